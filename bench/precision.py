"""fp32 against bf16 on this CPU: matrix products, a forward pass, an ETPO update, a supervised step.

    python -m bench.precision MODEL_DIR      # e.g. data/models/warm (SmolLM2-135M)

Whether `model.precision: bf16` pays depends on the CPU: with AVX512-BF16 or AMX units a bf16
matrix product is several times an fp32 one; without them it is emulated and several times
slower (bench/RESULTS.md). Prints one markdown table row per measurement, fp32 then bf16 and
their ratio, so one run gives the ratios of one sitting. Run it on an otherwise idle machine.
"""

from __future__ import annotations

import sys

import torch

from bench.etpo import timed, update_seconds
from pipeline.models.base import load_base

SHAPES = {"decode": (32, 576, 1536), "prefill": (2048, 576, 1536)}  # SmolLM2's MLP, rows x in x out


def matmul_gflops(rows: int, inner: int, cols: int, dtype: torch.dtype) -> float:
    a, b = torch.randn(rows, inner, dtype=dtype), torch.randn(inner, cols, dtype=dtype)
    return 2 * rows * inner * cols / timed(lambda: a @ b, repeat=20) / 1e9


def forward_seconds(model: torch.nn.Module, batch: int = 4, tokens: int = 256) -> float:
    ids = torch.randint(0, 1000, (batch, tokens), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return timed(lambda: model(input_ids=ids), repeat=2)


def main(model_dir: str) -> None:
    print(f"torch {torch.__version__}, CPU capability {torch.backends.cpu.get_cpu_capability()}, "
          f"{torch.get_num_threads()} threads")  # fmt: skip
    print("| measurement | fp32 | bf16 | bf16 speed-up |\n|---|---|---|---|")
    for name, shape in SHAPES.items():
        fp32, bf16 = (matmul_gflops(*shape, dtype) for dtype in (torch.float32, torch.bfloat16))
        size = "x".join(map(str, shape))
        print(f"| matmul {name} {size} (GFLOP/s) | {fp32:.0f} | {bf16:.0f} | {bf16 / fp32:.2f}x |")
    results = {}
    for precision in ("fp32", "bf16"):
        model, _ = load_base(model_dir, "cpu", precision)
        forward = forward_seconds(model)
        etpo_s, sft_s, tokens = update_seconds(model)  # attaches fp32 LoRA adapters to `model`
        results[precision] = (forward, etpo_s * 1e3 / tokens, sft_s * 1e3 / tokens)
    rows = ("forward, 4 x 256 tokens, no grad (s)", "ETPO update (ms/token)", "supervised step (ms/token)")
    for i, row in enumerate(rows):
        fp32, bf16 = results["fp32"][i], results["bf16"][i]
        print(f"| {row} | {fp32:.3f} | {bf16:.3f} | {fp32 / bf16:.2f}x |")


if __name__ == "__main__":
    main(sys.argv[1])
