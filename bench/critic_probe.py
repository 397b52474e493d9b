"""Where does the critic's fit go? Probe the critic after train@k on targets@k's actions.

    python bench/critic_probe.py data/iterations/003/targets.parquet data/iterations/003/adapters

For the actions that ran and those that failed separately, per token: the target y, the critic's
Q at the taken token, and (dueling) how Q splits into the state value V_psi and
beta log(pi_c / rho)(w), the part the policy is pulled toward (pi_star = pi_c = softmax z_critic).
A critic that fits by V_psi leaves pi_c near rho; one that fits by the log-ratio moves pi_c, and
the room it has to do so is one-sided: log(pi_c / rho)(w) <= -log rho(w), near 0 at a confident
token, but unbounded below. `--params` must be the run's (`git show EXP:params.yaml > FILE`).

`--credit FILE` (residual and dueling, whose pi_star = pi_c = softmax z_critic) writes the probed
actions as a targets table whose `advantage` is this critic's beta log(pi_c / rho)(w), that is
Q(w) - beta log E_rho exp(Q / beta), so `etpo credit FILE --png` shows where the update itself
pushes, token by token. Only `advantage` is replaced (q_taken, soft_value and kl_ref stay the
targets file's). The targets file's own `advantage` is what tilted the policy in train@k: the
target critic's Q - V before train@k, or y - V with `etpo.policy_target: return`, where this
probe's critic advantage is not what the policy was pulled toward.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import polars as pl
import torch

from pipeline.config import load_config
from pipeline.etpo.losses import taken_q
from pipeline.etpo.train import critic_outputs
from pipeline.io import read_trajectories, trajectory_metadata, write_trajectories
from pipeline.models.adapters import load_model
from pipeline.models.logits import ActionBatch, action_logits, per_token
from pipeline.models.tokens import kl_to_reference

COLUMNS = ("y", "q", "v", "logratio", "log_rho", "kl", "top_moved", "top_untaken")


def probe(model, rows: list[dict], config) -> dict[str, list[np.ndarray]]:
    """Per-token arrays, one per row of `rows`, for each name in COLUMNS.

    At the taken token: the target y, Q, V_psi, log(pi_c / rho), log rho. Over the whole
    vocabulary, where pi_c = softmax(z_critic) moved from rho: `kl`, KL(pi_c || rho) in nats;
    `top_moved`, pi_c's most likely token is not rho's; `top_untaken`, and it is not the token
    taken there either, so no loss term at this position asked for it.
    """
    etpo, found = config.etpo, {c: [] for c in COLUMNS}
    with torch.no_grad():
        for start in range(0, len(rows), 4):
            chunk = rows[start : start + 4]
            batch = ActionBatch.build([r["prompt_ids"] for r in chunk], [r["completion_ids"] for r in chunk])
            batch = batch.to(model.device)
            z, v = critic_outputs(model, batch, "critic", etpo)
            ref_logit, log_rho = per_token(chunk, "ref_logit", batch), per_token(chunk, "ref_logprob", batch)
            q = taken_q(z, ref_logit, log_rho, batch.taken, etpo.beta, etpo.parametrisation, v)
            logp_c = z.float().log_softmax(-1)
            logp_rho = action_logits(model, batch, None).float().log_softmax(-1)
            top_c, top_rho = logp_c.argmax(-1), logp_rho.argmax(-1)
            values = {
                "y": per_token(chunk, "q_target", batch),
                "q": q,
                "v": v if v is not None else torch.zeros_like(q),
                "logratio": logp_c.gather(-1, batch.taken.unsqueeze(-1)).squeeze(-1) - log_rho,
                "log_rho": log_rho,
                "kl": kl_to_reference(logp_c, logp_rho),
                "top_moved": (top_c != top_rho).float(),
                "top_untaken": ((top_c != top_rho) & (top_c != batch.taken)).float(),
            }
            mask = batch.mask.bool()
            for name, value in values.items():
                found[name] += [value[i][mask[i]].cpu().numpy() for i in range(len(chunk))]
    return found


def describe_moved(found: dict[str, np.ndarray]) -> str:
    """One line on how far pi_c moved from rho over the whole vocabulary; `found`: `probe`'s
    columns, each concatenated over the rows."""
    kl = found["kl"]
    return (
        f"KL(pi_c || rho) per token mean {kl.mean():.3f} nats (p95 {np.percentile(kl, 95):.3f}); "
        f"top token moved at {found['top_moved'].mean():.1%} of positions, "
        f"to an untaken token at {found['top_untaken'].mean():.1%}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("targets", type=Path, help="targets@k (its own iteration's actions are probed)")
    parser.add_argument("adapters", type=Path, help="train@k's adapters folder")
    parser.add_argument("--base", type=Path, default=Path("data/models/warm"))
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--credit", type=Path, help="write the actions with this critic's advantage here")
    args = parser.parse_args()
    config = load_config(args.params)
    if args.credit and config.etpo.parametrisation == "paper":
        raise SystemExit("critic_probe.py: --credit needs pi_star = softmax(z_critic) (residual or dueling)")
    table = read_trajectories(args.targets, "targets")
    frame = pl.from_arrow(table)
    frame = frame.filter(pl.col("iteration") == frame["iteration"].max())  # not replayed actions
    model, _ = load_model(config, args.base, args.adapters)
    beta = config.etpo.beta
    print(f"{config.etpo.parametrisation} critic, beta {beta}; means per token, and the 5th percentile (p5)")
    print("| actions | n | tokens | target y | Q | V_psi | beta log(pi_c/rho) | its p5 | -log rho |")
    print("|---|---|---|---|---|---|---|---|---|")
    rows = frame.to_dicts()
    per_row = probe(model, rows, config)  # once for all actions: the table splits it, --credit writes it
    failed = (frame["reward"] <= -1).to_list()
    for label, wanted in (("ran", False), ("failed", True)):
        picked = [i for i, f in enumerate(failed) if f == wanted]
        if not picked:
            continue
        t = {name: np.concatenate([arrays[i] for i in picked]) for name, arrays in per_row.items()}
        print(
            f"| {label} | {len(picked)} | {len(t['y'])} | {t['y'].mean():+.3f} | {t['q'].mean():+.3f} "
            f"| {t['v'].mean():+.3f} | {beta * t['logratio'].mean():+.3f} "
            f"| {beta * np.percentile(t['logratio'], 5):+.3f} | {-t['log_rho'].mean():.3f} |"
        )
    print("whole vocabulary: " + describe_moved({n: np.concatenate(a) for n, a in per_row.items()}))
    if args.credit:
        for row, logratio in zip(rows, per_row["logratio"], strict=True):
            row["advantage"] = (beta * logratio).tolist()
        write_trajectories(args.credit, rows, "targets", trajectory_metadata(table))
        print(f"{len(rows)} actions with this critic's advantage -> {args.credit}")


if __name__ == "__main__":
    main()
