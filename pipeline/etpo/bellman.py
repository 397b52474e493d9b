"""Per-token soft Bellman backup of ETPO (docs/design.md §1). Pure tensor functions, no I/O.

Shapes: B actions, T token positions (padded), V vocabulary. Position j of an action is the
prefix (s_t, w^{<j}); its logits predict w^j. All softmaxes are at temperature 1.

    KL_j = sum_w pi(w) [log pi(w) - log rho(w)]
    EV_j = sum_w pi(w) Q_bar(w)
    V_j  = EV_j - beta * KL_j
    y_j  = V_{j+1}                                      j < n
    y_n  = r + gamma * (1 - done) * V_1(s_{t+1})
    y_j  = (1 - lam) V_{j+1} + lam (y_{j+1} - beta [log pi - log rho](w^{j+1}))   (lambda-return)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from pipeline.models.tokens import discounted_sum, entropy, kl_to_reference

Parametrisation = Literal["residual", "paper", "dueling"]


def q_values(
    z_critic: Tensor, z_rho: Tensor, beta: float, parametrisation: Parametrisation, v: Tensor | None = None
) -> Tensor:
    """Soft Q over the vocabulary read from a critic's logits: (..., V) -> (..., V).

    residual: Q = beta (z_critic - z_rho), zero for an untrained (zero) adapter;
    paper:    Q = z_critic, the LM's own logits;
    dueling:  Q = v + beta (log_softmax z_critic - log_softmax z_rho), v (...) the critic's state
              value: beta log E_rho exp(Q / beta) = v exactly, and pi_star = softmax(z_critic).
    """
    if parametrisation == "residual":
        return beta * (z_critic - z_rho)
    if parametrisation == "dueling":
        return v.unsqueeze(-1) + beta * (z_critic.log_softmax(-1) - z_rho.log_softmax(-1))
    return z_critic


def expected_q(logp_pi: Tensor, q: Tensor) -> Tensor:
    """E_{w ~ pi}[Q(w)] per position: (..., V) -> (...)."""
    return (logp_pi.exp() * q).sum(-1)


def soft_value(logp_pi: Tensor, logp_rho: Tensor, q: Tensor, beta: float) -> Tensor:
    """V = E_pi[Q] - beta KL(pi || rho): (..., V) -> (...)."""
    return expected_q(logp_pi, q) - beta * kl_to_reference(logp_pi, logp_rho)


@dataclass(frozen=True)
class TokenStats:
    """Per-position scalars (each (B, T)): all the targets stage keeps of the vocabulary."""

    soft_value: Tensor  # V_j under the target critic
    kl_ref: Tensor  # KL(pi || rho) at j
    entropy: Tensor  # H(pi) at j
    logratio_taken: Tensor  # log pi(w^j) - log rho(w^j)
    q_taken: Tensor  # Q_bar(w^j)
    ref_logit: Tensor  # z_rho(w^j): with ref_logprob, all the critic's loss needs of the reference
    ref_logprob: Tensor  # log rho(w^j)


def token_stats(
    z_pi: Tensor,
    z_rho: Tensor,
    z_target: Tensor,
    taken: Tensor,
    beta: float,
    parametrisation: Parametrisation,
    chunk: int = 64,
    v_target: Tensor | None = None,
) -> TokenStats:
    """Reduce three (B, T, V) logit tensors to per-token scalars, `chunk` positions at a time
    (`v_target` (B, T): the target critic's state values, for the dueling parametrisation).

    Only chunk x V float32 temporaries live at once per tensor, so the memory of the reduction
    is O(B T + chunk V), not O(B T V) like the reference code's stored logits.
    """
    parts: list[list[Tensor]] = [[] for _ in range(7)]
    for start in range(0, z_pi.shape[1], chunk):
        sl = slice(start, start + chunk)
        logp_pi = z_pi[:, sl].float().log_softmax(-1)  # (B, c, V)
        logp_rho = z_rho[:, sl].float().log_softmax(-1)
        v = v_target[:, sl].float() if v_target is not None else None
        q = q_values(z_target[:, sl].float(), z_rho[:, sl].float(), beta, parametrisation, v)
        idx = taken[:, sl].unsqueeze(-1)  # (B, c, 1)
        values = (
            soft_value(logp_pi, logp_rho, q, beta),
            kl_to_reference(logp_pi, logp_rho),
            entropy(logp_pi),
            (logp_pi.gather(-1, idx) - logp_rho.gather(-1, idx)).squeeze(-1),
            q.gather(-1, idx).squeeze(-1),
            z_rho[:, sl].float().gather(-1, idx).squeeze(-1),
            logp_rho.gather(-1, idx).squeeze(-1),
        )
        for part, value in zip(parts, values, strict=True):
            part.append(value)
    return TokenStats(*(torch.cat(p, dim=1) for p in parts))


def q_targets(
    soft_values: Tensor,
    logratio_taken: Tensor,
    lengths: Tensor,
    reward: Tensor,
    done: Tensor,
    bootstrap_value: Tensor,
    gamma: float,
    beta: float,
    lam: float = 0.0,
) -> Tensor:
    """Per-token targets y (B, T); zero beyond each action's length.

    soft_values[b, j] = V_{j+1} (0-based j), logratio_taken[b, j] = log pi/rho of w^{j+1},
    lengths (B,) = n, reward/done/bootstrap_value (B,) for the action's last token.
    The lambda recursion y_j = a_j + lam y_{j+1} is one `discounted_sum`.
    """
    B, T = soft_values.shape
    pos = torch.arange(T, device=soft_values.device)
    valid = pos[None, :] < lengths[:, None]  # (B, T)
    last = pos[None, :] == (lengths[:, None] - 1)  # (B, T) the action's final token
    terminal = reward + gamma * (1.0 - done.float()) * bootstrap_value  # (B,)
    v_next = torch.cat([soft_values[:, 1:], soft_values.new_zeros(B, 1)], dim=1)  # V_{j+1}
    r_next = torch.cat([logratio_taken[:, 1:], logratio_taken.new_zeros(B, 1)], dim=1)
    # a_j: the non-recursive part of y_j; at the last token it is the whole (terminal) target
    a = torch.where(last, terminal[:, None], (1 - lam) * v_next - lam * beta * r_next)
    a = torch.where(valid, a, torch.zeros_like(a))
    return discounted_sum(a, lam)  # a is 0 past the action's end
