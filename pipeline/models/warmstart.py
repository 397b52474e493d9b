"""Warm start: a short supervised fine-tune so a small model writes runnable bodies at all.

SmolLM2-135M sampled 0 runnable bodies of 48 with our prompts, and RL cannot learn from rewards
that are all -1. So before RL we fine-tune (LoRA, merged into the base afterwards) on a synthetic
corpus: states for *generated* datasets (never the evaluation tasks), bodies drawn uniformly from
a grammar of a dozen scikit-learn estimators, hyperparameters and preprocessing steps
(`pipeline.tasks.bodies`). Nothing says which model is best, so RL still has everything to
discover. A fifth of the examples are reflection states (a body missing an import, its
NameError) with the fixed body, so the model has seen the second step of an episode too.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from pipeline.config import LoraConfig, WarmstartConfig
from pipeline.models.adapters import wrap
from pipeline.tasks.bodies import random_body
from pipeline.tasks.prompts import completion_prompt, state_source

DOMAINS = [
    "Customer Churn",
    "Loan Default",
    "Credit Card Fraud",
    "Heart Disease",
    "Spam Email",
    "Wine Quality",
    "Employee Attrition",
    "Diabetes Onset",
    "Mushroom Edibility",
    "Network Intrusion",
    "Forest Cover",
    "Car Evaluation",
    "Bank Marketing",
    "Student Dropout",
    "Machine Failure",
    "Insurance Claim",
    "Crop Disease",
    "Hotel Booking Cancellation",
    "Website Phishing",
    "Seismic Bump",
]


@dataclass(frozen=True)
class Example:
    prompt: str
    body: str  # the target, ending with "return model" and a newline


def synthetic_examples(count: int, seed: int) -> list[Example]:
    """States for invented datasets (shapes as make_classification would give), with bodies."""
    rng = random.Random(seed)
    examples = []
    for _ in range(count):
        shape = (rng.randint(100, 2000) // 2, rng.randint(3, 40))
        body = random_body(rng)
        previous, error = None, None
        if rng.random() < 0.2:  # a reflection state: the same body without its first import
            first_import = body.splitlines()[0].split("import ")[-1]
            previous = "".join(body.splitlines(keepends=True)[1:])
            error = f"[error] NameError: name '{first_import}' is not defined"
        source = state_source(rng.choice(DOMAINS), shape, previous_body=previous, error=error)
        examples.append(Example(completion_prompt(source), body))
    return examples


def encode(examples: list[Example], tokenizer: PreTrainedTokenizerBase) -> list[tuple[list[int], int]]:
    """(token ids of prompt + body + EOS, number of prompt tokens): the loss is on the body only."""
    encoded = []
    for ex in examples:
        prompt_ids = tokenizer(ex.prompt, add_special_tokens=False)["input_ids"]
        body_ids = tokenizer(ex.body, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        encoded.append((prompt_ids + body_ids, len(prompt_ids)))
    return encoded


def collate(batch: list[tuple[list[int], int]], pad_id: int) -> dict[str, torch.Tensor]:
    """Left-padded inputs, so every body ends at the last position, and the labels of the last
    `keep` positions (the longest body; -100 where a shorter body has not started)."""
    width = max(len(ids) for ids, _ in batch)
    keep = max(len(ids) - n_prompt for ids, n_prompt in batch)
    input_ids = torch.full((len(batch), width), pad_id)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    labels = torch.full((len(batch), keep), -100)
    for row, (ids, n_prompt) in enumerate(batch):
        input_ids[row, width - len(ids) :] = torch.tensor(ids)
        mask[row, width - len(ids) :] = 1
        labels[row, keep - (len(ids) - n_prompt) :] = torch.tensor(ids[n_prompt:])
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}


def body_loss(model: PreTrainedModel, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean cross-entropy of the body tokens.

    The LM head runs only on the positions that predict a body token (`logits_to_keep`): over a
    49k vocabulary it is most of a small model's cost, and the prompt is ~60% of each sequence.
    """
    labels = batch["labels"]
    mask = batch["attention_mask"]
    logits = model(
        input_ids=batch["input_ids"],
        attention_mask=mask,
        position_ids=(mask.cumsum(-1) - 1).clamp(min=0),  # positions count from each row's first token
        logits_to_keep=labels.shape[1] + 1,
    ).logits[:, :-1]  # the last position predicts past the body
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), labels.flatten())


def warm_start(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    config: WarmstartConfig,
    lora: LoraConfig,
    on_step: Callable[[int, float], None] | None = None,
) -> PreTrainedModel:
    """Fine-tune a LoRA adapter on the synthetic corpus and merge it: returns the new base."""
    examples = encode(synthetic_examples(config.corpus_size, config.seed), tokenizer)
    torch.manual_seed(config.seed)
    peft_model = wrap(model, lora)
    peft_model.train()
    optimiser = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=config.lr)
    order = random.Random(config.seed)
    for step in range(config.steps):
        batch = collate(order.sample(examples, config.batch_size), tokenizer.pad_token_id)
        device = next(peft_model.parameters()).device
        loss = body_loss(peft_model, {k: v.to(device) for k, v in batch.items()})
        loss.backward()
        torch.nn.utils.clip_grad_norm_(peft_model.parameters(), 1.0)
        optimiser.step()
        optimiser.zero_grad(set_to_none=True)
        if on_step:
            on_step(step, loss.item())
    return peft_model.merge_and_unload()
