"""Sampling throughput on the CPU: batched generation vs one sequence at a time, and peak memory.

    python bench/sampling.py MODEL_DIR [--sequences 8] [--tokens 96] [--adapters DIR]
    python bench/sampling.py MODEL_DIR --prompts PARQUET [--adapters DIR] [--batch-sizes 16,32,64]

Generates `--sequences` completions of exactly `--tokens` tokens (the stop rule is switched off
by a huge max and EOS suppressed, so both modes do identical work) for the balance-scale prompt,
once as one batch and once one sequence at a time; reports tokens/s and the ratio, and the peak
resident memory of this process (ru_maxrss).

With `--adapters` (an iteration's `adapters/` folder) it instead times the batch with the policy
LoRA as peft applies it (two extra small matrix products per adapted layer and token) against the
same adapter merged into the weights.

With `--prompts` (a stage's trajectories or eval samples: its `prompt` column) it times the
pipeline's own decode loop (`pipeline.models.generate.sample`, stop rule on, params.yaml's
sampling settings) on those prompts at each batch size, and checks that every size draws the same
completions (each prompt has its own random stream): what `sampling.batch_size` is chosen by.
"""

from __future__ import annotations

import argparse
import resource
import time
from dataclasses import replace
from pathlib import Path

import pyarrow.parquet as pq
import torch

from pipeline.config import load_config
from pipeline.models.adapters import load_adapters
from pipeline.models.base import load_base
from pipeline.models.generate import load_sampler, sample
from pipeline.tasks.prompts import completion_prompt, state_source


@torch.no_grad()
def generate(model, tokenizer, prompts: list[str], tokens: int) -> float:
    encoded = tokenizer(
        prompts, return_tensors="pt", padding=True, padding_side="left", add_special_tokens=False
    ).to(model.device)
    torch.manual_seed(0)
    began = time.perf_counter()
    model.generate(
        **encoded,
        do_sample=True,
        temperature=1.0,
        top_k=0,
        max_new_tokens=tokens,
        min_new_tokens=tokens,
        pad_token_id=tokenizer.pad_token_id,
    )
    if model.device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - began


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model")
    parser.add_argument("--sequences", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=96)
    parser.add_argument("--adapters")
    parser.add_argument("--prompts", type=Path)
    parser.add_argument("--batch-sizes", default="16,32,64")
    args = parser.parse_args()
    if args.prompts:
        return compare_batch_sizes(args)
    if args.adapters:
        return compare_merged(args)
    model, tokenizer = load_base(args.model)
    model.eval()
    prompt = completion_prompt(state_source("Balance Scale Weight & Distance", (625, 4)))
    generate(model, tokenizer, [prompt], 4)  # warm-up
    total = args.sequences * args.tokens
    batched = generate(model, tokenizer, [prompt] * args.sequences, args.tokens)
    single = sum(generate(model, tokenizer, [prompt], args.tokens) for _ in range(args.sequences))
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(
        f"| {args.model} | {args.sequences} x {args.tokens} | {total / batched:.1f} | {total / single:.1f} "
        f"| {single / batched:.1f}x | {peak_mb:.0f} |"
    )


def compare_merged(args: argparse.Namespace) -> None:
    prompt = completion_prompt(state_source("Balance Scale Weight & Distance", (625, 4)))
    seconds = {}
    for mode in ("peft", "merged"):
        model, tokenizer = load_base(args.model)
        model = load_adapters(model, args.adapters)
        if mode == "merged":
            model = model.merge_and_unload()
        model.eval()
        generate(model, tokenizer, [prompt], 4)  # warm-up
        seconds[mode] = generate(model, tokenizer, [prompt] * args.sequences, args.tokens)
    total = args.sequences * args.tokens
    print(
        f"| {args.adapters} | {args.sequences} x {args.tokens} | {total / seconds['peft']:.1f} "
        f"| {total / seconds['merged']:.1f} | {seconds['peft'] / seconds['merged']:.2f}x |"
    )


def compare_batch_sizes(args: argparse.Namespace) -> None:
    config = load_config(Path(__file__).resolve().parents[1] / "params.yaml")
    adapters = Path(args.adapters) if args.adapters else None
    model, tokenizer, _ = load_sampler(config, Path(args.model), adapters)
    prompts = pq.read_table(args.prompts, columns=["prompt"])["prompt"].to_pylist()
    sample(model, tokenizer, prompts[:2], replace(config.sampling, max_new_tokens=4), seed=0)  # warm-up
    print("| batch size | tokens drawn | seconds | tokens/s | completions as the first size's |")
    print("|---|---|---|---|---|")
    first = None
    for size in map(int, args.batch_sizes.split(",")):
        began = time.perf_counter()
        completions = sample(model, tokenizer, prompts, replace(config.sampling, batch_size=size), seed=0)
        seconds = time.perf_counter() - began
        drawn = [c.completion_ids for c in completions]
        first = first or drawn
        tokens, same = sum(map(len, drawn)), drawn == first
        print(f"| {size} | {tokens} | {seconds:.1f} | {tokens / seconds:.1f} | {same} |", flush=True)


if __name__ == "__main__":
    main()
