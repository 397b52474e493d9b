"""Artifacts on disk: atomic writes and the trajectory Parquet schema (docs/design.md §4).

Atomic: a reader never sees a half-written artifact, and a crash leaves none behind.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.errors import ArtifactError

METRICS = "metrics.json"  # DVCLive's metrics file in the folder it logs to (evaluate, eval, train)
# beside it in an eval@k folder (`etpo eval --out`), read back by `etpo report`; dvc.yaml lists them
EVAL_SAMPLES, EVAL_REWARDS = "samples.parquet", "rewards.json"


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it over `path` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    finally:
        tmp_path.unlink(missing_ok=True)


@contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield a fresh temporary folder beside `path`; it replaces `path` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        shutil.rmtree(path, ignore_errors=True)
        os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_atomic(path: str | Path, write: Callable[[Path], Any]) -> None:
    """Call `write(tmp_path)` and move the result to `path` atomically."""
    with atomic_path(path) as tmp:
        write(tmp)


def read_json(path: Path | None, default: Any) -> Any:
    """A JSON artifact, or `default` where there is none (e.g. before the first iteration)."""
    if path is None or not path.exists():
        return default
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ArtifactError(f"{path}: not valid JSON ({e})") from None


def write_json(path: str | Path, obj: Any) -> None:
    write_atomic(path, lambda tmp: tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n"))


# --- Trajectories: one row per action (docs/design.md §4) -------------------------------------------------

F32_LIST = pa.list_(pa.float32())
SAMPLED_FIELDS = [
    pa.field("iteration", pa.int32(), nullable=False),
    pa.field("episode_id", pa.string(), nullable=False),
    pa.field("step", pa.int32(), nullable=False),
    pa.field("task", pa.string(), nullable=False),
    pa.field("sample", pa.int32(), nullable=False),
    pa.field("state", pa.string(), nullable=False),  # the state's source with its <FILL_ME> slot
    pa.field("prompt", pa.string(), nullable=False),  # what the model saw
    pa.field("completion", pa.string(), nullable=False),
    pa.field("prompt_ids", pa.list_(pa.int32()), nullable=False),
    pa.field("completion_ids", pa.list_(pa.int32()), nullable=False),
    pa.field("behaviour_logprobs", F32_LIST, nullable=False),
    pa.field("truncated", pa.bool_(), nullable=False),
]
EXECUTED_FIELDS = SAMPLED_FIELDS + [
    pa.field("status", pa.dictionary(pa.int32(), pa.string()), nullable=False),
    pa.field("reward", pa.float32(), nullable=False),
    pa.field("score_std", pa.float32(), nullable=False),
    pa.field("error", pa.string(), nullable=False),
    pa.field("exec_seconds", pa.float32(), nullable=False),
    pa.field("done", pa.bool_(), nullable=False),
    pa.field("next_state", pa.string(), nullable=False),  # source of the next state; "" when done
]
# ETPO: q_target = soft Bellman target y_j, q_taken = Q(w_j), soft_value = V_j at the position of
# token j, advantage = the credit the policy is tilted by (y_j - V_j for `etpo.policy_target:
# return`, the default, which train reads; else Q(w_j) - V_j); ref_logit = z_rho(w_j) and
# ref_logprob = log rho(w_j), the reference's values at the taken tokens (the train stage reads
# them instead of running rho).
# The baselines fill the same columns (pipeline.baselines.targets).
TARGET_COLUMNS = (
    "q_target",
    "q_taken",
    "soft_value",
    "kl_ref",
    "entropy",
    "advantage",
    "ref_logit",
    "ref_logprob",
)
TARGET_FIELDS = (
    EXECUTED_FIELDS
    + [pa.field(name, F32_LIST, nullable=False) for name in TARGET_COLUMNS]
    + [pa.field("bootstrap_value", pa.float32(), nullable=False)]
)

SCHEMAS = {
    "sampled": pa.schema(SAMPLED_FIELDS),
    "executed": pa.schema(EXECUTED_FIELDS),
    "targets": pa.schema(TARGET_FIELDS),
}
PER_TOKEN = ("behaviour_logprobs", *TARGET_COLUMNS)
METADATA_KEY = b"etpo"


class TrajectoryError(ValueError):
    """A corrupt or mismatched trajectory file: the message names the file and the column."""


def write_trajectories(
    path: str | Path, rows: list[dict[str, Any]], kind: str, metadata: dict[str, Any]
) -> None:
    """Validate `rows` against the `kind` schema and write them atomically with zstd."""
    schema = SCHEMAS[kind].with_metadata({METADATA_KEY: json.dumps(metadata, sort_keys=True)})
    table = pa.Table.from_pylist(rows, schema=schema)
    _check_lengths(table, str(path))
    write_atomic(path, lambda tmp: pq.write_table(table, tmp, compression="zstd"))


def read_trajectories(path: str | Path, kind: str) -> pa.Table:
    """Read and validate a trajectory file written at stage `kind` (or a later one)."""
    path = Path(path)
    if not path.exists():
        raise TrajectoryError(f"{path}: no such trajectory file")
    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as e:
        raise TrajectoryError(f"{path}: not a readable Parquet file ({str(e).splitlines()[0]})") from None
    for expected in SCHEMAS[kind]:
        if expected.name not in table.schema.names:
            raise TrajectoryError(f"{path}: column {expected.name!r} is missing")
        actual = table.schema.field(expected.name).type
        if actual != expected.type:
            raise TrajectoryError(f"{path}: column {expected.name!r} is {actual}, expected {expected.type}")
    _check_lengths(table, str(path))
    return table


def trajectory_metadata(table: pa.Table) -> dict[str, Any]:
    raw = (table.schema.metadata or {}).get(METADATA_KEY)
    return json.loads(raw) if raw else {}


def _check_lengths(table: pa.Table, where: str) -> None:
    lengths = pc.list_value_length(table["completion_ids"])
    for name in PER_TOKEN:
        if name in table.schema.names:
            other = pc.list_value_length(table[name])
            if table.num_rows and not pc.all(pc.equal(lengths, other)).as_py():
                raise TrajectoryError(f"{where}: column {name!r} is not as long as completion_ids")
