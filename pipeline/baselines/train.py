"""The update loop of the policy-gradient baselines, over minibatches of actions.

    ppo:   L_pi = clipped surrogate(pi / pi_old, A)             A: whitened GAE (targets stage)
           L_V  = 1/2 (V(prefix_j) - return_j)^2                  V: value head on the critic adapter
    grpo:  L_pi = clipped surrogate(pi / pi_old, A) + kl_coef k3(pi, rho)   A: group-relative

pi_old is the behaviour policy, whose log-probs the sample stage recorded (exact at temperature 1
with no top-k/top-p; otherwise those of the warped distribution that was sampled from).
"""

from __future__ import annotations

import random
from collections.abc import Callable

import torch
from peft import PeftModel

from pipeline.baselines.losses import clipped_surrogate, k3_kl, value_loss
from pipeline.config import Config
from pipeline.etpo.bellman import entropy
from pipeline.etpo.logits import ActionBatch, action_hidden, action_logits, per_token
from pipeline.etpo.losses import masked_mean
from pipeline.etpo.train import adapter_parameters
from pipeline.parallel import DataParallel


def train_policy_gradient(
    model: PeftModel,
    rows: list[dict],
    pad_id: int,
    config: Config,
    seed: int,
    log: Callable[[dict[str, float]], None] | None = None,
    parallel: DataParallel | None = None,
) -> int:
    """Update the policy (and, for PPO, the critic adapter and value head) in place; returns steps."""
    algo, train = config.algo, config.train
    clip, kl_coef = (config.ppo.clip, 0.0) if algo == "ppo" else (config.grpo.clip, config.grpo.kl_coef)
    policy = adapter_parameters(model, "policy")
    critic = adapter_parameters(model, "critic") + list(model.value_head.parameters())
    opt_pi = torch.optim.AdamW(policy, lr=train.policy_lr)
    opt_v = torch.optim.AdamW(critic, lr=train.critic_lr)
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
            share = parallel.share(batch.mask.sum(), counts)
            metrics = {}

            logp_all = action_logits(model, batch, "policy").float().log_softmax(-1)  # (B, T, V)
            logp = logp_all.gather(-1, batch.taken.unsqueeze(-1)).squeeze(-1)
            advantages = per_token(chunk, "advantage", batch)
            loss_pi = clipped_surrogate(
                logp, per_token(chunk, "behaviour_logprobs", batch), advantages, batch.mask, clip
            )
            if kl_coef > 0:
                with torch.no_grad():
                    logits_rho = action_logits(model, batch, None).float()
                logp_rho = logits_rho.log_softmax(-1).gather(-1, batch.taken.unsqueeze(-1)).squeeze(-1)
                kl = masked_mean(k3_kl(logp, logp_rho), batch.mask)
                loss_pi = loss_pi + kl_coef * kl
                metrics["train/kl_ref"] = kl
            norms = {
                "train/grad_norm_policy": parallel.step(opt_pi, policy, loss_pi * share, train.grad_clip)
            }
            metrics |= {
                "train/policy_loss": loss_pi,
                "train/entropy": masked_mean(entropy(logp_all), batch.mask),
            }

            if algo == "ppo":
                values = model.value_head(action_hidden(model, batch, "critic")).squeeze(-1)
                loss_v = value_loss(values, per_token(chunk, "q_target", batch), batch.mask)
                norms["train/grad_norm_critic"] = parallel.step(
                    opt_v, critic, loss_v * share, train.grad_clip
                )
                metrics["train/value_loss"] = loss_v
            steps += 1
            global_means = {k: parallel.sum(v.detach() * share).item() for k, v in metrics.items()}
            if log and parallel.is_main:
                log(global_means | norms)
    model.eval()
    return steps
