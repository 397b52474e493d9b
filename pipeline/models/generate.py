"""Batched sampling with the KV cache and left padding, cut by the body stop rule.

A decode loop of our own (the warpers are Hugging Face's) that drops rows as they end, and records,
per sampled token, its log-probability under the distribution it was drawn from (temperature,
top-k and top-p applied): the behaviour log-probs of docs/design.md §4.

Each prompt draws from its own random stream (`gumbel_draw`), so what a prompt samples depends
on its seed and its own logits, not on the batch it shares: any batch size, and any split of the
prompts over processes, gives the same completions (up to float rounding of batched matmuls).
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import (
    LogitsProcessor,
    PreTrainedTokenizerBase,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from pipeline.config import Config, SamplingConfig
from pipeline.models.adapters import load_adapters
from pipeline.models.base import load_base
from pipeline.models.logits import CACHE, length_batches, real_positions
from pipeline.tasks.prompts import cut_body, find_fim_tokens


@dataclass(frozen=True)
class Completion:
    prompt_ids: list[int]
    completion_ids: list[int]  # the action: up to and including the token that ended the body
    behaviour_logprobs: list[float]
    body: str  # the completion text cut by the stop rule
    truncated: bool  # ended by max_new_tokens, not by the stop rule or EOS


def load_sampler(config: Config, base_dir: Path, adapters: Path | None) -> tuple:
    """(model, tokenizer, fim tokens or None): the policy of `adapters` (none: the base) in eval mode.

    The policy's LoRA is merged into the weights: the same function, up to float rounding, without
    peft's two extra small products per adapted layer and token (generation 1.18x faster,
    bench/RESULTS.md). The model is for sampling only: its critic and reference are gone.
    """
    model, tokenizer = load_base(base_dir, config.model.device, config.model.precision)
    if adapters is not None:
        model = load_adapters(model, adapters).merge_and_unload(adapter_names=["policy"])
    model.eval()
    fim = find_fim_tokens(tokenizer.get_vocab()) if config.prompt.format == "fim" else None
    return model, tokenizer, fim


def stream_seed(*parts: object) -> int:
    """A 63-bit seed derived from (seed, iteration, stage, ...): independent streams per use."""
    digest = hashlib.sha256(":".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def body_ended(tokenizer: PreTrainedTokenizerBase, completion_ids: list[int]) -> bool:
    """Whether the text of `completion_ids` ends the body (dedent or `return model`)."""
    return cut_body(tokenizer.decode(completion_ids, skip_special_tokens=True))[1]


def gumbel_draw(scores: torch.Tensor, generators: list[torch.Generator]) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's next token drawn from softmax(scores) (B, V) with the row's own generator, and the
    token's log-probability under it: two (B,) tensors.

    The Gumbel-max trick: argmax_w (log p(w) + G_w), G_w iid Gumbel(0, 1), is a draw from p, and
    each row's draw uses only its own random numbers (one uniform per vocabulary entry and step).
    """
    logp = scores.float().log_softmax(-1)
    uniform = torch.stack([torch.rand(logp.shape[-1], generator=g, device=logp.device) for g in generators])
    tokens = (logp - torch.log(-torch.log(uniform))).argmax(-1)  # rand is in [0, 1): G is finite or -inf
    return tokens, logp.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


def warpers(config: SamplingConfig) -> list[LogitsProcessor]:
    """Temperature, top-k, top-p as configured (identity settings add nothing)."""
    out: list[LogitsProcessor] = []
    if config.temperature != 1.0:
        out.append(TemperatureLogitsWarper(config.temperature))
    if config.top_k > 0:
        out.append(TopKLogitsWarper(config.top_k))
    if config.top_p < 1.0:
        out.append(TopPLogitsWarper(config.top_p))
    return out


@torch.no_grad()
def sample_batch(
    model,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[list[int]],
    seeds: list[int],
    config: SamplingConfig,
) -> list[Completion]:
    """One completion per tokenized prompt, prompt i drawing with `seeds[i]`; deterministic on the CPU.

    A decode loop over the key/value cache that drops each row from the batch as it ends (stop
    rule, EOS or `max_new_tokens`), so that a batch costs the tokens its completions have, not its
    longest completion's length times its size (docs/design.md §6). The prompts are left-padded,
    with position ids that count real tokens only (`real_positions`).
    """
    device = next(model.parameters()).device
    encoded = tokenizer.pad({"input_ids": prompts}, padding_side="left", return_tensors="pt").to(device)
    mask = encoded["attention_mask"]
    position = real_positions(mask)
    out = model(
        input_ids=encoded["input_ids"],
        attention_mask=mask,
        position_ids=position,
        use_cache=True,
        logits_to_keep=1,
    )
    cache, position = getattr(out, CACHE), position[:, -1:]
    generators = [torch.Generator(device).manual_seed(seed) for seed in seeds]
    processors = warpers(config)
    drawn: list[list[int]] = [[] for _ in prompts]
    logprobs: list[list[float]] = [[] for _ in prompts]
    ended = [False] * len(prompts)  # by the stop rule or EOS; else by max_new_tokens (truncated)
    live = list(range(len(prompts)))  # the prompts still drawing, in the batch's row order
    while True:
        scores = out.logits[:, -1].float()
        for warp in processors:  # they read only the scores
            scores = warp(None, scores)
        tokens, logp = gumbel_draw(scores, [generators[i] for i in live])
        for i, token, lp in zip(live, tokens.tolist(), logp.tolist(), strict=True):
            drawn[i].append(token)
            logprobs[i].append(lp)
            ended[i] = token == tokenizer.eos_token_id or body_ended(tokenizer, drawn[i])
        keep = [row for row, i in enumerate(live) if not ended[i]]
        if not keep or len(drawn[live[0]]) == config.max_new_tokens:
            break
        if len(keep) < len(live):
            index = torch.tensor(keep, device=device)
            cache.batch_select_indices(index)
            mask, position, tokens = mask[index], position[index], tokens[index]
            live = [live[row] for row in keep]
        mask = torch.cat([mask, mask.new_ones((len(live), 1))], dim=1)
        position = position + 1
        out = model(
            input_ids=tokens.unsqueeze(1), attention_mask=mask, position_ids=position, **{CACHE: cache}
        )
    return [
        Completion(
            prompt_ids=prompt,
            completion_ids=action,
            behaviour_logprobs=logp,
            body=cut_body(tokenizer.decode(action, skip_special_tokens=True))[0],
            truncated=not stopped,
        )
        for prompt, action, logp, stopped in zip(prompts, drawn, logprobs, ended, strict=True)
    ]


def sample(
    model,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[str],
    config: SamplingConfig,
    seed: int,
    on_batch: Callable[[int, int, float], None] | None = None,
    first: int = 0,
) -> list[Completion]:
    """All prompts in batches of `config.batch_size`; `on_batch(sequences, tokens, seconds)` after each.

    Prompt i draws from the stream `stream_seed(seed, first + i)`: `first` is the index of
    `prompts[0]` among the stage's prompts, so a shard of them samples what the whole would.
    """
    ids = tokenizer(prompts, add_special_tokens=False)["input_ids"]
    completions: dict[int, Completion] = {}
    for rows in length_batches([len(p) for p in ids], config.batch_size, slack=2.0):
        began = time.perf_counter()
        seeds = [stream_seed(seed, first + i) for i in rows]
        batch = sample_batch(model, tokenizer, [ids[i] for i in rows], seeds, config)
        completions.update(zip(rows, batch, strict=True))
        if on_batch:
            on_batch(len(batch), sum(len(c.completion_ids) for c in batch), time.perf_counter() - began)
    return [completions[i] for i in range(len(prompts))]
