"""bootstrap: the base model in Hugging Face format under data/models/base/."""

from __future__ import annotations

from pathlib import Path

from pipeline.config import Config
from pipeline.io import write_json
from pipeline.models.base import materialise, save_base
from pipeline.provenance import MODEL_INFO


def run(config: Config, out: Path) -> str:
    # warmstart.seed, not seed: every RL seed starts from the same model (the tiny preset's weights
    # are drawn from it), so eval@0 is shared by all runs of one params file.
    model, tokenizer, model_id = materialise(config.model, config.warmstart.seed)
    save_base(model, tokenizer, out)
    write_json(
        out / MODEL_INFO, {"model_id": model_id, "parameters": sum(p.numel() for p in model.parameters())}
    )
    return model_id
