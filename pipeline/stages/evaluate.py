"""evaluate@k: statistics of iteration k's training samples, best reward so far, KL, perplexity.

Read what these describe: the samples of iteration k were drawn by the adapters of k-1 (the
behaviour policy), on fresh states and on reflection states whose number depends on earlier
failures. So reward statistics are split by step index (`step0` = first tries, `step1` = first
reflections, ...), and the policy after train@k is judged by eval@k (`policy_eval.py`), not here.
Perplexity, in contrast, is measured with the adapters of k.

Also carried from iteration to iteration: the best body found so far per task (`best_bodies.json`)
and the per-iteration history (`history.json`, a DVC plot), drawn as `curves.png` (DVC's HTML
plots load vega from a CDN that offline users cannot reach).

Perplexity is measured on real held-out code (`pipeline.models.perplexity`); the reference's, which
never changes within a run, is measured once by init and carried from iteration to iteration.
"""

from __future__ import annotations

from pathlib import Path

import polars as pl
from dvclive import Live

from pipeline.config import Config
from pipeline.io import METRICS, read_json, read_trajectories, write_atomic, write_json
from pipeline.models.adapters import load_model
from pipeline.models.perplexity import held_out_corpus, perplexity

# the files of an evaluate folder besides DVCLive's METRICS; iteration k reads k-1's
HISTORY, BEST_BODIES, CURVES = "history.json", "best_bodies.json", "curves.png"


def best_bodies(targets: pl.DataFrame, previous: dict[str, dict]) -> dict[str, dict]:
    """The best-scoring body per task so far: {task: {reward, body, iteration}}."""
    best = dict(previous)
    ran = targets.filter(pl.col("status") == "ok").sort("reward", descending=True)
    for row in ran.unique("task", keep="first", maintain_order=True).iter_rows(named=True):
        if row["reward"] > best.get(row["task"], {}).get("reward", -1.0):
            best[row["task"]] = {
                "reward": row["reward"],
                "body": row["completion"],
                "iteration": row["iteration"],
            }
    return best


def history_row(iteration: int, metrics: dict[str, float]) -> dict[str, float]:
    """One point per iteration of the curves users compare across experiments."""
    best = [v for k, v in metrics.items() if k.startswith("best/")]
    row = {
        "iteration": iteration,
        "env_steps": metrics["env_steps"],
        **{k.replace("/", "_"): v for k, v in metrics.items() if k.startswith("best/")},
        "mean_reward": metrics["reward/mean"],
        "best_reward": sum(best) / len(best),
        "failure_rate": metrics["reward/failure_rate"],
    }
    if "ceiling_fraction/mean" in metrics:
        row["best_fraction_of_ceiling"] = metrics["ceiling_fraction/mean"]
    return row


def draw_curves(history: list[dict[str, float]], out: Path) -> None:
    """A static PNG of the history (matplotlib, no display needed), written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = ["mean_reward", "best_reward", "failure_rate"]
    fig, axes = plt.subplots(1, len(names), figsize=(4 * len(names), 3), constrained_layout=True)
    x = [h["iteration"] for h in history]
    for ax, name in zip(axes, names, strict=True):
        ax.plot(x, [h[name] for h in history], marker="o")
        ax.set_title(name.replace("_", " "))
        ax.set_xlabel("iteration")
        ax.set_xticks(x)
        ax.grid(alpha=0.3)
    write_atomic(out, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    plt.close(fig)


def ceiling_fractions(best: dict[str, float], ceiling: dict[str, dict]) -> dict[str, float]:
    """best / ceiling per task that has both, and their mean under "mean" (a failed task counts 0)."""
    fractions = {
        task: max(score, 0.0) / ceiling[task]["score"] for task, score in best.items() if task in ceiling
    }
    if fractions:
        fractions["mean"] = sum(fractions.values()) / len(fractions)
    return fractions


def reward_metrics(
    targets: pl.DataFrame, previous_best: dict[str, float], previous_steps: float = 0.0
) -> dict[str, float]:
    metrics = {
        "reward/mean": targets["reward"].mean(),
        "reward/success_rate": (targets["status"] == "ok").mean(),
        "reward/failure_rate": (targets["status"] != "ok").mean(),
        "policy/kl_ref": targets["kl_ref"].explode().mean(),
        "policy/entropy": targets["entropy"].explode().mean(),
    }
    for step, group in sorted(targets.group_by("step"), key=lambda g: g[0][0]):
        metrics[f"step{step[0]}/actions"] = group.height
        metrics[f"step{step[0]}/mean_reward"] = group["reward"].mean()
        metrics[f"step{step[0]}/success_rate"] = (group["status"] == "ok").mean()
    metrics["env_steps"] = previous_steps + targets.height  # actions executed in iterations 1..k
    for task, best in targets.group_by("task").agg(pl.col("reward").max()).iter_rows():
        metrics[f"best/{task}"] = max(best, previous_best.get(task, -1.0))
    return {k: float(v) for k, v in metrics.items()}


def run(
    config: Config,
    targets: Path,
    base_dir: Path,
    adapters: Path,
    out: Path,
    previous_dir: Path | None = None,
    ceiling: Path | None = None,
) -> dict[str, float]:
    frame = pl.from_arrow(read_trajectories(targets, "targets"))
    iteration = int(frame["iteration"].max()) if frame.height else 0
    frame = frame.filter(pl.col("iteration") == iteration)  # not the actions ETPO replays
    previous = read_json(previous_dir / METRICS if previous_dir else None, {})
    metrics = reward_metrics(frame, previous.get("best", {}), previous.get("env_steps", 0.0))  # nested
    if ceiling:
        best = {k.removeprefix("best/"): v for k, v in metrics.items() if k.startswith("best/")}
        fractions = ceiling_fractions(best, read_json(ceiling, {}))
        metrics |= {f"ceiling_fraction/{k}": v for k, v in fractions.items()}
    model, tokenizer = load_model(config, base_dir, adapters)
    model.eval()
    texts, hashes = held_out_corpus()
    metrics["perplexity/policy"] = perplexity(model, tokenizer, texts, "policy")
    reference = previous.get("perplexity", {}).get("reference")  # init's, carried along
    if reference is None:  # no k-1 folder given (a stage run by hand)
        reference = perplexity(model, tokenizer, texts, None)
    metrics["perplexity/reference"] = reference
    history = read_json(previous_dir / HISTORY if previous_dir else None, []) + [
        history_row(iteration, metrics)
    ]
    bodies = best_bodies(frame, read_json(previous_dir / BEST_BODIES if previous_dir else None, {}))
    with Live(dir=str(out), dvcyaml=None, save_dvc_exp=False) as live:
        for name, value in metrics.items():
            live.log_metric(name, value, plot=False)
        live.log_params({"held_out_sha256": hashes})
    write_json(out / HISTORY, history)
    write_json(out / BEST_BODIES, bodies)
    draw_curves(history, out / CURVES)
    return metrics
