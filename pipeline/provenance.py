"""What every stage records about where its artifact came from."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from importlib.metadata import version
from pathlib import Path
from typing import Any

import pipeline
from pipeline.config import Config

MODEL_INFO = "etpo_model.json"  # written by bootstrap beside the base weights


def config_hash(config: Config) -> str:
    return hashlib.sha256(json.dumps(dataclasses.asdict(config), sort_keys=True).encode()).hexdigest()[:16]


def model_id(base_dir: str | Path) -> str:
    """The id bootstrap (or warmstart) recorded beside the weights; the folder if none was."""
    info = Path(base_dir) / MODEL_INFO
    return json.loads(info.read_text())["model_id"] if info.exists() else str(base_dir)


def artifact_metadata(config: Config, base_dir: str | Path) -> dict[str, Any]:
    """Model id, tokenizer hash, params hash, code and package versions, the resolved config."""
    base_dir = Path(base_dir)
    tokenizer = base_dir / "tokenizer.json"
    tokenizer_hash = hashlib.sha256(tokenizer.read_bytes()).hexdigest()[:16] if tokenizer.exists() else ""
    return {
        "model_id": model_id(base_dir),
        "tokenizer_hash": tokenizer_hash,
        "params_hash": config_hash(config),
        "code_version": pipeline.__version__,
        "packages": {p: version(p) for p in ("torch", "transformers", "peft", "scikit-learn")},
        "config": dataclasses.asdict(config),
    }
