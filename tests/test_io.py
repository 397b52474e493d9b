import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.io import (
    SCHEMAS,
    TrajectoryError,
    read_trajectories,
    trajectory_metadata,
    write_atomic,
    write_trajectories,
)


def row(**changes):
    base = {
        "iteration": 1,
        "episode_id": "001-iris-000",
        "step": 0,
        "task": "iris",
        "sample": 0,
        "state": "def build_model(...):\n    <FILL_ME>\n",
        "prompt": "def build_model(...):\n",
        "completion": "    model = 1",
        "prompt_ids": [1, 2, 3],
        "completion_ids": [4, 5],
        "behaviour_logprobs": [-0.5, -1.25],
        "truncated": False,
        "status": "error",
        "reward": -1.0,
        "score_std": 0.0,
        "error": "NameError",
        "exec_seconds": 0.01,
        "done": False,
        "next_state": "next",
    }
    return {**base, **changes}


def test_round_trip_keeps_types_values_and_metadata(tmp_path):
    path = tmp_path / "t.parquet"
    rows = [row(), row(episode_id="001-iris-001", status="ok", reward=0.97, done=True, next_state="")]
    write_trajectories(path, rows, "executed", {"model_id": "preset:tiny", "params_hash": "abc"})
    table = read_trajectories(path, "executed")
    assert table.schema.remove_metadata() == SCHEMAS["executed"]
    assert table.column("status").type == pa.dictionary(pa.int32(), pa.string())
    back = table.to_pylist()
    assert back[1]["reward"] == pytest.approx(0.97) and back[0]["behaviour_logprobs"] == [-0.5, -1.25]
    assert trajectory_metadata(table)["model_id"] == "preset:tiny"
    assert pl.read_parquet(path).height == 2  # polars reads every file directly
    assert pq.ParquetFile(path).metadata.row_group(0).column(0).compression == "ZSTD"
    # a later stage's reader accepts an earlier stage's columns only if they are all there
    assert read_trajectories(path, "sampled").num_rows == 2
    with pytest.raises(TrajectoryError, match="column 'q_target' is missing"):
        read_trajectories(path, "targets")


def test_corrupt_file_is_a_clear_error(tmp_path):
    path = tmp_path / "bad.parquet"
    path.write_bytes(b"PAR1 this is not parquet")
    with pytest.raises(TrajectoryError, match=r"bad\.parquet: not a readable Parquet file"):
        read_trajectories(path, "sampled")


def test_short_list_column_is_refused_on_write_and_read(tmp_path):
    bad = row(behaviour_logprobs=[-0.5])
    with pytest.raises(TrajectoryError, match="'behaviour_logprobs' is not as long as completion_ids"):
        write_trajectories(tmp_path / "w.parquet", [bad], "executed", {})
    assert not list(tmp_path.iterdir())  # nothing half-written
    path = tmp_path / "r.parquet"
    pq.write_table(pa.Table.from_pylist([bad], schema=SCHEMAS["executed"]), path)
    with pytest.raises(TrajectoryError, match=r"r\.parquet: column 'behaviour_logprobs'"):
        read_trajectories(path, "executed")


def test_wrong_column_type_names_the_column(tmp_path):
    path = tmp_path / "typed.parquet"
    table = pa.Table.from_pylist([row()], schema=SCHEMAS["executed"])
    table = table.set_column(table.schema.get_field_index("reward"), "reward", pa.array(["high"]))
    pq.write_table(table, path)
    with pytest.raises(TrajectoryError, match="column 'reward' is string, expected float"):
        read_trajectories(path, "executed")


def test_atomic_write_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "out.txt"
    target.write_text("old")

    def explode(tmp):
        tmp.write_text("half")
        raise RuntimeError("crash")

    with pytest.raises(RuntimeError):
        write_atomic(target, explode)
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["out.txt"]
