"""Sampling and ETPO-update throughput of real architectures, on whatever device torch sees.

    python -m bench.gpu TOKENIZER_DIR [--archs smollm2-135m qwen2.5-coder-1.5b] [--precisions fp32 bf16]

No weights can be brought to the GPU machine, so each architecture is built from its published
configuration with random weights (`from_config`): a matrix product costs the same whatever the
numbers in it. Random weights never stop early, and the timed generation is forced to its full
length anyway. TOKENIZER_DIR is any saved base (the tiny preset's carries SmolLM2's tokenizer);
its ids are below every vocabulary here. Prints one markdown row per (architecture, precision):
sampling tokens/s at two batch sizes (160 new tokens each, the balance-scale prompt), and the
ETPO update's milliseconds per completion token at the default minibatch and a larger one, beside
a supervised step on the same tokens (bench/etpo.py).
"""

from __future__ import annotations

import argparse

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from bench.etpo import update_seconds
from bench.sampling import generate
from pipeline.models.base import DTYPES
from pipeline.tasks.prompts import completion_prompt, state_source

# The published config.json of each model, reduced to what shapes the computation.
ARCHS = {
    "smollm2-135m": dict(
        model_type="llama", hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
        num_attention_heads=9, num_key_value_heads=3, vocab_size=49152, rope_theta=100000.0,
        max_position_embeddings=8192, rms_norm_eps=1e-5, tie_word_embeddings=True,
    ),
    "qwen2.5-coder-1.5b": dict(
        model_type="qwen2", hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
        num_attention_heads=12, num_key_value_heads=2, vocab_size=151936, rope_theta=1000000.0,
        max_position_embeddings=32768, rms_norm_eps=1e-6, tie_word_embeddings=True,
        use_sliding_window=False,
    ),
}  # fmt: skip
NEW_TOKENS = 160


def build(arch: str, precision: str, device: torch.device) -> torch.nn.Module:
    spec = dict(ARCHS[arch])
    config = AutoConfig.for_model(spec.pop("model_type"), **spec)
    torch.manual_seed(0)
    with device:  # initialise on the device: a 1.5B model's random init on the CPU takes minutes
        model = AutoModelForCausalLM.from_config(config, dtype=DTYPES[precision])
    return model.eval()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("tokenizer")
    parser.add_argument("--archs", nargs="+", default=list(ARCHS))
    parser.add_argument("--precisions", nargs="+", default=["fp32", "bf16"])
    parser.add_argument("--batches", nargs=2, type=int, default=[32, 128], help="sampling batch sizes")
    parser.add_argument("--minibatches", nargs=2, type=int, default=[4, 32], help="update minibatch sizes")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    name = torch.cuda.get_device_name() if device.type == "cuda" else f"cpu x{torch.get_num_threads()}"
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    prompt = completion_prompt(state_source("Balance Scale Weight & Distance", (625, 4)))
    small, large = args.batches
    mb_small, mb_large = args.minibatches
    print(
        f"| device | model | precision | sampling tok/s, batch {small} | batch {large} "
        f"| ETPO ms/token, minibatch {mb_small} (vs supervised) | minibatch {mb_large} (vs supervised) |"
    )
    print("|---|---|---|---|---|---|---|")
    for arch in args.archs:
        for precision in args.precisions:
            model = build(arch, precision, device)
            generate(model, tokenizer, [prompt], 4)  # warm-up
            seconds = [generate(model, tokenizer, [prompt] * b, NEW_TOKENS) for b in args.batches]
            rates = [b * NEW_TOKENS / s for b, s in zip(args.batches, seconds, strict=True)]
            del model  # each update below attaches adapters to a fresh model
            updates = []
            for minibatch in args.minibatches:
                etpo_s, sft_s, tokens = update_seconds(build(arch, precision, device), minibatch)
                updates.append(f"{etpo_s * 1e3 / tokens:.3f} ({etpo_s / sft_s:.2f}x)")
            print(
                f"| {name} | {arch} | {precision} | {rates[0]:.0f} | {rates[1]:.0f} "
                f"| {updates[0]} | {updates[1]} |",
                flush=True,
            )
            if device.type == "cuda":
                torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
