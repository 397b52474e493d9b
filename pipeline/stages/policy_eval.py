"""eval@k: the policy after train@k, on fresh states only: the numbers runs are compared on.

k = 0 is the warm start itself (no adapters): every run of one params file shares it. Every eval
draws `eval.samples_per_task` bodies per task with random numbers that depend on neither `seed`
nor `algo` nor k (common random numbers), so two runs' evals differ only through their policies
and are compared sample by sample. Bodies are scored by the same executor (and cache) as training
samples. Unlike evaluate@k, which describes the behaviour policy of k-1 on a mix of fresh and
reflection states, this describes the policy of k on one fixed distribution of states.

Outputs: `samples.parquet` (every body, its status, reward and KL to the reference),
`rewards.json` ({task: [reward per sample]}, small and git-tracked, for paired comparisons
across experiments) and `metrics.json` (per task and over tasks, with 95% bootstrap intervals).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl
import torch
from dvclive import Live
from rich.progress import Progress

from pipeline.config import Config
from pipeline.io import EVAL_REWARDS, EVAL_SAMPLES, read_json, write_atomic, write_json
from pipeline.models.adapters import load_model
from pipeline.models.generate import load_sampler, sample, stream_seed
from pipeline.models.logits import ACTIONS_PER_PASS, ActionBatch, action_logits
from pipeline.models.tokens import kl_to_reference
from pipeline.sandbox.executor import Executor
from pipeline.stats import bootstrap_mean
from pipeline.tasks.datasets import load_task
from pipeline.tasks.prompts import program, render, state_source


@torch.no_grad()
def mean_kl_to_reference(
    model, actions: list[tuple[list[int], list[int]]], chunk: int = ACTIONS_PER_PASS
) -> list[float]:
    """Per (prompt ids, completion ids): the mean over its tokens of KL(pi || rho) over the whole
    vocabulary, 0 for an empty completion. Actions go `chunk` at a time (each chunk's logits are
    chunk x T x V floats), sharing the prompts they have in common."""
    kept = [i for i, (_, completion) in enumerate(actions) if completion]
    kls = [0.0] * len(actions)
    for start in range(0, len(kept), chunk):
        rows = kept[start : start + chunk]
        batch = ActionBatch.build([actions[i][0] for i in rows], [actions[i][1] for i in rows])
        batch = batch.to(model.device)
        log_pi = action_logits(model, batch, "policy").float().log_softmax(-1)
        log_rho = action_logits(model, batch, None).float().log_softmax(-1)
        per_token = kl_to_reference(log_pi, log_rho) * batch.mask
        for i, kl in zip(rows, (per_token.sum(1) / batch.mask.sum(1)).tolist(), strict=True):
            kls[i] = kl
    return kls


def eval_metrics(rewards: dict[str, list[float]], ceiling: dict[str, dict]) -> dict[str, float]:
    """Mean reward, success rate and fraction of the ceiling, per task and over tasks, with intervals."""
    metrics: dict[str, float] = {}
    tasks = list(rewards)
    reward = np.array([rewards[t] for t in tasks])  # (tasks, samples)
    success = (reward > -1.0).astype(np.float64)
    scale = np.array([ceiling.get(t, {}).get("score", np.nan) for t in tasks])[:, None]
    for i, task in enumerate(tasks):
        metrics |= bootstrap_mean(reward[None, i : i + 1]).as_dict(f"{task}/reward")
        metrics |= bootstrap_mean(success[None, i : i + 1]).as_dict(f"{task}/success")
        if np.isfinite(scale[i, 0]):
            metrics |= bootstrap_mean(reward[None, i : i + 1] / scale[i]).as_dict(f"{task}/ceiling_fraction")
    metrics |= bootstrap_mean(reward[None]).as_dict("mean/reward")
    metrics |= bootstrap_mean(success[None]).as_dict("mean/success")
    if np.isfinite(scale).all():
        metrics |= bootstrap_mean((reward / scale)[None]).as_dict("mean/ceiling_fraction")
    return metrics


def run(
    config: Config,
    iteration: int,
    tasks_dir: Path,
    base_dir: Path,
    out: Path,
    adapters: Path | None,
    ceiling: Path | None,
    cache_dir: Path | None,
) -> dict[str, float]:
    """Sample, score and summarise; write the three outputs into `out`; return the metrics."""
    tasks = [load_task(tasks_dir, name) for name in config.tasks.all_names]
    model, tokenizer, fim = load_sampler(config, base_dir, adapters)
    states = [
        state_source(t.description, t.x.shape) for t in tasks for _ in range(config.eval.samples_per_task)
    ]
    names = [t.name for t in tasks for _ in range(config.eval.samples_per_task)]
    with Progress() as progress:
        bar = progress.add_task(f"eval@{iteration}", total=len(states))
        completions = sample(
            model,
            tokenizer,
            [render(s, fim) for s in states],
            config.sampling,
            stream_seed(config.eval.seed, "eval"),  # not seed, algo or k: paired across runs
            lambda n, *_: progress.update(bar, advance=n),
        )
    with Executor(tasks_dir, config.executor, cache_dir) as executor:
        results = executor.run_many(
            [(n, program(s, c.body)) for n, s, c in zip(names, states, completions, strict=True)]
        )
    actions = [(c.prompt_ids, c.completion_ids) for c in completions]
    kl = [0.0] * len(actions)
    if adapters is not None:  # the sampler has its policy merged: KL needs policy and reference
        del model
        kl = mean_kl_to_reference(load_model(config, base_dir, adapters)[0].eval(), actions)
    frame = pl.DataFrame(
        {
            "iteration": [iteration] * len(states),
            "task": names,
            "sample": [i % config.eval.samples_per_task for i in range(len(states))],
            "completion": [c.body for c in completions],
            "tokens": [len(c.completion_ids) for c in completions],
            "status": [r.status for r in results],
            "reward": [r.reward for r in results],
            "kl_ref": kl,
        }
    )
    rewards = {t.name: frame.filter(pl.col("task") == t.name)["reward"].to_list() for t in tasks}
    metrics = eval_metrics(rewards, read_json(ceiling, {}))
    tokens = frame["tokens"].sum()
    metrics["kl_ref"] = float((frame["kl_ref"] * frame["tokens"]).sum() / tokens) if tokens else 0.0
    write_atomic(out / EVAL_SAMPLES, lambda tmp: frame.write_parquet(tmp, compression="zstd"))
    write_json(out / EVAL_REWARDS, rewards)
    with Live(dir=str(out), dvcyaml=None, save_dvc_exp=False) as live:
        for name, value in metrics.items():
            live.log_metric(name, value, plot=False)
    return metrics
