"""Shared fixtures: prepared tasks and a warm executor (session-scoped: workers are processes)."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.config import ExecutorConfig
from pipeline.sandbox.executor import Executor
from pipeline.tasks.datasets import build_tasks, save_tasks

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def tasks_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("tasks")
    save_tasks(build_tasks(["balance-scale", "iris", "tic-tac-toe"], []), out)
    return out


@pytest.fixture(scope="session")
def executor(tasks_dir: Path):
    with Executor(tasks_dir, ExecutorConfig(timeout_s=4.0, workers=2)) as ex:
        yield ex


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny preset, bootstrapped once: 2 layers, SmolLM2's tokenizer."""
    from pipeline.config import Config, ModelConfig
    from pipeline.stages import bootstrap

    out = tmp_path_factory.mktemp("models") / "base"
    bootstrap.run(Config(model=ModelConfig(preset="tiny")), out)
    return out


@pytest.fixture
def params(tmp_path: Path) -> Path:
    """params.yaml on the tiny preset, with short bodies and 2 samples per state."""
    text = (REPO / "params.yaml").read_text()
    for old, new in [
        ("preset: smollm2", "preset: tiny"),
        ("samples_per_state: 4", "samples_per_state: 2"),
        ("max_new_tokens: 160", "max_new_tokens: 24"),
    ]:
        text = text.replace(old, new)
    path = tmp_path / "params.yaml"
    path.write_text(text)
    return path


def invoke(*args: object) -> str:
    """Run the CLI in-process; fail the test with its output unless it exits 0."""
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return result.output
