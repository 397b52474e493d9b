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


def k3_kl(logp: Tensor, logp_ref: Tensor, mask: Tensor) -> Tensor:
    """Masked mean of the per-token estimate of KL(pi || rho) from the sampled token,
    rho/pi - log(rho/pi) - 1 >= 0. The log-ratio is 0 outside `mask`: past an action's end logp
    is the log-prob of a pad token and logp_ref a stored 0, and exp of their difference could
    overflow, and inf * 0 is NaN."""
    log_ratio = torch.where(mask > 0, logp_ref - logp, torch.zeros_like(logp))
    return masked_mean(log_ratio.exp() - log_ratio - 1.0, mask)


def value_loss(values: Tensor, returns: Tensor, mask: Tensor) -> Tensor:
    return masked_mean(0.5 * (values - returns.detach()) ** 2, mask)
