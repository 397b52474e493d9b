"""One iteration's sample, targets and train stages of several revisions on the same inputs.

    python bench/stage_speed.py DATA_DIR K REV [REV ...] [--repeat 1] [--stages sample,targets,train]
                                [--keep DIR] [--set KEY=VALUE ...]

DATA_DIR is a finished run's `data/` folder (tasks, models/warm, iterations/K-1 and K). Each
revision's code (`git archive REV`, imported through PYTHONPATH by this interpreter's `etpo`) runs
`etpo sample` for iteration K from K-1's adapters and open episodes, `etpo targets` on K's executed
actions, and `etpo train` on K's targets, each with that revision's params.yaml (algo etpo) and
the same inputs, so the stage times compare code, not trajectories. `--set` changes a param in
every revision's params.yaml (e.g. `--set train.minibatch_size=16` for a run of 16 samples a
state). Revisions alternate within each repeat, so they share the machine's state. Prints a
markdown table of wall seconds and of each stage process's peak resident memory.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from main_job import etpo_command, set_params  # bench/, this script's folder

REPO = Path(__file__).resolve().parents[1]


def commands(data: Path, k: int, out: Path) -> dict[str, list[str]]:
    """Train reads the targets this revision's targets stage wrote, if it ran (the columns change
    between revisions), else the run's own."""
    it, prev = data / "iterations" / f"{k:03d}", data / "iterations" / f"{k - 1:03d}"
    targets = out / "t.parquet" if (out / "t.parquet").exists() else it / "targets.parquet"
    common = ["--base", str(data / "models" / "warm"), "--adapters", str(prev / "adapters")]
    return {
        "sample": ["sample", "--iteration", str(k), "--tasks-dir", str(data / "tasks"), *common,
                   "--previous", str(prev / "executed.parquet"), "--out", str(out / "s.parquet")],
        "targets": ["targets", "--iteration", str(k), str(it / "executed.parquet"), *common,
                    "--out", str(out / "t.parquet")],
        "train": ["train", "--iteration", str(k), str(targets), *common,
                  "--out", str(out / "adapters"), "--logs", str(out / "logs")],
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("data", type=Path)
    parser.add_argument("k", type=int)
    parser.add_argument("revs", nargs="+")
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--stages", default="sample,targets,train")
    parser.add_argument("--keep", type=Path, help="copy each revision's outputs to KEEP/REV")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()
    stages = args.stages.split(",")
    times: dict[tuple[str, str], list[float]] = {}
    peak_mb: dict[tuple[str, str], list[float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        etpo = str(etpo_command(Path(tmp)))  # each revision's own CLI
        trees = {}
        for rev in args.revs:
            trees[rev] = Path(tmp) / rev
            trees[rev].mkdir()
            archive = subprocess.run(
                ["git", "-C", str(REPO), "archive", rev], check=True, capture_output=True
            )
            subprocess.run(["tar", "-x", "-C", str(trees[rev])], input=archive.stdout, check=True)
            set_params(trees[rev] / "params.yaml", args.set)
        for _ in range(args.repeat):
            for rev, tree in trees.items():
                out = Path(tmp) / f"out-{rev}"
                env = {**os.environ, "PYTHONPATH": str(tree)}
                for stage in stages:
                    command = commands(args.data.resolve(), args.k, out)[stage]
                    params = ["--params", str(tree / "params.yaml")]
                    began = time.perf_counter()
                    with open(out.parent / f"{rev}-{stage}.log", "w") as log:
                        child = subprocess.Popen(
                            [etpo, *command, *params], cwd=tree, env=env, stdout=log, stderr=log
                        )
                        _, status, usage = os.wait4(child.pid, 0)  # this child's own peak memory
                    if status:
                        sys.exit(f"{rev} {stage} failed:\n" + Path(log.name).read_text()[-3000:])
                    times.setdefault((stage, rev), []).append(time.perf_counter() - began)
                    peak_mb.setdefault((stage, rev), []).append(usage.ru_maxrss / 1024)  # KiB on Linux
                    print(f"{rev} {stage}: {times[stage, rev][-1]:.1f} s", file=sys.stderr, flush=True)
        if args.keep:  # the last repeat's outputs, to compare what the revisions wrote
            for rev in args.revs:
                shutil.copytree(Path(tmp) / f"out-{rev}", args.keep / rev, dirs_exist_ok=True)
    print("| stage | " + " | ".join(args.revs) + " | ratio | peak RSS (MiB) |")
    print("|---" * (len(args.revs) + 3) + "|")
    for stage in stages:
        best = [min(times[stage, rev]) for rev in args.revs]
        cells = " | ".join(f"{t:.1f} s" for t in best)
        peaks = " / ".join(f"{max(peak_mb[stage, rev]):.0f}" for rev in args.revs)
        print(f"| {stage} | {cells} | {best[0] / best[-1]:.2f}x | {peaks} |")


if __name__ == "__main__":
    main()
