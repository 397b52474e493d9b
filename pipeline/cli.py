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
from typing import Annotated, Any

import typer

from pipeline.config import ConfigError, load_config
from pipeline.tasks.datasets import DatasetError

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__)

EXEC_CACHE = Path(".cache/etpo/exec")  # results of executed programs, shared by every stage

ParamsOption = Annotated[Path, typer.Option("--params", help="The params file to read.")]


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
        except (ConfigError, DatasetError, UsageError) as e:
            fail(str(e))

    return run


@app.command()
@friendly
def prepare(
    out: Annotated[Path, typer.Option(help="Where the task tables go.")] = Path("data/tasks"),
    params: ParamsOption = Path("params.yaml"),
) -> None:
    """Build the task datasets (offline) into OUT/<task>.parquet and OUT/index.json."""
    from pipeline.tasks.datasets import build_tasks, save_tasks

    config = load_config(params)
    tasks = build_tasks(config.tasks.names, config.tasks.custom)
    save_tasks(tasks, out)
    for task in tasks:
        s = task.summary()
        typer.echo(f"{task.name}: {s['rows']} rows, {s['features']} features, "
                   f"{s['classes']} classes")


def _as_body(text: str) -> str:
    """Accept a body written flush left or already indented into the function."""
    text = textwrap.dedent(text.expandtabs(4)).strip("\n")
    return textwrap.indent(text, "    ")


@app.command("try")
@friendly
def try_body(
    task: Annotated[str, typer.Option(help="A prepared task, e.g. balance-scale.")],
    file: Annotated[str, typer.Argument(help="A file with the body of build_model; - for stdin.")],
    tasks_dir: Annotated[Path, typer.Option(help="Prepared tasks.")] = Path("data/tasks"),
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
    typer.echo(json.dumps({"status": result.status, "reward": result.reward,
                           "score_std": result.score_std, "seconds": round(result.seconds, 4),
                           "error": result.error}))


if __name__ == "__main__":
    app()
