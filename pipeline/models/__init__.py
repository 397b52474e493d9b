"""Base model materialisation, LoRA adapters and generation."""
