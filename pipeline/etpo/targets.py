"""ETPO's per-token soft Bellman targets and diagnostics for executed actions (docs/design.md §1, §4).

A few states at a time (`fill_by_states`): three forward passes (policy, reference, target critic)
over their prompts and samples, reduced to per-token scalars in chunks of positions; only those
scalars reach the disk.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from peft import PeftModel

from pipeline.config import EtpoConfig
from pipeline.etpo.bellman import TokenStats, q_targets, token_stats
from pipeline.etpo.train import critic_outputs
from pipeline.models.logits import ActionBatch, action_logits, fill_by_states


def _stats(model: PeftModel, batch: ActionBatch, etpo: EtpoConfig) -> TokenStats:
    """Three forward passes (policy, reference, target critic) reduced to per-token scalars."""
    z_pi, z_rho = action_logits(model, batch, "policy"), action_logits(model, batch, None)  # (B, T, V)
    z_target, v_target = critic_outputs(model, batch, "target", etpo)
    return token_stats(
        z_pi, z_rho, z_target, batch.taken, etpo.beta, etpo.parametrisation, etpo.chunk, v_target
    )


@torch.no_grad()
def bootstrap_values(
    model: PeftModel, next_prompt_ids: list[list[int] | None], etpo: EtpoConfig
) -> list[float]:
    """V_1(s_{t+1}) per action: the soft value of its next state's first decision (0 where done,
    None); the next prompts go through each network together."""
    kept = [i for i, ids in enumerate(next_prompt_ids) if ids]
    values = [0.0] * len(next_prompt_ids)
    if kept:  # a dummy next token after each prompt: causal, so it is unseen
        batch = ActionBatch.build([next_prompt_ids[i] for i in kept], [[0]] * len(kept)).to(model.device)
        for i, value in zip(kept, _stats(model, batch, etpo).soft_value[:, 0].tolist(), strict=True):
            values[i] = value
    return values


@torch.no_grad()
def action_targets(
    model: PeftModel, rows: list[dict], next_prompt_ids: list[list[int] | None], etpo: EtpoConfig
) -> list[dict]:
    """The per-token columns of docs/design.md §4 for executed actions (a state's prompt goes
    through each network once: `ActionBatch`); `next_prompt_ids`: None where done."""
    batch = ActionBatch.build([r["prompt_ids"] for r in rows], [r["completion_ids"] for r in rows])
    stats = _stats(model, batch.to(model.device), etpo)
    boot = bootstrap_values(model, next_prompt_ids, etpo)
    lengths = [len(r["completion_ids"]) for r in rows]
    y = q_targets(
        stats.soft_value,
        stats.logratio_taken,
        *(
            torch.tensor(values, device=model.device)
            for values in (lengths, [r["reward"] for r in rows], [r["done"] for r in rows], boot)
        ),
        etpo.gamma,
        etpo.beta,
        etpo.lam,
    )
    # the credit the policy is tilted by (what `etpo credit` draws): the observed return's
    # y_j - V_j for `policy_target: return`, else the target critic's soft advantage Q(w_j) - V_j
    returned = etpo.policy_target == "return"
    advantage = (y if returned else stats.q_taken) - stats.soft_value
    columns = {
        "q_target": y,
        "q_taken": stats.q_taken,
        "soft_value": stats.soft_value,
        "kl_ref": stats.kl_ref,
        "entropy": stats.entropy,
        "advantage": advantage,
        "ref_logit": stats.ref_logit,  # the reference never changes: train reads these, no forward
        "ref_logprob": stats.ref_logprob,
    }
    return [
        {name: t[b, :n].tolist() for name, t in columns.items()} | {"bootstrap_value": boot[b]}
        for b, n in enumerate(lengths)
    ]


def etpo_targets(
    model: PeftModel,
    rows: list[dict],
    next_prompt_ids: list[list[int] | None],
    etpo: EtpoConfig,
    advance: Callable[[], None],
) -> list[dict]:
    """`rows` (executed actions) with ETPO's targets columns; `next_prompt_ids`: None where done."""

    def columns(batch: list[int]) -> list[dict]:
        return action_targets(model, [rows[i] for i in batch], [next_prompt_ids[i] for i in batch], etpo)

    return fill_by_states(rows, columns, advance)
