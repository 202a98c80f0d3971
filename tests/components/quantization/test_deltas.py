"""Quantized-minus-merged deltas: point metrics only (bounds, row counts and majority baselines have no delta)."""

from __future__ import annotations

import pytest

from components.quantization.quantize import metric_deltas


def test_deltas_cover_point_metrics_and_skip_bounds_counts_and_baselines():
    merged = {"exact_match": 0.40, "exact_match_ci_low": 0.25, "exact_match_ci_high": 0.55, "n": 35.0,
              "majority_baseline": 0.34, "perplexity_cpt_eval": 4.07, "task/billable/exact_match": 0.6,
              "task/billable/exact_match_ci_low": 0.3, "task/billable/n": 10.0, "task/billable/majority_baseline": 0.5}
    nf4 = {**merged, "exact_match": 0.37, "exact_match_ci_low": 0.23, "perplexity_cpt_eval": 4.64,
           "task/billable/exact_match": 0.5, "only_here": 1.0}
    assert metric_deltas(nf4, merged) == pytest.approx(
        {"exact_match": -0.03, "perplexity_cpt_eval": 0.57, "task/billable/exact_match": -0.1})
