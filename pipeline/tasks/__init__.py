"""Task datasets, prompt templates and episode logic of the code-generation environment."""
