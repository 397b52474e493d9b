"""The baselines' targets: per-token advantages of an iteration's executed actions.

Columns of the targets table (io.TARGET_FIELDS), per algorithm:
    ppo:        advantage = whitened GAE, q_target = return (value target), q_taken = soft_value = V_old
    grpo:       advantage = group-relative advantage at every token; no critic (q_* = 0)
    best_of_n:  no update (advantage = 0, q_* = 0)
kl_ref, entropy, ref_logit and ref_logprob as for ETPO. The advantages are computed over the whole
iteration at once (GRPO's groups and PPO's whitening span actions).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from peft import PeftModel
from torch import Tensor

from pipeline.baselines.advantages import gae, group_advantages, kl_penalised_rewards, whiten
from pipeline.config import GrpoConfig, PpoConfig
from pipeline.models.logits import ActionBatch, action_hidden, action_logits, fill_by_states, per_token
from pipeline.models.tokens import entropy, kl_to_reference


@torch.no_grad()
def action_stats(model: PeftModel, rows: list[dict], values: bool) -> list[dict[str, list[float]]]:
    """KL to rho, entropy, log(pi / rho) and rho's logit and log-prob of the taken tokens, and V_old
    from the value head if asked, for actions (a state's prompt goes through each network once:
    `ActionBatch`)."""
    batch = ActionBatch.build([r["prompt_ids"] for r in rows], [r["completion_ids"] for r in rows])
    batch = batch.to(model.device)
    logp_pi = action_logits(model, batch, "policy").float().log_softmax(-1)  # (B, T, V)
    taken = batch.taken.unsqueeze(-1)
    z_rho = action_logits(model, batch, None).float()
    logp_rho = z_rho.log_softmax(-1)
    logratio = (logp_pi.gather(-1, taken) - logp_rho.gather(-1, taken))[..., 0]
    v_old = model.value_head(action_hidden(model, batch, "critic")).squeeze(-1) if values else 0 * logratio
    columns = {
        "kl_ref": kl_to_reference(logp_pi, logp_rho),
        "entropy": entropy(logp_pi),
        "logratio": logratio,
        "value": v_old.float(),
        "ref_logit": z_rho.gather(-1, taken)[..., 0],
        "ref_logprob": logp_rho.gather(-1, taken)[..., 0],
    }
    return [
        {name: t[b, :n].tolist() for name, t in columns.items()}
        for b, n in enumerate(len(r["completion_ids"]) for r in rows)
    ]


def ppo_targets(
    model: PeftModel, rows: list[dict], ppo: PpoConfig, advance: Callable[[], None]
) -> list[dict]:
    """`rows` with PPO's columns: whitened GAE advantages and value targets from V_old."""
    _with_stats(model, rows, values=True, advance=advance)
    batch = _layout(rows)
    values = per_token(rows, "value", batch)
    reward = torch.tensor([r["reward"] for r in rows])
    rewards = kl_penalised_rewards(reward, per_token(rows, "logratio", batch), batch.mask, ppo.kl_coef)
    advantages, returns = gae(rewards, values, batch.mask, ppo.gamma, ppo.gae_lambda)
    return _filled(rows, whiten(advantages, batch.mask), q_target=returns, q_taken=values, soft_value=values)


def grpo_targets(
    model: PeftModel, rows: list[dict], grpo: GrpoConfig, advance: Callable[[], None]
) -> list[dict]:
    """`rows` with GRPO's group-relative advantage at every token of an action; no critic."""
    _with_stats(model, rows, values=False, advance=advance)
    batch = _layout(rows)
    groups = _group_ids([(r["iteration"], r["state"]) for r in rows])
    reward = torch.tensor([r["reward"] for r in rows])
    return _filled(rows, group_advantages(reward, groups, grpo.std_floor)[:, None] * batch.mask)


def best_of_n_targets(model: PeftModel, rows: list[dict], advance: Callable[[], None]) -> list[dict]:
    """`rows` with the policy's KL and entropy and zero advantages: best_of_n updates nothing."""
    _with_stats(model, rows, values=False, advance=advance)
    return _filled(rows, torch.zeros_like(_layout(rows).mask))


def _with_stats(model: PeftModel, rows: list[dict], values: bool, advance: Callable[[], None]) -> None:
    fill_by_states(rows, lambda batch: action_stats(model, [rows[i] for i in batch], values), advance)


def _layout(rows: list[dict]) -> ActionBatch:
    """The (B, T) layout of the iteration's completions (the advantages span actions)."""
    return ActionBatch.build([[0]] * len(rows), [r["completion_ids"] for r in rows])


def _filled(rows: list[dict], advantage: Tensor, **columns: Tensor) -> list[dict]:
    """Write the per-token columns into `rows` (the critic's ones 0 unless given)."""
    zeros = torch.zeros_like(advantage)
    columns = {"q_target": zeros, "q_taken": zeros, "soft_value": zeros} | columns
    for b, row in enumerate(rows):
        n = len(row["completion_ids"])
        row.update({name: t[b, :n].tolist() for name, t in ({"advantage": advantage} | columns).items()})
        row["bootstrap_value"] = 0.0
        del row["logratio"], row["value"]
    return rows


def _group_ids(keys: list[tuple]) -> Tensor:
    ids: dict[tuple, int] = {}
    return torch.tensor([ids.setdefault(k, len(ids)) for k in keys])
