"""User-facing errors that live in heavy modules, importable without importing torch."""


class ModelError(ValueError):
    """A missing or unusable model: the message says which and why."""
