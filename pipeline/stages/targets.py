"""targets@k: per-token soft Bellman targets and diagnostics for every executed action
(or a baseline's advantages, `pipeline.baselines.targets`).

One action at a time: three forward passes (policy, reference, target critic), reduced to
per-token scalars in chunks of positions; only those scalars reach the disk.
"""

from __future__ import annotations

from pathlib import Path

import torch
from peft import PeftModel
from rich.progress import Progress

from pipeline.baselines.targets import baseline_targets
from pipeline.config import Config, EtpoConfig
from pipeline.etpo.bellman import q_targets, q_values, soft_value, token_stats
from pipeline.etpo.logits import ActionBatch, action_logits, last_position_logits
from pipeline.io import read_trajectories, trajectory_metadata, write_trajectories
from pipeline.models.adapters import attach_adapters, load_adapters
from pipeline.models.base import load_base
from pipeline.tasks.prompts import find_fim_tokens, render

ADAPTER_FOR = {"pi": "policy", "rho": None, "target": "target"}


@torch.no_grad()
def bootstrap_value(model: PeftModel, prompt_ids: list[int], etpo: EtpoConfig) -> float:
    """V_1(s_{t+1}): the soft value of the next state's first decision."""
    z = {k: last_position_logits(model, prompt_ids, a)[0, 0].float() for k, a in ADAPTER_FOR.items()}
    q = q_values(z["target"], z["rho"], etpo.beta, etpo.parametrisation)
    return soft_value(z["pi"].log_softmax(-1), z["rho"].log_softmax(-1), q, etpo.beta).item()


@torch.no_grad()
def action_targets(model: PeftModel, row: dict, next_prompt_ids: list[int] | None, etpo: EtpoConfig) -> dict:
    """The per-token columns of docs/design.md §4 for one executed action."""
    batch = ActionBatch.build([row["prompt_ids"]], [row["completion_ids"]], 0)
    z = {k: action_logits(model, batch, a) for k, a in ADAPTER_FOR.items()}  # each (1, n, V)
    stats = token_stats(
        z["pi"], z["rho"], z["target"], batch.taken, etpo.beta, etpo.parametrisation, etpo.chunk
    )
    boot = bootstrap_value(model, next_prompt_ids, etpo) if next_prompt_ids else 0.0
    y = q_targets(
        stats.soft_value,
        stats.logratio_taken,
        torch.tensor([len(row["completion_ids"])]),
        torch.tensor([row["reward"]]),
        torch.tensor([row["done"]]),
        torch.tensor([boot]),
        etpo.gamma,
        etpo.beta,
        etpo.lam,
    )
    return {
        "q_target": y[0].tolist(),
        "q_taken": stats.q_taken[0].tolist(),
        "soft_value": stats.soft_value[0].tolist(),
        "kl_ref": stats.kl_ref[0].tolist(),
        "entropy": stats.entropy[0].tolist(),
        "advantage": (stats.q_taken - stats.soft_value)[0].tolist(),  # soft advantage of the taken token
        "bootstrap_value": boot,
    }


def load_model(config: Config, base_dir: Path, adapters: Path | None, trainable: bool = False) -> tuple:
    """The base with the adapters of the previous iteration, or fresh (zero) ones at k = 1."""
    model, tokenizer = load_base(base_dir, config.model.device)
    model = load_adapters(model, adapters, trainable) if adapters else attach_adapters(model, config.lora)
    return model, tokenizer


def run(
    config: Config, executed: Path, base_dir: Path, out: Path, adapters: Path | None = None
) -> list[dict]:
    table = read_trajectories(executed, "executed")
    rows = table.to_pylist()
    model, tokenizer = load_model(config, base_dir, adapters)
    model.eval()
    fim = find_fim_tokens(tokenizer.get_vocab()) if config.prompt.format == "fim" else None
    with Progress() as progress:
        bar = progress.add_task(f"targets ({config.algo})", total=len(rows))
        if config.algo != "etpo":
            rows = baseline_targets(model, rows, config, lambda: progress.advance(bar))
        else:
            for row in rows:
                next_ids = (
                    tokenizer(render(row["next_state"], fim), add_special_tokens=False)["input_ids"]
                    if not row["done"]
                    else None
                )
                row.update(action_targets(model, row, next_ids, config.etpo))
                progress.advance(bar)
    write_trajectories(out, rows, "targets", trajectory_metadata(table))
    return rows
