"""Train the critic alone on one targets file, then probe where its fit went (bench/critic_probe.py).

    python bench/critic_fit.py data/iterations/003/targets.parquet --start data/iterations/002/adapters

The targets are constants, so this isolates the critic's optimisation from the rest of ETPO:
from which adapters it starts (`--start`; fresh ones by default), at which rate, with or without
the Adam state saved beside them, with its value head reset, or with every target replaced by one
constant (`--constant C`: the exact dueling fit is then V_psi = C and log(pi_c / rho) = 0; the
exact residual fit is a shift of every logit by C / beta, which also leaves pi_c = rho, so any
move of pi_c away from rho is an artefact of fitting taken tokens only), at another `--beta`.
Minibatches of `train.minibatch_size` actions drawn at random, `train.grad_clip` as in training.
"""

from __future__ import annotations

import argparse
import dataclasses
import random
from pathlib import Path

import numpy as np
import polars as pl
import torch
from critic_probe import describe_moved, probe

from pipeline.config import load_config
from pipeline.etpo.train import critic_objective
from pipeline.io import read_trajectories
from pipeline.models.adapters import load_model
from pipeline.models.logits import ActionBatch, per_token
from pipeline.models.update import make_optimisers


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("targets", type=Path, help="a targets@k file (its own iteration's actions)")
    parser.add_argument("--start", type=Path, help="adapters to start from (default: fresh ones)")
    parser.add_argument("--carry-adam", action="store_true", help="load the Adam state saved in --start")
    parser.add_argument("--zero-head", action="store_true", help="reset the critic's value head to 0")
    parser.add_argument("--constant", type=float, help="fit this constant at every token instead")
    parser.add_argument("--critic-lr", type=float, help="instead of train.critic_lr")
    parser.add_argument("--beta", type=float, help="instead of etpo.beta")
    parser.add_argument("--anchor", type=float, help="instead of etpo.untaken_anchor")
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--base", type=Path, default=Path("data/models/warm"))
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    args = parser.parse_args()
    config = load_config(args.params)
    if args.critic_lr is not None:
        train = dataclasses.replace(config.train, critic_lr=args.critic_lr)
        config = dataclasses.replace(config, train=train)
    for key, value in (("beta", args.beta), ("untaken_anchor", args.anchor)):
        if value is not None:
            config = dataclasses.replace(config, etpo=dataclasses.replace(config.etpo, **{key: value}))
    frame = pl.from_arrow(read_trajectories(args.targets, "targets"))
    rows = frame.filter(pl.col("iteration") == frame["iteration"].max()).to_dicts()
    if args.constant is not None:  # the targets fitted, and probed below
        rows = [{**r, "q_target": [args.constant] * len(r["q_target"])} for r in rows]
    etpo, train = config.etpo, config.train
    torch.manual_seed(0)
    model, _ = load_model(config, args.base, args.start, trainable=args.start is not None)
    if args.zero_head:
        with torch.no_grad():
            for p in model.value_head.parameters():
                p.zero_()
    critic = make_optimisers(model, train, args.start if args.carry_adam else None)["critic"]
    params = critic.param_groups[0]["params"]
    order = random.Random(0)
    model.train()
    for _ in range(args.steps):
        chunk = order.sample(rows, min(train.minibatch_size, len(rows)))
        batch = ActionBatch.build([r["prompt_ids"] for r in chunk], [r["completion_ids"] for r in chunk])
        batch = batch.to(model.device)
        y = per_token(chunk, "q_target", batch)
        ref_logit, ref_logprob = per_token(chunk, "ref_logit", batch), per_token(chunk, "ref_logprob", batch)
        loss, _, _ = critic_objective(model, batch, y, ref_logit, ref_logprob, etpo)
        critic.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, train.grad_clip)
        critic.step()
    model.eval()
    found = {name: np.concatenate(per_row) for name, per_row in probe(model, rows, config).items()}
    ratio = found["logratio"]
    fit = torch.nn.functional.huber_loss(
        torch.from_numpy(found["q"]), torch.from_numpy(found["y"]), delta=etpo.huber_delta
    )
    print(
        f"{etpo.parametrisation} critic, beta {etpo.beta:g}, untaken anchor {etpo.untaken_anchor:g}, "
        f"{args.steps} steps at lr {train.critic_lr:g} from "
        f"{args.start or 'fresh adapters'}{' (Adam carried)' if args.carry_adam else ''}"
        f"{' (head zeroed)' if args.zero_head else ''}: target mean {found['y'].mean():+.3f}, Q mean "
        f"{found['q'].mean():+.3f}, Huber loss {fit:.3f}, V_psi mean {found['v'].mean():+.3f}, "
        f"log(pi_c/rho) of taken tokens mean {ratio.mean():+.2f} nats, 5th percentile "
        f"{np.percentile(ratio, 5):+.2f}; " + describe_moved(found)
    )


if __name__ == "__main__":
    main()
