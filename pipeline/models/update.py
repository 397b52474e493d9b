"""The minibatch loop every trained algorithm shares: one base, policy and critic optimisers.

An algorithm is one function `update(model, minibatch, step) -> per-token means`: it computes its
losses on the minibatch and calls `step("policy" | "critic", loss)` for each optimiser step. The
loop owns what they have in common: the epochs over shuffled actions, the shard of each minibatch
(`pipeline.parallel`), the two AdamW optimisers, the loss weighting that makes a sharded step
equal to one process's, and the metrics (summed over shards) sent to `log`.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import PeftModel
from torch import Tensor

from pipeline.config import TrainConfig
from pipeline.models.adapters import adapter_parameters
from pipeline.models.logits import ActionBatch, per_token, prompt_groups
from pipeline.parallel import DataParallel


@dataclass(frozen=True)
class Minibatch:
    """This process's actions of one minibatch, laid out as an ActionBatch."""

    rows: list[dict]
    batch: ActionBatch

    def column(self, key: str) -> Tensor:
        """(B, T) a per-token column of the targets table, 0 past each action."""
        return per_token(self.rows, key, self.batch)


OPTIMISERS = "optimisers.pt"  # beside the adapters: Adam's moments carry over to the next iteration
Step = Callable[[str, Tensor], float]  # step(optimiser name, loss) -> gradient norm before clipping
Update = Callable[[PeftModel, Minibatch, Step], dict[str, Tensor]]


def optimised_parameters(model: PeftModel) -> dict[str, list[torch.nn.Parameter]]:
    """What each optimiser updates: the policy adapter; the critic adapter and the value head."""
    return {
        "policy": adapter_parameters(model, "policy"),
        "critic": adapter_parameters(model, "critic") + list(model.value_head.parameters()),
    }


def make_optimisers(
    model: PeftModel, train: TrainConfig, saved: Path | None = None
) -> dict[str, torch.optim.Optimizer]:
    """AdamW for the policy and for the critic, continuing from the state saved in `saved` (the
    previous iteration's adapters folder) if there is one. Each iteration continues one
    optimisation rather than restarting Adam, whose first steps are about lr in size whatever the
    gradient. Learning rates and weight decay are this iteration's params, not the saved ones."""
    params = optimised_parameters(model)
    lr = {"policy": train.policy_lr, "critic": train.critic_lr}
    optimisers = {
        name: torch.optim.AdamW(p, lr=lr[name], weight_decay=train.weight_decay) for name, p in params.items()
    }
    if saved is not None and (saved / OPTIMISERS).exists():
        state = torch.load(saved / OPTIMISERS, map_location="cpu", weights_only=True)  # moved to the params
        for name, optimiser in optimisers.items():
            optimiser.load_state_dict(state[name])
            for group in optimiser.param_groups:
                group.update(lr=lr[name], weight_decay=train.weight_decay)
    return optimisers


def save_optimisers(optimisers: dict[str, torch.optim.Optimizer], out: Path) -> None:
    """Next to the adapters saved in `out` (an atomic temp folder of the train stage)."""
    torch.save({name: o.state_dict() for name, o in optimisers.items()}, out / OPTIMISERS)


def train_adapters(
    model: PeftModel,
    rows: list[dict],
    update: Update,
    train: TrainConfig,
    seed: int,
    log: Callable[[dict[str, float]], None] | None = None,
    parallel: DataParallel | None = None,
    optimisers: dict[str, torch.optim.Optimizer] | None = None,
) -> int:
    """`train.epochs` passes of `update` over shuffled minibatches of `rows`; returns optimiser steps.

    The shuffle moves the samples of one state together (`by_state`), so that a minibatch holds
    whole states and each distinct prompt goes through each model once (`ActionBatch`).

    Under a multi-process launch each process takes its shard of every minibatch; the updates are
    those of one process on the whole minibatch (`pipeline.parallel`).
    """
    optimisers = optimisers or make_optimisers(model, train)
    params = {name: o.param_groups[0]["params"] for name, o in optimisers.items()}
    device = params["policy"][0].device
    parallel = parallel or DataParallel(device)
    order = random.Random(seed)
    steps = 0
    model.train()
    for _ in range(train.epochs):
        shuffled = by_state(rows, order)
        for start in range(0, len(shuffled), train.minibatch_size):
            chunk, counts = parallel.shard(shuffled[start : start + train.minibatch_size])
            batch = ActionBatch.build([r["prompt_ids"] for r in chunk], [r["completion_ids"] for r in chunk])
            batch = batch.to(device)
            share = parallel.share(batch.mask.sum(), counts)  # of the minibatch's tokens
            norms: dict[str, float] = {}
            step = _stepper(optimisers, params, parallel, share, train.grad_clip, norms)
            means = update(model, Minibatch(chunk, batch), step)
            steps += 1
            # each shard's token mean weighted by its share and summed: the minibatch's mean
            metrics = {k: parallel.sum(v * share).item() for k, v in means.items()}
            if log and parallel.is_main:
                log(metrics | norms)
    model.eval()
    return steps


def by_state(rows: list[dict], order: random.Random) -> list[dict]:
    """`rows` in a random order of their states, the samples of each state kept together."""
    groups = prompt_groups([row["prompt_ids"] for row in rows])
    return [rows[i] for group in order.sample(groups, len(groups)) for i in group]


def _stepper(
    optimisers: dict[str, torch.optim.Optimizer],
    params: dict[str, list[torch.nn.Parameter]],
    parallel: DataParallel,
    share: Tensor,
    grad_clip: float,
    norms: dict[str, float],
) -> Step:
    """`step(name, loss)` for one minibatch: the shard's loss weighted by its share; norms logged."""

    def step(name: str, loss: Tensor) -> float:
        norms[f"train/grad_norm_{name}"] = parallel.step(
            optimisers[name], params[name], loss * share, grad_clip
        )
        return norms[f"train/grad_norm_{name}"]

    return step
