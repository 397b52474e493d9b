"""The one place `algo` is read: each algorithm's targets and update, given its own config section.

etpo:       soft Bellman targets per token; critic, policy and Polyak target updates
ppo:        GAE advantages from a value head; clipped surrogate and value regression
grpo:       group-relative advantages; clipped surrogate with a KL(pi || rho) loss
best_of_n:  diagnostics only; no update (the policy samples as it did at iteration 0)
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

from peft import PeftModel
from transformers import PreTrainedTokenizerBase

from pipeline.baselines.targets import best_of_n_targets, grpo_targets, ppo_targets
from pipeline.baselines.train import grpo_update, ppo_update
from pipeline.config import Config
from pipeline.etpo.targets import etpo_targets
from pipeline.etpo.train import etpo_update
from pipeline.models.adapters import PREVIOUS_POLICY, freeze_copy
from pipeline.models.logits import FrozenLogits
from pipeline.models.update import Update
from pipeline.tasks.prompts import find_fim_tokens, render


def compute_targets(
    config: Config,
    model: PeftModel,
    tokenizer: PreTrainedTokenizerBase,
    rows: list[dict],
    advance: Callable[[], None],
) -> list[dict]:
    """`rows` (executed actions) with the targets columns of `config.algo` filled in."""
    if not rows:
        return rows
    if config.algo == "etpo":
        fim = find_fim_tokens(tokenizer.get_vocab()) if config.prompt.format == "fim" else None
        next_ids = [
            None
            if row["done"]
            else tokenizer(render(row["next_state"], fim), add_special_tokens=False)["input_ids"]
            for row in rows
        ]
        return etpo_targets(model, rows, next_ids, config.etpo, advance)
    if config.algo == "ppo":
        return ppo_targets(model, rows, config.ppo, advance)
    if config.algo == "grpo":
        return grpo_targets(model, rows, config.grpo, advance)
    return best_of_n_targets(model, rows, advance)


def replayed_iterations(config: Config) -> int:
    """How many iterations' actions targets@k and train@k use: M for ETPO (off-policy), else 1."""
    return config.etpo.replay_iterations if config.algo == "etpo" else 1


def prepare_update(config: Config, model: PeftModel) -> None:
    """What an update reads beside the trained adapters, set up as train@k starts: ETPO's proximal
    term needs pi_k, the policy before any of train@k's steps, frozen."""
    if config.algo == "etpo" and config.etpo.proximal > 0:
        freeze_copy(model, "policy", PREVIOUS_POLICY)


def update_for(config: Config) -> Update | None:
    """The per-minibatch update of `config.algo` (None: best_of_n trains nothing); one per train
    stage, since ETPO's keeps that stage's frozen logits."""
    return {
        "etpo": partial(etpo_update, etpo=config.etpo, frozen=FrozenLogits(config.train.logit_cache_mb)),
        "ppo": partial(ppo_update, ppo=config.ppo),
        "grpo": partial(grpo_update, grpo=config.grpo),
        "best_of_n": None,
    }[config.algo]
