"""Comparing two evaluations question by question (paired change) and the aligned model's KL figures."""

from __future__ import annotations

import pytest

from components.evaluation.compare import paired_change
from components.evaluation.divergence import answer_kl, kl_metrics


def _sample(task: str, prompt: str, reward: float) -> dict:
    return {"task": task, "rendered_prompt": prompt, "reference": "ref", "verifiable_reward": reward}


def test_paired_change_is_the_mean_per_question_difference_overall_and_per_task():
    before = [_sample("a", "q1", 0.0), _sample("a", "q2", 0.5), _sample("b", "q3", 1.0), _sample("b", "q9", 1.0)]
    after = [_sample("a", "q1", 1.0), _sample("a", "q2", 0.5), _sample("b", "q3", 0.8),
             {"task": "b", "rendered_prompt": "q4", "reference": "ref"}]  # unscored, and not asked before
    change = paired_change(before, after, "verifiable_reward", resamples=200)
    assert change["n"] == 3  # q9 was not asked after, q4 not before
    assert change["before"] == pytest.approx(0.5) and change["after"] == pytest.approx(2.3 / 3)
    assert change["change"]["value"] == pytest.approx((1.0 + 0.0 - 0.2) / 3)
    assert -0.2 <= change["change"]["ci_low"] <= change["change"]["value"] <= change["change"]["ci_high"] <= 1.0
    assert change["tasks"]["a"]["change"]["value"] == pytest.approx(0.5)
    assert change["tasks"]["b"]["change"]["value"] == pytest.approx(-0.2)
    assert change["tasks"]["b"]["change"]["ci_low"] == pytest.approx(-0.2)  # one question: no spread


def test_paired_change_is_none_without_shared_scored_questions():
    assert paired_change([_sample("a", "q1", 0.0)], [_sample("a", "q2", 1.0)], "verifiable_reward") is None
    assert paired_change([{"task": "a", "rendered_prompt": "q", "reference": "r"}] * 2,
                         [{"task": "a", "rendered_prompt": "q", "reference": "r"}], "verifiable_reward") is None


def test_answer_kl_figures_are_the_per_token_mean_and_the_sum_averaged_over_answers():
    # The per-position KL itself is checked against a by-hand forward in tests/components/models/test_generation.py.
    assert answer_kl([0.2, 0.4]) == {"kl_to_sft": pytest.approx(0.3), "kl_to_sft_per_answer": pytest.approx(0.6)}
    assert answer_kl([]) == {}
    samples = [{"kl_to_sft": 0.3, "kl_to_sft_per_answer": 0.6}, {"kl_to_sft": 0.1, "kl_to_sft_per_answer": 0.1}, {}]
    assert kl_metrics(samples) == {"kl_to_sft": pytest.approx(0.2), "kl_to_sft_per_answer": pytest.approx(0.35)}
    assert kl_metrics([{}]) == {}
