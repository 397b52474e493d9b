"""Does the warm start make a model write runnable, diverse bodies?

    python bench/warmstart.py MODEL_DIR [MODEL_DIR ...] [--samples 16] [--tasks balance-scale,...]

Samples `--samples` bodies per task (plain completion prompt, temperature 1.0, seed 0) from each
model directory, runs them in the sandbox, and prints the share that ran, the mean reward of
those that ran, and which estimator families appeared.
"""

from __future__ import annotations

import argparse
import re
import tempfile
import time
from collections import Counter
from dataclasses import replace
from pathlib import Path

from pipeline.config import load_config
from pipeline.models.base import load_base
from pipeline.models.generate import sample
from pipeline.sandbox.executor import Executor
from pipeline.tasks.datasets import build_tasks, save_tasks
from pipeline.tasks.prompts import completion_prompt, program, state_source

DEFAULTS = load_config(Path(__file__).resolve().parents[1] / "params.yaml")
ESTIMATOR = re.compile(r"\b([A-Z][A-Za-z]+(?:Classifier|Regression|NB|Analysis|SVC))\(")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("models", nargs="+")
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--tasks", default="balance-scale,tic-tac-toe,breast_cancer,iris")
    args = parser.parse_args()
    names = args.tasks.split(",")
    with tempfile.TemporaryDirectory() as tmp:
        tasks = build_tasks(names, [])
        save_tasks(tasks, tmp)
        config = replace(DEFAULTS.sampling, batch_size=8, temperature=args.temperature, max_new_tokens=160)
        with Executor(tmp, replace(DEFAULTS.executor, cache=False)) as executor:
            for path in args.models:
                model, tokenizer = load_base(path)
                model.eval()
                print(f"\n## {path}")
                print("| task | ran | mean reward of those that ran | estimator families | sampling s |")
                print("|---|---|---|---|---|")
                for task in tasks:
                    state = state_source(task.description, task.x.shape)
                    began = time.perf_counter()
                    prompts = [completion_prompt(state)] * args.samples
                    completions = sample(model, tokenizer, prompts, config, seed=0)
                    seconds = time.perf_counter() - began
                    results = executor.run_many([(task.name, program(state, c.body)) for c in completions])
                    ok = [r for r in results if r.status == "ok"]
                    families = Counter(m for c in completions for m in set(ESTIMATOR.findall(c.body)))
                    mean = sum(r.reward for r in ok) / len(ok) if ok else float("nan")
                    statuses = Counter(r.status for r in results)
                    print(
                        f"| {task.name} | {len(ok)}/{len(results)} ({dict(statuses)}) | {mean:.3f} "
                        f"| {len(families)}: {', '.join(sorted(families))} | {seconds:.0f} |"
                    )


if __name__ == "__main__":
    main()
