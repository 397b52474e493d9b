"""The baselines' advantages equal plain per-token / per-group loops on random inputs; their KL
penalty ignores padding."""

import math
import random

import pytest
import torch

from pipeline.baselines.advantages import gae, group_advantages, kl_penalised_rewards
from pipeline.baselines.losses import k3_kl


def random_actions(seed: int, B: int = 5, T: int = 9):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    lengths[0] = T  # one action fills the batch, the others are padded
    mask = (torch.arange(T)[None, :] < lengths[:, None]).float()
    values = torch.randn(B, T, generator=g) * 3  # garbage past the end: must be ignored
    return lengths, mask, values, torch.randn(B, T, generator=g), torch.randn(B, generator=g)


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.9, 0.0), (0.99, 1.0)])
def test_gae_equals_a_reverse_loop(gamma, lam):
    lengths, mask, values, logratio, reward = random_actions(seed=int(gamma * 100 + lam * 10))
    rewards = kl_penalised_rewards(reward, logratio, mask, kl_coef=0.05)
    advantages, returns = gae(rewards, values, mask, gamma, lam)
    for b, n in enumerate(lengths.tolist()):
        running = 0.0
        for j in reversed(range(n)):
            r = -0.05 * logratio[b, j].item() + (reward[b].item() if j == n - 1 else 0.0)
            v_next = values[b, j + 1].item() if j + 1 < n else 0.0
            running = r + gamma * v_next - values[b, j].item() + gamma * lam * running
            assert advantages[b, j].item() == pytest.approx(running, abs=1e-4)
            assert returns[b, j].item() == pytest.approx(running + values[b, j].item(), abs=1e-4)
        assert advantages[b, n:].abs().sum() == 0 and returns[b, n:].abs().sum() == 0


def test_the_group_std_floor_keeps_near_equal_rewards_small():
    rewards = torch.tensor([0.990, 0.991, -1.0, 0.8], dtype=torch.float64)
    groups = torch.tensor([0, 0, 1, 1])
    plain = group_advantages(rewards, groups)
    floored = group_advantages(rewards, groups, std_floor=0.05)
    assert plain[0].item() == pytest.approx(-0.707, abs=1e-3)  # 0.001 apart: +-1 / sqrt(2)
    assert abs(floored[0].item()) < 0.02  # (0.990 - 0.9905) / 0.05
    assert torch.equal(floored[2:], plain[2:])  # a real difference is above the floor


def test_group_advantages_equal_a_loop_over_groups():
    rng = random.Random(0)
    groups = [rng.randrange(6) for _ in range(40)] + [6]  # group 6 has one sample
    rewards = [rng.uniform(-1, 1) for _ in groups]
    got = group_advantages(torch.tensor(rewards, dtype=torch.float64), torch.tensor(groups))
    for i, g in enumerate(groups):
        members = [r for r, h in zip(rewards, groups, strict=True) if h == g]
        if len(members) == 1:
            assert got[i].item() == 0.0
            continue
        mean = sum(members) / len(members)
        std = math.sqrt(sum((r - mean) ** 2 for r in members) / (len(members) - 1))
        assert got[i].item() == pytest.approx((rewards[i] - mean) / (std + 1e-6), abs=1e-9)


def test_the_k3_penalty_ignores_padding_even_where_its_ratio_would_overflow():
    """Past an action's end the stored log rho is 0 and the policy's log-prob of the pad token can
    be very low: exp(0 - (-200)) is inf, and inf * 0 would make the loss and its gradient NaN."""
    logp = torch.tensor([[-1.0, -2.0, -200.0]], requires_grad=True)
    logp_ref = torch.tensor([[-1.5, -1.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    kl = k3_kl(logp, logp_ref, mask)
    kl.backward()
    r = logp_ref[0, :2] - logp.detach()[0, :2]
    assert kl.item() == pytest.approx((r.exp() - r - 1.0).mean().item())
    assert torch.isfinite(logp.grad).all() and logp.grad[0, 2] == 0.0
