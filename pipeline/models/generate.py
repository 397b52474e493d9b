"""Batched sampling with the KV cache and left padding, cut by the body stop rule.

Uses `model.generate` (the KV cache, padding and the warpers are Hugging Face's) and records, per
sampled token, its log-probability under the distribution it was drawn from (temperature, top-k
and top-p applied): the behaviour log-probs of docs/design.md §4.

Each prompt draws from its own random stream (`GumbelSampler`), so what a prompt samples depends
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
    GenerationConfig,
    LogitsProcessor,
    LogitsProcessorList,
    PreTrainedTokenizerBase,
    StoppingCriteria,
    StoppingCriteriaList,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from pipeline.config import Config, SamplingConfig
from pipeline.models.adapters import load_adapters
from pipeline.models.base import load_base
from pipeline.models.logits import length_batches
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


class GumbelSampler(LogitsProcessor):
    """Draws every row's next token from softmax(scores) with the row's own generator.

    The Gumbel-max trick: argmax_w (log p(w) + G_w), G_w iid Gumbel(0, 1), is a draw from p. So
    `generate` runs greedy on the perturbed scores returned here, and each row's draw uses only its
    own random numbers. Records the log-probability of each drawn token under p.
    """

    def __init__(self, seeds: list[int], device: torch.device):
        self.generators = [torch.Generator(device).manual_seed(seed) for seed in seeds]
        self.logprobs: list[torch.Tensor] = []  # per step, (B,)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        logp = scores.float().log_softmax(-1)
        uniform = torch.stack(
            [torch.rand(logp.shape[-1], generator=g, device=logp.device) for g in self.generators]
        )
        perturbed = logp - torch.log(-torch.log(uniform))  # rand is in [0, 1): G is finite or -inf
        self.logprobs.append(logp.gather(-1, perturbed.argmax(-1, keepdim=True)).squeeze(-1))
        return perturbed


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
    """One completion per tokenized prompt, prompt i drawing with `seeds[i]`; deterministic on the CPU."""
    device = next(model.parameters()).device
    encoded = tokenizer.pad(  # left padding: generation continues every prompt from its end
        {"input_ids": prompts}, padding_side="left", return_tensors="pt"
    ).to(device)
    prompt_length = encoded["input_ids"].shape[1]
    stop = BodyStop(tokenizer, prompt_length, len(prompts))
    sampler = GumbelSampler(seeds, device)
    generation = GenerationConfig(  # explicit: no defaults inherited from the checkpoint
        do_sample=False,  # greedy on the Gumbel-perturbed scores: a draw (GumbelSampler)
        temperature=None,
        top_k=None,
        top_p=None,
        max_new_tokens=config.max_new_tokens,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        return_dict_in_generate=True,
    )
    out = model.generate(
        **encoded,
        generation_config=generation,
        logits_processor=LogitsProcessorList([*warpers(config), sampler]),
        stopping_criteria=StoppingCriteriaList([stop]),
    )
    generated = out.sequences[:, prompt_length:]  # (B, T)
    taken = torch.stack(sampler.logprobs, dim=1)  # (B, T) log-prob of each token where it was drawn
    completions = []
    for row in range(len(prompts)):
        ids = generated[row].tolist()
        eos = ids.index(tokenizer.eos_token_id) + 1 if tokenizer.eos_token_id in ids else None
        ends = [n for n in (stop.stop_at[row], eos) if n is not None]
        length = min(ends) if ends else len(ids)
        action = ids[:length]
        text = tokenizer.decode(action, skip_special_tokens=True)
        completions.append(
            Completion(
                prompt_ids=prompts[row],
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
