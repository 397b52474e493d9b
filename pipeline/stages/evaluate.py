"""evaluate@k: reward statistics, best reward so far per task, episode length, KL, perplexity.

Perplexity is measured on real held-out code that nobody here wrote: a fixed list of modules of
the installed Python standard library, read at run time; their hashes go with the metric.
"""

from __future__ import annotations

import hashlib
import json
import math
import sysconfig
from pathlib import Path

import polars as pl
import torch
from dvclive import Live

from pipeline.config import Config
from pipeline.io import read_trajectories
from pipeline.stages.targets import load_model

HELD_OUT_MODULES = ("textwrap.py", "heapq.py", "bisect.py", "json/decoder.py")
HELD_OUT_TOKENS = 512  # per module: enough for a stable estimate, cheap on a CPU


def held_out_corpus() -> tuple[list[str], dict[str, str]]:
    """The modules' texts and their sha256 (so a changed Python is visible in the metrics)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    texts = [(root / m).read_text() for m in HELD_OUT_MODULES]
    hashes = {
        m: hashlib.sha256(t.encode()).hexdigest()[:16] for m, t in zip(HELD_OUT_MODULES, texts, strict=True)
    }
    return texts, hashes


@torch.no_grad()
def perplexity(model, tokenizer, texts: list[str], adapter: str | None) -> float:
    """exp(mean token NLL) over the first HELD_OUT_TOKENS tokens of each text."""
    nll, count = 0.0, 0
    for text in texts:
        ids = torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"][:HELD_OUT_TOKENS]])
        if adapter is None:
            with model.disable_adapter():
                loss = model(input_ids=ids, labels=ids).loss
        else:
            model.set_adapter(adapter)
            loss = model(input_ids=ids, labels=ids).loss
        nll += loss.item() * (ids.shape[1] - 1)
        count += ids.shape[1] - 1
    return math.exp(nll / count)


def reward_metrics(targets: pl.DataFrame, previous_best: dict[str, float]) -> dict[str, float]:
    metrics = {
        "reward/mean": targets["reward"].mean(),
        "reward/success_rate": (targets["status"] == "ok").mean(),
        "reward/failure_rate": (targets["status"] != "ok").mean(),
        "policy/kl_ref": targets["kl_ref"].explode().mean(),
        "policy/entropy": targets["entropy"].explode().mean(),
    }
    first = targets.filter(pl.col("step") == 0)  # fresh states only: comparable across iterations
    if first.height:
        metrics["first_try/mean_reward"] = first["reward"].mean()
        metrics["first_try/success_rate"] = (first["status"] == "ok").mean()
    ended = targets.filter(pl.col("done"))
    if ended.height:
        metrics["episode/mean_length"] = (ended["step"] + 1).mean()
    for task, best in targets.group_by("task").agg(pl.col("reward").max()).iter_rows():
        metrics[f"best/{task}"] = max(best, previous_best.get(task, -1.0))
    return {k: float(v) for k, v in metrics.items()}


def run(
    config: Config,
    targets: Path,
    base_dir: Path,
    adapters: Path,
    out: Path,
    previous_metrics: Path | None = None,
) -> dict[str, float]:
    frame = pl.from_arrow(read_trajectories(targets, "targets"))
    previous = (
        json.loads(previous_metrics.read_text()) if previous_metrics and previous_metrics.exists() else {}
    )
    metrics = reward_metrics(frame, previous.get("best", {}))  # DVCLive nests "best/<task>"
    model, tokenizer = load_model(config, base_dir, adapters)
    model.eval()
    texts, hashes = held_out_corpus()
    metrics["perplexity/policy"] = perplexity(model, tokenizer, texts, "policy")
    metrics["perplexity/reference"] = perplexity(model, tokenizer, texts, None)
    with Live(dir=str(out), dvcyaml=None, save_dvc_exp=False) as live:
        for name, value in metrics.items():
            live.log_metric(name, value, plot=False)
        live.log_params({"held_out_sha256": hashes})
    return metrics
