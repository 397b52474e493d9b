"""Executor benchmark: the warm sandboxed pool against one fresh `python` process per program.

    python bench/executor.py            # prints a Markdown table for bench/RESULTS.md

Two measurements, each on a fixed set of 50 bodies for balance-scale:
- throughput: 50 ordinary bodies (10 estimator families x 5 settings), 2 programs at a time;
- overhead: 50 bodies of near-zero work (DummyClassifier), one at a time, so the wall time per
  program is the cost of running a program at all (sandbox, fork, limits, I/O, scoring).
The cold baseline runs each program in a new interpreter that imports the same modules as a
warm worker and scores in-process (no sandbox at all, so it flatters the baseline).
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

import numpy as np

from pipeline.config import load_config
from pipeline.sandbox.executor import HARNESS_PATH, Executor, bwrap_available
from pipeline.tasks.datasets import build_tasks, save_tasks
from pipeline.tasks.prompts import program, state_source

DEFAULTS = load_config(Path(__file__).resolve().parents[1] / "params.yaml")
TASK = "balance-scale"
FAMILIES = [  # (module, estimator, arguments with {} for the varied value, five values)
    ("sklearn.linear_model", "LogisticRegression", "C={}, max_iter=500", [0.1, 0.3, 1, 3, 10]),
    ("sklearn.ensemble", "RandomForestClassifier", "n_estimators={}, random_state=0", [10, 20, 30, 40, 50]),
    ("sklearn.ensemble", "ExtraTreesClassifier", "n_estimators={}, random_state=0", [10, 20, 30, 40, 50]),
    ("sklearn.tree", "DecisionTreeClassifier", "max_depth={}, random_state=0", [2, 4, 6, 8, 10]),
    ("sklearn.neighbors", "KNeighborsClassifier", "n_neighbors={}", [3, 5, 7, 9, 11]),
    ("sklearn.naive_bayes", "GaussianNB", "var_smoothing={}", [1e-9, 1e-8, 1e-7, 1e-6, 1e-5]),
    ("sklearn.svm", "SVC", "C={}, probability=True, random_state=0", [0.5, 1, 2, 4, 8]),
    (
        "sklearn.neural_network",
        "MLPClassifier",
        "hidden_layer_sizes=({},), random_state=0",
        [8, 16, 24, 32, 40],
    ),
    (
        "sklearn.ensemble",
        "GradientBoostingClassifier",
        "n_estimators={}, random_state=0",
        [10, 20, 30, 40, 50],
    ),
    ("sklearn.discriminant_analysis", "LinearDiscriminantAnalysis", "tol={}", [1e-6, 1e-5, 1e-4, 1e-3, 1e-2]),
]

COLD_SCRIPT = """
import sys, json, time
sys.path.insert(0, {harness_dir!r})
import numpy as np
import harness
source = sys.stdin.read()
with np.load({data!r}) as d:
    x, y = d["x"], d["y"]
n = int(y.max()) + 1
ns = {{}}
exec(compile(source, "<build_model>", "exec"), ns)
scores = []
for train, test in harness.splits(y):
    model = ns["build_model"](x[train], y[train])
    scores.append(harness.auc(y[test], model.predict_proba(x[test]), n))
print(json.dumps(float(np.mean(scores))))
"""


def bodies() -> list[str]:
    out = []
    for module, name, args, values in FAMILIES:
        for v in values:
            out.append(
                f"    from {module} import {name}\n    model = {name}({args.format(v)}).fit(x_train, y_train)"
            )
    return out


def dummy_bodies() -> list[str]:
    return [
        f"    from sklearn.dummy import DummyClassifier\n    # variant {i}\n"
        "    model = DummyClassifier(strategy='prior').fit(x_train, y_train)"
        for i in range(50)
    ]


def run_cold(sources: list[str], data: Path, parallel: int) -> float:
    script = COLD_SCRIPT.format(harness_dir=str(HARNESS_PATH.parent), data=str(data))
    env = {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}

    def one(source: str) -> None:
        subprocess.run(
            [sys.executable, "-c", script], input=source, text=True, check=True, capture_output=True, env=env
        )

    started = time.perf_counter()
    with ThreadPoolExecutor(parallel) as pool:
        list(pool.map(one, sources))
    return time.perf_counter() - started


def run_warm(executor: Executor, sources: list[str]) -> float:
    started = time.perf_counter()
    results = executor.run_many([(TASK, s) for s in sources])
    elapsed = time.perf_counter() - started
    failed = [r for r in results if r.status != "ok"]
    assert not failed, failed[0]
    return elapsed


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        tasks = build_tasks([TASK], [])
        save_tasks(tasks, tmp)
        data = Path(tmp) / "data.npz"
        np.savez(data, x=tasks[0].x, y=tasks[0].y)
        state = state_source(tasks[0].description, tasks[0].x.shape)
        work = [program(state, b) for b in bodies()]
        idle = [program(state, b) for b in dummy_bodies()]

        rows = []
        for parallel, sources, label in (
            (2, work, "50 ordinary bodies, 2 at a time"),
            (1, idle, "50 near-empty bodies, 1 at a time"),
        ):
            config = replace(DEFAULTS.executor, workers=parallel, cache=False, timeout_s=60)
            with Executor(tmp, config) as executor:
                started = time.perf_counter()
                executor.run_many([(TASK, s) for s in sources[:parallel]])  # start the workers
                startup = time.perf_counter() - started
                warm = statistics.median(run_warm(executor, sources) for _ in range(3))
            cold = run_cold(sources, data, parallel)
            rows.append((label, warm, cold, startup))

    print(f"sandbox: {'bubblewrap' if bwrap_available() else 'rlimit fallback'}\n")
    print(
        "| workload | warm pool: programs/s | cold process: programs/s | warm ms/program "
        "| cold ms/program | ratio | pool start-up s |"
    )
    print("|---|---|---|---|---|---|---|")
    for label, warm, cold, startup in rows:
        print(
            f"| {label} | {50 / warm:.1f} | {50 / cold:.1f} | {1000 * warm / 50:.1f} "
            f"| {1000 * cold / 50:.1f} | {cold / warm:.1f}x | {startup:.2f} |"
        )


if __name__ == "__main__":
    main()
