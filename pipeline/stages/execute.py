"""execute@k: run every sampled body in the sandbox -> rewards, statuses, next states."""

from __future__ import annotations

from pathlib import Path

from rich.progress import Progress

from pipeline.config import Config
from pipeline.io import read_trajectories, trajectory_metadata, write_trajectories
from pipeline.sandbox.executor import Executor
from pipeline.tasks.datasets import load_task
from pipeline.tasks.episodes import next_state
from pipeline.tasks.prompts import program


def run(config: Config, trajectories: Path, tasks_dir: Path, out: Path, cache_dir: Path | None) -> list[dict]:
    """Write `out` (the sampled rows plus execution columns); returns the rows."""
    table = read_trajectories(trajectories, "sampled")
    rows = table.to_pylist()
    tasks = {name: load_task(tasks_dir, name) for name in {r["task"] for r in rows}}
    jobs = [(r["task"], program(r["state"], r["completion"])) for r in rows]
    with Executor(tasks_dir, config.executor, cache_dir) as executor, Progress() as progress:
        bar = progress.add_task("execute", total=len(jobs))
        results = executor.run_many(jobs, on_done=lambda _: progress.advance(bar))
    for row, result in zip(rows, results, strict=True):
        row.update(
            status=result.status,
            reward=result.reward,
            score_std=result.score_std,
            error=result.error,  # the harness keeps its tail; the prompt bounds it again
            exec_seconds=result.seconds,
        )
        row["done"], row["next_state"] = next_state(
            tasks[row["task"]], row, config.prompt.max_steps, config.prompt.max_error_chars
        )
    write_trajectories(out, rows, "executed", trajectory_metadata(table))
    return rows
