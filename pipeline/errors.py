"""User-facing errors that live in heavy modules, importable without importing torch."""


class ModelError(ValueError):
    """A missing or unusable model: the message says which and why."""


class ArtifactError(ValueError):
    """A corrupt artifact of an earlier stage: the message names the file."""


class DatasetError(ValueError):
    """Bad task data: the message names the task (or file) and the problem."""
