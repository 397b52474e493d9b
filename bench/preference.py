"""Does an update prefer the bodies that run? A held-out test with a known answer.

    python bench/preference.py DATA ADAPTERS [ADAPTERS ...]

DATA is a run's folder (its `data/`: tasks, the warm start, eval@0's samples); each ADAPTERS is
an iteration's adapters folder (e.g. from `dvc get . data/iterations/001/adapters --rev EXP`).
eval@0's bodies are the warm start's fresh-state samples, scored by the executor, and no update
trained on them. For each body, delta = log pi(body) - log rho(body) (summed over its tokens,
the body re-tokenised from its text) under each policy. An update that learned what makes a body
run raises delta more for bodies that ran than for bodies that failed: the table gives the mean
delta of each group, the difference with a 95% bootstrap interval, and the same per failure kind.
A difference near 0 with a large |delta| is an update that moves the policy without preferring
what works; a negative one prefers what fails.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import polars as pl
import torch

from pipeline.baselines.targets import action_stats
from pipeline.config import load_config
from pipeline.models.adapters import load_model
from pipeline.stats import LEVEL, RESAMPLES
from pipeline.tasks.datasets import load_task
from pipeline.tasks.prompts import render, state_source

CHUNK = 16


@torch.no_grad()
def body_deltas(model, rows: list[dict]) -> np.ndarray:
    """log pi(body) - log rho(body) per row (prompt_ids, completion_ids): `action_stats`'s
    per-token log(pi / rho) of the taken tokens, summed, CHUNK actions per pass."""
    stats = [
        s for i in range(0, len(rows), CHUNK) for s in action_stats(model, rows[i : i + CHUNK], values=False)
    ]
    return np.array([sum(s["logratio"]) for s in stats])


def difference_interval(a: np.ndarray, b: np.ndarray, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of mean(a) - mean(b), the two groups resampled apart."""
    rng = np.random.default_rng(seed)
    draws = rng.choice(a, (RESAMPLES, len(a))).mean(1) - rng.choice(b, (RESAMPLES, len(b))).mean(1)
    lo, hi = np.quantile(draws, [(1 - LEVEL) / 2, (1 + LEVEL) / 2])
    return float(lo), float(hi)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("data", type=Path)
    parser.add_argument("adapters", type=Path, nargs="+")
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    args = parser.parse_args()
    config = load_config(args.params)
    bodies = pl.read_parquet(args.data / "iterations/000/eval/samples.parquet")
    tasks = {name: load_task(args.data / "tasks", name) for name in bodies["task"].unique()}
    ran = (bodies["status"] == "ok").to_numpy()
    print("| adapters | delta, bodies that ran | failed | ran - failed | syntax | run error |")
    print("|---|---|---|---|---|---|")
    rows = None  # the bodies' token ids: every adapters folder shares the warm start's tokenizer
    for folder in args.adapters:
        model, tokenizer = load_model(config, args.data / "models/warm", folder)
        if rows is None:
            rows = []
            for row in bodies.iter_rows(named=True):
                task = tasks[row["task"]]
                prompt = render(state_source(task.description, task.x.shape), None)
                ids = tokenizer([prompt, row["completion"]], add_special_tokens=False)["input_ids"]
                rows.append({"prompt_ids": ids[0], "completion_ids": ids[1]})
        delta = body_deltas(model.eval(), rows)
        ok, bad = delta[ran], delta[~ran]
        lo, hi = difference_interval(ok, bad)
        kind = {s: delta[(bodies["status"] == s).to_numpy()].mean() for s in ("syntax", "error")}
        print(
            f"| {folder} | {ok.mean():+.2f} ({len(ok)}) | {bad.mean():+.2f} ({len(bad)}) "
            f"| {ok.mean() - bad.mean():+.2f} [{lo:+.2f}, {hi:+.2f}] "
            f"| {kind['syntax']:+.2f} | {kind['error']:+.2f} |"
        )


if __name__ == "__main__":
    main()
