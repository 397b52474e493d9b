"""Where the update moved one decision: the next token after MARKER, under rho, pi_{k-1}, critic_k, pi_k.

    python bench/next_token.py TARGETS@k ADAPTERS@k-1 ADAPTERS@k --marker 'HistGradientBoostingClassifier(' \
        [--base data/models/warm --params FILE --rows 4]

For the first `--rows` of iteration k's own actions whose completion contains MARKER, at the
position right after it: the top tokens of the reference rho, of the behaviour policy (the
adapters of k-1, which sampled these actions), of the critic after train@k (pi_c = softmax z_critic,
the policy's target, pi_star) and of the policy after train@k. A critic fitted only at taken tokens
can move an untaken token above the taken one; this shows whether it did, and whether the policy
followed.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import polars as pl
import torch

from pipeline.config import load_config
from pipeline.io import read_trajectories
from pipeline.models.adapters import load_model
from pipeline.models.logits import ActionBatch, action_logits


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("targets", type=Path, help="targets@k")
    parser.add_argument("before", type=Path, help="the adapters of k-1 (the behaviour policy)")
    parser.add_argument("after", type=Path, help="the adapters after train@k")
    parser.add_argument("--marker", required=True, help="text after which the next token is read")
    parser.add_argument("--base", type=Path, default=Path("data/models/warm"))
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--rows", type=int, default=4)
    args = parser.parse_args()
    config = load_config(args.params)
    frame = pl.from_arrow(read_trajectories(args.targets, "targets"))
    frame = frame.filter(pl.col("iteration") == frame["iteration"].max())
    rows = (
        frame.filter(pl.col("completion").str.contains(args.marker, literal=True)).head(args.rows).to_dicts()
    )
    if not rows:
        raise SystemExit(f"next_token.py: no action of {args.targets} contains {args.marker!r}")
    after, tokenizer = load_model(config, args.base, args.after)
    before, _ = load_model(config, args.base, args.before)
    for row in rows:
        ids = row["completion_ids"]
        j = next((n for n in range(1, len(ids)) if args.marker in tokenizer.decode(ids[:n])), None)
        if j is None:  # the marker ends the action, or only the detokenised text contains it
            continue
        batch = ActionBatch.build([row["prompt_ids"]], [ids])
        with torch.no_grad():
            logits = {
                "rho": action_logits(after, batch, None),
                "policy k-1 (behaviour)": action_logits(before, batch, "policy"),
                "critic k (pi_star)": action_logits(after, batch, "critic"),
                "policy k": action_logits(after, batch, "policy"),
            }
        taken = tokenizer.decode(ids[j])
        print(f"{row['task']} ({row['status']}, reward {row['reward']:+.3f}), taken: {taken!r}")
        for name, z in logits.items():
            top = z[0, j].float().softmax(-1).topk(5)
            shown = ", ".join(
                f"{tokenizer.decode(int(i))!r} {float(p):.2f}"
                for p, i in zip(top.values, top.indices, strict=True)
            )
            print(f"  {name:24s} {shown}")


if __name__ == "__main__":
    main()
