"""ceiling: per task, the best score of a fixed grid of standard scikit-learn models.

The grid is the warm-start grammar thinned to 33 bodies (every other value of each
hyperparameter, a StandardScaler where the estimator needs one): bodies the policy could write.
They run in the same executor, with the same cache, as the policy's, so "fraction of the
ceiling" compares like with like. Results say how much of the reachable score RL has found.
"""

from __future__ import annotations

from pathlib import Path

from rich.progress import Progress

from pipeline.config import Config
from pipeline.io import write_json
from pipeline.sandbox.executor import Executor
from pipeline.tasks.bodies import grid_bodies
from pipeline.tasks.datasets import load_task
from pipeline.tasks.prompts import program, state_source


def run(config: Config, tasks_dir: Path, out: Path, cache_dir: Path | None = None) -> dict[str, dict]:
    """Write {task: {score, body, grid_size}} to `out` (JSON); returns it."""
    bodies = grid_bodies()
    jobs = []
    for name in config.tasks.all_names:
        task = load_task(tasks_dir, name)
        state = state_source(task.description, task.x.shape)
        jobs += [(name, program(state, body)) for body in bodies]
    with Executor(tasks_dir, config.executor, cache_dir) as executor, Progress() as progress:
        bar = progress.add_task("ceiling", total=len(jobs))
        results = executor.run_many(jobs, on_done=lambda _: progress.advance(bar))
    ceiling: dict[str, dict] = {}
    for (name, _), body, result in zip(jobs, bodies * len(config.tasks.all_names), results, strict=True):
        if result.status == "ok" and result.reward > ceiling.get(name, {}).get("score", -1.0):
            ceiling[name] = {"score": result.reward, "body": body, "grid_size": len(bodies)}
    write_json(out, ceiling)
    return ceiling
