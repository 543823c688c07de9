"""Bootstrap confidence intervals and the paired bootstrap test, over questions, seeded.

Percentile bootstrap: draw B resamples of the n questions with replacement (numpy PCG64, `seed`),
compute the statistic on each, and take the (α/2, 1 − α/2) quantiles, α = 1 − confidence. The statistic
is the mean of the values, or with `weights` the weighted mean Σ w·v / Σ w (the answer loss per token is
Σ nll / Σ tokens = the token-weighted mean of per-question mean losses).

Paired test (Koehn 2004; Berg-Kirkpatrick et al. 2012) for two models scored on the same questions:
each resample draws the same question indices for both, d* = stat(a) − stat(b). The interval is the
percentile interval of d*; the two-sided p-value is p = min(1, 2·min(P*(d* ≤ 0), P*(d* ≥ 0))), the
bootstrap estimate of how often the sign of the difference would flip.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np

from medmerge.errors import MedmergeError


@dataclass(frozen=True)
class Interval:
    """A statistic with its bootstrap interval: mean ∈ [low, high] at `confidence`, over n questions."""

    mean: float
    low: float
    high: float
    n: int
    confidence: float

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


@dataclass(frozen=True)
class PairedTest:
    """stat(a) − stat(b) over the same questions, its bootstrap interval and two-sided p-value."""

    diff: float
    low: float
    high: float
    p_value: float
    n: int
    confidence: float

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


def _stat(values: np.ndarray, weights: np.ndarray | None, idx: np.ndarray | None = None) -> np.ndarray:
    """Mean (or weighted mean) of values[idx] along the last axis; idx (B, n) gives B resamples."""
    v = values if idx is None else values[idx]
    if weights is None:
        return v.mean(axis=-1)
    w = weights if idx is None else weights[idx]
    return (v * w).sum(axis=-1) / np.maximum(w.sum(axis=-1), 1e-300)


def _arrays(values: Sequence[float], weights: Sequence[float] | None) -> tuple[np.ndarray, np.ndarray | None]:
    v = np.asarray(values, dtype=np.float64)
    if v.ndim != 1 or v.size == 0:
        raise MedmergeError(f"bootstrap: expected a non-empty list of numbers, got shape {v.shape}")
    w = None if weights is None else np.asarray(weights, dtype=np.float64)
    if w is not None and w.shape != v.shape:
        raise MedmergeError(f"bootstrap: {w.size} weights for {v.size} values (expected equal)")
    return v, w


def bootstrap_ci(
    values: Sequence[float],
    *,
    weights: Sequence[float] | None = None,
    resamples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> Interval:
    """Mean (or weighted mean) of `values` with its percentile-bootstrap interval (see the module doc)."""
    v, w = _arrays(values, weights)
    idx = np.random.default_rng(seed).integers(0, v.size, size=(resamples, v.size))  # (B, n)
    stats = _stat(v, w, idx)  # (B,)
    alpha = 1.0 - confidence
    low, high = np.quantile(stats, [alpha / 2, 1 - alpha / 2])
    return Interval(float(_stat(v, w)), float(low), float(high), int(v.size), confidence)


def paired_bootstrap(
    a: Sequence[float],
    b: Sequence[float],
    *,
    weights_a: Sequence[float] | None = None,
    weights_b: Sequence[float] | None = None,
    resamples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> PairedTest:
    """Paired bootstrap of stat(a) − stat(b), a[i] and b[i] scoring the same question i (module doc)."""
    va, wa = _arrays(a, weights_a)
    vb, wb = _arrays(b, weights_b)
    if va.size != vb.size:
        raise MedmergeError(f"paired bootstrap: {va.size} vs {vb.size} questions (expected the same ones)")
    idx = np.random.default_rng(seed).integers(0, va.size, size=(resamples, va.size))  # (B, n)
    d = _stat(va, wa, idx) - _stat(vb, wb, idx)  # (B,)
    alpha = 1.0 - confidence
    low, high = np.quantile(d, [alpha / 2, 1 - alpha / 2])
    p = min(1.0, 2.0 * min(float((d <= 0).mean()), float((d >= 0).mean())))
    diff = float(_stat(va, wa) - _stat(vb, wb))
    return PairedTest(diff, float(low), float(high), p, int(va.size), confidence)
