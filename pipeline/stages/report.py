"""report: one run in a few numbers, for `dvc exp show` and for bench/compare.py.

Reads every eval@k (`<iterations>/NNN/eval/`) and the last evaluate@K, and writes
- `summary.json` (a DVC metrics file): eval@0 and eval@K mean reward and success rate over tasks
  and per task with 95% intervals; the gain eval@K - eval@0, paired sample by sample (both evals
  use the same random numbers); KL(pi_K || rho) per token on eval@K's samples; the relative
  change of perplexity on held-out text; and the environment steps taken;
- `eval_history.json` (a DVC plot) and `curves.png`: the eval metrics per iteration with their
  intervals;
- `best_history.json` (a DVC plot): the paper's metric, the best reward explored so far per task
  against the environment steps taken (from evaluate@K's history of training samples).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pipeline.errors import ArtifactError
from pipeline.io import EVAL_REWARDS, METRICS, read_json, write_atomic, write_json
from pipeline.stats import bootstrap_mean

SUMMARY, HISTORY, BEST, CURVES = "summary.json", "eval_history.json", "best_history.json", "curves.png"


def rewards_array(rewards: dict[str, list[float]], tasks: list[str]) -> np.ndarray:
    """(1, tasks, samples): one run's eval rewards in the layout of `pipeline.stats`."""
    return np.array([rewards[t] for t in tasks], dtype=np.float64)[None]


def summarise(evals: dict[int, dict[str, list[float]]], last_eval: dict, last_evaluate: dict) -> dict:
    """The run-level numbers from the per-sample rewards of every eval and the last metrics."""
    first, last = min(evals), max(evals)
    tasks = list(evals[first])
    r0, rk = rewards_array(evals[first], tasks), rewards_array(evals[last], tasks)
    summary: dict = {"iterations": last, "env_steps": last_evaluate.get("env_steps", 0.0)}
    for name, r in (("eval_0", r0), ("eval_K", rk)):
        summary |= bootstrap_mean(r).as_dict(name)
        summary[f"success_{name[-1]}"] = float((r > -1.0).mean())
    summary |= bootstrap_mean(rk - r0).as_dict("gain")
    summary["kl_ref"] = last_eval.get("kl_ref", 0.0)
    ppl = last_evaluate.get("perplexity", {})
    if ppl:
        summary["perplexity_change"] = ppl["policy"] / ppl["reference"] - 1.0
    summary["task"] = {
        t: {
            **bootstrap_mean(r0[:, i : i + 1]).as_dict("eval_0"),
            **bootstrap_mean(rk[:, i : i + 1]).as_dict("eval_K"),
            **bootstrap_mean(rk[:, i : i + 1] - r0[:, i : i + 1]).as_dict("gain"),
        }
        for i, t in enumerate(tasks)
    }
    return summary


def history(eval_metrics: dict[int, dict]) -> list[dict[str, float]]:
    """One point per eval: mean reward and success over tasks with intervals, and per task."""
    rows = []
    for k, m in sorted(eval_metrics.items()):
        row = {"iteration": k}
        for name in ("reward", "success"):
            row |= {f"{name}{s}": m["mean"][f"{name}{s}"] for s in ("", "_lo", "_hi")}
        row |= {f"reward_{t}": v["reward"] for t, v in m.items() if isinstance(v, dict) and t != "mean"}
        rows.append(row)
    return rows


def draw_curves(rows: list[dict[str, float]], out: Path) -> None:
    """Eval mean reward and success rate per iteration with 95% bands, and each task's reward."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = [r["iteration"] for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.4), constrained_layout=True)
    for ax, name in zip(axes[:2], ("reward", "success"), strict=True):
        ax.plot(x, [r[name] for r in rows], marker="o")
        ax.fill_between(x, [r[f"{name}_lo"] for r in rows], [r[f"{name}_hi"] for r in rows], alpha=0.25)
        ax.set_title(f"eval mean {name} (95% interval)")
    for key in (k for k in rows[0] if k.startswith("reward_") and k not in ("reward_lo", "reward_hi")):
        axes[2].plot(x, [r[key] for r in rows], marker=".", label=key.removeprefix("reward_"))
    axes[2].set_title("eval mean reward per task")
    axes[2].legend(fontsize=7)
    for ax in axes:
        ax.set_xlabel("iteration (0: warm start)")
        ax.set_xticks(x)
        ax.grid(alpha=0.3)
    write_atomic(out, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    plt.close(fig)


def run(iterations: Path, out: Path) -> dict:
    evals = {int(d.parent.parent.name): d for d in sorted(iterations.glob(f"*/eval/{METRICS}"))}
    if 0 not in evals or len(evals) < 2:
        raise ArtifactError(
            f"{iterations}: report needs eval@0 and at least one later eval (found {sorted(evals)})"
        )
    last = max(evals)
    rewards = {k: read_json(p.parent / EVAL_REWARDS, None) for k, p in evals.items()}
    if any(r is None for r in rewards.values()):
        raise ArtifactError(f"{iterations}: an eval folder lacks {EVAL_REWARDS}")
    metrics = {k: read_json(p, {}) for k, p in evals.items()}
    evaluated = iterations / f"{last:03d}" / "metrics"
    last_evaluate = read_json(evaluated / METRICS, {})
    best = [
        {k: v for k, v in row.items() if k == "env_steps" or k.startswith("best_")}
        for row in read_json(evaluated / "history.json", [])
    ]
    summary = summarise(rewards, metrics[last], last_evaluate)
    rows = history(metrics)
    write_json(out / SUMMARY, summary)
    write_json(out / HISTORY, rows)
    write_json(out / BEST, best)
    draw_curves(rows, out / CURVES)
    return summary
