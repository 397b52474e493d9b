"""Base model, adapters and sampling on the tiny preset (the real SmolLM2 is the slow test)."""

from dataclasses import replace

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from pipeline.models import generate
from pipeline.models.adapters import (
    ADAPTERS,
    adapter_parameters,
    attach_adapters,
    load_adapters,
    reference,
    save_adapters,
)
from pipeline.models.base import load_base
from pipeline.models.generate import body_ended, gumbel_draw, load_sampler, sample
from pipeline.tasks.prompts import completion_prompt, state_source
from tests.conftest import DEFAULTS, defaults

PROMPT = completion_prompt(state_source("Balance Scale", (625, 4)))


def logits(model, tokenizer, text=PROMPT):
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        return model(**ids).logits


def perturb(model, seed=0):
    """Give every LoRA weight a random value, as training would."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.05)


def test_fresh_adapters_are_the_identity_and_reference_is_the_base(tiny_base):
    model, tokenizer = load_base(tiny_base)
    plain = logits(AutoModelForCausalLM.from_pretrained(tiny_base), tokenizer)
    peft_model = attach_adapters(model, defaults("lora", rank=4))
    for name in ADAPTERS:
        peft_model.set_adapter(name)
        assert torch.equal(logits(peft_model, tokenizer), plain), name  # LoRA B starts at zero
    perturb(peft_model)
    peft_model.set_adapter("policy")
    assert not torch.allclose(logits(peft_model, tokenizer), plain)
    with reference(peft_model):
        assert torch.equal(logits(peft_model, tokenizer), plain)


def test_the_target_critic_starts_as_an_exact_copy_of_the_critic(tiny_base):
    """Polyak averages A and B separately, so only equal factors make Q_bar track Q."""
    model, tokenizer = load_base(tiny_base)
    peft_model = attach_adapters(model, defaults("lora", rank=4))
    critic, target = adapter_parameters(peft_model, "critic"), adapter_parameters(peft_model, "target")
    assert len(critic) == len(target) > 0
    assert all(torch.equal(c, t) for c, t in zip(critic, target, strict=True))
    assert not torch.equal(critic[0], adapter_parameters(peft_model, "policy")[0])  # A is random per adapter
    with torch.no_grad():  # the same critic step on both: Q_bar == Q (in iteration 000 and after)
        for c, t in zip(critic, target, strict=True):
            step = torch.randn(c.shape, generator=torch.Generator().manual_seed(c.numel())) * 0.05
            c.add_(step)
            t.add_(step)
    peft_model.set_adapter("critic")
    q = logits(peft_model, tokenizer)
    peft_model.set_adapter("target")
    assert torch.equal(logits(peft_model, tokenizer), q)


def test_adapters_save_and_load_to_identical_logits(tiny_base, tmp_path):
    model, tokenizer = load_base(tiny_base)
    peft_model = attach_adapters(model, defaults("lora", rank=4))
    perturb(peft_model)
    before = {}
    for name in ADAPTERS:
        peft_model.set_adapter(name)
        before[name] = logits(peft_model, tokenizer)
    save_adapters(peft_model, tmp_path / "adapters")
    loaded = load_adapters(load_base(tiny_base)[0], tmp_path / "adapters")
    for name in ADAPTERS:
        loaded.set_adapter(name)
        assert torch.equal(logits(loaded, tokenizer), before[name]), name
    assert not torch.equal(before["policy"], before["critic"])


def test_sampling_is_deterministic_for_a_seed(tiny_base):
    model, tokenizer = load_base(tiny_base)
    config = defaults("sampling", batch_size=3, max_new_tokens=12, temperature=1.0)
    prompts = [PROMPT, PROMPT + "    # a longer prompt to force left padding\n", PROMPT]
    first = sample(model, tokenizer, prompts, config, seed=7)
    assert first == sample(model, tokenizer, prompts, config, seed=7)
    assert first != sample(model, tokenizer, prompts, config, seed=8)
    for c in first:
        assert len(c.completion_ids) == len(c.behaviour_logprobs) >= 1
        assert all(lp <= 0.0 for lp in c.behaviour_logprobs)
        assert not c.truncated or len(c.completion_ids) == config.max_new_tokens
    # the prompt ids are the unpadded prompt, whatever the batch's padding
    assert first[1].prompt_ids == tokenizer(prompts[1], add_special_tokens=False)["input_ids"]


def test_gumbel_draw_draws_from_the_softmax():
    """20,000 rows, one seed each, on the same scores: the drawn tokens' frequencies are the
    softmax's (within 4 standard errors), and each recorded log-prob is that of the drawn token."""
    p = torch.tensor([0.5, 0.3, 0.15, 0.05])
    n = 20_000
    drawn, logp = gumbel_draw(p.log().expand(n, -1), [torch.Generator().manual_seed(i) for i in range(n)])
    frequency = torch.bincount(drawn, minlength=4) / n
    assert ((frequency - p).abs() < 4 * (p * (1 - p) / n).sqrt()).all(), frequency
    assert torch.allclose(logp, p.log()[drawn])


def test_a_prompt_samples_the_same_in_any_batch_and_shard(tiny_base):
    """Each prompt draws from its own stream: batch sizes 1 and 3, and the last two prompts
    sampled alone as a shard (`first=1`), give the same completions."""
    model, tokenizer = load_base(tiny_base)
    prompts = [PROMPT, PROMPT + "    # a longer prompt to force left padding\n", PROMPT]
    config = defaults("sampling", max_new_tokens=12)
    together = sample(model, tokenizer, prompts, replace(config, batch_size=3), seed=5)
    assert together == sample(model, tokenizer, prompts, replace(config, batch_size=1), seed=5)
    assert together[1:] == sample(
        model, tokenizer, prompts[1:], replace(config, batch_size=2), seed=5, first=1
    )
    assert together[0] != together[2]  # the same prompt, two streams


def test_top_k_one_is_greedy(tiny_base):
    model, tokenizer = load_base(tiny_base)
    (c,) = sample(model, tokenizer, [PROMPT], defaults("sampling", top_k=1, max_new_tokens=6), seed=0)
    ids = torch.tensor([c.prompt_ids + c.completion_ids])
    with torch.no_grad():
        greedy = model(ids).logits[0, len(c.prompt_ids) - 1 : -1].argmax(-1)
    assert c.completion_ids == greedy.tolist() and c.behaviour_logprobs == [0.0] * len(c.completion_ids)


def test_the_sampler_is_the_policy_with_its_adapter_merged(tiny_base, tmp_path):
    """load_sampler merges the policy LoRA into the weights: the policy's logits, to float rounding."""
    torch.manual_seed(0)
    model = attach_adapters(load_base(tiny_base)[0], defaults("lora", rank=4))
    with torch.no_grad():
        for p in adapter_parameters(model, "policy"):
            p.normal_(0.0, 0.05)
    save_adapters(model, tmp_path)
    sampler, _, _ = load_sampler(DEFAULTS, tiny_base, tmp_path)
    assert not isinstance(sampler, PeftModel)
    ids = torch.tensor([[11, 12, 13, 14, 15]])
    with torch.no_grad():
        want = load_adapters(load_base(tiny_base)[0], tmp_path)(input_ids=ids).logits  # policy active
        got = sampler(input_ids=ids).logits
        base = load_base(tiny_base)[0](input_ids=ids).logits
    assert not torch.allclose(want, base, atol=1e-3)  # the adapter matters
    assert torch.allclose(got, want, atol=1e-5)


def test_behaviour_logprobs_match_a_forward_pass(tiny_base):
    model, tokenizer = load_base(tiny_base)
    config = defaults("sampling", batch_size=1, max_new_tokens=8, temperature=1.0)
    (c,) = sample(model, tokenizer, [PROMPT], config, seed=3)
    ids = torch.tensor([c.prompt_ids + c.completion_ids])
    with torch.no_grad():
        logprobs = model(ids).logits[0, len(c.prompt_ids) - 1 : -1].log_softmax(-1)
    expected = logprobs.gather(-1, torch.tensor(c.completion_ids)[:, None]).squeeze(-1)
    assert torch.allclose(torch.tensor(c.behaviour_logprobs), expected, atol=1e-4)


def test_body_stop_fires_on_dedent_and_after_return(tiny_base):
    _, tokenizer = load_base(tiny_base)
    cases = {
        "    model = 1\n    return model\n": True,
        "    model = 1\ndef f():": True,
        "    model = 1\n    model.fit(": False,
    }
    for text, stops in cases.items():
        assert body_ended(tokenizer, tokenizer(text, add_special_tokens=False)["input_ids"]) == stops, text


def test_finished_rows_leave_the_batch(tiny_base, monkeypatch):
    """The decode loop runs each row only until its completion ends: over the decode steps, the
    rows passed through the model add up to the tokens drawn after each prompt's first (which
    the prompt's pass draws). The completions are those of each prompt sampled alone. The tiny
    model's first token usually dedents, so a stop rule of our own (3-7 tokens, by the first
    token drawn) gives completions of different lengths in one batch."""
    model, tokenizer = load_base(tiny_base)
    monkeypatch.setattr(generate, "body_ended", lambda _, ids: len(ids) == 3 + ids[0] % 5)
    rows: list[torch.Size] = []

    def record(_, args, kwargs):
        rows.append(kwargs["input_ids"].shape)

    hook = model.register_forward_pre_hook(record, with_kwargs=True)
    longer = PROMPT + "    # a longer prompt to force left padding\n"
    prompts = [PROMPT, longer, PROMPT, PROMPT + "    x = 1\n", PROMPT]
    config = defaults("sampling", batch_size=5, max_new_tokens=12)
    completions = sample(model, tokenizer, prompts, config, seed=1)
    hook.remove()
    lengths = [len(c.completion_ids) for c in completions]
    assert len(set(lengths)) > 1 and not any(c.truncated for c in completions), lengths
    prefill, *decode = rows
    assert prefill[0] == 5 and all(shape[1] == 1 for shape in decode)
    assert sum(shape[0] for shape in decode) == sum(n - 1 for n in lengths)
    each_alone = sample(model, tokenizer, prompts, replace(config, batch_size=1), seed=1)
    for got, alone in zip(completions, each_alone, strict=True):
        assert got.completion_ids == alone.completion_ids and got.body == alone.body
        assert got.behaviour_logprobs == pytest.approx(alone.behaviour_logprobs, abs=1e-5)  # batched matmuls
        ids = torch.tensor([got.prompt_ids + got.completion_ids])  # and a plain forward pass agrees
        with torch.no_grad():
            logp = model(ids).logits[0, len(got.prompt_ids) - 1 : -1].log_softmax(-1)
        want = logp.gather(-1, torch.tensor(got.completion_ids)[:, None]).squeeze(-1)
        assert torch.allclose(torch.tensor(got.behaviour_logprobs), want, atol=1e-4)
