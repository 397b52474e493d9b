"""The targets stage for the baselines: per-token advantages of an iteration's executed actions.

Columns of the targets table (io.TARGET_FIELDS), per algorithm:
    ppo:        advantage = whitened GAE, q_target = return (value target), q_taken = soft_value = V_old
    grpo:       advantage = group-relative advantage at every token; no critic (q_* = 0)
    best_of_n:  no update (advantage = 0, q_* = 0)
kl_ref and entropy are the policy's, as for ETPO. The advantages are computed over the whole
iteration at once (GRPO's groups and PPO's whitening span actions).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from peft import PeftModel
from torch import Tensor

from pipeline.baselines.advantages import gae, group_advantages, kl_penalised_rewards, whiten
from pipeline.config import Config
from pipeline.etpo.bellman import entropy, kl_to_reference
from pipeline.etpo.logits import ActionBatch, action_hidden, action_logits, per_token


@torch.no_grad()
def action_stats(model: PeftModel, row: dict, values: bool) -> dict[str, list[float]]:
    """KL to rho, entropy and log(pi / rho) of the taken tokens; V_old from the value head if asked."""
    batch = ActionBatch.build([row["prompt_ids"]], [row["completion_ids"]], 0)
    logp_pi = action_logits(model, batch, "policy").float().log_softmax(-1)  # (1, n, V)
    logp_rho = action_logits(model, batch, None).float().log_softmax(-1)
    taken = batch.taken.unsqueeze(-1)
    logratio = (logp_pi.gather(-1, taken) - logp_rho.gather(-1, taken))[..., 0]
    v_old = model.value_head(action_hidden(model, batch, "critic")).squeeze(-1) if values else 0 * logratio
    return {
        "kl_ref": kl_to_reference(logp_pi, logp_rho)[0].tolist(),
        "entropy": entropy(logp_pi)[0].tolist(),
        "logratio": logratio[0].tolist(),
        "value": v_old[0].float().tolist(),
    }


def baseline_targets(
    model: PeftModel, rows: list[dict], config: Config, advance: Callable[[], None] = lambda: None
) -> list[dict]:
    """`rows` (executed actions) with the targets columns of `config.algo` filled in."""
    for row in rows:
        row.update(action_stats(model, row, values=config.algo == "ppo"))
        advance()
    if not rows:
        return rows
    batch = ActionBatch.build([[0]] * len(rows), [r["completion_ids"] for r in rows], 0)
    mask = batch.mask
    reward = torch.tensor([r["reward"] for r in rows])
    zeros = torch.zeros_like(mask)
    if config.algo == "ppo":
        values = per_token(rows, "value", batch)
        rewards = kl_penalised_rewards(reward, per_token(rows, "logratio", batch), mask, config.ppo.kl_coef)
        advantages, returns = gae(rewards, values, mask, config.ppo.gamma, config.ppo.gae_lambda)
        columns = {"advantage": whiten(advantages, mask), "q_target": returns, "q_taken": values}
        columns["soft_value"] = values
    elif config.algo == "grpo":
        groups = _group_ids([(r["iteration"], r["state"]) for r in rows])
        advantages = group_advantages(reward, groups)[:, None] * mask
        columns = {"advantage": advantages, "q_target": zeros, "q_taken": zeros, "soft_value": zeros}
    else:
        columns = {"advantage": zeros, "q_target": zeros, "q_taken": zeros, "soft_value": zeros}
    for b, row in enumerate(rows):
        n = len(row["completion_ids"])
        row.update({name: _head(t[b], n) for name, t in columns.items()}, bootstrap_value=0.0)
        del row["logratio"], row["value"]
    return rows


def _group_ids(keys: list[tuple]) -> Tensor:
    ids: dict[tuple, int] = {}
    return torch.tensor([ids.setdefault(k, len(ids)) for k in keys])


def _head(values: Tensor, n: int) -> list[float]:
    return values[:n].tolist()
