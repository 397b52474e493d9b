"""Batched sampling with the KV cache and left padding, cut by the body stop rule.

Uses `model.generate` (the KV cache, padding and sampling warpers are Hugging Face's) and records,
per sampled token, its log-probability under the distribution it was drawn from (temperature,
top-k and top-p applied): the behaviour log-probs of docs/design.md §4.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import GenerationConfig, PreTrainedTokenizerBase, StoppingCriteria, StoppingCriteriaList

from pipeline.config import Config, SamplingConfig
from pipeline.models.adapters import load_adapters
from pipeline.models.base import load_base
from pipeline.tasks.prompts import cut_body, find_fim_tokens


@dataclass(frozen=True)
class Completion:
    prompt_ids: list[int]
    completion_ids: list[int]  # the action: up to and including the token that ended the body
    behaviour_logprobs: list[float]
    body: str  # the completion text cut by the stop rule
    truncated: bool  # ended by max_new_tokens, not by the stop rule or EOS


def load_sampler(config: Config, base_dir: Path, adapters: Path | None) -> tuple:
    """(model, tokenizer, fim tokens or None): the policy of `adapters` (none: the base) in eval mode."""
    model, tokenizer = load_base(base_dir, config.model.device)
    if adapters is not None:
        model = load_adapters(model, adapters)  # policy adapter active
    model.eval()
    fim = find_fim_tokens(tokenizer.get_vocab()) if config.prompt.format == "fim" else None
    return model, tokenizer, fim


def stream_seed(*parts: object) -> int:
    """A 63-bit seed derived from (seed, iteration, stage, ...): independent streams per use."""
    digest = hashlib.sha256(":".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


class BodyStop(StoppingCriteria):
    """Marks a row finished once its text ends the body (dedent or `return model`)."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, prompt_length: int, batch: int):
        self.tokenizer = tokenizer
        self.prompt_length = prompt_length
        self.stop_at: list[int | None] = [None] * batch  # tokens in the action, once stopped

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs) -> torch.BoolTensor:
        done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        for row in range(input_ids.shape[0]):
            if self.stop_at[row] is None:
                generated = input_ids[row, self.prompt_length :]
                if cut_body(self.tokenizer.decode(generated, skip_special_tokens=True))[1]:
                    self.stop_at[row] = generated.shape[0]
            done[row] = self.stop_at[row] is not None
        return done


@torch.no_grad()
def sample_batch(
    model, tokenizer: PreTrainedTokenizerBase, prompts: list[str], config: SamplingConfig, seed: int
) -> list[Completion]:
    """Sample one completion per prompt; deterministic on the CPU for a given seed."""
    device = next(model.parameters()).device
    encoded = tokenizer(  # left padding: generation continues every prompt from its end
        prompts, return_tensors="pt", padding=True, padding_side="left", add_special_tokens=False
    ).to(device)
    prompt_length = encoded["input_ids"].shape[1]
    stop = BodyStop(tokenizer, prompt_length, len(prompts))
    torch.manual_seed(seed)
    generation = GenerationConfig(  # explicit: no defaults inherited from the checkpoint
        do_sample=True,
        temperature=config.temperature,
        top_k=config.top_k,
        top_p=config.top_p,
        max_new_tokens=config.max_new_tokens,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        output_scores=True,
        return_dict_in_generate=True,
    )
    out = model.generate(
        **encoded, generation_config=generation, stopping_criteria=StoppingCriteriaList([stop])
    )
    generated = out.sequences[:, prompt_length:]  # (B, T)
    taken = torch.stack(
        [  # log-prob of each sampled token under the warped distribution: (B, T)
            step.float().log_softmax(-1).gather(-1, generated[:, t : t + 1]).squeeze(-1)
            for t, step in enumerate(out.scores)
        ],
        dim=1,
    )
    completions = []
    for row in range(len(prompts)):
        ids = generated[row].tolist()
        eos = ids.index(tokenizer.eos_token_id) + 1 if tokenizer.eos_token_id in ids else None
        ends = [n for n in (stop.stop_at[row], eos) if n is not None]
        length = min(ends) if ends else len(ids)
        action = ids[:length]
        prompt_ids = encoded["input_ids"][row][encoded["attention_mask"][row].bool()].tolist()
        text = tokenizer.decode(action, skip_special_tokens=True)
        completions.append(
            Completion(
                prompt_ids=prompt_ids,
                completion_ids=action,
                behaviour_logprobs=taken[row, :length].tolist(),
                body=cut_body(text)[0],
                truncated=not ends,
            )
        )
    return completions


def sample(
    model,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[str],
    config: SamplingConfig,
    seed: int,
    on_batch: Callable[[int, int, float], None] | None = None,
) -> list[Completion]:
    """All prompts in batches of `config.batch_size`; `on_batch(sequences, tokens, seconds)` after each."""
    completions: list[Completion] = []
    for start in range(0, len(prompts), config.batch_size):
        began = time.perf_counter()
        batch = sample_batch(
            model, tokenizer, prompts[start : start + config.batch_size], config, stream_seed(seed, start)
        )
        completions += batch
        if on_batch:
            on_batch(len(batch), sum(len(c.completion_ids) for c in batch), time.perf_counter() - began)
    return completions
