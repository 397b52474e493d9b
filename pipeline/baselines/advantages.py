"""Advantages of the baselines, as pure functions of per-token tensors (B, T) and masks.

    ppo:   r_j = -kl_coef log(pi_old / rho)(w_j)  (+ the action's reward R at its last token)
           delta_j = r_j + V_{j+1} - V_j,   A_j = sum_k (gamma lam)^(k-j) delta_k,   return_j = A_j + V_j
    grpo:  A = (R - mean_g R) / std_g R  over the samples g of one state, the same at every token

Each action is its own episode, as in RLHF-style PPO: the value past its last token is 0.
"""

from __future__ import annotations

import torch
from torch import Tensor

from pipeline.models.tokens import discounted_sum


def kl_penalised_rewards(reward: Tensor, logratio: Tensor, mask: Tensor, kl_coef: float) -> Tensor:
    """Per-token rewards (B, T): the KL penalty at every token, the action's reward at its last."""
    lengths = mask.sum(-1).long()
    last = torch.arange(mask.shape[-1], device=mask.device)[None, :] == (lengths[:, None] - 1)
    return (-kl_coef * logratio + last * reward[:, None]) * mask


def gae(rewards: Tensor, values: Tensor, mask: Tensor, gamma: float, lam: float) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimates and value targets (returns), both (B, T), 0 past the end."""
    values = values * mask
    v_next = torch.cat([values[:, 1:], values.new_zeros(values.shape[0], 1)], dim=1)  # 0 after the last
    delta = (rewards + gamma * v_next - values) * mask
    advantages = discounted_sum(delta, gamma * lam) * mask
    return advantages, (advantages + values) * mask


def group_advantages(rewards: Tensor, groups: Tensor, std_floor: float = 0.0, eps: float = 1e-6) -> Tensor:
    """(R - group mean) / (max(group std, std_floor) + eps) per action (B,); 0 in a group of one.

    groups (B,) holds integer ids of the state each action was sampled from. The std is the
    unbiased one, as in the GRPO paper's implementation; the floor keeps near-equal rewards (AUCs
    0.001 apart on a saturated task) from becoming advantages of +-1.
    """
    n = int(groups.max()) + 1 if groups.numel() else 0
    counts = torch.zeros(n, dtype=rewards.dtype, device=rewards.device).index_add_(
        0, groups, torch.ones_like(rewards)
    )
    mean = torch.zeros_like(counts).index_add_(0, groups, rewards) / counts.clamp(min=1)
    centred = rewards - mean[groups]
    var = torch.zeros_like(counts).index_add_(0, groups, centred**2) / (counts - 1).clamp(min=1)
    advantages = centred / (var.sqrt().clamp(min=std_floor)[groups] + eps)
    return torch.where(counts[groups] > 1, advantages, torch.zeros_like(advantages))


def whiten(values: Tensor, mask: Tensor, eps: float = 1e-8) -> Tensor:
    """Zero mean, unit variance over the valid tokens (PPO's advantage normalisation)."""
    count = mask.sum().clamp(min=1)
    mean = (values * mask).sum() / count
    var = (((values - mean) * mask) ** 2).sum() / count
    return (values - mean) * torch.rsqrt(var + eps) * mask
