"""The ETPO update loop: critic step, policy step, Polyak target, over minibatches of actions.

Read top to bottom, one minibatch is:
    z_rho    = reference logits                      (no grad)
    z_critic = critic logits;   L_Q  = Huber(Q_phi(w^j) - y_j)            -> critic step
    z_pi     = policy logits;   L_pi = KL(pi || pi_star[z_critic, z_rho])  -> policy step
    target  <- (1 - tau) target + tau critic
"""

from __future__ import annotations

import random
from collections.abc import Callable

import torch
from peft import PeftModel

from pipeline.config import EtpoConfig, TrainConfig
from pipeline.etpo.bellman import entropy, kl_to_reference
from pipeline.etpo.logits import ActionBatch, action_logits, per_token
from pipeline.etpo.losses import critic_loss, masked_mean, policy_loss, polyak_update
from pipeline.parallel import DataParallel


def adapter_parameters(model: PeftModel, name: str) -> list[torch.nn.Parameter]:
    """The LoRA weights of one adapter, in a fixed order (so Polyak pairs them up)."""
    return [p for n, p in sorted(model.named_parameters()) if f".{name}." in n and "lora_" in n]


def train_etpo(
    model: PeftModel,
    rows: list[dict],
    pad_id: int,
    etpo: EtpoConfig,
    train: TrainConfig,
    seed: int,
    log: Callable[[dict[str, float]], None] | None = None,
    parallel: DataParallel | None = None,
) -> int:
    """Update the policy, critic and target adapters of `model` in place; returns optimiser steps.

    Under a multi-process launch each process takes its shard of every minibatch (see
    `pipeline.parallel`); the updates are those of one process on the whole minibatch.
    """
    # peft's set_adapter (inside action_logits) makes exactly the active adapter trainable
    policy, critic, target = (adapter_parameters(model, n) for n in ("policy", "critic", "target"))
    opt_pi = torch.optim.AdamW(policy, lr=train.policy_lr)
    opt_q = torch.optim.AdamW(critic, lr=train.critic_lr)
    device = policy[0].device
    parallel = parallel or DataParallel(device)
    order = random.Random(seed)
    steps = 0
    model.train()
    for _ in range(train.epochs):
        shuffled = order.sample(rows, len(rows))
        for start in range(0, len(shuffled), train.minibatch_size):
            chunk, counts = parallel.shard(shuffled[start : start + train.minibatch_size])
            batch = ActionBatch.build(
                [r["prompt_ids"] for r in chunk], [r["completion_ids"] for r in chunk], pad_id
            ).to(device)
            share = parallel.share(batch.mask.sum(), counts)  # of the minibatch's tokens
            y = per_token(chunk, "q_target", batch)  # (B, T) targets, 0 past each action
            with torch.no_grad():
                z_rho = action_logits(model, batch, None)  # (B, T, V)

            z_critic = action_logits(model, batch, "critic")
            loss_q = critic_loss(
                z_critic, z_rho, batch.taken, y, batch.mask, etpo.beta, etpo.huber_delta, etpo.parametrisation
            )
            grad_q = parallel.step(opt_q, critic, loss_q * share, train.grad_clip)

            z_pi = action_logits(model, batch, "policy")
            loss_pi = policy_loss(z_pi, z_rho, z_critic.detach(), batch.mask, etpo.beta, etpo.parametrisation)
            grad_pi = parallel.step(opt_pi, policy, loss_pi * share, train.grad_clip)

            polyak_update(target, [p.detach() for p in critic], etpo.tau)
            steps += 1
            with torch.no_grad():
                logp_pi, logp_rho = z_pi.float().log_softmax(-1), z_rho.float().log_softmax(-1)
                means = {  # over this shard; weighted by its share and summed: over the minibatch
                    "train/critic_loss": loss_q,
                    "train/policy_loss": loss_pi,
                    "train/kl_ref": masked_mean(kl_to_reference(logp_pi, logp_rho), batch.mask),
                    "train/entropy": masked_mean(entropy(logp_pi), batch.mask),
                }
                metrics = {k: parallel.sum(v * share).item() for k, v in means.items()}
            if log and parallel.is_main:
                log(metrics | {"train/grad_norm_critic": grad_q, "train/grad_norm_policy": grad_pi})
    model.eval()
    return steps
