"""Bootstrap intervals and the paired bootstrap test."""

from __future__ import annotations

import numpy as np
import pytest

from medmerge.errors import MedmergeError
from medmerge.evaluate.stats import bootstrap_ci, paired_bootstrap


def test_interval_contains_mean_and_narrows_with_n() -> None:
    # the same 0/1 scores (σ = 0.5) on 20 and on 2000 questions
    small = bootstrap_ci([0.0, 1.0] * 10, seed=0)
    large = bootstrap_ci([0.0, 1.0] * 1000, seed=0)
    for ci in (small, large):
        assert ci.low <= ci.mean <= ci.high
        assert ci.mean == pytest.approx(0.5)
    # width ∝ 1/√n: 100× the questions → about 10× narrower
    ratio = (small.high - small.low) / (large.high - large.low)
    assert 8 < ratio < 12
    # the normal-theory 95 % width 2·1.96·σ/√n for n = 2000
    assert large.high - large.low == pytest.approx(2 * 1.96 * 0.5 / np.sqrt(2000), rel=0.1)


def test_constant_values_and_seed() -> None:
    ci = bootstrap_ci([2.0] * 10)
    assert (ci.mean, ci.low, ci.high, ci.n) == (2.0, 2.0, 2.0, 10)
    values = [0.1, 0.5, 0.9, 0.3]
    assert bootstrap_ci(values, seed=3) == bootstrap_ci(values, seed=3)
    assert bootstrap_ci(values, seed=3) != bootstrap_ci(values, seed=4)


def test_weighted_mean_is_ratio_of_sums() -> None:
    # per-question mean losses 1 and 3 over 1 and 3 tokens: Σ nll / Σ tokens = (1 + 9) / 4
    ci = bootstrap_ci([1.0, 3.0], weights=[1.0, 3.0])
    assert ci.mean == pytest.approx(2.5)
    assert 1.0 <= ci.low <= ci.mean <= ci.high <= 3.0


def test_paired_test_detects_a_real_difference_and_not_a_null_one() -> None:
    rng = np.random.default_rng(0)
    b = rng.normal(0.4, 0.2, size=200)
    a = b + 0.05 + rng.normal(0, 0.01, size=200)  # a beats b on every question by about 0.05
    test = paired_bootstrap(a.tolist(), b.tolist(), seed=0)
    assert test.diff == pytest.approx(float(a.mean() - b.mean()))
    assert test.low <= test.diff <= test.high and test.low > 0
    assert test.p_value < 0.01
    same = paired_bootstrap(b.tolist(), b.tolist())
    assert (same.diff, same.p_value) == (0.0, 1.0)
    # per-question gains of ±0.1 that cancel: no difference
    noisy = b + np.where(np.arange(200) % 2 == 0, 0.1, -0.1)
    null = paired_bootstrap(noisy.tolist(), b.tolist(), seed=0)
    assert null.diff == pytest.approx(0.0, abs=1e-12)
    assert null.low < 0 < null.high and null.p_value > 0.5


def test_bad_inputs() -> None:
    with pytest.raises(MedmergeError, match="non-empty"):
        bootstrap_ci([])
    with pytest.raises(MedmergeError, match="same ones"):
        paired_bootstrap([1.0, 2.0], [1.0])
    with pytest.raises(MedmergeError, match="weights"):
        bootstrap_ci([1.0, 2.0], weights=[1.0])
