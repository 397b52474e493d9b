"""One frozen base, three named LoRA adapters (peft): `policy`, `critic`, `target`.

The reference policy rho is the base with adapters disabled (`reference(model)`). LoRA's B matrix
starts at zero, so every adapter starts as the identity: the policy equals rho, and the residual
critic Q = beta * (z_critic - z_rho) is exactly zero, as docs/design.md §1 requires. The target
critic starts as an exact copy of the critic, A matrices included: Polyak averages the factors A
and B separately, so with independent random A's the target's product would mix in noise.

`model.value_head` (hidden -> 1, zero at first) reads a state value from the critic adapter's last
hidden state: the PPO baseline's value function, and the state value V_psi of ETPO's dueling
critic, whose target network reads `model.target_value_head` on the target adapter's.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path

import torch
from peft import LoraConfig as PeftLoraConfig
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from transformers import PreTrainedModel

from pipeline.config import Config, LoraConfig
from pipeline.models.base import load_base

ADAPTERS = ("policy", "critic", "target")
PREVIOUS_POLICY = "previous"  # a frozen copy of the policy inside one train stage; never saved
VALUE_HEADS = {"value_head": "value_head.safetensors", "target_value_head": "target_value_head.safetensors"}


def lora_config(config: LoraConfig) -> PeftLoraConfig:
    return PeftLoraConfig(
        r=config.rank,
        lora_alpha=config.alpha,
        lora_dropout=config.dropout,
        target_modules=list(config.target_modules),
        task_type="CAUSAL_LM",
    )


@contextmanager
def quiet_peft() -> Iterator[None]:
    """peft (0.21, the latest) reads transformers' deprecated `is_gradient_checkpointing` alias each
    time it wraps a model: a FutureWarning in every stage that no user can act on."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "`is_gradient_checkpointing` is deprecated", FutureWarning)
        yield


def wrap(base: PreTrainedModel, config: LoraConfig, name: str = "default") -> PeftModel:
    """`base` with one fresh LoRA adapter `name` (peft freezes the base's own weights)."""
    with quiet_peft():
        return get_peft_model(base, lora_config(config), adapter_name=name)


def attach_adapters(base: PreTrainedModel, config: LoraConfig) -> PeftModel:
    """Fresh adapters on `base` (whose own weights are frozen by peft)."""
    model = wrap(base, config, ADAPTERS[0])
    for name in ADAPTERS[1:]:
        model.add_adapter(name, lora_config(config))
    critic, target = adapter_parameters(model, "critic"), adapter_parameters(model, "target")
    with torch.no_grad():  # the target critic starts as the critic, A matrices included: Q_bar = Q
        for t, c in zip(target, critic, strict=True):
            t.copy_(c)
    model.set_adapter("policy")
    return _with_value_heads(model, {})


def _with_value_heads(model: PeftModel, states: dict[str, dict[str, torch.Tensor]]) -> PeftModel:
    """The critic's and the target's value heads: zero (V = 0) unless a saved state is given."""
    for name in VALUE_HEADS:
        head = torch.nn.Linear(model.config.hidden_size, 1)
        torch.nn.init.zeros_(head.weight)
        torch.nn.init.zeros_(head.bias)
        if name in states:
            head.load_state_dict(states[name])
        setattr(model, name, head.to(next(model.parameters()).device))
    return model


def save_adapters(model: PeftModel, out: str | Path) -> None:
    """Each adapter in its own folder under `out` (peft layout: out/<name>/adapter_*.safetensors)."""
    model.save_pretrained(str(out), selected_adapters=list(ADAPTERS))
    for name, file in VALUE_HEADS.items():
        state = getattr(model, name).state_dict()
        save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, Path(out) / file)


def load_adapters(base: PreTrainedModel, directory: str | Path, trainable: bool = False) -> PeftModel:
    """The adapters saved by `save_adapters`, on `base`."""
    directory = Path(directory)
    missing = [n for n in ADAPTERS if not (directory / n / "adapter_config.json").exists()]
    if missing:
        raise FileNotFoundError(f"{directory}: adapter {missing[0]!r} is missing")
    with quiet_peft():
        model = PeftModel.from_pretrained(
            base, directory / ADAPTERS[0], adapter_name=ADAPTERS[0], is_trainable=trainable
        )
    for name in ADAPTERS[1:]:
        model.load_adapter(directory / name, adapter_name=name, is_trainable=trainable)
    model.set_adapter("policy")
    saved = {name: directory / file for name, file in VALUE_HEADS.items()}
    return _with_value_heads(model, {name: load_file(path) for name, path in saved.items() if path.exists()})


def load_model(config: Config, base_dir: Path, adapters: Path | None, trainable: bool = False) -> tuple:
    """(model, tokenizer): the base with the adapters of an iteration, or fresh (identity) ones."""
    model, tokenizer = load_base(base_dir, config.model.device, config.model.precision)
    model = load_adapters(model, adapters, trainable) if adapters else attach_adapters(model, config.lora)
    return model, tokenizer


def freeze_copy(model: PeftModel, source: str, name: str) -> None:
    """A frozen copy `name` of adapter `source` (its own LoRA settings), e.g. the policy as a train
    stage starts (pi_k of ETPO's proximal term). `save_adapters` leaves it out; the active adapter
    stays `source`."""
    model.add_adapter(name, copy.deepcopy(model.peft_config[source]))
    with torch.no_grad():
        copies, weights = adapter_parameters(model, name), adapter_parameters(model, source)
        for frozen, weight in zip(copies, weights, strict=True):
            frozen.copy_(weight)
            frozen.requires_grad_(False)
    model.set_adapter(source)


def adapter_parameters(model: PeftModel, name: str) -> list[torch.nn.Parameter]:
    """The LoRA weights of one adapter, in a fixed order (so Polyak pairs them up)."""
    return [p for n, p in sorted(model.named_parameters()) if f".{name}." in n and "lora_" in n]


def reference(model: PeftModel) -> AbstractContextManager:
    """`with reference(model): ...` runs the base model: the reference policy rho."""
    return model.disable_adapter()
