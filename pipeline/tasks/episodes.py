"""Episodes of the environment: which states are open at an iteration, and what follows an action.

An episode starts from a task's fresh state. A successful body ends it; a failure opens a
reflection state (the failed body and its error) for the next iteration, up to `max_steps` tries.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pipeline.tasks.datasets import Task
from pipeline.tasks.prompts import state_source


@dataclass(frozen=True)
class OpenState:
    episode_id: str
    step: int
    task: str
    sample: int
    state: str  # Python source with the slot


def fresh_states(tasks: list[Task], iteration: int, samples_per_state: int) -> list[OpenState]:
    """Every task's first state, `samples_per_state` times: each sample starts its own episode."""
    return [
        OpenState(
            f"{iteration:03d}-{task.name}-{k:03d}",
            0,
            task.name,
            k,
            state_source(task.description, task.x.shape),
        )
        for task in tasks
        for k in range(samples_per_state)
    ]


def continuing_states(executed: list[dict[str, Any]]) -> list[OpenState]:
    """The states that follow the not-done actions of the previous iteration."""
    return [
        OpenState(row["episode_id"], row["step"] + 1, row["task"], row["sample"], row["next_state"])
        for row in executed
        if not row["done"]
    ]


def next_state(task: Task, row: dict[str, Any], max_steps: int, max_error_chars: int) -> tuple[bool, str]:
    """(done, next state source) after an executed action; the next state is '' when done."""
    done = row["status"] == "ok" or row["step"] + 1 >= max_steps
    if done:
        return True, ""
    error = f"[{row['status']}] {row['error']}"
    return False, state_source(
        task.description,
        task.x.shape,
        previous_body=row["completion"],
        error=error,
        max_error_chars=max_error_chars,
    )
