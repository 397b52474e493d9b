"""ETPO losses (docs/design.md §1), as pure functions of logits and per-token targets.

    critic:  L_Q  = Huber_delta(Q_phi(w^j) - y_j)                 y_j a constant
             [+ alpha KL(pi_bar || pi_c) over the tokens not taken    the untaken anchor, §1]
    policy:  L_pi = KL(pi_theta || pi_star),  pi_star ∝ rho exp(Q_phi / beta),  Q_phi detached
             [or pi_T: rho tilted at the taken token only, by the critic's advantage
              or by the observed return's, y_j - V_j                            §1]
             [proximal: onto pi_star^(beta / (beta + eta)) pi_k^(eta / (beta + eta))   §1]
    target:  Q_bar <- (1 - tau) Q_bar + tau Q_phi                 on adapter weights

Means are over valid completion tokens only (`mask`: prompt and padding are 0).
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import Tensor

from pipeline.etpo.bellman import Parametrisation, q_values, soft_value
from pipeline.models.tokens import masked_mean


def taken_q(
    z_critic: Tensor,
    ref_logit: Tensor,
    ref_logprob: Tensor,
    taken: Tensor,
    beta: float,
    parametrisation: Parametrisation,
    v: Tensor | None = None,
) -> Tensor:
    """(B, T) the critic's Q at the taken tokens: `q_values` there, without a reference pass.

    z_critic: (B, T, V); taken, v (the dueling critic's state values): (B, T). The reference
    enters only through z_rho(w) and log rho(w) (ref_logit, ref_logprob: (B, T), stored by the
    targets stage); the dueling form also needs the critic's own normaliser, logsumexp z_critic.
    """
    z = z_critic.float()
    z_taken = z.gather(-1, taken.unsqueeze(-1)).squeeze(-1)
    if parametrisation == "dueling":
        return v.float() + beta * (z_taken - z.logsumexp(-1) - ref_logprob)
    # elementwise in the logits: residual beta (z_critic - z_rho)(w), paper z_critic(w)
    return q_values(z_taken, ref_logit, beta, parametrisation)


def critic_loss(
    z_critic: Tensor,
    ref_logit: Tensor,
    ref_logprob: Tensor,
    taken: Tensor,
    targets: Tensor,
    mask: Tensor,
    beta: float,
    delta: float,
    parametrisation: Parametrisation,
    v: Tensor | None = None,
) -> Tensor:
    """Huber loss of the critic's Q at the taken tokens (`taken_q`) against the (constant) targets;
    targets and mask: (B, T)."""
    q_taken = taken_q(z_critic, ref_logit, ref_logprob, taken, beta, parametrisation, v)
    per_token = F.huber_loss(q_taken, targets.detach(), reduction="none", delta=delta)
    return masked_mean(per_token, mask)


def untaken_kl(z_critic: Tensor, z_anchor: Tensor, taken: Tensor, mask: Tensor) -> Tensor:
    """KL(anchor || critic) between their softmaxes over the tokens *not* taken, per position;
    masked mean. z_critic, z_anchor: (B, T, V); taken, mask: (B, T).

    A critic fitted at taken tokens only also moves the tokens nobody took, through the weights
    they share (bench/RESULTS.md measures it), and pi_star = softmax(z_critic) carries that to the
    policy. A tabular update of Q(s, a) leaves every other Q(s, w) as it was; this term asks the
    critic to keep, at least, the *shape* of its distribution over the untaken tokens
    (renormalised without the taken one), which is what pi_star reads. It is blind to the taken
    token's logit and to a common shift of the untaken ones, so its gradient never acts on the
    taken logit itself; through the weights they share it still costs some of the fit there
    (docs/design.md §1, "The untaken anchor").
    """
    drop = torch.zeros_like(z_critic, dtype=torch.bool).scatter_(-1, taken.unsqueeze(-1), True)
    logp_anchor = z_anchor.detach().float().masked_fill(drop, float("-inf")).log_softmax(-1)
    logp_critic = z_critic.float().masked_fill(drop, float("-inf")).log_softmax(-1)
    log_ratio = (logp_anchor - logp_critic).masked_fill(drop, 0.0)  # -inf - -inf at the taken token
    kl = (logp_anchor.exp() * log_ratio).sum(-1)
    return masked_mean(kl, mask)


def optimal_policy_logits(
    z_critic: Tensor, z_rho: Tensor | None, beta: float, parametrisation: Parametrisation
) -> Tensor:
    """Unnormalised log pi_star = log rho + Q / beta: (..., V).

    With `residual`, log rho + Q / beta = z_critic - logsumexp(z_rho), so pi_star = softmax(z_critic)
    exactly; we return z_critic itself, so an untrained critic gives pi_star == rho bit for bit
    (a rounded log_softmax of a log_softmax would leave ~1e-7 gradients that Adam amplifies).
    With `dueling`, log rho + Q / beta = v / beta + log_softmax(z_critic): pi_star = softmax(z_critic)
    as well, whatever the state value v. Only `paper` reads the reference's logits z_rho.
    """
    if parametrisation in ("residual", "dueling"):
        return z_critic
    if z_rho is None:
        raise ValueError("the paper parametrisation's pi_star needs the reference's logits z_rho")
    return z_rho.log_softmax(-1) + q_values(z_critic, z_rho, beta, parametrisation) / beta


def tilted_target(logp_rho: Tensor, taken: Tensor, advantage: Tensor, beta: float) -> tuple[Tensor, Tensor]:
    """rho tilted at the taken token only: the unnormalised log-probabilities (..., V) and their
    log-normaliser log Z (...). logp_rho (..., V); taken, advantage (...).

        log pi_T(w) = log rho(w) + [w = a] A(a) / beta - log Z

    The untaken tokens keep advantage 0, as in a table where fitting Q(s, a) leaves every other
    Q(s, w) alone, so they keep rho's odds to each other (docs/design.md §1, "Trusting the critic
    at the taken token only"). A = 0 gives log pi_T = log rho exactly.
    """
    log_target = logp_rho.scatter_add(-1, taken.unsqueeze(-1), (advantage / beta).unsqueeze(-1))
    return log_target, log_target.logsumexp(-1)


def critic_advantage(logp_pi: Tensor, logp_rho: Tensor, q: Tensor, taken: Tensor, beta: float) -> Tensor:
    """The critic's advantage of the taken token, A(a) = Q(a) - V_pi (...), from (..., V) inputs:

        V_pi = E_pi[Q] - beta KL(pi || rho)    (the state's soft value under the current policy)

    The critic's values off a enter only through E_pi[Q], weighted by pi, whose mass on tokens
    nobody samples is small; the soft value under rho (pi_star's normaliser) would instead let a
    critic that lifts such tokens by a few nats push every taken token down (docs/design.md §1).
    Q enters as Q(a) - E_pi[Q], so a per-state constant cancels.
    """
    return q.gather(-1, taken.unsqueeze(-1)).squeeze(-1) - soft_value(logp_pi, logp_rho, q, beta)


def taken_token_target(
    logp_pi: Tensor, logp_rho: Tensor, q: Tensor, taken: Tensor, beta: float
) -> tuple[Tensor, Tensor]:
    """`tilted_target` by the critic's advantage (`critic_advantage`): all inputs (..., V) but
    taken. An untrained critic and policy (Q = 0, pi = rho) give log pi_T = log rho exactly."""
    return tilted_target(logp_rho, taken, critic_advantage(logp_pi, logp_rho, q, taken, beta), beta)


def importance_weights(behaviour_logprob: Tensor, cap: float) -> Tensor:
    """min(1 / mu(a), cap) (...), from log mu(a) of the policy that drew each taken token.

    The one-sample estimate of the whole row A(.) that tilts only the taken token a ~ mu,
    [w = a] A(a) / mu(a), has mean A(w) over mu's draws. Without the weight a token's tilt is, on
    average, mu(w) A(w): rows at a prefix pull the policy to rho exp(mu A / beta) (the geometric
    mean of their targets), so a token the behaviour policy gives a tenth keeps a tenth of its
    advantage, as if beta were ten times larger there (docs/design.md §1, "Weighting by the
    behaviour policy"). The cap truncates the weight as V-trace does: tokens with mu >= 1 / cap
    are weighted exactly, rarer ones by cap, which bounds the tilt (a rare token's 1 / mu would
    otherwise ask for hundreds of nats) at the price of a bias toward today's mu A there.
    """
    return (-behaviour_logprob).clamp(max=math.log(cap)).exp()


def proximal_target(log_target: Tensor, logp_previous: Tensor, beta: float, eta: float) -> Tensor:
    """pi_target^(beta / (beta + eta)) pi_k^(eta / (beta + eta)), unnormalised, in logs (..., V).

    It solves max_pi E_pi[Q] - beta KL(pi || rho) - eta KL(pi || pi_k) for pi_target ∝ rho exp(Q / beta):
    each projection goes a fraction beta / (beta + eta) of the log-distance from pi_k to the
    target (A / (beta + eta) nats at a token of advantage A while pi_k = rho, not A / beta), and
    pi_k = pi_target is its fixed point (docs/design.md §1, "One step at a time"). Written as a
    move from log_target toward pi_k, so that log_target == logp_previous gives it back exactly.
    """
    return log_target + eta / (beta + eta) * (logp_previous - log_target)


def policy_target(
    z_pi: Tensor | None,
    z_critic: Tensor | None,
    beta: float,
    parametrisation: Parametrisation,
    z_rho: Tensor | None = None,
    taken: Tensor | None = None,
    advantage: Tensor | None = None,
    z_previous: Tensor | None = None,
    eta: float = 0.0,
    importance: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """log pi_T (..., V), unnormalised and constant, and its log-normaliser log Z (...): the target
    `policy_loss` projects the policy onto. Logits (..., V); taken, advantage, importance (...).

    Without `taken`: pi_star, from the critic's logits (normalised, log Z = 0). With `taken` (needs
    z_rho): `tilted_target`'s pi_T, rho tilted at the taken token only, so the tokens nobody
    sampled (the junk tail a fit at taken tokens drags along, bench/RESULTS.md) get none of the
    target's mass; by `advantage`, the observed return's y_j - V_j (`etpo.policy_target: return`),
    which reads neither z_pi nor z_critic, else by the critic's (`critic_advantage`). With
    `importance`, `importance_weights` of the taken tokens, the tilt is A times it: A / mu(a) up to
    the cap (`etpo.importance`). With `z_previous`, the logits of pi_k, and eta > 0, the target is
    `proximal_target`'s step from pi_k toward the one above (`etpo.proximal`). A `return` target
    reads only networks that stay fixed through train@k, so train keeps it per action
    (`pipeline.etpo.train`).
    """
    if taken is None:
        z_rho = z_rho.detach().float() if z_rho is not None else None
        log_target = optimal_policy_logits(z_critic.detach().float(), z_rho, beta, parametrisation)
        log_target = log_target.log_softmax(-1)  # normalised: pi_star itself
        log_z = log_target.new_zeros(log_target.shape[:-1])
    elif z_rho is None:
        raise ValueError("a policy target at the taken tokens needs the reference's logits z_rho")
    else:
        z_rho = z_rho.detach().float()
        logp_rho = z_rho.log_softmax(-1)
        if advantage is None:
            # Q up to a per-state constant, which the advantage cancels (the dueling critic's value)
            z_critic = z_critic.detach().float()
            q = q_values(z_critic, z_rho, beta, parametrisation, z_critic.new_zeros(z_critic.shape[:-1]))
            advantage = critic_advantage(z_pi.detach().float().log_softmax(-1), logp_rho, q, taken, beta)
        advantage = advantage.detach().float()
        if importance is not None:
            advantage = advantage * importance.detach().float()
        log_target, log_z = tilted_target(logp_rho, taken, advantage, beta)
    if eta > 0:
        if z_previous is None:
            raise ValueError("a proximal policy target (eta > 0) needs pi_k's logits z_previous")
        log_target = proximal_target(log_target, z_previous.detach().float().log_softmax(-1), beta, eta)
        log_z = log_target.logsumexp(-1)
    return log_target, log_z


def policy_loss(
    z_pi: Tensor,
    z_critic: Tensor,
    mask: Tensor,
    beta: float,
    parametrisation: Parametrisation,
    z_rho: Tensor | None = None,
    taken: Tensor | None = None,
    advantage: Tensor | None = None,
    z_previous: Tensor | None = None,
    eta: float = 0.0,
    importance: Tensor | None = None,
) -> Tensor:
    """KL(pi_theta || pi_T) per position, masked mean: the projection onto `policy_target`'s target
    (pi_star without `taken`). z_pi, z_critic, z_rho, z_previous (B, T, V); mask and the rest (B, T).

    Unlike the reference code's `beta * log_softmax - Q` (which never sees Q's ranking of tokens
    through pi), the gradient moves pi toward tokens with higher Q relative to rho (`projection`).
    """
    log_target, log_z = policy_target(
        z_pi, z_critic, beta, parametrisation, z_rho, taken, advantage, z_previous, eta, importance
    )
    valid = mask != 0
    kl = projection(z_pi, log_target[valid], log_z[valid], valid)[0]
    return (kl * mask[valid]).sum() / mask.sum().clamp(min=1)  # `masked_mean` of the valid positions


PROJECTION_BYTES = 8 * 2**20  # a chunk's (rows, V) fp32 temporaries: cache-sized, reused by malloc


def projection(
    z_pi: Tensor, log_target: Tensor, log_z: Tensor, valid: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """KL(pi || pi_T), the entropy H(pi) and log sum_w exp z_pi(w), each (N,), at the N `valid`
    positions of z_pi (B, T, V), in their row-major order; log_target (N, V), log_z (N,) as
    `policy_target` gives them, constants. Only the KL has a gradient, into z_pi.

        KL = sum_w pi(w) [log pi(w) - log pi_T(w)] + log Z,   grad_z KL = pi (r - E_pi[r]),
        r = log pi - log pi_T

    The gradient of the normaliser term, grad sum_w pi(w), is 0 since pi sums to 1, and log Z,
    a constant, has none: where log pi == log_target bit for bit (an untrained policy, a zero tilt)
    the gradient is exactly 0, not rounding noise Adam would amplify. Computed a cache-sized chunk
    of positions at a time, the positions past each action skipped: autograd of the same formula
    holds ~10 (B, T, V) temporaries, and the elementwise passes over them cost more than the LM
    head's matrix products (docs/design.md §6, bench/RESULTS.md).
    """
    if z_pi.shape[:-1] != valid.shape:
        raise ValueError(
            f"projection: logits {tuple(z_pi.shape)} do not match the positions {tuple(valid.shape)}"
        )
    z_pi = z_pi if z_pi.dtype in (torch.float32, torch.float64) else z_pi.float()  # bf16 logits: fp32 maths
    return _Projection.apply(z_pi, log_target.detach(), log_z.detach(), valid)


class _Projection(torch.autograd.Function):
    """`projection`'s forward and backward, chunk by chunk over the valid positions."""

    @staticmethod
    def forward(ctx, z: Tensor, log_target: Tensor, log_z: Tensor, valid: Tensor) -> tuple[Tensor, ...]:
        rows = valid.flatten().nonzero().squeeze(1)
        flat = z.reshape(-1, z.shape[-1])
        kl, entropy, lse = (flat.new_empty(len(rows)) for _ in range(3))
        for part in _chunks(len(rows), z.shape[-1]):
            logits = flat.index_select(0, rows[part])
            logp = logits.log_softmax(-1)
            p = logp.exp()
            kl[part] = (p * (logp - log_target[part])).sum(-1)
            entropy[part] = -(p * logp).sum(-1)
            lse[part] = logits.logsumexp(-1)
        ctx.save_for_backward(z, log_target, kl, rows)
        ctx.mark_non_differentiable(entropy, lse)
        return kl + log_z, entropy, lse

    @staticmethod
    def backward(ctx, grad_kl: Tensor, *_: Tensor) -> tuple[Tensor | None, ...]:
        z, log_target, kl, rows = ctx.saved_tensors
        flat = z.reshape(-1, z.shape[-1])
        grad = torch.zeros_like(flat)
        for part in _chunks(len(rows), z.shape[-1]):
            logp = flat.index_select(0, rows[part]).log_softmax(-1)
            r = logp - log_target[part]
            grad.index_copy_(0, rows[part], logp.exp() * (r - kl[part, None]) * grad_kl[part, None])
        return grad.view_as(z), None, None, None


def _chunks(n: int, vocabulary: int) -> list[slice]:
    size = max(1, PROJECTION_BYTES // (4 * vocabulary))
    return [slice(start, start + size) for start in range(0, n, size)]


@torch.no_grad()
def polyak_update(target: Iterable[Tensor], online: Iterable[Tensor], tau: float) -> None:
    """target <- (1 - tau) target + tau online, in place, parameter by parameter."""
    for t, o in zip(target, online, strict=True):
        t.lerp_(o, tau)
