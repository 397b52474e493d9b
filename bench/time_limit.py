"""Does a program's time depend on what else runs? Wall-clock against CPU seconds under load.

    python bench/time_limit.py            # prints a Markdown table for bench/RESULTS.md

The body is the one that timed out in a main-job rerun beside the test suite (cmc,
HistGradientBoosting with 900 rounds: 13.4 s alone). It runs alone and beside N busy-loop
processes on this machine's cores, twice per load:
- as a plain child process (its 5 fits, one thread like the sandbox), timing wall and CPU seconds;
- through the sandboxed `Executor` at the default `executor.timeout_s`, whose status says whether
  the load turned it into a timeout.
The busy processes share this script's session; the sandbox's programs run in sessions of their
own, so where the kernel groups scheduling by session (autogroup) they are slowed less.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from pipeline.config import load_config
from pipeline.sandbox.executor import Executor
from pipeline.tasks.datasets import build_tasks, save_tasks
from pipeline.tasks.prompts import program, state_source

DEFAULTS = load_config(Path(__file__).resolve().parents[1] / "params.yaml")
TASK = "cmc"
BODY = (
    "    from sklearn.ensemble import HistGradientBoostingClassifier\n"
    "    model = HistGradientBoostingClassifier(max_iter=900, learning_rate=0.02, random_state=0)\n"
    "    model.fit(x_train, y_train)\n"
)
DIRECT = """
import sys, time
from sklearn.ensemble import HistGradientBoostingClassifier
from pipeline.sandbox.harness import splits
from pipeline.tasks.datasets import load_task
task = load_task(sys.argv[1], "cmc")
wall, cpu = time.perf_counter(), time.process_time()
for train, test in splits(task.y):
    model = HistGradientBoostingClassifier(max_iter=900, learning_rate=0.02, random_state=0)
    model.fit(task.x[train], task.y[train]).predict_proba(task.x[test])
print(time.perf_counter() - wall, time.process_time() - cpu)
"""


def direct_seconds(tasks_dir: str) -> tuple[float, float]:
    """Wall and CPU seconds of the body's 5 fits in a plain one-thread child."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", DIRECT, tasks_dir], env=env, capture_output=True, text=True)
    out.check_returncode()
    wall, cpu = map(float, out.stdout.split())
    return wall, cpu


def main() -> None:
    cores = os.cpu_count() or 1
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tasks = build_tasks([TASK], [])
        save_tasks(tasks, tmp)
        source = program(state_source(tasks[0].description, tasks[0].x.shape), BODY)
        config = replace(DEFAULTS.executor, workers=1, cache=False)
        for hogs in (0, cores, 2 * cores):
            busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(hogs)]
            try:
                time.sleep(1)
                wall, cpu = direct_seconds(tmp)
                with Executor(tmp, config) as executor:
                    result = executor.run(TASK, source)
            finally:
                for process in busy:
                    process.kill()
                    process.wait()
            rows.append((hogs, wall, cpu, result))

    limit = config.timeout_s
    print(f"{cores} cores, executor.timeout_s {limit}\n")
    print(
        f"| busy processes | wall s | CPU s | a {limit} s wall limit | a {limit} CPU s limit "
        "| sandbox: status | sandbox: wall s |"
    )
    print("|---|---|---|---|---|---|---|")
    for hogs, wall, cpu, result in rows:
        verdicts = " | ".join("timeout" if seconds > limit else "ok" for seconds in (wall, cpu))
        print(f"| {hogs} | {wall:.1f} | {cpu:.1f} | {verdicts} | {result.status} | {result.seconds:.1f} |")


if __name__ == "__main__":
    main()
