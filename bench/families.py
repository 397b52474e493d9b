"""What the policy writes: the estimator each body builds, per stage, and how often it runs.

    python bench/families.py [EXP ...]          # every experiment by default (names: dvc exp list)

Per experiment and stage (the behaviour samples of iterations 1..K, eval@0, eval@K), the most
common estimators (the last `...Classifier(` / `...Regression(` / ... a body calls), each with its
share of the bodies and the share of those that ran. A run whose eval reward collapses shows here
as what it collapsed to: one estimator taking over (mode collapse), invented names (drift), or
no estimator at all (text that is no longer code). Files are read from each experiment's commit
through the DVC cache (`dvc.api.open`), so nothing is checked out.
"""

from __future__ import annotations

import argparse
import io
import subprocess

import dvc.api
import polars as pl
import yaml

ESTIMATOR = r"([A-Z]\w*(?:Classifier|Regression|Regressor|NB|SVC|Analysis|Boost))\s*\("
SAMPLES = {"eval": "data/iterations/{k}/eval/samples.parquet", "train": "data/iterations/{k}/targets.parquet"}


def experiments() -> dict[str, str]:
    """{name: commit} of every experiment in this repository (DVC keeps them as git refs/exps/)."""
    refs = subprocess.run(
        ["git", "for-each-ref", "--format=%(refname) %(objectname)", "refs/exps"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split("\n")
    found: dict[str, str] = {}
    for ref, rev in (line.split() for line in refs if line):
        parts = ref.split("/")  # refs/exps/<baseline sha in two parts>/<name>; others are DVC's own
        if len(parts) != 5 or parts[2] in ("exec", "celery"):
            continue
        name = parts[4] if parts[4] not in found else f"{parts[4]}@{parts[2]}{parts[3][:5]}"
        found[name] = rev
    return found


def read(path: str, rev: str) -> pl.DataFrame:
    with dvc.api.open(path, rev=rev, mode="rb") as f:
        return pl.read_parquet(io.BytesIO(f.read()))


def families(frame: pl.DataFrame, top: int) -> str:
    """'Name share (ran share), ...' for the `top` most common estimators of these bodies."""
    named = frame.with_columns(
        estimator=pl.col("completion").str.extract_all(ESTIMATOR).list.last().str.strip_chars_end("( ")
    ).with_columns(pl.col("estimator").fill_null("(none)"))
    counts = named.group_by("estimator").agg(n=pl.len(), ran=(pl.col("status") == "ok").mean())
    counts = counts.sort(["n", "estimator"], descending=[True, False]).head(top)
    return ", ".join(
        f"{r['estimator']} {r['n'] / frame.height:.0%} ({r['ran']:.0%})" for r in counts.iter_rows(named=True)
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("names", nargs="*", help="experiments (default: all)")
    parser.add_argument("--top", type=int, default=3, help="estimators shown per stage")
    args = parser.parse_args()
    found = experiments()
    missing = [n for n in args.names if n not in found]
    if missing:
        raise SystemExit(f"families.py: no experiment named {', '.join(missing)} (see `dvc exp list`)")
    print("| run | stage | bodies | ran | estimators: share of bodies (share of those that ran) |")
    print("|---|---|---|---|---|")
    for name in args.names or sorted(found):
        rev = found[name]
        params = yaml.safe_load(dvc.api.read("params.yaml", rev=rev))
        iterations = sorted(int(k) for k in params["iterations"])
        stages = [  # each iteration's own actions, not the ones ETPO replays
            (f"sample@{k}", read(SAMPLES["train"].format(k=f"{k:03d}"), rev).filter(pl.col("iteration") == k))
            for k in iterations
        ]
        stages += [
            (f"eval@{k}", read(SAMPLES["eval"].format(k=f"{k:03d}"), rev)) for k in (0, iterations[-1])
        ]
        for stage, frame in stages:
            ran = (frame["status"] == "ok").mean()
            print(f"| {name} | {stage} | {frame.height} | {ran:.0%} | {families(frame, args.top)} |")


if __name__ == "__main__":
    main()
