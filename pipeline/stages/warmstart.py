"""warmstart: base model -> warm-started base (also the reference policy of the RL iterations)."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

from rich.progress import Progress

from pipeline.config import Config
from pipeline.io import atomic_dir, write_json
from pipeline.models.base import load_base, save_base
from pipeline.models.warmstart import warm_start
from pipeline.provenance import MODEL_INFO, model_id


def run(config: Config, base_dir: Path, out: Path) -> dict:
    """Write the warm-started model to `out`; with 0 steps, hard-link the base's files.

    The returned info adds the wall time, which stays out of the artifact: the same weights must
    hash the same in every run, or DVC would see a new warm start each time.
    """
    started = time.perf_counter()
    losses: list[float] = []
    if config.warmstart.steps == 0:
        with atomic_dir(out) as tmp:
            shutil.copytree(base_dir, tmp, copy_function=_link_or_copy, dirs_exist_ok=True)
    else:
        model, tokenizer = load_base(base_dir, config.model.device, config.model.precision)
        with Progress() as progress:
            bar = progress.add_task("warmstart", total=config.warmstart.steps)

            def on_step(step: int, loss: float) -> None:
                losses.append(loss)
                progress.update(bar, advance=1, description=f"warmstart loss {loss:.3f}")

            merged = warm_start(model, tokenizer, config.warmstart, config.lora, on_step)
        save_base(merged, tokenizer, out)
    info = {
        "model_id": f"warm:{model_id(base_dir)}",
        "steps": config.warmstart.steps,
        "losses": [round(x, 4) for x in losses],
    }
    write_json(out / MODEL_INFO, info)
    return info | {"seconds": round(time.perf_counter() - started, 1)}


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)
