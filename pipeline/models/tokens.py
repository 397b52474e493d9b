"""Per-token quantities of a policy's distribution that every algorithm uses.

Shapes: (..., V) log-probabilities over the vocabulary in, one scalar per position out;
(B, T) per-token tensors with a 0/1 `mask` of valid completion tokens.
"""

from __future__ import annotations

import torch
from torch import Tensor


def kl_to_reference(logp_pi: Tensor, logp_rho: Tensor) -> Tensor:
    """KL(pi || rho) per position: (..., V) -> (...)."""
    return (logp_pi.exp() * (logp_pi - logp_rho)).sum(-1)


def entropy(logp: Tensor) -> Tensor:
    """H(pi) per position: (..., V) -> (...)."""
    return -(logp.exp() * logp).sum(-1)


def masked_mean(values: Tensor, mask: Tensor) -> Tensor:
    """Mean over valid tokens only (prompt and padding positions are 0 in `mask`)."""
    return (values * mask).sum() / mask.sum().clamp(min=1)


def discounted_sum(a: Tensor, factor: float) -> Tensor:
    """y_j = sum_{k >= j} factor^(k-j) a_k along the last axis: (B, T) -> (B, T).

    The recursion y_j = a_j + factor y_{j+1} (ETPO's lambda-return, PPO's GAE) as one matrix
    product with the upper-triangular factor^(k-j) matrix: a reverse scan without a Python loop.
    """
    T = a.shape[-1]
    pos = torch.arange(T, device=a.device)
    offset = pos[None, :] - pos[:, None]  # (T, T): [j, k] = k - j
    powers = torch.full((T, T), factor, dtype=a.dtype, device=a.device).pow(offset.clamp(min=0))
    decay = torch.where(offset >= 0, powers, 0.0)  # factor^(k-j) for k >= j; 0^0 = 1
    return a @ decay.T
