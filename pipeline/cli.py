"""The `etpo` command: one subcommand per pipeline stage, plus helpers for people.

Every expected failure (bad params, bad data, a missing file) ends as one line on stderr and
exit code 2; a traceback means a bug in this package.
"""

from __future__ import annotations

import json
import sys
import textwrap
from collections.abc import Callable
from functools import wraps
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from pipeline.config import ConfigError, load_config
from pipeline.errors import ArtifactError, DatasetError, ModelError
from pipeline.io import TrajectoryError

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__)

EXEC_CACHE = Path(".cache/etpo/exec")  # results of executed programs, shared by every stage

ParamsOption = Annotated[Path, typer.Option("--params", help="The params file to read.")]
WarmBaseOption = Annotated[Path, typer.Option("--base", help="The (warm-started) base model.")]
PrevAdaptersOption = Annotated[Optional[Path], typer.Option("--adapters", help="Adapters of iteration k-1.")]  # noqa: UP045


class UsageError(Exception):
    """A user-facing problem (missing input, bad argument) reported in one line."""


def fail(message: str) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(2)


def friendly(command: Callable[..., Any]) -> Callable[..., Any]:
    """Turn the errors a user can cause into one line and exit code 2."""

    @wraps(command)
    def run(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except (ArtifactError, ConfigError, DatasetError, ModelError, TrajectoryError, UsageError) as e:
            fail(str(e))

    return run


@app.command()
@friendly
def prepare(
    out: Annotated[Path, typer.Option(help="Where the task tables go.")],
    params: ParamsOption = Path("params.yaml"),
) -> None:
    """Build the task datasets (offline) into OUT/<task>.parquet and OUT/index.json."""
    from pipeline.tasks.datasets import build_tasks, save_tasks

    config = load_config(params)
    tasks = build_tasks(config.tasks.names, config.tasks.custom)
    save_tasks(tasks, out)
    for task in tasks:
        s = task.summary()
        typer.echo(f"{task.name}: {s['rows']} rows, {s['features']} features, {s['classes']} classes")


def _as_body(text: str) -> str:
    """Accept a body written flush left or already indented into the function."""
    text = textwrap.dedent(text.expandtabs(4)).strip("\n")
    return textwrap.indent(text, "    ")


@app.command("try")
@friendly
def try_body(
    task: Annotated[str, typer.Option(help="A prepared task, e.g. balance-scale.")],
    file: Annotated[str, typer.Argument(help="A file with the body of build_model; - for stdin.")],
    tasks_dir: Annotated[Path, typer.Option(help="Prepared tasks.")],
    params: ParamsOption = Path("params.yaml"),
) -> None:
    """Score one body of build_model in the sandbox; print one JSON object."""
    from pipeline.sandbox.executor import Executor
    from pipeline.tasks.datasets import load_task
    from pipeline.tasks.prompts import program, state_source

    config = load_config(params)
    if file == "-":
        text = sys.stdin.read()
    elif Path(file).is_file():
        text = Path(file).read_text()
    else:
        raise UsageError(f"{file}: no such file")
    loaded = load_task(tasks_dir, task)
    source = program(state_source(loaded.description, loaded.x.shape), _as_body(text))
    with Executor(tasks_dir, config.executor, EXEC_CACHE) as executor:
        result = executor.run(task, source)
    typer.echo(
        json.dumps(
            {
                "status": result.status,
                "reward": result.reward,
                "score_std": result.score_std,
                "seconds": round(result.seconds, 4),
                "error": result.error,
            }
        )
    )


@app.command()
@friendly
def bootstrap(
    out: Annotated[Path, typer.Option(help="Where the base model goes.")],
    params: ParamsOption = Path("params.yaml"),
) -> None:
    """Materialise the base model (embedded SmolLM2, a local path, or the tiny preset) as safetensors."""
    from pipeline.stages import bootstrap as stage

    model_id = stage.run(load_config(params), out)
    typer.echo(f"bootstrap: {model_id} -> {out}")


@app.command()
@friendly
def warmstart(
    base: Annotated[Path, typer.Option(help="The base model directory.")],
    out: Annotated[Path, typer.Option(help="Where the warm-started model goes.")],
    params: ParamsOption = Path("params.yaml"),
) -> None:
    """Supervised LoRA warm start on synthetic bodies, merged into a new base (0 steps: a link)."""
    from pipeline.stages import warmstart as stage

    info = stage.run(load_config(params), base, out)
    typer.echo(f"warmstart: {info['steps']} steps in {info['seconds']} s -> {out}")


@app.command()
@friendly
def sample(
    iteration: Annotated[int, typer.Option(min=1, help="The iteration k being sampled.")],
    out: Annotated[Path, typer.Option(help="The trajectories file to write.")],
    tasks_dir: Annotated[Path, typer.Option(help="Prepared tasks.")],
    base: Annotated[Path, typer.Option(help="The base model directory.")],
    adapters: PrevAdaptersOption = None,
    previous: Annotated[Optional[Path], typer.Option(help="Executed trajectories of k-1.")] = None,  # noqa: UP045
    params: ParamsOption = Path("params.yaml"),
) -> None:
    """Sample one action for every open state (fresh episodes + unfinished ones of k-1)."""
    from pipeline.stages import sample as stage

    count = stage.run(load_config(params), iteration, tasks_dir, base, out, adapters, previous)
    typer.echo(f"sample@{iteration}: {count} actions -> {out}")


@app.command()
@friendly
def execute(
    trajectories: Annotated[Path, typer.Argument(help="Sampled trajectories.")],
    out: Annotated[Path, typer.Option(help="The executed trajectories file to write.")],
    tasks_dir: Annotated[Path, typer.Option(help="Prepared tasks.")],
    params: ParamsOption = Path("params.yaml"),
) -> None:
    """Score every sampled body in the sandbox; add rewards, statuses and next states."""
    from pipeline.stages import execute as stage

    config = load_config(params)
    rows = stage.run(config, trajectories, tasks_dir, out, EXEC_CACHE)
    ok = sum(r["status"] == "ok" for r in rows)
    typer.echo(f"execute: {ok}/{len(rows)} ran -> {out}")


@app.command()
@friendly
def ceiling(
    out: Annotated[Path, typer.Option(help="The JSON file to write.")],
    tasks_dir: Annotated[Path, typer.Option(help="Prepared tasks.")],
    params: ParamsOption = Path("params.yaml"),
) -> None:
    """Best score per task of a fixed grid of 33 scikit-learn bodies (the reachable ceiling)."""
    from pipeline.stages import ceiling as stage

    config = load_config(params)
    best = stage.run(config, tasks_dir, out, EXEC_CACHE)
    for task, entry in best.items():
        typer.echo(f"{task}: {entry['score']:.4f}  {entry['body'].splitlines()[-3].strip()}")


@app.command()
@friendly
def init(
    adapters: Annotated[Path, typer.Option(help="Where the fresh adapters go.")],
    executed: Annotated[Path, typer.Option(help="The (empty) executed trajectories of iteration 000.")],
    targets: Annotated[Path, typer.Option(help="The (empty) targets of iteration 000.")],
    metrics: Annotated[Path, typer.Option(help="The (empty) evaluate folder of iteration 000.")],
    base: WarmBaseOption,
    params: ParamsOption = Path("params.yaml"),
) -> None:
    """Iteration 000: fresh adapters, no open episodes, no metrics."""
    from pipeline.stages import init as stage

    stage.run(load_config(params), base, adapters, executed, targets, metrics)
    typer.echo(f"init: fresh adapters -> {adapters}")


@app.command()
@friendly
def targets(
    iteration: Annotated[int, typer.Option(min=1, help="The iteration k.")],
    executed: Annotated[Path, typer.Argument(help="Executed trajectories of iteration k.")],
    out: Annotated[Path, typer.Option(help="The trajectories-with-targets file to write.")],
    base: WarmBaseOption,
    adapters: PrevAdaptersOption = None,
    previous: Annotated[Optional[Path], typer.Option(help="Targets of k-1 (replayed by ETPO).")] = None,  # noqa: UP045
    params: ParamsOption = Path("params.yaml"),
) -> None:
    """Per-token soft Bellman targets and diagnostics (docs/design.md §1, §4)."""
    from pipeline.stages import targets as stage

    rows = stage.run(load_config(params), iteration, executed, base, out, adapters, previous)
    typer.echo(f"targets: {sum(len(r['completion_ids']) for r in rows)} tokens -> {out}")


@app.command()
@friendly
def train(
    iteration: Annotated[int, typer.Option(min=1, help="The iteration k.")],
    targets_file: Annotated[Path, typer.Argument(help="Trajectories with targets of iteration k.")],
    out: Annotated[Path, typer.Option(help="Where the adapters of iteration k go.")],
    logs: Annotated[Path, typer.Option(help="DVCLive folder for per-step training metrics.")],
    base: WarmBaseOption,
    adapters: PrevAdaptersOption = None,
    params: ParamsOption = Path("params.yaml"),
) -> None:
    """ETPO updates: critic (Huber to targets), policy (KL projection), Polyak target."""
    from pipeline.stages import train as stage

    steps = stage.run(load_config(params), iteration, targets_file, base, out, logs, adapters)
    typer.echo(f"train@{iteration}: {steps} steps -> {out}")


@app.command()
@friendly
def evaluate(
    targets_file: Annotated[Path, typer.Argument(help="Trajectories with targets of iteration k.")],
    adapters: Annotated[Path, typer.Option(help="Adapters of iteration k.")],
    out: Annotated[Path, typer.Option(help="DVCLive folder for the metrics.")],
    base: WarmBaseOption,
    previous: Annotated[Optional[Path], typer.Option(help="The evaluate --out of k-1.")] = None,  # noqa: UP045
    ceiling: Annotated[Optional[Path], typer.Option(help="ceiling.json, for fractions of it.")] = None,  # noqa: UP045
    params: ParamsOption = Path("params.yaml"),
) -> None:
    """Training-sample statistics by step, best so far per task, KL, perplexity; curves.png."""
    from pipeline.stages import evaluate as stage

    metrics = stage.run(load_config(params), targets_file, base, adapters, out, previous, ceiling)
    typer.echo(" ".join(f"{k}={v:.3f}" for k, v in metrics.items()))


@app.command("eval")
@friendly
def eval_policy(
    iteration: Annotated[int, typer.Option(min=0, help="k: the policy after train@k (0: the warm start).")],
    out: Annotated[Path, typer.Option(help="The folder for samples, rewards and metrics.")],
    tasks_dir: Annotated[Path, typer.Option(help="Prepared tasks.")],
    base: Annotated[Path, typer.Option(help="The warm-started base model.")],
    adapters: Annotated[Optional[Path], typer.Option(help="Adapters of iteration k; none at k = 0.")] = None,  # noqa: UP045
    ceiling: Annotated[Optional[Path], typer.Option(help="ceiling.json, for fractions of it.")] = None,  # noqa: UP045
    params: ParamsOption = Path("params.yaml"),
) -> None:
    """Fresh states only, eval.samples_per_task bodies per task, paired across runs; 95% intervals."""
    from pipeline.stages import policy_eval as stage

    if (adapters is None) != (iteration == 0):
        raise UsageError("eval: --adapters is required for k >= 1 and must be left out at k = 0")
    config = load_config(params)
    metrics = stage.run(config, iteration, tasks_dir, base, out, adapters, ceiling, EXEC_CACHE)
    shown = ("mean/reward", "mean/reward_lo", "mean/reward_hi", "mean/success", "kl_ref")
    typer.echo(f"eval@{iteration}: " + " ".join(f"{k}={metrics[k]:.3f}" for k in shown))


@app.command()
@friendly
def report(
    iterations: Annotated[Path, typer.Option(help="The iterations folder (eval@k in NNN/eval).")],
    out: Annotated[Path, typer.Option(help="The folder for summary.json, eval_history.json, curves.png.")],
) -> None:
    """The run in a few numbers: eval@0 and eval@K with intervals, the paired gain, KL, steps."""
    from pipeline.stages import report as stage

    s = stage.run(iterations, out)
    typer.echo(
        f"eval@0 {s['eval_0']:.3f} [{s['eval_0_lo']:.3f}, {s['eval_0_hi']:.3f}]  "
        f"eval@{s['iterations']} {s['eval_K']:.3f} [{s['eval_K_lo']:.3f}, {s['eval_K_hi']:.3f}]  "
        f"gain {s['gain']:+.3f} [{s['gain_lo']:+.3f}, {s['gain_hi']:+.3f}]  env steps {s['env_steps']:.0f}"
    )


@app.command()
@friendly
def inspect(
    file: Annotated[Path, typer.Argument(help="A trajectories Parquet file.")],
    rows: Annotated[int, typer.Option(help="How many rows to show.")] = 10,
) -> None:
    """Show a trajectory file as a table, with summary statistics."""
    import polars as pl
    from rich.console import Console
    from rich.table import Table

    from pipeline.io import SCHEMAS, read_trajectories, trajectory_metadata

    kind = next(k for k in ("targets", "executed", "sampled") if _has_columns(file, SCHEMAS[k].names))
    table = read_trajectories(file, kind)
    frame = pl.from_arrow(table).with_columns(tokens=pl.col("completion_ids").list.len())
    meta = trajectory_metadata(table)
    console = Console()
    console.print(f"[bold]{file}[/]  {frame.height} actions  stage: {kind}  model: {meta.get('model_id')}")
    columns = ("episode_id", "step", "task", "tokens", "truncated", "status", "reward")
    shown = [c for c in columns if c in frame.columns]
    view = Table(*shown, "completion")
    for row in frame.head(rows).iter_rows(named=True):
        first = next((line.strip() for line in row["completion"].splitlines() if line.strip()), "")
        cells = (f"{row[c]:.3f}" if isinstance(row[c], float) else str(row[c]) for c in shown)
        view.add_row(*cells, first[:60])
    console.print(view)
    by = ["task"]
    stats = [pl.len().alias("actions"), pl.col("tokens").mean().alias("mean tokens")]
    if "reward" in frame.columns:
        stats += [
            (pl.col("status") == "ok").mean().alias("ran"),
            pl.col("reward").mean().alias("mean reward"),
            pl.col("reward").max().alias("best"),
        ]
    console.print(frame.group_by(by).agg(stats).sort(by))


@app.command()
@friendly
def credit(
    file: Annotated[Path, typer.Argument(help="A targets Parquet file (targets@k).")],
    base: Annotated[Path, typer.Option(help="The model whose tokenizer wrote the actions.")],
    rows: Annotated[int, typer.Option(min=1, help="How many actions to show.")] = 4,
    task: Annotated[Optional[str], typer.Option(help="Only this task's actions.")] = None,  # noqa: UP045
    png: Annotated[Optional[Path], typer.Option(help="Also draw them into this PNG.")] = None,  # noqa: UP045
) -> None:
    """Actions with every token coloured by its advantage (ETPO: Q(w_j) - V_j, or y_j - V_j) and its KL."""
    import polars as pl
    from transformers import AutoTokenizer

    from pipeline.credit import credited_actions, draw_png, print_terminal
    from pipeline.io import read_trajectories

    frame = pl.from_arrow(read_trajectories(file, "targets"))
    frame = frame.sort("iteration", descending=True, maintain_order=True)  # k's own before replayed ones
    if task is not None:
        frame = frame.filter(pl.col("task") == task)
    if frame.is_empty():
        raise UsageError(f"{file}: no actions{f' of task {task}' if task else ''}")
    if not (base / "tokenizer.json").exists() and not (base / "tokenizer_config.json").exists():
        raise UsageError(f"{base}: no tokenizer here (pass the model folder, e.g. data/models/warm)")
    actions = credited_actions(frame.head(rows).to_dicts(), AutoTokenizer.from_pretrained(base))
    print_terminal(actions)
    if png is not None:
        draw_png(actions, png)
        typer.echo(f"credit: {len(actions)} actions -> {png}")


@app.command()
@friendly
def summary(
    iterations: Annotated[Path, typer.Option(help="The iterations folder.")],
) -> None:
    """Per iteration: mean reward, success rate, and the best reward found so far per task."""
    import polars as pl

    from pipeline.io import read_trajectories

    files = sorted(iterations.glob("*/executed.parquet"))
    if not files:
        raise UsageError(f"{iterations}: no executed iterations yet (run dvc repro)")
    frame = pl.concat(
        [pl.from_arrow(read_trajectories(f, "executed")) for f in files], how="diagonal_relaxed"
    )
    first_try = pl.col("step") == 0  # fresh states: comparable across iterations
    per_iteration = (
        frame.group_by("iteration")
        .agg(
            first_try_success=(pl.col("status") == "ok").filter(first_try).mean(),
            first_try_reward=pl.col("reward").filter(first_try).mean(),
            actions=pl.len(),
            success_rate=(pl.col("status") == "ok").mean(),
            mean_reward=pl.col("reward").mean(),
        )
        .sort("iteration")
    )
    best = (
        frame.group_by("iteration", "task")
        .agg(pl.col("reward").max())
        .sort("iteration")
        .with_columns(pl.col("reward").cum_max().over("task").alias("best so far"))
    )
    with pl.Config(tbl_rows=100, tbl_hide_dataframe_shape=True, float_precision=3):
        typer.echo(per_iteration)
        typer.echo(best.pivot(on="task", index="iteration", values="best so far"))


def _has_columns(file: Path, names: list[str]) -> bool:
    import pyarrow.parquet as pq

    if not file.exists():
        raise TrajectoryError(f"{file}: no such trajectory file")
    try:
        present = set(pq.read_schema(file).names)
    except Exception as e:
        raise TrajectoryError(f"{file}: not a readable Parquet file ({str(e).splitlines()[0]})") from None
    return set(names) <= present


if __name__ == "__main__":
    app()
