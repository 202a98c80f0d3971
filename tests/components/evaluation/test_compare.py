"""Comparing two evaluations question by question (paired change) and the aligned model's KL to SFT."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from components.evaluation.compare import paired_change
from components.evaluation.divergence import answer_kl


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


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval(), AutoTokenizer.from_pretrained(tiny_model_dir)


def test_answer_kl_is_zero_against_itself_and_the_exact_kl_over_answer_tokens(tiny):
    model, tokenizer = tiny
    prompts, answers = ["Which chapter holds K27.9?", "Is A00 billable?", "empty"], ["Diseases", "No", "  "]
    same = answer_kl(model, copy.deepcopy(model), tokenizer, prompts, answers)
    assert same["kl_to_sft"] == pytest.approx(0.0, abs=1e-6)

    moved = copy.deepcopy(model)
    with torch.no_grad():
        moved.get_output_embeddings().weight.add_(0.5 * torch.randn_like(moved.get_output_embeddings().weight))
    got = answer_kl(moved, model, tokenizer, prompts, answers, batch_size=1)

    # By hand, one pair at a time without padding; the empty answer has no tokens and is not counted.
    per_token, per_answer = [], []
    for prompt, answer in zip(prompts[:2], answers[:2]):
        p = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        a = tokenizer(answer, add_special_tokens=False)["input_ids"]
        ids = torch.tensor([p + a])
        with torch.no_grad():
            lp = torch.log_softmax(moved(input_ids=ids).logits[0, len(p) - 1 : -1], -1)
            lq = torch.log_softmax(model(input_ids=ids).logits[0, len(p) - 1 : -1], -1)
        kl = (lp.exp() * (lp - lq)).sum(-1)
        per_token.append(float(kl.mean()))
        per_answer.append(float(kl.sum()))
    assert got["kl_to_sft"] == pytest.approx(sum(per_token) / 2, rel=1e-4)
    assert got["kl_to_sft_per_answer"] == pytest.approx(sum(per_answer) / 2, rel=1e-4)
    assert got["kl_to_sft"] > 1e-3
    # Batched with right padding gives the same figure.
    assert answer_kl(moved, model, tokenizer, prompts, answers, batch_size=8)["kl_to_sft"] == pytest.approx(
        got["kl_to_sft"], rel=1e-4)
    assert answer_kl(moved, model, tokenizer, ["p"], [""]) == {}
    # With the end of turn after each answer, the empty answer counts too: one position, where it stopped.
    ended = answer_kl(moved, model, tokenizer, prompts, answers, end="</s>")
    assert ended["kl_to_sft"] > 0 and ended["kl_to_sft_per_answer"] > got["kl_to_sft_per_answer"] * 2 / 3
    assert not math.isnan(got["kl_to_sft_per_answer"])
