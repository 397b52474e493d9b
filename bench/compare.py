"""Compare settings (algorithms, tunings) on the eval stages, with intervals and verdicts.

    dvc exp run --queue -S 'algo=etpo,ppo,grpo,best_of_n' -S 'seed=range(0,3)'
    dvc queue start                      # then wait for `dvc queue status` to show them done
    python bench/compare.py [--json FILE]
    python bench/compare.py --save bench/runs     # also keep each run's record in the repository
    python bench/compare.py --runs bench/runs     # the table from kept records, no DVC needed

Runs whose params differ only in `seed` form one setting, labelled by `algo` and the params where
they differ from the most common value. Per setting, from each run's eval@0 and eval@K rewards
(`data/iterations/NNN/eval/rewards.json`, read from the experiment's commit):
- eval@K: mean reward of the policy after the last update on fresh states, with its interval;
- gain: eval@K - eval@0, paired sample by sample (all evals draw the same random numbers);
- vs the reference (best_of_n, or `--reference LABEL`, e.g. "etpo" to pair a tuning with the
  default): eval@K minus the reference's eval@K at the same seed, sample by sample, and a verdict:
  better / worse when the interval excludes 0, else "cannot tell";
- KL(pi_K || rho) per token, perplexity change on held-out text, environment steps (means).
Intervals are 95% percentile bootstraps over seeds, and over samples within each (seed, task)
(`pipeline/stats.py`): tasks are the fixed benchmark.

A run lives in `dvc exp` refs, which do not travel with a clone and are gone with the machine.
`--save DIR` writes each run's record (params, summary, eval@0 and eval@K rewards: a few KB, and
the CPU it was saved on, since a seed is another draw on another kind of CPU) to DIR/NAME.json,
so that comparisons can be committed and grow over sessions; `--runs DIR` reads them back, alone
or together with DVC's runs.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
from collections import Counter, defaultdict
from pathlib import Path
from typing import get_args, get_type_hints

import numpy as np
import yaml

from pipeline.config import Config
from pipeline.errors import ArtifactError
from pipeline.io import read_json, write_json
from pipeline.stats import Interval, bootstrap_mean, samples_needed

PARAMS = Path(__file__).resolve().parents[1] / "params.yaml"  # the defaults a key added later has
# ... unless its default changed after it was added: then a run without the key ran the old value
BEFORE_A_CHANGED_DEFAULT = {"etpo.policy_target": "vocabulary", "etpo.proximal": 0.0, "etpo.importance": 1.0}
SUMMARY = "data/report/summary.json"
REWARDS = "data/iterations/{k:03d}/eval/rewards.json"
REFERENCE = "best_of_n"
RECORD = {"name", "params", "summary", "eval_0", "eval_K"}  # what --save keeps of a run
SHOWN = ("kl_ref", "perplexity_change", "env_steps")  # summary numbers averaged over seeds


def experiments(shown: object) -> list[dict]:
    """Every experiment record (name, rev, params, summary) in `dvc exp show --json` output."""
    found = []

    def walk(node: object) -> None:
        if isinstance(node, dict):
            data = node.get("data")
            if isinstance(data, dict) and "params" in data and "metrics" in data and node.get("name"):
                params = (data["params"] or {}).get("params.yaml", {}).get("data", {})
                summary = ((data["metrics"] or {}).get(SUMMARY) or {}).get("data", {})
                if params and summary:
                    found.append(
                        {"name": node["name"], "rev": data.get("rev"), "params": params, "summary": summary}
                    )
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(shown)
    committed = [e for e in found if e["rev"] != "workspace"]
    # the workspace repeats the last experiment applied, and an experiment still running shows the
    # workspace's files under its own name: neither is a finished run when committed ones exist
    return list({e["name"]: e for e in committed or found}.values())


def flatten(params: dict, prefix: str = "") -> dict[str, object]:
    """Nested params as dotted keys: {"etpo": {"beta": 0.1}} -> {"etpo.beta": 0.1}."""
    flat: dict[str, object] = {}
    for key, value in params.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def setting_labels(exps: list[dict]) -> list[str]:
    """A label per experiment that is equal for runs differing only in seed: algo + unusual params.

    A param a run lacks is one added after it ran, with a default that keeps the old behaviour:
    it counts as that default (this repository's params.yaml value, or for a default changed since,
    the value it had before: `BEFORE_A_CHANGED_DEFAULT`), so a new key does not split old runs from
    new ones at its default and does label new runs that set it. Numbers compare by value (10 is
    10.0). Another algorithm's section (`etpo.*` for a PPO run) is not read by the run, so it is
    left out.
    """
    algos = set(get_args(get_type_hints(Config)["algo"]))

    def read_by(algo: str, key: str) -> bool:
        section = key.split(".", 1)[0]
        return section not in algos or section == algo

    def canonical(value: object) -> str:
        number = isinstance(value, int | float) and not isinstance(value, bool)
        return repr(float(value) if number else value)

    defaults = flatten(yaml.safe_load(PARAMS.read_text())) if PARAMS.exists() else {}
    flat = [defaults | BEFORE_A_CHANGED_DEFAULT | flatten(e["params"]) for e in exps]
    keys = sorted(set().union(*flat) - {"seed", "algo"})
    usual = {k: Counter(canonical(f[k]) for f in flat if k in f).most_common(1)[0][0] for k in keys}
    labels = []
    for f in flat:
        algo = str(f.get("algo", "etpo"))
        unusual = [f"{k}={f[k]}" for k in keys if k in f and canonical(f[k]) != usual[k] and read_by(algo, k)]
        labels.append(" ".join([algo, *unusual]))
    return labels


def read_rewards(rev: str | None, k: int) -> np.ndarray:
    """(tasks, samples) eval@k rewards of the run at `rev` (the workspace when rev is not a commit)."""
    path = REWARDS.format(k=k)
    if rev and rev != "workspace":
        text = subprocess.run(
            ["git", "show", f"{rev}:{path}"], capture_output=True, text=True, check=True
        ).stdout
    else:
        text = Path(path).read_text()
    rewards = json.loads(text)
    return np.array([rewards[t] for t in sorted(rewards)], dtype=np.float64)


def verdict(difference: Interval) -> str:
    if difference.contains_zero():
        return "cannot tell"
    return "better" if difference.lo > 0 else "worse"


def fmt(i: Interval) -> str:
    return f"{i.mean:+.3f} [{i.lo:+.3f}, {i.hi:+.3f}]"


def table(groups: dict[str, list[dict]], against: str = REFERENCE) -> str:
    """One markdown row per setting; rewards are (seed, tasks, samples) arrays."""
    reference = {r["seed"]: r["eval_K"] for r in groups.get(against, [])}
    lines = [
        f"| setting | seeds | eval@K | gain over eval@0 | vs {against} (same seeds) | verdict "
        "| KL to ref | perplexity | env steps |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for label, runs in sorted(groups.items()):
        eval_k = np.stack([r["eval_K"] for r in runs])
        gain = np.stack([r["eval_K"] - r["eval_0"] for r in runs])
        paired = [r["eval_K"] - reference[r["seed"]] for r in runs if r["seed"] in reference]
        if label == against or not paired:
            difference, word = "-", "-"
        else:
            diff = bootstrap_mean(np.stack(paired))
            difference, word = fmt(diff), verdict(diff)
        mean = {k: statistics.fmean(r["summary"].get(k, float("nan")) for r in runs) for k in SHOWN}
        lines.append(
            f"| {label} | {len(runs)} | {fmt(bootstrap_mean(eval_k))} | {fmt(bootstrap_mean(gain))} "
            f"| {difference} | {word} | {mean['kl_ref']:.4f} | {mean['perplexity_change']:+.2%} "
            f"| {mean['env_steps']:.0f} |"
        )
    return "\n".join(lines)


def power_note(groups: dict[str, list[dict]], against: str = REFERENCE) -> str:
    """How many eval samples per task a paired difference of 0.05 in mean reward would need."""
    reference = {r["seed"]: r["eval_K"] for r in groups.get(against, [])}
    diffs = [
        r["eval_K"] - reference[r["seed"]]
        for label, runs in groups.items()
        if label != against
        for r in runs
        if r["seed"] in reference
    ]
    if not diffs:
        return ""
    per_task = np.concatenate(diffs)  # (runs x tasks, samples)
    sd = float(per_task.std(ddof=1))
    n_tasks = per_task.shape[0] // len(diffs)
    total = samples_needed(sd, 0.05)
    return (
        f"\nsd of per-sample paired differences against {against}: {sd:.3f}; a difference of 0.05 in "
        f"mean reward needs ~{total} paired samples (80% power, 5% level), ~{-(-total // n_tasks)} per task "
        f"over {n_tasks} tasks, pooled over seeds."
    )


def with_rewards(exp: dict) -> dict:
    """The experiment's record with its eval@0 and eval@K rewards, read from its commit."""
    k = int(exp["summary"]["iterations"])
    eval_0, eval_k = read_rewards(exp["rev"], 0), read_rewards(exp["rev"], k)
    return {**exp, "eval_0": eval_0.tolist(), "eval_K": eval_k.tolist()}


def cpu_name() -> str:
    """The CPU a record was saved on: the same seed is another draw on another kind of CPU."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def archived(folder: Path) -> list[dict]:
    """The records that `--save` wrote to `folder`, by name."""
    files = sorted(folder.glob("*.json"))
    if not files:
        raise SystemExit(f"compare.py: no run records (*.json) in {folder}")
    records = []
    for path in files:
        try:
            record = read_json(path, None)
        except ArtifactError as e:
            raise SystemExit(f"compare.py: {e}") from None
        if not isinstance(record, dict) or not RECORD <= set(record):
            raise SystemExit(f"compare.py: {path} is not a run record (needs {sorted(RECORD)})")
        records.append(record)
    return records


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--json", type=Path, help="saved `dvc exp show --json` output (default: run it)")
    parser.add_argument("--runs", type=Path, help="read run records from this folder (see --save)")
    parser.add_argument("--save", type=Path, help="write each DVC run's record to this folder")
    parser.add_argument("--by-name", action="store_true", help="one row per experiment, not per setting")
    parser.add_argument("--reference", help=f"the setting label paired against (default: {REFERENCE})")
    args = parser.parse_args()
    records = archived(args.runs) if args.runs else []
    if args.json or args.save or not args.runs:
        text = (
            args.json.read_text()
            if args.json
            else subprocess.run(
                ["dvc", "exp", "show", "--json"], capture_output=True, text=True, check=True
            ).stdout
        )
        fresh = [with_rewards(exp) for exp in experiments(json.loads(text))]
        if args.save:
            for record in fresh:
                write_json(args.save / f"{record['name']}.json", record | {"cpu": cpu_name()})
        records = list({r["name"]: r for r in records + fresh}.values())  # a fresh run replaces its record
    records.sort(key=lambda r: r["name"])  # one order whatever the source: the bootstrap draws by position
    labels = [r["name"] for r in records] if args.by_name else setting_labels(records)
    groups: dict[str, list[dict]] = defaultdict(list)
    for label, record in zip(labels, records, strict=True):
        groups[label].append(
            {
                "seed": record["params"].get("seed", 0),
                "eval_0": np.array(record["eval_0"], dtype=np.float64),
                "eval_K": np.array(record["eval_K"], dtype=np.float64),
                "summary": record["summary"],
            }
        )
    if args.reference and args.reference not in groups:
        raise SystemExit(f"compare.py: no setting labelled {args.reference!r}; there are {sorted(groups)}")
    against = args.reference or REFERENCE
    print(table(groups, against))
    print(power_note(groups, against))


if __name__ == "__main__":
    main()
