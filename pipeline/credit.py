"""Per-token credit made visible: each token of an action coloured by its advantage.

The advantage is the targets table's `advantage` column: for ETPO the observed return's
y_j - V_j, which tilts the policy (`etpo.policy_target: return`, the default; with `vocabulary`
or `taken`, Q(w_j) - V_j, the soft advantage of the taken token under the target critic); for
PPO the whitened GAE; for GRPO the group-relative advantage (the same at every token). Green
tokens were credited, red ones blamed, white ones left alone. It is the quickest way to see
whether credit lands on the tokens that decide the reward (the estimator, a hyperparameter
value, an invented name) or is smeared over the whole body.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from transformers import PreTrainedTokenizerBase

from pipeline.io import write_atomic


@dataclass(frozen=True)
class CreditedAction:
    """One action's tokens as text, with their advantage and KL(pi || rho) at each."""

    title: str
    pieces: list[str]
    advantage: list[float]
    kl_ref: list[float]


def token_pieces(tokenizer: PreTrainedTokenizerBase, ids: list[int]) -> list[str]:
    """The text each token adds: decode prefixes, so multi-byte characters and spaces come out right."""
    pieces, previous = [], ""
    for n in range(1, len(ids) + 1):
        text = tokenizer.decode(ids[:n], skip_special_tokens=True)
        pieces.append(text[len(previous) :] if text.startswith(previous) else text)
        previous = text
    return pieces


def credited_actions(rows: list[dict], tokenizer: PreTrainedTokenizerBase) -> list[CreditedAction]:
    """Rows of a targets table -> actions ready to draw."""
    return [
        CreditedAction(
            title=(
                f"iteration {r['iteration']}  {r['task']}  episode {r['episode_id']} step {r['step']}  "
                f"reward {r['reward']:+.3f} ({r['status']})"
            ),
            pieces=token_pieces(tokenizer, r["completion_ids"]),
            advantage=list(r["advantage"]),
            kl_ref=list(r["kl_ref"]),
        )
        for r in rows
    ]


def colour(value: float, scale: float) -> tuple[float, float, float]:
    """White at 0, saturating to green (positive) or red (negative) at |value| = scale."""
    t = max(-1.0, min(1.0, value / scale)) if scale > 0 else 0.0
    return (1.0, 1.0 + t, 1.0 + t) if t < 0 else (1.0 - t, 1.0, 1.0 - t)


def scale_of(actions: list[CreditedAction]) -> float:
    """One colour scale for every action shown: the largest |advantage| (so colours compare)."""
    return max((abs(a) for action in actions for a in action.advantage), default=0.0)


def print_terminal(actions: list[CreditedAction]) -> None:
    """Each action with its tokens on coloured backgrounds, then its largest credits and blames."""
    from rich.console import Console
    from rich.text import Text

    console, scale = Console(), scale_of(actions)
    console.print(f"advantage colour scale: ±{scale:.3f} (green credited, red blamed)")
    for action in actions:
        text = Text()
        for piece, value in zip(action.pieces, action.advantage, strict=True):
            r, g, b = (round(255 * c) for c in colour(value, scale))
            text.append(piece, style=f"black on rgb({r},{g},{b})")
        console.rule(action.title)
        console.print(text)
        ranked = sorted(range(len(action.pieces)), key=lambda j: action.advantage[j])
        for label, picks in (("blamed", ranked[:3]), ("credited", ranked[::-1][:3])):
            shown = ", ".join(
                f"{action.pieces[j]!r} {action.advantage[j]:+.3f} (KL {action.kl_ref[j]:.3f})" for j in picks
            )
            console.print(f"  {label}: {shown}")


def draw_png(actions: list[CreditedAction], out: Path) -> None:
    """The same colouring as a PNG (monospace, one block per action), written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    width, points = 100, 8  # characters per line before wrapping; font size
    char_inches = 0.6 * points / 72  # a monospace character's advance
    lines = [_layout(action, width) for action in actions]
    height = sum(len(block) + 2 for block in lines)
    fig = plt.figure(figsize=(width * char_inches, max(1.0, height * 1.6 * points / 72)))
    ax = fig.add_axes((0, 0, 1, 1))
    ax.set_xlim(0, width)
    ax.set_ylim(height, 0)
    ax.axis("off")
    scale, y = scale_of(actions), 0.5
    for action, block in zip(actions, lines, strict=True):
        ax.text(0, y, action.title, fontsize=points, family="monospace", weight="bold", va="center")
        y += 1.2
        for line in block:
            for x, piece, value in line:
                ax.text(
                    x, y, piece, fontsize=points, family="monospace", va="center",
                    bbox={"facecolor": colour(value, scale), "edgecolor": "none", "pad": 0.6},
                )  # fmt: skip
            y += 1
        y += 0.8
    write_atomic(out, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    plt.close(fig)


def _layout(action: CreditedAction, width: int) -> list[list[tuple[int, str, float]]]:
    """Lines of (column, text, advantage): a token's newlines start new lines; long lines wrap."""
    lines: list[list[tuple[int, str, float]]] = [[]]
    column = 0
    for piece, value in zip(action.pieces, action.advantage, strict=True):
        for i, part in enumerate(piece.split("\n")):
            if i > 0 or column + len(part) > width:
                lines.append([])
                column = 0
            if part:
                lines[-1].append((column, part, value))
                column += len(part)
    return lines
