"""`model.device: cuda`: one whole iteration of each training algorithm through the CLI, in bf16.

Skipped where there is no GPU; `bench/RESULTS.md` records the run on one. The numerics of bf16
against fp32 are bounded in tests/test_precision.py; here the point is that every stage runs on
the device (no tensor left on the CPU, no dtype mismatch) and writes what the next one reads.
"""

import json
import math

import pytest
import torch

from pipeline.io import read_trajectories
from tests.conftest import invoke, set_params

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")


@pytest.mark.parametrize("algo", ["etpo", "ppo", "grpo"])
def test_one_iteration_on_cuda_in_bf16(algo, params, tasks_dir, tiny_base, tmp_path):
    set_params(
        params,
        {
            "algo": algo,
            "tasks.names": ["iris", "balance-scale"],
            "model.device": "cuda",
            "model.precision": "bf16",
            "eval.samples_per_task": 2,
        },
    )
    it0, it1 = tmp_path / "000", tmp_path / "001"
    common = ["--base", tiny_base, "--params", params]
    invoke(
        "init", "--adapters", it0 / "adapters", "--executed", it0 / "e.parquet",
        "--targets", it0 / "t.parquet", "--metrics", it0 / "metrics", *common,
    )  # fmt: skip
    torch.cuda.reset_peak_memory_stats()
    invoke(
        "sample", "--iteration", 1, "--tasks-dir", tasks_dir, "--adapters", it0 / "adapters",
        "--previous", it0 / "e.parquet", "--out", it1 / "s.parquet", *common,
    )  # fmt: skip
    assert torch.cuda.max_memory_allocated() > 0  # the model ran on the GPU
    invoke(
        "execute", it1 / "s.parquet", "--tasks-dir", tasks_dir, "--out", it1 / "e.parquet", "--params", params
    )
    invoke(
        "targets", "--iteration", 1, it1 / "e.parquet", "--adapters", it0 / "adapters",
        "--previous", it0 / "t.parquet", "--out", it1 / "t.parquet", *common,
    )  # fmt: skip
    rows = read_trajectories(it1 / "t.parquet", "targets").to_pylist()
    assert len(rows) == 4
    values = [v for r in rows for v in r["ref_logprob"]]
    assert values and all(math.isfinite(v) and v <= 0 for v in values)

    invoke(
        "train", "--iteration", 1, it1 / "t.parquet", "--adapters", it0 / "adapters",
        "--out", it1 / "adapters", "--logs", it1 / "train", *common,
    )  # fmt: skip
    logged = json.loads((it1 / "train" / "metrics.json").read_text())
    assert logged and all(math.isfinite(v) for v in _numbers(logged))
    invoke(
        "evaluate", it1 / "t.parquet", "--adapters", it1 / "adapters", "--previous", it0 / "metrics",
        "--out", it1 / "metrics", *common,
    )  # fmt: skip
    out = invoke(
        "eval", "--iteration", 1, "--tasks-dir", tasks_dir, "--adapters", it1 / "adapters",
        "--out", it1 / "eval", *common,
    )  # fmt: skip
    metrics = json.loads((it1 / "eval" / "metrics.json").read_text())
    assert metrics["kl_ref"] >= 0 and math.isfinite(metrics["kl_ref"]), out
    if algo == "etpo":  # the baselines may stand still: every tiny-model body fails, so no advantage
        assert metrics["kl_ref"] > 0, out


def _numbers(tree: dict) -> list[float]:
    """Every number in a DVCLive metrics file (nested by metric path)."""
    found = []
    for value in tree.values():
        if isinstance(value, dict):
            found += _numbers(value)
        elif isinstance(value, int | float):
            found.append(float(value))
    return found
