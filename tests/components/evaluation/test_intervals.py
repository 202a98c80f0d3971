"""Confidence intervals against known values."""

import doctest
import math

import numpy as np
import pytest

from components.evaluation import intervals
from components.evaluation.intervals import bootstrap, bootstrap_mean, proportion, wilson_interval


def test_wilson_interval_known_cases():
    assert wilson_interval(8, 10) == pytest.approx((0.4902, 0.9433), abs=1e-4)
    # 0 of 10 still has an upper bound: z^2 / (n + z^2).
    low, high = wilson_interval(0, 10)
    assert low == 0.0 and high == pytest.approx(1.959963984540054**2 / (10 + 1.959963984540054**2))
    assert wilson_interval(10, 10)[1] == 1.0
    assert all(math.isnan(x) for x in wilson_interval(0, 0))
    assert doctest.testmod(intervals).failed == 0


def test_proportion_counts_hits():
    e = proportion([True, True, False, True, True, True, True, True, False, True])
    assert (e.value, e.method) == (0.8, "wilson")
    assert (e.low, e.high) == pytest.approx(wilson_interval(8, 10))


def test_bootstrap_intervals():
    assert bootstrap_mean([0.5] * 20).as_dict() == {"value": 0.5, "ci_low": 0.5, "ci_high": 0.5, "ci_method": "bootstrap"}
    values = np.random.default_rng(1).normal(10, 2, size=400)
    e = bootstrap_mean(values, resamples=2000)
    # The bootstrap interval of a mean is close to mean +- 1.96 s / sqrt(n).
    half = 1.96 * values.std(ddof=1) / math.sqrt(len(values))
    assert e.low == pytest.approx(values.mean() - half, abs=0.05) and e.high == pytest.approx(values.mean() + half, abs=0.05)
    med = bootstrap(lambda idx: float(np.median(values[idx])), len(values), resamples=300)
    assert med.low < med.value < med.high
    assert bootstrap_mean(values, resamples=300) == bootstrap_mean(values, resamples=300)  # seeded
    assert math.isnan(bootstrap_mean([1.0, 2.0], resamples=0).low)
