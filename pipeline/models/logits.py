"""Logits of the policy, the reference, the critic and the target critic over action tokens.

All four are the same base with a different LoRA adapter active (or none, for the reference),
so one helper switches adapters and slices the positions that predict the completion.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass

import torch
from peft import PeftModel
from torch import Tensor

from pipeline.models.adapters import reference


@dataclass(frozen=True)
class ActionBatch:
    """Left-padded prompt + completion sequences: every completion ends at the last position.

    So the logits of the last T + 1 positions cover every completion token of the batch, and the
    LM head (a 49k-vocabulary matmul) runs on those only, never on the prompts.
    """

    input_ids: Tensor  # (B, L)
    attention_mask: Tensor  # (B, L)
    positions: Tensor  # (B, T) index in L of the position that predicts completion token j (0 past it)
    taken: Tensor  # (B, T) completion token ids, 0 past the end
    mask: Tensor  # (B, T) 1 on valid completion tokens

    @classmethod
    def build(cls, prompts: list[list[int]], completions: list[list[int]], pad_id: int) -> ActionBatch:
        B = len(prompts)
        L = max(len(p) + len(c) for p, c in zip(prompts, completions, strict=True))
        T = max(len(c) for c in completions)
        input_ids = torch.full((B, L), pad_id, dtype=torch.long)
        attention = torch.zeros((B, L), dtype=torch.long)
        positions = torch.zeros((B, T), dtype=torch.long)
        taken = torch.zeros((B, T), dtype=torch.long)
        mask = torch.zeros((B, T))
        for b, (p, c) in enumerate(zip(prompts, completions, strict=True)):
            seq = p + c
            input_ids[b, L - len(seq) :] = torch.tensor(seq)
            attention[b, L - len(seq) :] = 1
            positions[b, : len(c)] = torch.arange(L - len(c) - 1, L - 1)
            taken[b, : len(c)] = torch.tensor(c)
            mask[b, : len(c)] = 1.0
        return cls(input_ids, attention, positions, taken, mask)

    def to(self, device: torch.device) -> ActionBatch:
        return ActionBatch(
            *(
                t.to(device)
                for t in (self.input_ids, self.attention_mask, self.positions, self.taken, self.mask)
            )
        )


def per_token(rows: list[dict], key: str, batch: ActionBatch) -> Tensor:
    """(B, T) a per-token list column of `rows` laid out like `batch.taken`, 0 past each action."""
    out = torch.zeros_like(batch.mask)
    for b, row in enumerate(rows):
        out[b, : len(row[key])] = torch.tensor(row[key], dtype=out.dtype)
    return out


def action_logits(model: PeftModel, batch: ActionBatch, adapter: str | None) -> Tensor:
    """(B, T, V) logits predicting each completion token, with `adapter` active (None: reference)."""
    window = _forward(model, batch, adapter, logits_to_keep=batch.taken.shape[1] + 1).logits
    return _in_window(window, batch)


def action_hidden(model: PeftModel, batch: ActionBatch, adapter: str) -> Tensor:
    """(B, T, H) last hidden states (after the final norm) where each completion token is chosen."""
    out = _forward(model, batch, adapter, output_hidden_states=True, logits_to_keep=1)
    return _at(out.hidden_states[-1], batch.positions)


def action_logits_and_hidden(model: PeftModel, batch: ActionBatch, adapter: str) -> tuple[Tensor, Tensor]:
    """`action_logits` and `action_hidden` of one adapter from one forward pass."""
    out = _forward(model, batch, adapter, output_hidden_states=True, logits_to_keep=batch.taken.shape[1] + 1)
    return _in_window(out.logits, batch), _at(out.hidden_states[-1], batch.positions)


def _in_window(window: Tensor, batch: ActionBatch) -> Tensor:
    """Logits of the last T + 1 positions (L-T-1 .. L-1) at each completion token's position."""
    L, T = batch.input_ids.shape[1], batch.taken.shape[1]
    return _at(window, (batch.positions - (L - T - 1)).clamp(min=0))


def _forward(model: PeftModel, batch: ActionBatch, adapter: str | None, **kwargs: object):
    if adapter is not None:
        model.set_adapter(adapter)
    position_ids = (batch.attention_mask.cumsum(-1) - 1).clamp(min=0)  # count from each row's first token
    with reference(model) if adapter is None else nullcontext():
        return model(
            input_ids=batch.input_ids,
            attention_mask=batch.attention_mask,
            position_ids=position_ids,
            **kwargs,
        )


def _at(per_position: Tensor, index: Tensor) -> Tensor:
    """(B, P, D) gathered at (B, T) position indices -> (B, T, D)."""
    return per_position.gather(1, index.unsqueeze(-1).expand(-1, -1, per_position.shape[-1]))
