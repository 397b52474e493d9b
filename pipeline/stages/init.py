"""init: iteration 000, so every iteration k >= 1 has the same inputs (adapters, episodes, metrics of k-1).

Fresh adapters (LoRA B = 0: policy = reference, residual Q = 0), no open episodes, no actions to
replay; of the metrics only the reference's perplexity, which no iteration changes, so evaluate
carries it instead of measuring it again each iteration.
"""

from __future__ import annotations

from pathlib import Path

import torch

from pipeline.config import Config
from pipeline.io import METRICS, atomic_dir, write_json, write_trajectories
from pipeline.models.adapters import attach_adapters, save_adapters
from pipeline.models.base import load_base
from pipeline.models.perplexity import held_out_corpus, perplexity
from pipeline.provenance import artifact_metadata


def run(config: Config, base_dir: Path, adapters: Path, executed: Path, targets: Path, metrics: Path) -> None:
    model, tokenizer = load_base(base_dir, config.model.device, config.model.precision)
    torch.manual_seed(config.seed)  # LoRA A matrices are random; make them reproducible
    model = attach_adapters(model, config.lora)
    with atomic_dir(adapters) as tmp:
        save_adapters(model, tmp)
    write_trajectories(executed, [], "executed", artifact_metadata(config, base_dir))
    write_trajectories(targets, [], "targets", artifact_metadata(config, base_dir))  # nothing to replay
    model.eval()
    reference_ppl = perplexity(model, tokenizer, held_out_corpus()[0], None)
    write_json(metrics / METRICS, {"perplexity": {"reference": reference_ppl}})
