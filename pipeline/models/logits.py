"""Logits of the policy, the reference, the critic and the target critic over action tokens.

All four are the same base with a different LoRA adapter active (or none, for the reference),
so one helper switches adapters and slices the positions that predict the completion.

Actions are grouped by prompt (the samples of one state share it): each distinct prompt goes
through the model once, and its samples continue from that prefix's key/value cache, repeated over
them with gradients flowing back through it (docs/design.md §6). Nothing is padded across prompts:
a prompt is one row, its completions are right-padded among themselves only, so causal attention
alone keeps every valid position from seeing padding and no attention mask is needed.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from peft import PeftModel
from torch import Tensor

from pipeline.models.adapters import reference


@dataclass(frozen=True)
class PromptGroup:
    """One distinct prompt and the completions (actions) that continue it."""

    prompt: Tensor  # (1, P)
    completions: Tensor  # (n, T_g) right-padded with 0; only the first T_g - 1 tokens are inputs
    rows: list[int]  # each completion's row in the ActionBatch


@dataclass(frozen=True)
class ActionBatch:
    """Prompt + completion sequences, grouped by prompt; outputs are (B, T) laid out by row."""

    groups: list[PromptGroup]
    taken: Tensor  # (B, T) completion token ids, 0 past the end
    mask: Tensor  # (B, T) 1 on valid completion tokens

    @classmethod
    def build(cls, prompts: list[list[int]], completions: list[list[int]]) -> ActionBatch:
        B, T = len(prompts), max(len(c) for c in completions)
        taken = torch.zeros((B, T), dtype=torch.long)
        mask = torch.zeros((B, T))
        for b, c in enumerate(completions):
            taken[b, : len(c)] = torch.tensor(c)
            mask[b, : len(c)] = 1.0
        groups = [
            PromptGroup(
                torch.tensor([prompts[rows[0]]]), taken[rows, : max(len(completions[b]) for b in rows)], rows
            )
            for rows in prompt_groups(prompts)
        ]
        return cls(groups, taken, mask)

    def to(self, device: torch.device) -> ActionBatch:
        groups = [PromptGroup(g.prompt.to(device), g.completions.to(device), g.rows) for g in self.groups]
        return ActionBatch(groups, self.taken.to(device), self.mask.to(device))


def prompt_groups(prompts: list[list[int]]) -> list[list[int]]:
    """Indices of equal prompts (the samples of one state), groups in order of first appearance."""
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, prompt in enumerate(prompts):
        groups.setdefault(tuple(prompt), []).append(i)
    return list(groups.values())


def fill_by_state(
    rows: list[dict], columns: Callable[[list[int]], list[dict]], advance: Callable[[], None]
) -> list[dict]:
    """Update `rows` one state at a time with `columns(indices of that state's rows)`."""
    for group in prompt_groups([r["prompt_ids"] for r in rows]):
        for i, values in zip(group, columns(group), strict=True):
            rows[i].update(values)
            advance()
    return rows


def per_token(rows: list[dict], key: str, batch: ActionBatch) -> Tensor:
    """(B, T) a per-token list column of `rows` laid out like `batch.taken`, 0 past each action."""
    out = torch.zeros_like(batch.mask)
    for b, row in enumerate(rows):
        out[b, : len(row[key])] = torch.tensor(row[key], dtype=out.dtype)
    return out


def action_logits(model: PeftModel, batch: ActionBatch, adapter: str | None) -> Tensor:
    """(B, T, V) logits predicting each completion token, with `adapter` active (None: reference)."""
    return _forward(model, batch, adapter, hidden=False)[0]


def action_hidden(model: PeftModel, batch: ActionBatch, adapter: str) -> Tensor:
    """(B, T, H) last hidden states (after the final norm) where each completion token is chosen."""
    return _forward(model, batch, adapter, hidden=True)[1]


def action_logits_and_hidden(model: PeftModel, batch: ActionBatch, adapter: str) -> tuple[Tensor, Tensor]:
    """`action_logits` and `action_hidden` of one adapter from one forward pass."""
    return _forward(model, batch, adapter, hidden=True)


def _forward(
    model: PeftModel, batch: ActionBatch, adapter: str | None, hidden: bool
) -> tuple[Tensor, Tensor]:
    """(B, T, V) logits and, if `hidden`, (B, T, H) last hidden states (else an empty tensor)."""
    if adapter is not None:
        model.set_adapter(adapter)
    T = batch.taken.shape[1]
    logits, states, rows = [], [], []
    with reference(model) if adapter is None else nullcontext():
        for group in batch.groups:
            z, h = _group_forward(model, group, hidden)
            logits.append(F.pad(z, (0, 0, 0, T - z.shape[1])))
            states.append(F.pad(h, (0, 0, 0, T - h.shape[1])) if hidden else h)
            rows += group.rows
    back = torch.argsort(torch.tensor(rows, device=batch.taken.device))  # group order -> row order
    return torch.cat(logits)[back], torch.cat(states)[back] if hidden else torch.empty(0)


def _group_forward(model: PeftModel, group: PromptGroup, hidden: bool) -> tuple[Tensor, Tensor]:
    """One prompt's pass (its last position predicts every sample's first token), then the samples'
    pass over their tokens 0 .. T_g - 2 from the prompt's cache repeated n times."""
    n, T = group.completions.shape
    out = model(input_ids=group.prompt, use_cache=T > 1, logits_to_keep=1, output_hidden_states=hidden)
    z = out.logits.expand(n, -1, -1)  # (n, 1, V)
    h = out.hidden_states[-1][:, -1:].expand(n, -1, -1) if hidden else torch.empty(0)
    if T > 1:
        cache = out.cache
        cache.batch_repeat_interleave(n)  # an autograd op: gradients reach the prompt's pass
        rest = model(input_ids=group.completions[:, :-1], cache=cache, output_hidden_states=hidden)
        z = torch.cat([z, rest.logits], dim=1)
        h = torch.cat([h, rest.hidden_states[-1]], dim=1) if hidden else h
    return z, h
