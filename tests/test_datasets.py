import json

import numpy as np
import polars as pl
import pytest
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.config import CustomTask
from pipeline.tasks.bundled import credit_g, parse_attribute_file
from pipeline.tasks.datasets import (
    DatasetError,
    balance_scale,
    build_tasks,
    encode,
    load_task,
    save_tasks,
    tic_tac_toe,
)
from tests.conftest import REPO, set_params


def test_balance_scale_follows_its_rule():
    frame = balance_scale()
    assert frame.height == 625
    counts = dict(frame["target"].value_counts().iter_rows())
    assert counts == {"L": 288, "R": 288, "B": 49}
    for lw, ld, rw, rd, label in frame.iter_rows():
        expected = "L" if lw * ld > rw * rd else "R" if lw * ld < rw * rd else "B"
        assert label == expected


def test_tic_tac_toe_endgames():
    frame = tic_tac_toe()
    assert frame.height == 958
    assert (frame["target"] == "positive").sum() == 626
    boards = frame.drop("target").to_numpy()
    xs, os_ = (boards == 1).sum(axis=1), (boards == -1).sum(axis=1)
    assert np.all((xs == os_) | (xs == os_ + 1))  # x moves first, turns alternate


@pytest.mark.parametrize(
    ("task", "rows", "features", "class_counts"),
    [
        ("credit-g", 1000, 20, [300, 700]),  # bad, good
        ("diabetes", 768, 8, [500, 268]),  # negative, positive
        ("cmc", 1473, 9, [629, 333, 511]),
        ("pc1", 1109, 21, [1032, 77]),
        ("breast-w", 683, 9, [444, 239]),  # OpenML's 699 less 16 rows with a missing value
    ],
)
def test_the_papers_datasets_prepare_offline(task, rows, features, class_counts):
    (prepared,) = build_tasks([task], [])
    assert prepared.x.shape == (rows, features)
    assert np.bincount(prepared.y).tolist() == class_counts
    assert np.isfinite(prepared.x).all()


def test_credit_g_has_13_coded_features():
    frame = credit_g()
    coded = [c for c in frame.columns if c != "target" and frame[c].dtype == pl.String]
    assert len(coded) == 13 and frame["checking_status"][0] == "A11"


def test_attribute_file_errors_name_the_line():
    text = "@relation r\n@attribute a real\n@attribute class {x,y}\n@data\n1,x\n2\n"
    with pytest.raises(DatasetError, match=r"bad.dat:6: 1 values, expected 2"):
        parse_attribute_file(text, "bad.dat")


def test_prepare_writes_tables_and_index(tmp_path):
    save_tasks(build_tasks(["iris", "balance-scale"], []), tmp_path)
    index = json.loads((tmp_path / "index.json").read_text())
    assert index["iris"]["rows"] == 150 and index["iris"]["classes"] == 3
    assert index["balance-scale"]["features"] == 4
    task = load_task(tmp_path, "balance-scale")
    assert task.x.shape == (625, 4) and set(task.y.tolist()) == {0, 1, 2}
    assert pl.read_parquet(tmp_path / "iris.parquet").height == 150


def test_categorical_features_are_ordinal_in_sorted_order():
    frame = pl.DataFrame(
        {"colour": ["red", "blue", "green", "blue"], "n": [1, 2, 3, 4], "target": ["yes", "no", "yes", "no"]}
    )
    task = encode("t", "T", frame)
    assert task.x[:, 0].tolist() == [2.0, 0.0, 1.0, 0.0]
    assert task.classes == ["no", "yes"] and task.y.tolist() == [1, 0, 1, 0]


def custom(tmp_path, frame: pl.DataFrame | None, target="label", name="mine"):
    path = tmp_path / f"{name}.csv"
    if frame is not None:
        frame.write_csv(path)
    return CustomTask(name=name, path=str(path), target=target, description="Mine")


@pytest.mark.parametrize(
    ("frame", "target", "message"),
    [
        (None, "label", "does not exist"),
        (pl.DataFrame({"a": [1, 2], "label": [0, 1]}), "y", "no target column 'y'"),
        (pl.DataFrame({"a": [1, 2, 3], "label": [1, 1, 1]}), "label", "only one class"),
        (pl.DataFrame({"a": [], "label": []}, schema={"a": pl.Int64, "label": pl.Int64}), "label", "empty"),
        (pl.DataFrame({"a": [1.0, None, 2.0, 3.0], "label": [0, 1, 0, 1]}), "label", "missing values"),
    ],
)
def test_bad_custom_data_names_the_task(tmp_path, frame, target, message):
    with pytest.raises(DatasetError) as info:
        build_tasks([], [custom(tmp_path, frame, target)])
    assert str(info.value).startswith("task mine:") and message in str(info.value)


def test_custom_parquet_task(tmp_path):
    frame = pl.DataFrame({"a": [1.0, 2.0, 3.0, 4.0], "label": ["x", "y", "x", "y"]})
    frame.write_parquet(tmp_path / "d.parquet")
    (task,) = build_tasks([], [CustomTask("d", str(tmp_path / "d.parquet"), "label", "D")])
    assert task.x.shape == (4, 1) and task.classes == ["x", "y"]


def test_prepare_cli_reports_bad_dataset(tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text((REPO / "params.yaml").read_text())
    custom = [{"name": "c", "path": "missing.csv", "target": "t", "description": "C"}]
    set_params(params, {"tasks.names": [], "tasks.custom": custom})
    result = CliRunner().invoke(app, ["prepare", "--params", str(params), "--out", str(tmp_path)])
    assert result.exit_code == 2
    assert result.output.strip() == "error: task c: data file missing.csv does not exist"
