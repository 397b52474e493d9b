"""ETPO benchmarks: vectorised targets vs a per-token loop, memory per trajectory, update cost.

    python bench/etpo.py [MODEL_DIR]     # MODEL_DIR for the update-time comparison (e.g. SmolLM2)

1. `q_targets` (one matrix product) vs the same recursion as a Python loop over tokens, and the
   chunked `token_stats` vs one position at a time; 8 actions of 256 tokens, vocabulary 49,152.
2. Bytes kept per trajectory (7 float32 per token) vs the reference code's stored logits of
   three models (3 x T x V float32). (Transient: one trajectory's logits while it is reduced.)
3. One ETPO update (critic and policy passes, each with its backward pass; the reference's
   values at the taken tokens come from the targets stage) vs one supervised
   step (one forward + backward) on the same 4 x 256-token minibatch, seconds per token.
"""

from __future__ import annotations

import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

from pipeline.config import load_config
from pipeline.etpo.bellman import q_targets, token_stats

B, T, V, CHUNK = 8, 256, 49152, 64
DEFAULTS = load_config(Path(__file__).resolve().parents[1] / "params.yaml")


def timed(fn, repeat: int = 3) -> float:
    """Mean seconds of `fn` after one warm-up call; waits for queued GPU work at both ends."""
    fn()
    sync()
    began = time.perf_counter()
    for _ in range(repeat):
        fn()
    sync()
    return (time.perf_counter() - began) / repeat


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def loop_q_targets(values, logratio, lengths, reward, done, boot, gamma, beta, lam):
    y = torch.zeros_like(values)
    for b in range(values.shape[0]):
        n = int(lengths[b])
        y[b, n - 1] = reward[b] + gamma * (1 - float(done[b])) * boot[b]
        for j in range(n - 2, -1, -1):
            y[b, j] = (1 - lam) * values[b, j + 1] + lam * (y[b, j + 1] - beta * logratio[b, j + 1])
    return y


def loop_token_stats(z_pi, z_rho, z_target, taken, beta):
    """One position at a time (what a per-token implementation does)."""
    out = []
    for b in range(z_pi.shape[0]):
        for j in range(z_pi.shape[1]):
            s = token_stats(
                z_pi[b : b + 1, j : j + 1],
                z_rho[b : b + 1, j : j + 1],
                z_target[b : b + 1, j : j + 1],
                taken[b : b + 1, j : j + 1],
                beta,
                "residual",
            )
            out.append(s.soft_value)
    return out


def targets_bench() -> None:
    gen = torch.Generator().manual_seed(0)
    values, logratio = torch.randn(B, T, generator=gen), torch.randn(B, T, generator=gen)
    lengths, reward = torch.full((B,), T), torch.rand(B, generator=gen)
    done, boot = torch.zeros(B, dtype=torch.bool), torch.randn(B, generator=gen)
    args = (values, logratio, lengths, reward, done, boot, 1.0, 0.1, 0.5)
    assert torch.allclose(q_targets(*args), loop_q_targets(*args), atol=1e-4)
    vec, loop = timed(lambda: q_targets(*args)), timed(lambda: loop_q_targets(*args), repeat=1)
    print(
        f"| q_targets, {B} x {T} tokens, lambda 0.5 | {vec * 1e3:.2f} ms | {loop * 1e3:.1f} ms "
        f"| {loop / vec:.0f}x |"
    )
    z = [torch.randn(2, T, V, generator=gen) for _ in range(3)]
    taken = torch.randint(0, V, (2, T), generator=gen)
    vec = timed(lambda: token_stats(*z, taken, 0.1, "residual", CHUNK), repeat=1)
    loop = timed(lambda: loop_token_stats(*z, taken, 0.1), repeat=1)
    print(
        f"| token_stats, 2 x {T} tokens x {V} vocab | {vec * 1e3:.0f} ms | {loop * 1e3:.0f} ms "
        f"| {loop / vec:.1f}x |"
    )


def memory_bench() -> None:
    stored = (
        7 * T * 4 + 4
    )  # q_target, q_taken, soft_value, kl_ref, entropy, ref_logit, ref_logprob + bootstrap

    reference = 3 * T * V * 4  # the reference code keeps three models' float32 logits
    print(
        f"| kept on disk per {T}-token trajectory | {stored / 1024:.1f} KiB | {reference / 2**20:.0f} MiB "
        f"| {reference / stored:.0f}x |"
    )


def update_seconds(
    model, minibatch: int = 4, prompt: int = 96, completion: int = 160
) -> tuple[float, float, int]:
    """Seconds of one ETPO update (the default step, with its reference and pi_k passes) and of one
    supervised step on `minibatch` random actions, and the completion tokens they hold. The
    model's device and dtype are used as loaded."""
    from functools import partial

    from pipeline.algorithms import prepare_update
    from pipeline.etpo.train import etpo_update
    from pipeline.models.adapters import attach_adapters
    from pipeline.models.update import train_adapters

    torch.manual_seed(0)
    peft_model = attach_adapters(model, DEFAULTS.lora)
    gen = torch.Generator().manual_seed(0)
    rows = [
        {
            "prompt_ids": torch.randint(0, 1000, (prompt,), generator=gen).tolist(),
            "completion_ids": torch.randint(0, 1000, (completion,), generator=gen).tolist(),
            "q_target": torch.randn(completion, generator=gen).tolist(),
            "ref_logit": torch.randn(completion, generator=gen).tolist(),  # the targets stage's
            "ref_logprob": (-torch.rand(completion, generator=gen)).tolist(),
            "advantage": torch.randn(completion, generator=gen).tolist(),
            "behaviour_logprobs": (-torch.rand(completion, generator=gen)).tolist(),
        }
        for _ in range(minibatch)
    ]
    train = replace(DEFAULTS.train, epochs=1, minibatch_size=minibatch)
    prepare_update(DEFAULTS, peft_model)
    update = partial(etpo_update, etpo=DEFAULTS.etpo)
    etpo_s = timed(lambda: train_adapters(peft_model, rows, update, train, 0), repeat=2)

    peft_model.set_adapter("policy")
    opt = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-4)
    device = next(peft_model.parameters()).device
    input_ids = torch.tensor([r["prompt_ids"] + r["completion_ids"] for r in rows], device=device)
    labels = input_ids.clone()  # equal lengths: no padding
    labels[:, :prompt] = -100  # the loss on the completions only, as ETPO's

    def supervised() -> None:
        loss = peft_model(input_ids=input_ids, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad()

    sft_s = timed(supervised, repeat=2)
    return etpo_s, sft_s, minibatch * completion


def update_bench(model_dir: str) -> None:
    from pipeline.models.base import load_base

    model, _ = load_base(model_dir)
    etpo_s, sft_s, tokens = update_seconds(model)
    print(
        f"| {model_dir}: 4 x (96 prompt + 160 completion) tokens | ETPO {etpo_s * 1e3 / tokens:.1f} ms/token "
        f"| supervised {sft_s * 1e3 / tokens:.1f} ms/token | {etpo_s / sft_s:.2f}x |"
    )


def main() -> None:
    torch.manual_seed(0)
    print("| computation | vectorised | per-token loop | speed-up |\n|---|---|---|---|")
    targets_bench()
    print("\n| memory | ours | reference | ratio |\n|---|---|---|---|")
    memory_bench()
    if len(sys.argv) > 1:
        print("\n| update | ETPO | supervised | ratio |\n|---|---|---|---|")
        update_bench(sys.argv[1])


if __name__ == "__main__":
    main()
