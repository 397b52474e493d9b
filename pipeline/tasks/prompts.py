"""States of the environment as Python source with a slot, and how a model sees them.

A state is always a whole Python module with one `<FILL_ME>` slot in `build_model`: the first
attempt, or a reflection after a failure (the failed body and its bounded error as comments above
a fresh template). So one stop rule and one harness serve every step of an episode.
"""

from __future__ import annotations

from dataclasses import dataclass

SLOT = "<FILL_ME>"
INDENT = "    "

TEMPLATE = '''"""Classification with a {description} Prediction Dataset"""
import numpy as np

{reflection}def build_model(x_train: np.ndarray, y_train: np.ndarray):
    """Import modules, return a scikit model trained with x_train in shape {shape} and y_train."""
{slot}
    return model
'''

REFLECTION = """# A previous version of build_model failed.
# Previous body:
{body}
# Error:
{error}
# Fix the error in the new version below.

"""


@dataclass(frozen=True)
class FimTokens:
    """A model's own fill-in-the-middle markers (prefix, suffix, middle)."""

    prefix: str
    suffix: str
    middle: str


# Known infill vocabularies; `find_fim_tokens` picks the one whose markers a tokenizer has.
FIM_STYLES = [
    FimTokens("<fim_prefix>", "<fim_suffix>", "<fim_middle>"),  # StarCoder, SmolLM
    FimTokens("<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>"),  # Qwen2.5-Coder
    FimTokens("<PRE>", "<SUF>", "<MID>"),  # CodeLlama
]


def find_fim_tokens(vocab: set[str] | dict[str, int]) -> FimTokens:
    for style in FIM_STYLES:
        if all(t in vocab for t in (style.prefix, style.suffix, style.middle)):
            return style
    raise ValueError("prompt.format is 'fim' but the tokenizer has no known infill tokens")


def bound_error(text: str, max_chars: int) -> str:
    """Keep the end of an error: a traceback's last lines say what went wrong."""
    text = text.strip()
    return text if len(text) <= max_chars else "..." + text[-(max_chars - 3) :]


def _comment(text: str) -> str:
    return "\n".join(f"# {line}".rstrip() for line in text.splitlines() or [""])


def state_source(
    description: str,
    shape: tuple[int, ...],
    previous_body: str | None = None,
    error: str | None = None,
    max_error_chars: int = 600,
) -> str:
    """The state as Python source with the slot; a reflection state if a previous body failed."""
    reflection = ""
    if previous_body is not None:
        reflection = REFLECTION.format(
            body=_comment(previous_body), error=_comment(bound_error(error or "", max_error_chars))
        )
    return TEMPLATE.format(
        description=description, shape=tuple(shape), reflection=reflection, slot=INDENT + SLOT
    )


def split_slot(source: str) -> tuple[str, str]:
    """(prefix, suffix) around the slot; the prefix ends with a newline, the body is indented."""
    prefix, suffix = source.split(INDENT + SLOT)
    return prefix, suffix


def completion_prompt(source: str) -> str:
    return split_slot(source)[0]


def fim_prompt(source: str, fim: FimTokens) -> str:
    prefix, suffix = split_slot(source)
    return f"{fim.prefix}{prefix}{fim.suffix}{suffix}{fim.middle}"


def render(source: str, fim: FimTokens | None) -> str:
    """What the model sees of a state: the completion prefix, or the FIM prompt given its tokens."""
    return completion_prompt(source) if fim is None else fim_prompt(source, fim)


def cut_body(text: str) -> tuple[str, bool]:
    """Apply the stop rule to generated text: (body, stopped).

    The body ends before the first non-blank line that dedents out of the function, or right after
    a `return model` at body level. `stopped` is False when neither happened (the text may go on).
    """
    lines = text.split("\n")
    kept: list[str] = []
    for i, line in enumerate(lines):
        is_last = i == len(lines) - 1  # may be a partial line ("return model_2" is not a stop)
        if line.strip() and not line.startswith(INDENT):
            return "\n".join(kept), True
        kept.append(line)
        if line.rstrip() == INDENT + "return model" and not is_last:
            return "\n".join(kept), True
    return text, False


def program(source: str, body: str) -> str:
    """The complete module to execute: the state with the body in its slot."""
    prefix, suffix = split_slot(source)
    return prefix + body.rstrip("\n") + suffix
