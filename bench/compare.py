"""Turn `dvc exp show --json` into the comparison table of algorithms (means over seeds).

    dvc exp run --queue -S 'algo=etpo,ppo,grpo,best_of_n' -S 'seed=range(0,3)'
    dvc queue start                      # then wait for `dvc queue status` to show them done
    python bench/compare.py [--json FILE] [--ceiling data/ceiling.json]

Per algorithm: how many runs (seeds); the mean reward of each iteration, over all its actions and
over first tries only (fresh states: comparable across iterations); the best reward found by
the last iteration as a fraction of the ceiling (mean over tasks; a task never solved counts 0);
the failure rate of each iteration; and the policy's perplexity on the held-out corpus relative to
the reference's at the last iteration (1.00 = unchanged). Runs whose params differ only in `seed`
form one row, labelled by `algo` and the params where they differ from the most common value
(so a tuning run `-S etpo.lambda=1.0` gets its own row); `--by-name` gives one row per experiment.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
from collections import Counter, defaultdict
from pathlib import Path

from pipeline.stages.ceiling import ceiling_fractions


def experiments(shown: object) -> list[dict]:
    """Every experiment record (name, params, metrics by file) in `dvc exp show --json` output."""
    found = []

    def walk(node: object) -> None:
        if isinstance(node, dict):
            data = node.get("data")
            if isinstance(data, dict) and "params" in data and "metrics" in data and node.get("name"):
                params = (data["params"] or {}).get("params.yaml", {}).get("data", {})
                metrics = {path: entry.get("data", {}) for path, entry in (data["metrics"] or {}).items()}
                if params and any(metrics.values()):
                    found.append({"name": node["name"], "params": params, "metrics": metrics})
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(shown)
    unique = {e["name"]: e for e in found}  # the workspace repeats the last experiment applied
    return list(unique.values())


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
    """A label per experiment that is equal for runs differing only in seed: algo + unusual params."""
    flat = [flatten(e["params"]) for e in exps]
    keys = sorted(set().union(*flat) - {"seed", "algo"})
    usual = {k: Counter(repr(f.get(k)) for f in flat).most_common(1)[0][0] for k in keys}
    return [
        " ".join(
            [str(f.get("algo", "etpo"))] + [f"{k}={f.get(k)}" for k in keys if repr(f.get(k)) != usual[k]]
        )
        for f in flat
    ]


def per_iteration(metrics: dict[str, dict]) -> list[tuple[int, dict]]:
    rows = []
    for path, values in metrics.items():
        parts = Path(path).parts
        evaluated = len(parts) >= 4 and parts[-2:] == ("metrics", "metrics.json")
        if evaluated and values.get("reward"):
            rows.append((int(parts[-3]), values))
    return sorted(rows, key=lambda kv: kv[0])


def sd(xs: list[float]) -> float:
    """Sample standard deviation over seeds (0 for one run, nan when a value is missing)."""
    if any(math.isnan(x) for x in xs):
        return float("nan")
    return statistics.stdev(xs) if len(xs) > 1 else 0.0


def summarise(runs: list[dict], ceiling: dict[str, dict]) -> dict[str, object]:
    """Means over the runs of one setting (its seeds)."""
    by_iteration = [per_iteration(r["metrics"]) for r in runs]
    n_iter = min(len(b) for b in by_iteration)
    mean = lambda xs: statistics.fmean(xs) if xs else float("nan")  # noqa: E731
    rewards = [mean([b[i][1]["reward"]["mean"] for b in by_iteration]) for i in range(n_iter)]
    first = [mean([b[i][1]["first_try"]["mean_reward"] for b in by_iteration]) for i in range(n_iter)]
    failures = [mean([b[i][1]["reward"]["failure_rate"] for b in by_iteration]) for i in range(n_iter)]
    fractions, perplexity = [], []
    for b in by_iteration:
        last = b[n_iter - 1][1]
        fractions.append(ceiling_fractions(last.get("best", {}), ceiling).get("mean", float("nan")))
        ppl = last.get("perplexity", {})
        if ppl.get("reference"):
            perplexity.append(ppl["policy"] / ppl["reference"])
    return {
        "runs": len(runs),
        "mean_reward": rewards,
        "first_try_reward": first,
        "best_fraction": mean(fractions),
        "best_fraction_sd": sd(fractions),
        "last_first_try_sd": sd([b[n_iter - 1][1]["first_try"]["mean_reward"] for b in by_iteration]),
        "failure_rate": failures,
        "perplexity_ratio": mean(perplexity),
    }


def table(groups: dict[str, list[dict]], ceiling: dict[str, dict]) -> str:
    lines = [
        "| setting | runs | mean reward per iteration | first tries: mean reward (sd of the last) "
        "| best found / ceiling "
        "| failure rate per iteration | perplexity policy / reference |",
        "|---|---|---|---|---|---|---|",
    ]
    for label, runs in sorted(groups.items()):
        s = summarise(runs, ceiling)
        fmt = lambda xs: " -> ".join(f"{x:.3f}" for x in xs)  # noqa: E731
        lines.append(
            f"| {label} | {s['runs']} | {fmt(s['mean_reward'])} "
            f"| {fmt(s['first_try_reward'])} ({s['last_first_try_sd']:.3f}) "
            f"| {s['best_fraction']:.3f} "
            f"(sd {s['best_fraction_sd']:.3f}) | {fmt(s['failure_rate'])} | {s['perplexity_ratio']:.3f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--json", type=Path, help="saved `dvc exp show --json` output (default: run it)")
    parser.add_argument("--ceiling", type=Path, default=Path("data/ceiling.json"))
    parser.add_argument("--by-name", action="store_true", help="one row per experiment, not per algo")
    args = parser.parse_args()
    text = (
        args.json.read_text()
        if args.json
        else subprocess.run(
            ["dvc", "exp", "show", "--json"], capture_output=True, text=True, check=True
        ).stdout
    )
    ceiling = json.loads(args.ceiling.read_text()) if args.ceiling.exists() else {}
    groups: dict[str, list[dict]] = defaultdict(list)
    exps = experiments(json.loads(text))
    labels = [e["name"] for e in exps] if args.by_name else setting_labels(exps)
    for label, exp in zip(labels, exps, strict=True):
        groups[label].append(exp)
    print(table(groups, ceiling))


if __name__ == "__main__":
    main()
