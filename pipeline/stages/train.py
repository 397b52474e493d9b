"""train@k: the update of `algo` on iteration k's targets (`pipeline.algorithms`): ETPO's policy,
critic and target adapters, a baseline's, or none for best_of_n (its adapters pass through)."""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path

from dvclive import Live

from pipeline.algorithms import prepare_update, update_for
from pipeline.config import Config
from pipeline.io import atomic_dir, read_trajectories
from pipeline.models.adapters import load_model, save_adapters
from pipeline.models.base import resolve_device
from pipeline.models.generate import stream_seed
from pipeline.models.update import make_optimisers, save_optimisers, train_adapters
from pipeline.parallel import DataParallel


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
    parallel = DataParallel(resolve_device(config.model.device))
    model, tokenizer = load_model(config, base_dir, adapters, trainable=True)
    model.to(parallel.device)  # one device per process under a multi-process launch
    live = Live(dir=str(logs), dvcyaml=None, save_dvc_exp=False) if parallel.is_main else nullcontext()
    with live:

        def log(metrics: dict[str, float]) -> None:  # called on the main process only
            for name, value in metrics.items():
                live.log_metric(name, value)
            live.next_step()

        update = update_for(config)
        if update is not None:
            prepare_update(config, model)
            optimisers = make_optimisers(model, config.train, adapters)  # continued from k-1's
            seed = stream_seed(config.seed, iteration, "train")
            steps = train_adapters(model, rows, update, config.train, seed, log, parallel, optimisers)
        else:  # best_of_n samples from the same policy every iteration
            optimisers, steps = {}, 0
            if parallel.is_main:
                log({"train/actions": float(len(rows))})  # one point, so DVC finds the plots it expects
    if parallel.is_main:  # every process holds the same adapters
        with atomic_dir(out) as tmp:
            save_adapters(model, tmp)
            if optimisers:
                save_optimisers(optimisers, tmp)
    parallel.wait()
    return steps
