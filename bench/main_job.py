"""Where the main job's time goes: `dvc repro` from a fresh clone, wall time per stage.

    python bench/main_job.py [REV ...] [--set KEY=VALUE ...] [--set-in REV KEY=VALUE ...]

For each git revision (default HEAD), clones this repository at REV into a temporary folder, runs
`dvc repro` there with this interpreter's environment (its `etpo` imports the clone's `pipeline`:
PYTHONPATH points at the clone) and times each stage from DVC's "Running stage" lines. Several
revisions run one after another in one sitting, so their ratios share the machine's state.
`--set` overrides params.yaml keys in every clone (e.g. `--set sampling.batch_size=16`), `--set-in
REV KEY=VALUE` in REV's clone only (to run an old algorithm's settings on new code, say);
`--keep DIR` makes the clones in DIR/REV and keeps them (their dvc.lock and outputs).
Prints one markdown table: a row per stage, a column per revision, and the total.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
STAGE = re.compile(r"Running stage '([^']+)'")


# `etpo` for any revision's tree (on PYTHONPATH): `pipeline.__main__` (tcmalloc first) where it has
# one, else `pipeline.cli` (revisions before 2026-12-04). This venv's own `etpo` imports the former.
ENTRY = (
    'import sys\nsys.argv[0] = "etpo"\n'
    "try:\n    from pipeline.__main__ import main\n"
    "except ImportError:\n    from pipeline.cli import app as main\n"
    "main()"
)


def etpo_command(folder: Path) -> Path:
    """Write an `etpo` executable to `folder` that runs the CLI of the tree PYTHONPATH points at."""
    script = folder / "etpo"
    script.write_text(f"#!/bin/sh\nexec '{sys.executable}' -c '{ENTRY}' \"$@\"\n")
    script.chmod(0o755)
    return script


def set_params(path: Path, changes: list[str]) -> None:
    params = yaml.safe_load(path.read_text())
    for change in changes:
        key, value = change.split("=", 1)
        *parents, leaf = key.split(".")
        node = params
        for part in parents:
            node = node[part]
        node[leaf] = yaml.safe_load(value)
    path.write_text(yaml.safe_dump(params, sort_keys=False))


def profile(rev: str, changes: list[str], log: Path, keep: Path | None) -> dict[str, float]:
    """{stage: seconds} of one `dvc repro` of `rev` from scratch; the full output goes to `log`."""
    with tempfile.TemporaryDirectory() as tmp:
        clone = keep / rev if keep else Path(tmp) / "repo"
        subprocess.run(["git", "clone", "-q", "--shared", str(REPO), str(clone)], check=True)
        subprocess.run(["git", "-C", str(clone), "checkout", "-q", rev], check=True)
        if changes:
            set_params(clone / "params.yaml", changes)
        path = f"{etpo_command(Path(tmp)).parent}:{os.environ['PATH']}"  # dvc.yaml's `etpo`, any revision
        # unbuffered: DVC's lines as they come
        env = {**os.environ, "PATH": path, "PYTHONPATH": str(clone), "PYTHONUNBUFFERED": "1"}
        times: dict[str, float] = {}
        current, began = None, time.perf_counter()
        with log.open("w") as out:
            proc = subprocess.Popen(
                [str(Path(sys.executable).parent / "dvc"), "repro"],
                cwd=clone, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            )  # fmt: skip
            for line in proc.stdout:
                out.write(line)
                if match := STAGE.search(line):
                    now = time.perf_counter()
                    if current:
                        times[current] = now - began
                    current, began = match.group(1), now
            if proc.wait() != 0:
                raise SystemExit(f"dvc repro of {rev} failed: see {log}")
        if current:
            times[current] = time.perf_counter() - began
        return times


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("revs", nargs="*", default=["HEAD"])
    parser.add_argument("--set", dest="changes", action="append", default=[])
    parser.add_argument("--set-in", dest="changes_in", nargs=2, action="append", default=[])
    parser.add_argument("--keep", type=Path)
    args = parser.parse_args()
    results = {}
    for rev in args.revs:
        log = Path(tempfile.gettempdir()) / f"profile-{rev}.log"
        changes = args.changes + [change for only, change in args.changes_in if only == rev]
        results[rev] = profile(rev, changes, log, args.keep)
        print(f"{rev}: {sum(results[rev].values()):.0f} s", file=sys.stderr, flush=True)
    stages = list(dict.fromkeys(s for times in results.values() for s in times))
    print("| stage | " + " | ".join(args.revs) + " |")
    print("|---" * (len(args.revs) + 1) + "|")
    for stage in stages:
        print(f"| {stage} | " + " | ".join(f"{results[r].get(stage, 0):.0f} s" for r in args.revs) + " |")
    totals = [sum(results[r].values()) for r in args.revs]
    print("| **total** | " + " | ".join(f"**{t / 60:.1f} min**" for t in totals) + " |")


if __name__ == "__main__":
    main()
