import numpy as np
import pytest

from pipeline.stats import bootstrap_mean, samples_needed, wilson


def test_bootstrap_of_a_proportion_agrees_with_wilson_at_large_n():
    values = np.zeros(4000)
    values[:1200] = 1.0  # p = 0.3 exactly
    boot = bootstrap_mean(values[None, None, :])
    ref = wilson(1200, 4000)
    assert boot.mean == pytest.approx(0.3)
    assert boot.lo == pytest.approx(ref.lo, abs=0.002) and boot.hi == pytest.approx(ref.hi, abs=0.002)
    assert ref.hi - ref.lo == pytest.approx(2 * 1.96 * np.sqrt(0.3 * 0.7 / 4000), rel=0.01)


def test_tasks_are_strata_and_seeds_are_resampled():
    rng = np.random.default_rng(1)
    # two tasks with very different means: resampling tasks would widen the interval a lot
    values = np.stack([rng.normal(0.0, 0.1, 200), rng.normal(1.0, 0.1, 200)])[None]
    one = bootstrap_mean(values)
    assert one.lo < 0.5 < one.hi and one.hi - one.lo < 0.03  # se = 0.1 / sqrt(400)
    # three seeds whose means differ: the between-seed spread dominates the interval
    seeds = values + np.array([-0.2, 0.0, 0.2])[:, None, None]
    spread = bootstrap_mean(seeds)
    assert spread.hi - spread.lo > 0.2
    assert bootstrap_mean(seeds, seed=3) != spread  # a different stream, a slightly different interval


def test_bad_shapes_are_refused():
    with pytest.raises(ValueError, match="seeds, tasks, samples"):
        bootstrap_mean(np.zeros((3, 4)))


def test_samples_needed_matches_the_textbook_formula():
    # (1.96 + 0.84)^2 * 1^2 / 0.5^2 = 31.4
    assert samples_needed(1.0, 0.5) == 32
