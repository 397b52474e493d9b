"""etpo-pipeline: entropy-regularised token-level policy optimisation for code generation."""

__version__ = "0.1.0"
