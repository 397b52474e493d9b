"""Logits of the policy, the reference, the critic and the target critic over action tokens.

All four are the same base with a different LoRA adapter active (or none, for the reference),
so one helper switches adapters and slices the positions that predict the completion.

Actions are grouped by prompt (the samples of one state share it): each distinct prompt goes
through the model once, and its samples continue from that prefix's key/value cache, gathered over
them with gradients flowing back through it (docs/design.md §6). A minibatch goes in parts of
similar prompt length, each part in two passes: its distinct prompts, left-padded, then its
completions, right-padded, each attending to its prompt's cache. Attention masks keep
padding invisible and position ids count real tokens only, so every valid position sees exactly
its own sequence.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass

import torch
from peft import PeftModel
from torch import Tensor
from transformers.modeling_outputs import CausalLMOutputWithPast

from pipeline.models.adapters import reference


@dataclass(frozen=True)
class ActionBatch:
    """Prompt + completion sequences, the distinct prompts stored once; outputs are (B, T) by row."""

    prompts: Tensor  # (G, P) distinct prompts, left-padded with 0
    prompt_mask: Tensor  # (G, P) 1 on prompt tokens
    prompt_of: Tensor  # (B,) each action's row in `prompts`
    taken: Tensor  # (B, T) completion token ids, 0 past the end
    mask: Tensor  # (B, T) 1 on valid completion tokens

    @classmethod
    def build(cls, prompts: list[list[int]], completions: list[list[int]]) -> ActionBatch:
        groups = prompt_groups(prompts)
        distinct = [prompts[rows[0]] for rows in groups]
        P = max(len(p) for p in distinct)
        prompt_ids = torch.zeros((len(distinct), P), dtype=torch.long)
        prompt_mask = torch.zeros((len(distinct), P), dtype=torch.long)
        for g, prompt in enumerate(distinct):
            prompt_ids[g, P - len(prompt) :] = torch.tensor(prompt)
            prompt_mask[g, P - len(prompt) :] = 1
        prompt_of = torch.zeros(len(prompts), dtype=torch.long)
        for g, rows in enumerate(groups):
            prompt_of[rows] = g
        B, T = len(prompts), max(len(c) for c in completions)
        taken = torch.zeros((B, T), dtype=torch.long)
        mask = torch.zeros((B, T))
        for b, c in enumerate(completions):
            taken[b, : len(c)] = torch.tensor(c)
            mask[b, : len(c)] = 1.0
        return cls(prompt_ids, prompt_mask, prompt_of, taken, mask)

    def to(self, device: torch.device) -> ActionBatch:
        fields = (self.prompts, self.prompt_mask, self.prompt_of, self.taken, self.mask)
        return ActionBatch(*(t.to(device) for t in fields))

    def part(self, rows: list[int]) -> tuple[ActionBatch, Tensor]:
        """The actions `rows` as a batch of their own (their distinct prompts only), padding trimmed
        to its longest prompt and completion, and their rows in this batch."""
        rows = torch.tensor(rows, device=self.prompt_of.device)
        index, local = torch.unique(self.prompt_of[rows], return_inverse=True)  # their prompts
        mask = self.prompt_mask[index]
        P, T = int(mask.sum(1).max()), max(1, int(self.mask[rows].sum(1).max()))
        part = ActionBatch(
            self.prompts[index, -P:], mask[:, -P:], local, self.taken[rows, :T], self.mask[rows, :T]
        )
        return part, rows


def length_batches(
    lengths: list[int], size: int, slack: float, weights: list[int] | None = None
) -> list[list[int]]:
    """Indices of sequences of `lengths` in batches of at most `size` (in `weights`, 1 each if
    none; an item heavier than `size` goes alone), cut from them sorted by length, each batch's
    longest within `slack` times its shortest. A batch is padded to its longest sequence: a
    73-token first try padded to a 385-token reflection prompt would pay for the difference in
    every pass (docs/design.md §6)."""
    weights = weights or [1] * len(lengths)
    batches: list[list[int]] = []
    load = 0
    for i in sorted(range(len(lengths)), key=lengths.__getitem__):
        if not batches or load + weights[i] > size or lengths[i] > slack * lengths[batches[-1][0]]:
            batches.append([])
            load = 0
        batches[-1].append(i)
        load += weights[i]
    return batches


def prompt_groups(prompts: list[list[int]]) -> list[list[int]]:
    """Indices of equal prompts (the samples of one state), groups in order of first appearance."""
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, prompt in enumerate(prompts):
        groups.setdefault(tuple(prompt), []).append(i)
    return list(groups.values())


def fill_by_states(
    rows: list[dict], columns: Callable[[list[int]], list[dict]], advance: Callable[[], None]
) -> list[dict]:
    """Update `rows` with `columns(indices)` over batches of whole states: states of similar prompt
    length together, at most ACTIONS_PER_PASS actions a batch, so that one pass of each network
    serves several prompts (a GPU needs the batch; a CPU gains little, docs/design.md §6)."""
    states = prompt_groups([r["prompt_ids"] for r in rows])
    lengths = [len(rows[group[0]]["prompt_ids"]) for group in states]
    sizes = [len(group) for group in states]
    for batch in length_batches(lengths, ACTIONS_PER_PASS, PROMPT_SLACK, weights=sizes):
        indices = [i for s in batch for i in states[s]]
        for i, values in zip(indices, columns(indices), strict=True):
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


class FrozenLogits:
    """What the networks that stay fixed through train@k give (the reference rho, pi_k), computed
    once per action and reused in later epochs instead of a pass per epoch (docs/design.md §6):
    their logits, or a target built from them (`keep`).

    An action's values depend only on its tokens (and, for a target, per-action constants), so they
    are kept by (name, prompt, completion[, constants]), whatever minibatch the action lands in
    next. At most `budget_mb` MiB are kept (an action's logits cost its length x vocabulary x 4
    bytes); a minibatch with an action not kept is computed again whole. One instance serves one
    train stage: pi_k is that stage's. The passes run in eval mode (no dropout), so a kept tensor
    is what a recomputation gives, to float rounding. Under a multi-process launch each process
    keeps its own (the budget is per process, on its device), and shards change with each epoch's
    shuffle, so there the saving is small.
    """

    def __init__(self, budget_mb: float) -> None:
        self.budget = int(budget_mb * 2**20)
        self.used = 0
        self.kept: dict[tuple, tuple[Tensor, ...]] = {}

    def __call__(self, model: PeftModel, batch: ActionBatch, adapter: str | None) -> Tensor:
        """(B, T, V) `action_logits(model, batch, adapter)`, without gradients, 0 past each action."""
        (rows,) = self.keep(adapter, batch, lambda: (frozen_logits(model, batch, adapter),))
        out = rows.new_zeros((*batch.mask.shape, rows.shape[-1]))
        out[batch.mask != 0] = rows
        return out

    def keep(
        self,
        name: str | None,
        batch: ActionBatch,
        compute: Callable[[], tuple[Tensor, ...]],
        constants: list[tuple] | None = None,
    ) -> tuple[Tensor, ...]:
        """`compute()`'s (B, T, ...) tensors at the batch's valid positions, (N, ...) each in row-major
        order, from what was kept under `name` for every action, or computed (and kept if there is
        room). `constants`, one tuple per action, names what else `compute` reads of it (a target's
        stored advantages): two samples of one state with the same tokens but other values (another
        outcome, a replayed iteration) are kept apart."""
        constants = constants or [()] * len(batch.prompt_of)
        keys = [(name, *action, *extra) for action, extra in zip(_actions(batch), constants, strict=True)]
        if all(key in self.kept for key in keys):
            return tuple(torch.cat(parts) for parts in zip(*(self.kept[key] for key in keys), strict=True))
        values = compute()
        for b, key in enumerate(keys):
            n = len(key[2])
            size = sum(t[b, :n].nelement() * t.element_size() for t in values)
            if key not in self.kept and self.used + size <= self.budget:
                self.kept[key] = tuple(t[b, :n].clone() for t in values)
                self.used += size
        valid = batch.mask != 0
        return tuple(t[valid] for t in values)


def frozen_logits(model: PeftModel, batch: ActionBatch, adapter: str | None) -> Tensor:
    """(B, T, V) `action_logits` of a network train@k holds fixed: no gradients, and eval mode, so
    a fixed target has no dropout noise, kept or recomputed alike."""
    training = model.training
    model.eval()
    with torch.no_grad():
        z = action_logits(model, batch, adapter)
    model.train(training)
    return z


def _actions(batch: ActionBatch) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
    """Each action's (prompt, completion) token ids, padding dropped."""
    prompts = [tuple(p[m.bool()].tolist()) for p, m in zip(batch.prompts, batch.prompt_mask, strict=True)]
    lengths = batch.mask.sum(1).long().tolist()
    return [
        (prompts[g], tuple(batch.taken[b, :n].tolist()))
        for b, (g, n) in enumerate(zip(batch.prompt_of.tolist(), lengths, strict=True))
    ]


# transformers 5.2x renamed the key/value cache `past_key_values` -> `cache` (in and out); the
# old name is still accepted there (deprecated), but older versions know only the old one.
CACHE = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"
PROMPT_SLACK = 1.25  # prompts up to 1.25x apart share a pass: at most 20% of its prompt tokens pad
ACTIONS_PER_PASS = 16  # actions at once outside training (targets, eval's KL): 16 x T x V logits


def _forward(
    model: PeftModel, batch: ActionBatch, adapter: str | None, hidden: bool
) -> tuple[Tensor, Tensor]:
    """(B, T, V) fp32 logits and, if `hidden`, (B, T, H) last hidden states (else an empty tensor).

    The actions go in parts of similar prompt length (`_similar_lengths`), so that little compute
    goes to padding; each part takes two passes (`_two_passes`).
    """
    if adapter is not None:
        model.set_adapter(adapter)
    parts = [batch.part(rows) for rows in _similar_lengths(batch)]
    with reference(model) if adapter is None else nullcontext():
        outputs = [_two_passes(model, part, hidden) for part, _ in parts]
    if len(parts) == 1:
        logits, states = outputs[0]
        return logits.float(), states.float()  # the maths runs in fp32 whatever `model.precision`
    B, T = batch.taken.shape
    logits = outputs[0][0].new_zeros((B, T, outputs[0][0].shape[-1]), dtype=torch.float32)
    states = outputs[0][1].new_zeros((B, T, outputs[0][1].shape[-1]), dtype=torch.float32) if hidden else None
    for (_, rows), (z, h) in zip(parts, outputs, strict=True):  # an autograd op: gradients reach each part
        logits[rows, : z.shape[1]] = z.float()
        if hidden:
            states[rows, : h.shape[1]] = h.float()
    return logits, states if hidden else torch.empty(0)


def _similar_lengths(batch: ActionBatch) -> list[list[int]]:
    """The batch's actions in parts whose distinct prompts have similar length, each part's rows in
    batch order (one part: the batch itself). Cutting them further by completion length (each part
    pads its completions to its longest) ran first tries of 16 samples 1.18x faster but minibatches
    of reflections, one state each, 1.33x slower (more, smaller passes; bench/RESULTS.md), and the
    policy's projection skips the padded positions anyway (`pipeline.etpo.losses.projection`)."""
    lengths = batch.prompt_mask.sum(1).tolist()
    parts = []
    for prompts in length_batches(lengths, len(lengths), PROMPT_SLACK):
        rows = torch.isin(batch.prompt_of, torch.tensor(prompts, device=batch.prompt_of.device))
        parts.append(rows.nonzero().squeeze(1).tolist())
    return parts


def real_positions(mask: Tensor) -> Tensor:
    """Position ids of left-padded rows that count real tokens only (padding gets 0, and is masked)."""
    return (mask.cumsum(1) - 1).clamp(min=0)


def _two_passes(model: PeftModel, batch: ActionBatch, hidden: bool) -> tuple[Tensor, Tensor]:
    """The prompts' pass: the last position of each (real, thanks to left padding) predicts its
    samples' first token. The completions' pass: tokens 0 .. T - 2 of every sample, from its
    prompt's cache gathered by `prompt_of` (indexing is an autograd op, so gradients reach the
    prompts' pass), at positions that continue its prompt's real length."""
    T = batch.taken.shape[1]
    positions = real_positions(batch.prompt_mask)
    out = model(
        input_ids=batch.prompts,
        attention_mask=batch.prompt_mask,
        position_ids=positions,
        use_cache=T > 1,
        logits_to_keep=1,
        output_hidden_states=hidden,
    )
    logits = out.logits[batch.prompt_of]  # (B, 1, V)
    states = out.hidden_states[-1][batch.prompt_of, -1:] if hidden else torch.empty(0)
    if T > 1:
        cache = getattr(out, CACHE)
        cache.batch_select_indices(batch.prompt_of)
        seen = batch.prompt_mask[batch.prompt_of]  # (B, P)
        rest = model(
            input_ids=batch.taken[:, :-1],
            attention_mask=torch.cat([seen, torch.ones_like(batch.taken[:, :-1])], dim=1),
            position_ids=seen.sum(1, keepdim=True) + torch.arange(T - 1, device=seen.device),
            **{CACHE: cache},
            output_hidden_states=hidden,
        )
        logits = torch.cat([logits, rest.logits], dim=1)
        states = torch.cat([states, rest.hidden_states[-1]], dim=1) if hidden else states
    return logits, states
