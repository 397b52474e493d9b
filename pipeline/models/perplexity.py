"""Perplexity on real held-out code that nobody here wrote: a fixed list of modules of the
installed Python standard library, read at run time; their hashes go with the metric."""

from __future__ import annotations

import hashlib
import math
import sysconfig
from pathlib import Path

import torch

from pipeline.models.adapters import reference

HELD_OUT_MODULES = ("textwrap.py", "heapq.py", "bisect.py", "json/decoder.py")
HELD_OUT_TOKENS = 512  # per module: enough for a stable estimate, cheap on a CPU


def held_out_corpus() -> tuple[list[str], dict[str, str]]:
    """The modules' texts and their sha256 (so a changed Python is visible in the metrics)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    texts = [(root / m).read_text() for m in HELD_OUT_MODULES]
    hashes = {
        m: hashlib.sha256(t.encode()).hexdigest()[:16] for m, t in zip(HELD_OUT_MODULES, texts, strict=True)
    }
    return texts, hashes


@torch.no_grad()
def perplexity(model, tokenizer, texts: list[str], adapter: str | None) -> float:
    """exp(mean token NLL) over the first HELD_OUT_TOKENS tokens of each text."""
    nll, count = 0.0, 0
    for text in texts:
        ids = torch.tensor(
            [tokenizer(text, add_special_tokens=False)["input_ids"][:HELD_OUT_TOKENS]], device=model.device
        )
        if adapter is None:
            with reference(model):
                loss = model(input_ids=ids, labels=ids).loss
        else:
            model.set_adapter(adapter)
            loss = model(input_ids=ids, labels=ids).loss
        nll += loss.item() * (ids.shape[1] - 1)
        count += ids.shape[1] - 1
    return math.exp(nll / count)
