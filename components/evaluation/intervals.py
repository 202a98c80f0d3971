"""95% confidence intervals: Wilson's score interval for proportions, the percentile bootstrap otherwise.

A held-out task has tens of rows, so an accuracy of 0.15 on 60 questions is anything from 0.08 to 0.26:
every reported figure carries its interval, so a reader sees which differences are noise.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

Z95 = 1.959963984540054  # the standard normal's 97.5% quantile
DEFAULT_RESAMPLES = 1000


@dataclass(frozen=True)
class Estimate:
    """A metric's value with its 95% interval and how the interval was made (wilson, bootstrap)."""

    value: float
    low: float
    high: float
    method: str

    def as_dict(self) -> dict:
        return {"value": self.value, "ci_low": self.low, "ci_high": self.high, "ci_method": self.method}


def wilson_interval(successes: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson's score interval for `successes` out of `n` (stays inside [0, 1], sound at 0/n and n/n).

    >>> tuple(round(x, 3) for x in wilson_interval(8, 10))
    (0.49, 0.943)
    """
    if n <= 0:
        return (math.nan, math.nan)
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    # At 0/n and n/n the bound is exactly 0 or 1; rounding would leave it a hair inside.
    low = 0.0 if successes == 0 else max(0.0, centre - half)
    high = 1.0 if successes == n else min(1.0, centre + half)
    return (low, high)


def proportion(hits: list[bool]) -> Estimate:
    """The share of true `hits`, with its Wilson interval."""
    k, n = sum(bool(h) for h in hits), len(hits)
    low, high = wilson_interval(k, n)
    return Estimate(k / n if n else math.nan, low, high, "wilson")


def _resample_indices(n: int, resamples: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, n, size=(resamples, n))


def bootstrap(statistic: Callable[[np.ndarray], float], n: int, *, resamples: int = DEFAULT_RESAMPLES,
              seed: int = 0) -> Estimate:
    """`statistic(indices)` on all n items, with the 2.5/97.5 percentiles of it over resampled index sets.

    For corpus-level metrics (BLEU, NIST, distinct-n) whose value is not a mean of per-item values.
    """
    value = float(statistic(np.arange(n)))
    if n == 0 or resamples <= 0:
        return Estimate(value, math.nan, math.nan, "bootstrap")
    values = np.array([statistic(idx) for idx in _resample_indices(n, resamples, seed)], dtype=float)
    low, high = np.nanpercentile(values, [2.5, 97.5])
    return Estimate(value, float(low), float(high), "bootstrap")


def bootstrap_mean(values: list[float] | np.ndarray, *, resamples: int = DEFAULT_RESAMPLES, seed: int = 0) -> Estimate:
    """The mean of per-item `values` with its percentile-bootstrap interval (vectorized)."""
    arr = np.asarray(values, dtype=float)
    if arr.size == 0:
        return Estimate(math.nan, math.nan, math.nan, "bootstrap")
    if resamples <= 0:
        return Estimate(float(arr.mean()), math.nan, math.nan, "bootstrap")
    means = arr[_resample_indices(arr.size, resamples, seed)].mean(axis=1)
    low, high = np.percentile(means, [2.5, 97.5])
    return Estimate(float(arr.mean()), float(low), float(high), "bootstrap")
