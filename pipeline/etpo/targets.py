"""ETPO's per-token soft Bellman targets and diagnostics for executed actions (docs/design.md §1, §4).

One action at a time: three forward passes (policy, reference, target critic), reduced to
per-token scalars in chunks of positions; only those scalars reach the disk.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from peft import PeftModel

from pipeline.config import EtpoConfig
from pipeline.etpo.bellman import TokenStats, q_targets, token_stats
from pipeline.etpo.train import critic_outputs
from pipeline.models.logits import ActionBatch, action_logits


def _stats(model: PeftModel, batch: ActionBatch, etpo: EtpoConfig) -> TokenStats:
    """Three forward passes (policy, reference, target critic) reduced to per-token scalars."""
    z_pi, z_rho = action_logits(model, batch, "policy"), action_logits(model, batch, None)  # (1, n, V)
    z_target, v_target = critic_outputs(model, batch, "target", etpo)
    return token_stats(
        z_pi, z_rho, z_target, batch.taken, etpo.beta, etpo.parametrisation, etpo.chunk, v_target
    )


@torch.no_grad()
def bootstrap_value(model: PeftModel, prompt_ids: list[int], etpo: EtpoConfig) -> float:
    """V_1(s_{t+1}): the soft value of the next state's first decision."""
    batch = ActionBatch.build([prompt_ids], [[0]], 0)  # a dummy next token; causal, so it is unseen
    return _stats(model, batch, etpo).soft_value[0, 0].item()


@torch.no_grad()
def action_targets(model: PeftModel, row: dict, next_prompt_ids: list[int] | None, etpo: EtpoConfig) -> dict:
    """The per-token columns of docs/design.md §4 for one executed action."""
    batch = ActionBatch.build([row["prompt_ids"]], [row["completion_ids"]], 0)
    stats = _stats(model, batch, etpo)
    boot = bootstrap_value(model, next_prompt_ids, etpo) if next_prompt_ids else 0.0
    y = q_targets(
        stats.soft_value,
        stats.logratio_taken,
        torch.tensor([len(row["completion_ids"])]),
        torch.tensor([row["reward"]]),
        torch.tensor([row["done"]]),
        torch.tensor([boot]),
        etpo.gamma,
        etpo.beta,
        etpo.lam,
    )
    return {
        "q_target": y[0].tolist(),
        "q_taken": stats.q_taken[0].tolist(),
        "soft_value": stats.soft_value[0].tolist(),
        "kl_ref": stats.kl_ref[0].tolist(),
        "entropy": stats.entropy[0].tolist(),
        "advantage": (stats.q_taken - stats.soft_value)[0].tolist(),  # soft advantage of the taken token
        "bootstrap_value": boot,
    }


def etpo_targets(
    model: PeftModel,
    rows: list[dict],
    next_prompt_ids: list[list[int] | None],
    etpo: EtpoConfig,
    advance: Callable[[], None],
) -> list[dict]:
    """`rows` (executed actions) with ETPO's targets columns; `next_prompt_ids`: None where done."""
    for row, next_ids in zip(rows, next_prompt_ids, strict=True):
        row.update(action_targets(model, row, next_ids, etpo))
        advance()
    return rows
