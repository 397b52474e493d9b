"""`model.precision: bf16`: bf16 base weights, fp32 adapters, optimiser state and maths.

On an AVX2 CPU bf16 is 6-9x slower than fp32, on one with AMX 1.2x faster for the main job
(bench/RESULTS.md), so it is chiefly for GPUs; the bounds are checked on the CPU with the tiny
preset, and again on CUDA where a GPU is present.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from pipeline.algorithms import prepare_update, update_for
from pipeline.baselines.targets import action_stats
from pipeline.etpo.targets import action_targets
from pipeline.models.adapters import PREVIOUS_POLICY, adapter_parameters, attach_adapters
from pipeline.models.base import load_base
from pipeline.models.generate import sample
from pipeline.models.logits import ActionBatch, action_logits
from pipeline.models.update import make_optimisers, train_adapters
from pipeline.stages import warmstart
from tests.conftest import DEFAULTS, defaults

BODIES = ["    model = LogisticRegression()\n", "    return model\n", "    x = y\n    return x\n"]
CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")


def prepared(tiny_base, precision: str, device: str = "cpu"):
    """The tiny base in `precision` with the same non-trivial adapters and value heads."""
    model, tokenizer = load_base(tiny_base, device, precision)
    model = attach_adapters(model, defaults("lora", rank=4))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name in ("policy", "critic", "target"):
            for p in adapter_parameters(model, name):
                p.copy_(torch.randn(p.shape, generator=generator) * 0.05)
        for head in (model.value_head, model.target_value_head):
            head.weight.copy_(torch.randn(head.weight.shape, generator=generator) * 0.1)
    return model, tokenizer


def state_rows(tokenizer):
    prompt = tokenizer("def build_model(x_train, y_train):\n", add_special_tokens=False)["input_ids"]
    return [
        {"prompt_ids": prompt, "completion_ids": tokenizer(b, add_special_tokens=False)["input_ids"]}
        | {"reward": r, "done": r > 0}
        for b, r in zip(BODIES, [1.0, -1.0, -0.5], strict=True)
    ]


def outputs(model, tokenizer) -> dict[str, torch.Tensor]:
    """Per-token log-probs of the policy, ETPO targets and baseline statistics of one state."""
    rows = state_rows(tokenizer)
    batch = ActionBatch.build([r["prompt_ids"] for r in rows], [r["completion_ids"] for r in rows])
    batch = batch.to(next(model.parameters()).device)
    with torch.no_grad():
        logp = action_logits(model, batch, "policy").log_softmax(-1)
        logp = logp.gather(-1, batch.taken.unsqueeze(-1)).squeeze(-1)[batch.mask.bool()]
    etpo = defaults("etpo", parametrisation="dueling", lam=0.5)
    targets = action_targets(model, rows, [None, rows[0]["prompt_ids"] + [11], None], etpo)
    stats = action_stats(model, rows, values=True)
    flat = {"logp": logp.cpu()}
    for key in ("q_target", "soft_value"):
        flat[key] = torch.tensor([x for t in targets for x in t[key]])
    for key in stats[0]:
        flat[f"stats/{key}"] = torch.tensor([x for s in stats for x in s[key]])
    return flat


# Measured on the tiny preset (CPU): log-probs within 0.0023 nats, ETPO targets and soft values
# within 0.007, baseline values and log-ratios within 0.005, KL and entropy within 1e-4. Log-probs
# taken from bf16 logits, without the fp32 upcast, are off by ~0.04 nats at log-probs near -11.
BOUNDS = {"logp": 0.01, "q_target": 0.02, "soft_value": 0.02, "stats/kl_ref": 1e-3}
BOUNDS |= {"stats/entropy": 1e-3, "stats/logratio": 0.02, "stats/value": 0.02}
BOUNDS |= {"stats/ref_logit": 0.01, "stats/ref_logprob": 0.01}  # the reference's, like logp


def assert_within_bounds(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert got.keys() == want.keys() == BOUNDS.keys()
    for key, bound in BOUNDS.items():
        error = (got[key] - want[key]).abs().max().item()
        assert error <= bound, (key, error)


def test_bf16_log_probs_and_targets_stay_within_bounds_of_fp32(tiny_base):
    fp32_model, tokenizer = prepared(tiny_base, "fp32")
    bf16_model, _ = prepared(tiny_base, "bf16")
    assert next(bf16_model.base_model.model.model.parameters()).dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for p in adapter_parameters(bf16_model, "policy"))
    assert_within_bounds(outputs(bf16_model, tokenizer), outputs(fp32_model, tokenizer))


def train_losses(model, tokenizer, steps: int = 3) -> list[float]:
    rows = [
        r | {"q_target": [0.0] * (len(r["completion_ids"]) - 1) + [r["reward"]]}
        for r in state_rows(tokenizer)
    ]
    for row, stats in zip(rows, action_stats(model, rows, values=False), strict=True):
        row.update(ref_logit=stats["ref_logit"], ref_logprob=stats["ref_logprob"])  # as targets stores them
        n = len(row["q_target"])  # V = 0; mu 0.9 and 0.02: weights 1.1 and the cap, 10
        row.update(advantage=row["q_target"], behaviour_logprobs=[-0.1, -4.0] * (n // 2) + [-0.1] * (n % 2))
    config = defaults("train", epochs=steps, minibatch_size=len(rows))
    optimisers = make_optimisers(model, config)
    logged: list[dict] = []
    settings = replace(DEFAULTS, algo="etpo")  # the default step: reference and pi_k passes in bf16 too
    prepare_update(settings, model)
    update = update_for(settings)
    train_adapters(model, rows, update, config, seed=0, log=logged.append, optimisers=optimisers)
    for optimiser in optimisers.values():  # Adam's moments are fp32 like the adapters
        assert all(v.dtype == torch.float32 for s in optimiser.state.values() for v in s.values() if v.dim())
    return [m[key] for m in logged for key in ("train/critic_loss", "train/policy_loss")]


def test_bf16_training_keeps_fp32_adapters_and_follows_fp32(tiny_base):
    fp32_model, tokenizer = prepared(tiny_base, "fp32")
    bf16_model, _ = prepared(tiny_base, "bf16")
    before = [p.detach().clone() for p in adapter_parameters(bf16_model, "critic")]
    got, want = train_losses(bf16_model, tokenizer), train_losses(fp32_model, tokenizer)
    for adapter in ("critic", "policy", PREVIOUS_POLICY):
        assert all(p.dtype == torch.float32 for p in adapter_parameters(bf16_model, adapter)), adapter
    assert any(
        not torch.equal(p, b) for p, b in zip(adapter_parameters(bf16_model, "critic"), before, strict=True)
    )
    assert got == pytest.approx(want, rel=0.05, abs=0.001), (got, want)


def test_bf16_sampling_records_the_log_probs_of_its_own_forward(tiny_base):
    model, tokenizer = load_base(tiny_base, "cpu", "bf16")
    config = defaults("sampling", max_new_tokens=12)
    (c,) = sample(model, tokenizer, ["def build_model(x_train, y_train):\n"], config, seed=3)
    batch = ActionBatch.build([c.prompt_ids], [c.completion_ids])
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([c.prompt_ids + c.completion_ids])).logits[0].float()
    n = len(c.prompt_ids)
    expected = logits[n - 1 : -1].log_softmax(-1).gather(-1, batch.taken[0].unsqueeze(-1)).squeeze(-1)
    assert torch.allclose(torch.tensor(c.behaviour_logprobs), expected, atol=0.01)


@CUDA
def test_cuda_bf16_matches_cpu_fp32_within_bounds(tiny_base):
    fp32_model, tokenizer = prepared(tiny_base, "fp32")
    cuda_model, _ = prepared(tiny_base, "bf16", "cuda")
    assert_within_bounds(outputs(cuda_model, tokenizer), outputs(fp32_model, tokenizer))
    assert train_losses(cuda_model, tokenizer) == pytest.approx(
        train_losses(fp32_model, tokenizer), rel=0.05, abs=0.01
    )


def test_bf16_warm_start_merges_into_bf16_weights(tiny_base, tmp_path):
    model_config = replace(DEFAULTS.model, precision="bf16")
    config = replace(
        DEFAULTS, model=model_config, warmstart=defaults("warmstart", steps=2, batch_size=2, corpus_size=4)
    )
    info = warmstart.run(config, tiny_base, tmp_path / "warm")
    assert len(info["losses"]) == 2 and all(loss == loss for loss in info["losses"])  # finite, not NaN
    model, _ = load_base(tmp_path / "warm", "cpu", "bf16")
    assert next(model.parameters()).dtype == torch.bfloat16
