"""train@k: ETPO updates of the policy, critic and target adapters on iteration k's targets."""

from __future__ import annotations

from pathlib import Path

from dvclive import Live

from pipeline.config import Config
from pipeline.etpo.train import train_etpo
from pipeline.io import atomic_dir, read_trajectories
from pipeline.models.adapters import save_adapters
from pipeline.models.generate import stream_seed
from pipeline.stages.targets import load_model


def run(
    config: Config,
    iteration: int,
    targets: Path,
    base_dir: Path,
    out: Path,
    logs: Path,
    adapters: Path | None = None,
) -> int:
    rows = read_trajectories(targets, "targets").to_pylist()
    model, tokenizer = load_model(config, base_dir, adapters, trainable=True)
    with Live(dir=str(logs), dvcyaml=None, save_dvc_exp=False) as live:

        def log(metrics: dict[str, float]) -> None:
            for name, value in metrics.items():
                live.log_metric(name, value)
            live.next_step()

        steps = train_etpo(
            model,
            rows,
            tokenizer.pad_token_id,
            config.etpo,
            config.train,
            stream_seed(config.seed, iteration, "train"),
            log,
        )
    with atomic_dir(out) as tmp:
        save_adapters(model, tmp)
    return steps
