"""Losses of the policy-gradient baselines (PPO, GRPO), per token, masked means."""

from __future__ import annotations

import torch
from torch import Tensor

from pipeline.models.tokens import masked_mean


def clipped_surrogate(
    logp: Tensor, logp_old: Tensor, advantages: Tensor, mask: Tensor, clip: float
) -> Tensor:
    """PPO's objective, negated: -min(ratio A, clip(ratio, 1 -+ clip) A), ratio = pi / pi_old."""
    ratio = (logp - logp_old).exp()
    clipped = ratio.clamp(1.0 - clip, 1.0 + clip)
    return masked_mean(-torch.minimum(ratio * advantages, clipped * advantages), mask)


def k3_kl(logp: Tensor, logp_ref: Tensor) -> Tensor:
    """Per-token estimate of KL(pi || rho) from the sampled token: rho/pi - log(rho/pi) - 1 >= 0."""
    log_ratio = logp_ref - logp
    return log_ratio.exp() - log_ratio - 1.0


def value_loss(values: Tensor, returns: Tensor, mask: Tensor) -> Tensor:
    return masked_mean(0.5 * (values - returns.detach()) ** 2, mask)
