"""Confidence intervals for comparing policies: a percentile bootstrap over a nested design.

Rewards of an evaluation form an array of shape (seeds, tasks, samples). Tasks are fixed (they
are the benchmark, not a draw from a population of tasks); samples are drawn anew within each
(seed, task); seeds are drawn anew when there is more than one. The statistic is the grand mean,
which weighs every task equally because every task has the same number of samples. With one seed
and one task this is the plain bootstrap of a mean; for a proportion at large n it agrees with
the Wilson interval (tested).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

RESAMPLES = 4000
LEVEL = 0.95


@dataclass(frozen=True)
class Interval:
    mean: float
    lo: float
    hi: float

    def contains_zero(self) -> bool:
        return self.lo <= 0.0 <= self.hi

    def as_dict(self, name: str) -> dict[str, float]:
        return {name: self.mean, f"{name}_lo": self.lo, f"{name}_hi": self.hi}


def bootstrap_mean(
    values: np.ndarray, seed: int = 0, resamples: int = RESAMPLES, level: float = LEVEL
) -> Interval:
    """Mean of `values` (seeds, tasks, samples) with its percentile bootstrap interval."""
    values = np.asarray(values, dtype=np.float64)
    if values.ndim != 3 or 0 in values.shape:
        raise ValueError(f"expected a non-empty (seeds, tasks, samples) array, got shape {values.shape}")
    n_seeds, n_tasks, n_samples = values.shape
    rng = np.random.default_rng(seed)
    stats = np.empty(resamples)
    tasks = np.arange(n_tasks)[None, :, None]
    chunk = max(1, 2_000_000 // values.size)  # bounded memory for large sample counts
    for start in range(0, resamples, chunk):
        b = min(chunk, resamples - start)
        seeds = rng.integers(n_seeds, size=(b, n_seeds)) if n_seeds > 1 else np.zeros((b, 1), dtype=int)
        samples = rng.integers(n_samples, size=(b, n_seeds, n_tasks, n_samples))
        drawn = values[seeds[:, :, None, None], tasks, samples]
        stats[start : start + b] = drawn.mean(axis=(1, 2, 3))
    alpha = (1.0 - level) / 2
    lo, hi = np.quantile(stats, [alpha, 1.0 - alpha])
    return Interval(float(values.mean()), float(lo), float(hi))


def wilson(successes: int, n: int, level: float = LEVEL) -> Interval:
    """The Wilson score interval of a proportion (the reference the bootstrap is tested against)."""
    z = _normal_quantile(0.5 + level / 2)
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return Interval(p, centre - half, centre + half)


def samples_needed(sd: float, difference: float, level: float = LEVEL, power: float = 0.8) -> int:
    """Paired samples for a two-sided test at `level` to detect `difference` with `power`."""
    z = _normal_quantile(0.5 + level / 2) + _normal_quantile(power)
    return math.ceil((z * sd / difference) ** 2)


def _normal_quantile(p: float) -> float:
    from statistics import NormalDist

    return NormalDist().inv_cdf(p)
