"""The soft Bellman targets against a plain loop, and ETPO on a token MDP with a known optimum."""

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from pipeline.etpo import losses
from pipeline.etpo.bellman import q_targets, q_values, token_stats
from pipeline.etpo.losses import (
    critic_loss,
    importance_weights,
    policy_loss,
    policy_target,
    polyak_update,
    projection,
    taken_token_target,
    untaken_kl,
)


def loop_q(zt, zr, v, beta, param):
    """Q over the vocabulary at one position, as plain Python lists."""
    if param == "residual":
        return [beta * (t - r) for t, r in zip(zt, zr, strict=True)]
    if param == "paper":
        return list(zt)
    lt, lr = (torch.tensor(z).log_softmax(-1).tolist() for z in (zt, zr))
    return [v + beta * (t - r) for t, r in zip(lt, lr, strict=True)]


def loop_targets(z_pi, z_rho, z_target, taken, lengths, reward, done, boot, gamma, beta, lam, param, v_t):
    """docs/design.md §1 written token by token, vocabulary sums as plain Python sums."""
    B, T, V = z_pi.shape
    out = torch.zeros(B, T, dtype=torch.float64)
    for b in range(B):
        n = int(lengths[b])
        values, logratio = [], []
        for j in range(n):
            lp = z_pi[b, j].double().log_softmax(-1).tolist()
            lr = z_rho[b, j].double().log_softmax(-1).tolist()
            zt, zr = z_target[b, j].double().tolist(), z_rho[b, j].double().tolist()
            q = loop_q(zt, zr, float(v_t[b, j]), beta, param)
            kl = sum(math.exp(lp[w]) * (lp[w] - lr[w]) for w in range(V))
            ev = sum(math.exp(lp[w]) * q[w] for w in range(V))
            values.append(ev - beta * kl)
            logratio.append(lp[taken[b, j]] - lr[taken[b, j]])
        y = [0.0] * n
        y[n - 1] = float(reward[b]) + gamma * (1 - float(done[b])) * float(boot[b])
        for j in range(n - 2, -1, -1):
            y[j] = (1 - lam) * values[j + 1] + lam * (y[j + 1] - beta * logratio[j + 1])
        out[b, :n] = torch.tensor(y)
    return out


@pytest.mark.parametrize("param", ["residual", "paper", "dueling"])
@pytest.mark.parametrize("lam", [0.0, 0.5, 1.0])
def test_targets_equal_a_plain_loop(param, lam):
    gen = torch.Generator().manual_seed(0)
    B, T, V, beta, gamma = 5, 9, 7, 0.3, 0.9
    z_pi, z_rho, z_target = (torch.randn(B, T, V, generator=gen) for _ in range(3))
    taken = torch.randint(0, V, (B, T), generator=gen)
    lengths = torch.tensor([9, 1, 4, 6, 2])  # full, single-token, and padded actions
    reward = torch.tensor([0.9, -1.0, 0.5, -1.0, 0.7])
    done = torch.tensor([True, False, True, False, False])  # terminal and non-terminal
    boot = torch.randn(B, generator=gen)  # V_1(s_{t+1}); truncated actions use it like any other
    v_target = torch.randn(B, T, generator=gen)  # the dueling critic's state values
    stats = token_stats(z_pi, z_rho, z_target, taken, beta, param, chunk=4, v_target=v_target)  # chunk < T
    y = q_targets(stats.soft_value, stats.logratio_taken, lengths, reward, done, boot, gamma, beta, lam)
    expected = loop_targets(
        z_pi, z_rho, z_target, taken, lengths, reward, done, boot, gamma, beta, lam, param, v_target
    )
    assert torch.allclose(y.double(), expected, atol=1e-5)
    pad = torch.arange(T)[None, :] >= lengths[:, None]
    assert torch.all(y[pad] == 0)


def test_dueling_values_are_the_state_value_less_the_kl_to_the_critic_policy():
    """V_j = E_pi[Q] - beta KL(pi || rho) = v - beta KL(pi || softmax z_critic) (docs/design.md §1)."""
    gen = torch.Generator().manual_seed(2)
    z_pi, z_rho, z_critic = (torch.randn(3, 4, 13, generator=gen, dtype=torch.float64) for _ in range(3))
    v, beta = torch.randn(3, 4, generator=gen, dtype=torch.float64), 0.2
    taken = torch.randint(0, 13, (3, 4), generator=gen)
    stats = token_stats(z_pi, z_rho, z_critic, taken, beta, "dueling", v_target=v)
    logp_pi, logp_c = z_pi.log_softmax(-1), z_critic.log_softmax(-1)
    kl = (logp_pi.exp() * (logp_pi - logp_c)).sum(-1)
    assert torch.allclose(stats.soft_value.double(), v - beta * kl, atol=1e-5)
    q = v.unsqueeze(-1) + beta * (logp_c - z_rho.log_softmax(-1))  # beta logsumexp_rho(Q / beta) = v
    assert torch.allclose(beta * torch.logsumexp(z_rho.log_softmax(-1) + q / beta, -1), v)


@pytest.mark.parametrize("target", ["vocabulary", "taken", "return"])
@pytest.mark.parametrize("param", ["residual", "dueling"])
def test_an_untrained_critic_gives_zero_q_and_leaves_policy_unchanged(param, target):
    """With `return` the advantage is y - V, zero here as for a return equal to the state's value."""
    gen = torch.Generator().manual_seed(1)
    z_rho = torch.randn(2, 5, 11, generator=gen)
    z_pi = z_rho.clone().requires_grad_(True)  # an untrained policy adapter: pi = rho
    z_critic = z_rho.clone()  # an untrained (zero) critic adapter: z_critic = z_rho
    v = torch.zeros(2, 5)  # and a zero value head
    taken = torch.randint(0, 11, (2, 5), generator=gen)
    stats = token_stats(z_pi.detach(), z_rho, z_critic, taken, 0.1, param, v_target=v)
    assert torch.allclose(stats.q_taken, torch.zeros(2, 5), atol=1e-6)
    assert torch.allclose(stats.soft_value, torch.zeros(2, 5), atol=1e-6)
    at = {
        "vocabulary": {},
        "taken": dict(z_rho=z_rho, taken=taken),
        "return": dict(z_rho=z_rho, taken=taken, advantage=torch.zeros(2, 5)),
    }[target]
    loss = policy_loss(z_pi, z_critic, torch.ones(2, 5), beta=0.1, parametrisation=param, **at)
    loss.backward()
    assert loss.item() == pytest.approx(0.0, abs=1e-6)
    assert (z_pi.grad == 0).all()  # no update, not even rounding noise for Adam: pi_star = rho = pi


@pytest.mark.parametrize("param", ["residual", "paper", "dueling"])
def test_the_critic_loss_reads_q_from_the_stored_reference_values(param):
    """Q(w^j) in the critic loss, from rho's stored logit and log-prob of the taken token, is the
    full-vocabulary `q_values` at that token; the policy loss needs rho's logits for `paper` only."""
    gen = torch.Generator().manual_seed(2)
    z_pi, z_rho, z_critic = (torch.randn(2, 5, 11, generator=gen) for _ in range(3))
    v, y = torch.randn(2, 5, generator=gen), torch.randn(2, 5, generator=gen)
    taken, mask = torch.randint(0, 11, (2, 5), generator=gen), torch.ones(2, 5)
    stats = token_stats(z_pi, z_rho, z_critic, taken, 0.1, param, v_target=v)
    assert torch.allclose(stats.ref_logprob, z_rho.log_softmax(-1).gather(-1, taken[..., None])[..., 0])
    q = q_values(z_critic, z_rho, 0.1, param, v).gather(-1, taken[..., None])[..., 0]
    want = F.huber_loss(q, y, delta=1.0)
    got = critic_loss(z_critic, stats.ref_logit, stats.ref_logprob, taken, y, mask, 0.1, 1.0, param, v)
    assert torch.allclose(got, want, atol=1e-6)
    if param == "paper":
        with pytest.raises(ValueError, match="reference"):
            policy_loss(z_pi, z_critic, mask, 0.1, param)
    else:
        assert policy_loss(z_pi, z_critic, mask, 0.1, param) == policy_loss(
            z_pi, z_critic, mask, 0.1, param, z_rho
        )


def by_hand_taken_target(z_pi, z_rho, z_critic, taken, beta):
    """pi_T of docs/design.md §1 for the residual critic, built from its definition (float64)."""
    pi, rho = z_pi.double().softmax(-1), z_rho.double().softmax(-1)
    q = beta * (z_critic.double() - z_rho.double())
    v_pi = (pi * q).sum(-1) - beta * (pi * (pi.log() - rho.log())).sum(-1)  # E_pi[Q] - beta KL(pi || rho)
    advantage = q.gather(-1, taken[..., None])[..., 0] - v_pi
    target = rho * torch.exp(F.one_hot(taken, z_pi.shape[-1]) * advantage[..., None] / beta)
    return target / target.sum(-1, keepdim=True)


def test_the_taken_token_target_is_rho_tilted_by_the_critics_advantage_at_the_taken_token():
    """pi_T(w) ∝ rho(w) exp([w = a] (Q(a) - V_pi) / beta), against the definition built by hand;
    a critic that lifts an untaken token moves the target only through E_pi[Q]: by -pi(w) x the
    lift at the taken token, and not at all in the shape over the untaken ones."""
    gen = torch.Generator().manual_seed(4)
    z_pi, z_rho, z_critic = (torch.randn(2, 3, 9, generator=gen, dtype=torch.float64) for _ in range(3))
    taken, beta = torch.randint(0, 9, (2, 3), generator=gen), 0.1

    def target(z_c):
        logp_pi, logp_rho = z_pi.log_softmax(-1), z_rho.log_softmax(-1)
        log_target, log_z = taken_token_target(logp_pi, logp_rho, beta * (z_c - z_rho), taken, beta)
        return log_target - log_z[..., None]

    got = target(z_critic)
    assert torch.allclose(got, by_hand_taken_target(z_pi, z_rho, z_critic, taken, beta).log(), atol=1e-10)

    a = int(taken[0, 0])
    junk = (a + 1) % 9
    lifted = z_critic.clone()
    lifted[0, 0, junk] += 8.0  # 8 nats: Q(junk) + 0.8
    moved = target(lifted) - got
    pi_junk = z_pi[0, 0].softmax(-1)[junk]
    log_z_change = moved[0, 0, junk]  # the untaken tokens all move by -(change of log Z)
    off = [w for w in range(9) if w != a]
    assert torch.allclose(moved[0, 0, off], log_z_change.expand(len(off)), atol=1e-12)
    assert torch.allclose(moved[0, 0, a] - log_z_change, -pi_junk * 8.0, atol=1e-12)
    assert (moved[1:] == 0).all() and (moved[0, 1:] == 0).all()  # other positions untouched
    with pytest.raises(ValueError, match="reference"):
        policy_loss(z_pi, z_critic, torch.ones(2, 3), beta, "residual", taken=taken)


def test_the_taken_token_loss_is_the_kl_to_the_target_in_float32_at_a_confident_token():
    """policy_loss with `taken` is KL(pi || pi_T), also in float32 where rho(a) rounds near 1."""
    gen = torch.Generator().manual_seed(6)
    z_rho = torch.randn(1, 4, 50, generator=gen, dtype=torch.float64)
    taken = torch.randint(0, 50, (1, 4), generator=gen)
    z_rho.scatter_add_(-1, taken[..., None], torch.full((1, 4, 1), 25.0, dtype=torch.float64))  # rho(a) ~ 1
    z_pi = z_rho + 0.3 * torch.randn(1, 4, 50, generator=gen, dtype=torch.float64)
    z_critic = z_rho + torch.randn(1, 4, 50, generator=gen, dtype=torch.float64)
    pi, want_t = z_pi.softmax(-1), by_hand_taken_target(z_pi, z_rho, z_critic, taken, 0.1)
    want = (pi * (pi.log() - want_t.log())).sum(-1).mean()
    got = policy_loss(z_pi.float(), z_critic.float(), torch.ones(1, 4), 0.1, "residual", z_rho.float(), taken)
    assert got.dtype == torch.float32
    assert torch.allclose(got.double(), want, rtol=1e-4, atol=1e-6), (got, want)


def test_the_return_target_is_rho_tilted_by_the_given_advantage_and_ignores_the_critic():
    """`policy_target: return`: KL(pi || pi_T) with pi_T ∝ rho exp([w = a] A / beta) for the given
    A = y - V (by hand in float64; the loss computes in float32), the same value and gradient
    whatever the critic's logits."""
    gen = torch.Generator().manual_seed(7)
    z_pi, z_rho, z_critic = (torch.randn(2, 3, 9, generator=gen, dtype=torch.float64) for _ in range(3))
    taken, advantage, beta = torch.randint(0, 9, (2, 3), generator=gen), torch.randn(2, 3, generator=gen), 0.1
    target = z_rho.softmax(-1) * torch.exp(F.one_hot(taken, 9) * advantage[..., None].double() / beta)
    target = target / target.sum(-1, keepdim=True)
    pi = z_pi.softmax(-1)
    want = (pi * (pi.log() - target.log())).sum(-1).mean()
    losses, grads = [], []
    for z_c in (z_critic, z_critic + 5.0 * torch.randn(2, 3, 9, generator=gen, dtype=torch.float64)):
        z = z_pi.clone().requires_grad_(True)
        loss = policy_loss(z, z_c, torch.ones(2, 3), beta, "residual", z_rho, taken, advantage)
        loss.backward()
        losses.append(loss)
        grads.append(z.grad)
    assert torch.allclose(losses[0].double(), want, rtol=1e-5, atol=1e-7)
    assert losses[0] == losses[1] and torch.equal(grads[0], grads[1])


def adam_minimise(loss_of, z_start, lr, steps):
    """The logits after `steps` of Adam on loss_of(z) from `z_start`: the projections' stationary
    points found numerically, for the tests that compare them with a closed form."""
    z = z_start.clone().requires_grad_(True)
    opt = torch.optim.Adam([z], lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        loss_of(z).backward()
        opt.step()
    return z.detach()


def test_the_taken_token_projection_reaches_rho_tilted_by_each_tokens_share_of_the_samples():
    """At one prefix whose rows took tokens with frequencies f, the stationary point of the mean of
    KL(pi || pi_T) is pi ∝ rho exp(f (Q - V_pi) / beta) (the geometric mean of the rows' targets,
    V_pi that of pi itself): tokens nobody took keep rho's odds to each other (docs/design.md §1)."""
    gen = torch.Generator().manual_seed(5)
    V, beta = 5, 0.1
    z_rho = torch.randn(V, generator=gen)
    z_critic = z_rho + torch.randn(V, generator=gen)  # Q / beta = z_critic - z_rho: about a nat
    taken = torch.tensor([[0], [0], [1], [3]])  # f = (1/2, 1/4, 0, 1/4, 0)
    f = torch.bincount(taken[:, 0], minlength=V).float() / len(taken)
    expand = (len(taken), 1, V)

    def loss_of(z):
        return policy_loss(
            z.expand(expand), z_critic.expand(expand), torch.ones(len(taken), 1), beta, "residual",
            z_rho=z_rho.expand(expand), taken=taken,
        )  # fmt: skip

    pi = adam_minimise(loss_of, z_rho, 0.02, 3000).softmax(-1)
    q, logp_rho = beta * (z_critic - z_rho), z_rho.log_softmax(-1)
    v_pi = (pi * q).sum() - beta * (pi * (pi.log() - logp_rho)).sum()
    want = (logp_rho + f * (q - v_pi) / beta).softmax(-1)
    assert torch.allclose(pi, want, atol=1e-3), (pi, want)
    assert not torch.allclose(pi, logp_rho.exp(), atol=1e-2)  # it did move


def test_the_return_projection_reaches_rho_tilted_by_each_tokens_summed_advantage():
    """With `policy_target: return` the mean of KL(pi || pi_T) over rows at one prefix is
    KL(pi || rho) - E_pi[g] / beta + const, g(w) = (1/N) sum of the advantages of the rows that
    took w: its minimum is pi ∝ rho exp(g / beta). A token taken by a success and a failure with
    opposite advantages stays at rho's odds (docs/design.md §1)."""
    gen = torch.Generator().manual_seed(8)
    V, beta = 5, 0.1
    z_rho = torch.randn(V, generator=gen)
    taken = torch.tensor([[0], [0], [1], [3], [3]])
    advantage = torch.tensor([[0.2], [-0.2], [0.15], [-0.05], [-0.1]])
    g = torch.zeros(V).index_add_(0, taken[:, 0], advantage[:, 0]) / len(taken)  # (0, 0.03, 0, -0.03, 0)
    expand = (len(taken), 1, V)

    def loss_of(z):
        return policy_loss(
            z.expand(expand), z_rho.expand(expand), torch.ones(len(taken), 1), beta, "residual",
            z_rho=z_rho.expand(expand), taken=taken, advantage=advantage,
        )  # fmt: skip

    pi, logp_rho = adam_minimise(loss_of, z_rho, 0.02, 3000).softmax(-1), z_rho.log_softmax(-1)
    want = (logp_rho + g / beta).softmax(-1)
    assert torch.allclose(pi, want, atol=1e-3), (pi, want)
    assert torch.allclose(pi[0] / pi[2], logp_rho.exp()[0] / logp_rho.exp()[2], rtol=1e-2)  # 0.2 - 0.2
    assert pi[1] > logp_rho.exp()[1] * 1.2 and pi[3] < logp_rho.exp()[3] / 1.2  # it did move


def expected_return_projection(z_rho, logp_mu, advantage, beta, cap=None):
    """The policy that minimises the mean of KL(pi || pi_T) over one row per token a at a single
    prefix, each row weighted by mu(a): the expectation over the behaviour policy's draws, exactly
    (masked_mean with mask mu is the mu-weighted mean). `cap`: `etpo.importance`'s weights."""
    V = len(z_rho)
    expand, taken = (V, 1, V), torch.arange(V)[:, None]
    weights = importance_weights(logp_mu[:, None], cap) if cap else None

    def loss_of(z):
        return policy_loss(
            z.expand(expand), z_rho.expand(expand), logp_mu.exp()[:, None], beta, "residual",
            z_rho=z_rho.expand(expand), taken=taken, advantage=advantage[:, None], importance=weights,
        )  # fmt: skip

    return adam_minimise(loss_of, z_rho, 0.05, 3000).softmax(-1)


def test_weighting_the_tilt_by_the_behaviour_probability_removes_its_bias():
    """Over mu's draws, a row tilting only its taken token a by A(a) gives each token w the tilt
    mu(w) A(w) on average: the projection lands on rho exp(mu A / beta), not the KL-regularised
    optimum rho exp(A / beta). `etpo.importance` tilts by A(a) min(1 / mu(a), cap): uncapped it
    lands on the optimum, capped on rho exp(min(1, cap mu) A / beta) (docs/design.md §1,
    "Weighting by the behaviour policy"). mu is neither rho nor the policy."""
    gen = torch.Generator().manual_seed(0)
    V, beta = 6, 0.1
    z_rho, z_mu = torch.randn(V, generator=gen), torch.randn(V, generator=gen)
    logp_rho, logp_mu = z_rho.log_softmax(-1), z_mu.log_softmax(-1)
    mu = logp_mu.exp()
    advantage = torch.tensor([0.3, -0.5, 0.1, 0.0, 0.2, -0.2])
    optimum = (logp_rho + advantage / beta).softmax(-1)
    for cap, share in ((None, mu), (1e6, torch.ones(V)), (4.0, (4.0 * mu).clamp(max=1.0))):
        pi = expected_return_projection(z_rho, logp_mu, advantage, beta, cap)
        want = (logp_rho + share * advantage / beta).softmax(-1)
        assert torch.allclose(pi, want, atol=2e-3), (cap, pi, want)
        if cap != 1e6:  # biased: nats away from the optimum at some token, not a rounding matter
            assert (pi.log() - optimum.log()).abs().max() > 1.0, cap


def test_the_weighted_tilt_starts_as_the_policy_gradient_of_the_regularised_return():
    """At pi = pi_k = mu (the policy that sampled), rho elsewhere, one row's gradient in the logits
    is c [grad KL(pi || rho) - (A / beta)(e_a - pi)], c = beta / (beta + eta) (1 without the
    proximal step): the policy gradient of E[A] - beta KL(pi || rho), whatever mu(a). The
    unweighted tilt's advantage part is mu(a) times that."""
    gen = torch.Generator().manual_seed(3)
    V, beta, eta = 7, 0.1, 0.3
    z_rho, z_mu = (2.0 * torch.randn(1, 1, V, generator=gen, dtype=torch.float64) for _ in range(2))
    z = z_mu.clone().requires_grad_(True)
    logp, logp_rho = z.log_softmax(-1), z_rho.log_softmax(-1)
    (grad_kl,) = torch.autograd.grad((logp.exp() * (logp - logp_rho)).sum(), z)
    pi = z_mu.softmax(-1)[0, 0]
    for a, advantage in ((int(pi.argmin()), 0.7), (int(pi.argmax()), -0.4)):
        taken, adv = torch.tensor([[a]]), torch.tensor([[advantage]], dtype=torch.float64)
        weights = importance_weights(z_mu.log_softmax(-1)[..., a], 1e6)
        pg = -(advantage / beta) * (F.one_hot(torch.tensor(a), V).double() - pi)
        for weighting, scale in ((dict(importance=weights), 1.0), ({}, float(pi[a]))):
            for proximal, c in (({}, 1.0), (dict(z_previous=z_mu, eta=eta), beta / (beta + eta))):
                z = z_mu.clone().requires_grad_(True)
                loss = policy_loss(
                    z, z_rho, torch.ones(1, 1), beta, "residual", z_rho, taken, adv, **proximal, **weighting
                )
                loss.backward()
                want = c * (grad_kl[0, 0] + scale * pg)
                assert torch.allclose(z.grad[0, 0].double(), want, rtol=1e-4, atol=1e-6), (
                    a,
                    weighting,
                    proximal,
                )


def proximal_by_hand(target, z_previous, beta, eta):
    """pi_target^(beta / (beta + eta)) pi_k^(eta / (beta + eta)), normalised (float64)."""
    c = beta / (beta + eta)
    mixed = target.pow(c) * z_previous.softmax(-1).pow(1 - c)
    return mixed / mixed.sum(-1, keepdim=True)


def test_the_proximal_target_interpolates_the_target_and_pi_k_and_is_off_at_eta_zero():
    """`etpo.proximal` eta: KL(pi || pi_target^c pi_k^(1 - c)), c = beta / (beta + eta), by hand in
    float64 for the vocabulary target (pi_star = softmax z_critic) and the return target; eta 0
    gives the plain target's value and gradient bit for bit."""
    gen = torch.Generator().manual_seed(11)
    z_pi, z_rho, z_critic, z_prev = (torch.randn(2, 3, 9, generator=gen).double() for _ in range(4))
    taken, advantage = torch.randint(0, 9, (2, 3), generator=gen), torch.randn(2, 3, generator=gen)
    beta, eta, mask = 0.1, 0.4, torch.ones(2, 3)
    tilted = z_rho.softmax(-1) * torch.exp(F.one_hot(taken, 9) * advantage[..., None].double() / beta)
    targets = {"vocabulary": z_critic.softmax(-1), "return": tilted / tilted.sum(-1, keepdim=True)}
    pi = z_pi.softmax(-1)
    for name, target in targets.items():
        extra = {} if name == "vocabulary" else dict(z_rho=z_rho, taken=taken, advantage=advantage)
        mixed = proximal_by_hand(target, z_prev, beta, eta)
        want = (pi * (pi.log() - mixed.log())).sum(-1).mean()
        got = policy_loss(z_pi, z_critic, mask, beta, "residual", **extra, z_previous=z_prev, eta=eta)
        assert torch.allclose(got.double(), want, rtol=1e-5, atol=1e-7), (name, got, want)
        values, grads = [], []
        for proximal in ({}, dict(z_previous=z_prev, eta=0.0)):
            z = z_pi.clone().requires_grad_(True)
            loss = policy_loss(z, z_critic, mask, beta, "residual", **extra, **proximal)
            loss.backward()
            values.append(loss)
            grads.append(z.grad)
        assert values[0] == values[1] and torch.equal(grads[0], grads[1]), name


def test_the_proximal_step_is_zero_where_pi_rho_and_pi_k_agree_and_no_advantage():
    """At initialisation (pi = rho = pi_k, A = 0) the proximal return target is rho itself: the
    gradient is exactly zero, not rounding noise that Adam would amplify."""
    z = torch.randn(2, 4, 7, generator=torch.Generator().manual_seed(2)).requires_grad_(True)
    z_fixed = z.detach().clone()
    taken, advantage = torch.zeros(2, 4, dtype=torch.long), torch.zeros(2, 4)
    loss = policy_loss(z, z_fixed, torch.ones(2, 4), 0.1, "residual", z_fixed, taken, advantage, z_fixed, 0.9)
    loss.backward()
    assert (z.grad == 0).all()


def minimise_policy_loss(z_rho, taken, advantage, beta, z_previous=None, eta=0.0):
    """The policy's logits (V,) at one prefix, from rho's, after Adam on the mean `policy_loss` of
    rows there that took `taken` (N, 1) with `advantage` (N, 1)."""
    rows, V = len(taken), len(z_rho)

    def per_row(logits):  # the prefix's logits, once per row
        return None if logits is None else logits.expand(rows, 1, V)

    def loss_of(z):
        rho_rows, mask = per_row(z_rho), torch.ones(rows, 1)
        return policy_loss(
            per_row(z), rho_rows, mask, beta, "residual", rho_rows, taken, advantage, per_row(z_previous), eta
        )

    return adam_minimise(loss_of, z_rho, 0.02, 2000)


def test_the_proximal_projection_moves_a_forced_token_one_step_and_keeps_the_optimum():
    """One failed body (A = -1) through a forced token (rho 0.99) at beta 0.1: the plain return
    target drives it to rho e^-10 / Z (0.45%, the rest to rho's alternatives); with eta 0.9 and
    pi_k = rho, one train stage reaches rho^c pi_k^(1-c) e^(A / (beta + eta)) / Z (~97%), and with
    pi_k at the plain target that target is the minimiser: the same optimum, reached in steps."""
    beta, eta = 0.1, 0.9
    z_rho = torch.tensor([math.log(0.99), *([math.log(0.0025)] * 4)])
    failed = (torch.tensor([[0]]), torch.tensor([[-1.0]]), beta)  # taken, advantage, beta
    tilt = torch.tensor([-1.0, 0, 0, 0, 0])
    plain = minimise_policy_loss(z_rho, *failed).softmax(-1)
    want_plain = (z_rho.log_softmax(-1) + tilt / beta).softmax(-1)
    assert torch.allclose(plain, want_plain, atol=1e-3) and plain[0] < 0.01, plain
    step = minimise_policy_loss(z_rho, *failed, z_previous=z_rho, eta=eta).softmax(-1)
    want_step = (z_rho.log_softmax(-1) + tilt / (beta + eta)).softmax(-1)  # rho^c rho^(1-c) = rho
    assert torch.allclose(step, want_step, atol=1e-3) and step[0] > 0.95, step
    kept = minimise_policy_loss(z_rho, *failed, z_previous=want_plain.log(), eta=eta).softmax(-1)
    assert torch.allclose(kept, want_plain, atol=1e-3), kept


def soft_optimum(rho_logits, reward, L, V, beta):
    """Q* and pi* by backward recursion over the prefix tree; prefixes are tuples."""
    q_star, pi_star = {}, {}
    for depth in range(L - 1, -1, -1):
        for prefix in itertools.product(range(V), repeat=depth):
            q = torch.tensor(
                [
                    reward[prefix + (w,)]
                    if depth == L - 1
                    else beta
                    * torch.logsumexp(
                        rho_logits[prefix + (w,)].log_softmax(-1) + q_star[prefix + (w,)] / beta, -1
                    )
                    for w in range(V)
                ]
            )
            q_star[prefix] = q
            pi_star[prefix] = (rho_logits[prefix].log_softmax(-1) + q / beta).softmax(-1)
    return pi_star


def test_the_untaken_anchor_sees_only_the_tokens_not_taken():
    """KL(anchor || critic) over the untaken tokens, renormalised: 0 whatever the critic does to the
    taken token or to every logit at once; the plain KL by hand when an untaken token moves; and no
    gradient acts on the taken token's logit itself."""
    gen = torch.Generator().manual_seed(3)
    z_anchor = torch.randn(2, 4, 7, generator=gen)
    taken = torch.randint(0, 7, (2, 4), generator=gen)
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 1.0, 0.0, 0.0]])
    shifted = z_anchor + torch.randn(2, 4, 1, generator=gen) + 5.0 * F.one_hot(taken, 7)
    assert untaken_kl(shifted, z_anchor, taken, mask).abs() < 1e-6

    w = int(taken[0, 0] + 1) % 7
    moved = z_anchor.clone()
    moved[0, 0, w] += 2.0
    moved.requires_grad_(True)
    got = untaken_kl(moved, z_anchor, taken, mask)
    keep = [u for u in range(7) if u != taken[0, 0]]
    p, q = z_anchor[0, 0, keep].log_softmax(-1), moved[0, 0, keep].detach().log_softmax(-1)
    want = (p.exp() * (p - q)).sum() / mask.sum()  # the other 4 valid positions contribute 0
    assert got > 0 and torch.allclose(got, want, atol=1e-6)
    got.backward()
    assert torch.isfinite(moved.grad).all()
    assert (moved.grad.gather(-1, taken[..., None]) == 0).all()
    assert moved.grad[0, 0, w] > 0  # raising the moved token further would raise the KL


@pytest.mark.parametrize("anchor", [0.0, 1.0])
@pytest.mark.parametrize("param", ["residual", "dueling"])
@pytest.mark.parametrize("L", [2, 3])
def test_etpo_converges_to_the_soft_optimal_policy_on_a_token_mdp(L, param, anchor):
    """Tabular ETPO (targets, Huber critic, KL projection, Polyak) reaches pi* at every prefix; the
    untaken anchor (against the target critic) does not move that fixed point."""
    V, beta, tau = 3, 0.5, 0.05
    gen = torch.Generator().manual_seed(L)
    prefixes = [p for d in range(L) for p in itertools.product(range(V), repeat=d)]
    index = {p: i for i, p in enumerate(prefixes)}
    rho = torch.randn(len(prefixes), V, generator=gen)
    actions = list(itertools.product(range(V), repeat=L))
    reward = {a: float(r) for a, r in zip(actions, torch.rand(len(actions), generator=gen), strict=True)}
    pi_star = soft_optimum({p: rho[index[p]] for p in prefixes}, reward, L, V, beta)

    policy = rho.clone().requires_grad_(True)  # tables of logits, one row per prefix
    critic = rho.clone().requires_grad_(True)  # Q = 0 at the start: z_critic = z_rho (and v = 0)
    v = torch.zeros(len(prefixes), requires_grad=True)  # the dueling critic's state value per prefix
    target, v_target = critic.detach().clone(), v.detach().clone()
    rows = torch.tensor([[index[a[:j]] for j in range(L)] for a in actions])  # (A, L) prefix per position
    taken = torch.tensor(actions)  # (A, L)
    rewards = torch.tensor([reward[a] for a in actions])
    lengths, done, boot = torch.full((len(actions),), L), torch.ones(len(actions)), torch.zeros(len(actions))
    mask = torch.ones(len(actions), L)
    opt = torch.optim.Adam([policy, critic, v], lr=0.05)
    for _ in range(1500):
        with torch.no_grad():
            stats = token_stats(
                policy[rows], rho[rows], target[rows], taken, beta, param, v_target=v_target[rows]
            )
            y = q_targets(stats.soft_value, stats.logratio_taken, lengths, rewards, done, boot, 1.0, beta)
        ref = (stats.ref_logit, stats.ref_logprob)  # what the targets stage stores of rho
        loss = critic_loss(critic[rows], *ref, taken, y, mask, beta, 1.0, param, v[rows])
        loss = loss + anchor * untaken_kl(critic[rows], target[rows], taken, mask)
        loss = loss + policy_loss(policy[rows], critic[rows], mask, beta, param)
        opt.zero_grad()
        loss.backward()
        opt.step()
        polyak_update([target, v_target], [critic.detach(), v.detach()], tau)
    pi = policy.detach().softmax(-1)
    for p in prefixes:
        tv = 0.5 * (pi[index[p]] - pi_star[p]).abs().sum().item()
        assert tv < 0.02, (p, tv)


def test_polyak_update_moves_a_fraction_tau():
    target, online = [torch.zeros(3)], [torch.ones(3)]
    polyak_update(target, online, 0.25)
    assert torch.allclose(target[0], torch.full((3,), 0.25))


def test_the_chunked_projection_equals_autograd_of_its_formula(monkeypatch):
    """`projection` (chunk by chunk over the valid positions, its own backward) gives the KL,
    entropy and normaliser of the plain formula and the same gradient in z_pi, 0 past the actions,
    whatever the chunk size; the loss it feeds is `policy_loss`'s for a proximal return target."""
    gen = torch.Generator().manual_seed(5)
    B, T, V, beta, eta = 3, 4, 13, 0.1, 0.9
    z_pi, z_rho, z_prev = (torch.randn(B, T, V, generator=gen, dtype=torch.float64) for _ in range(3))
    taken, advantage = torch.randint(0, V, (B, T), generator=gen), torch.randn(B, T, generator=gen).double()
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0]], dtype=torch.float64)
    log_target, log_z = policy_target(None, None, beta, "residual", z_rho, taken, advantage, z_prev, eta)
    valid = mask != 0

    z = z_pi.clone().requires_grad_(True)
    logp = z.log_softmax(-1)
    want_kl = (logp.exp() * (logp - log_target)).sum(-1) + log_z
    (want_grad,) = torch.autograd.grad((want_kl * mask).sum(), z)
    want_entropy = -(logp.exp() * logp).sum(-1)
    for chunk_bytes in (1, 2 * 4 * V, 2**20):  # one position, two, all at once
        monkeypatch.setattr(losses, "PROJECTION_BYTES", chunk_bytes)
        z = z_pi.clone().requires_grad_(True)
        kl, entropy, lse = projection(z, log_target[valid], log_z[valid], valid)
        kl.sum().backward()
        assert torch.allclose(kl, want_kl[valid]) and torch.allclose(entropy, want_entropy[valid].detach())
        assert torch.allclose(lse, z_pi.logsumexp(-1)[valid])
        assert torch.allclose(z.grad, want_grad) and (z.grad[~valid] == 0).all()
    got = policy_loss(z_pi, None, mask, beta, "residual", z_rho, taken, advantage, z_prev, eta)
    assert torch.allclose(got, (want_kl * mask).sum() / mask.sum())
