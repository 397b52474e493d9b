"""targets@k: per-token targets and diagnostics for every executed action of iteration k
(ETPO's soft Bellman targets, or a baseline's advantages: `pipeline.algorithms`), plus, for ETPO
with `etpo.replay_iterations` M > 1, the actions of iterations k-M+1 .. k-1 from targets@(k-1),
their targets recomputed under the current networks (soft Q-learning learns off-policy)."""

from __future__ import annotations

from pathlib import Path

from rich.progress import Progress

from pipeline.algorithms import compute_targets, replayed_iterations
from pipeline.config import Config
from pipeline.io import read_trajectories, trajectory_metadata, write_trajectories
from pipeline.models.adapters import load_model


def run(
    config: Config,
    iteration: int,
    executed: Path,
    base_dir: Path,
    out: Path,
    adapters: Path | None = None,
    previous: Path | None = None,
) -> list[dict]:
    table = read_trajectories(executed, "executed")
    rows = table.to_pylist()
    oldest = iteration - replayed_iterations(config) + 1
    if previous is not None and oldest < iteration:
        older = read_trajectories(previous, "targets").to_pylist()
        rows = [r for r in older if r["iteration"] >= oldest] + rows
    model, tokenizer = load_model(config, base_dir, adapters)
    model.eval()
    with Progress() as progress:
        bar = progress.add_task(f"targets ({config.algo})", total=len(rows))
        rows = compute_targets(config, model, tokenizer, rows, lambda: progress.advance(bar))
    write_trajectories(out, rows, "targets", trajectory_metadata(table))
    return rows
