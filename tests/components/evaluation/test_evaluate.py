"""The evaluate stage's scoring on the tiny model: per-task report, flat keys, files; perplexity by hand."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from components.config import EvaluateConfig, PipelineConfig
from components.data.chat_render import render_prompt
from components.evaluation import evaluate
from components.evaluation.evaluate import perplexity, run_evaluate, score_heldout
from tests.components.evaluation.test_per_task import FIXTURE


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval(), AutoTokenizer.from_pretrained(tiny_model_dir)


def test_perplexity_of_a_uniform_model_is_the_vocabulary_size(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    with torch.no_grad():
        model.get_output_embeddings().weight.zero_()  # every logit 0: each token has probability 1/V
    rows = [{"input_ids": [5, 6, 7, 8], "labels": [-100, -100, 7, 8]}, {"input_ids": [9, 10], "labels": [-100, 10]}]
    assert perplexity(model, rows, pad_token_id=0) == pytest.approx(model.config.vocab_size, rel=1e-4)


def test_score_heldout_reports_every_task_with_majority_baseline_and_intervals(tiny):
    model, tokenizer = tiny
    cfg = EvaluateConfig(max_samples=4, max_new_tokens=3, batch_size=8, bootstrap_resamples=50)
    report, samples = score_heldout(model, tokenizer, FIXTURE, cfg=cfg, template_name="auto", system_prompt=None)
    tasks = report["tasks"]
    assert list(tasks) == ["billable", "code_to_chapter", "description_to_code", "unlabeled"]
    assert {t: e["n"] for t, e in tasks.items()} == {
        "billable": 4, "code_to_chapter": 4, "description_to_code": 2, "unlabeled": 1}  # capped at 4 per task
    assert tasks["billable"]["majority_baseline"] == 0.5 and tasks["billable"]["answers"] == 2
    assert tasks["code_to_chapter"]["majority_baseline"] == 0.75  # 3 of its first 4 rows answer Neoplasms
    assert "answers" not in tasks["description_to_code"]
    assert "choice_accuracy" in tasks["billable"]["metrics"]
    assert "choice_accuracy" not in tasks["description_to_code"]["metrics"]
    for entry in [*tasks.values(), report["overall"]]:
        em = entry["metrics"]["exact_match"]
        assert em["ci_method"] == "wilson" and em["ci_low"] <= em["value"] <= em["ci_high"]
        assert set(entry["metrics"]) >= {"exact_match", "bleu", "rouge1", "rouge2", "rougeL", "meteor", "nist",
                                         "distinct_1", "distinct_2", "mean_length"}
    overall = report["overall"]
    assert overall["n"] == 11
    assert overall["majority_baseline"] == pytest.approx((4 * 0.5 + 4 * 0.75 + 2 * 0.5 + 1 * 1.0) / 11)
    assert len(samples) == 11 and {s["task"] for s in samples} == set(tasks)
    choices = [s["choice"] for s in samples if s["task"] == "billable"]
    assert len(choices) == 4 and set(choices) <= {"Yes", "No"}
    # Choice accuracy pooled over the classification rows only.
    hits = [s["choice"].lower() == s["reference"].lower() for s in samples if "choice" in s]
    assert overall["metrics"]["choice_accuracy"]["value"] == pytest.approx(sum(hits) / len(hits))


def test_a_total_cap_is_split_over_the_tasks(tiny):
    model, tokenizer = tiny
    cfg = EvaluateConfig(max_new_tokens=2, bootstrap_resamples=0, choice_max_answers=0)
    report, _ = score_heldout(model, tokenizer, FIXTURE, cfg=cfg, template_name="auto", system_prompt=None,
                              max_samples=8)
    assert {t: e["n"] for t, e in report["tasks"].items()} == {
        "billable": 2, "code_to_chapter": 2, "description_to_code": 2, "unlabeled": 1}
    assert all("choice_accuracy" not in e["metrics"] for e in report["tasks"].values())  # choice turned off
    assert math.isnan(report["overall"]["metrics"]["bleu"]["ci_low"] or math.nan)  # no resamples, no interval


def test_run_evaluate_writes_metrics_samples_and_per_task(tiny, tmp_path: Path):
    model, tokenizer = tiny
    aligned = tmp_path / "align"
    aligned.mkdir()
    (aligned / "sft_eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in FIXTURE))
    cfg = EvaluateConfig(max_samples=2, max_new_tokens=2, bootstrap_resamples=20)
    result = run_evaluate(model, tokenizer, tmp_path / "out", tokenized_dir=tmp_path / "no-tokens",
                          aligned_dir=aligned, cfg=cfg, template_name="auto", system_prompt=None)
    assert result.files == ["metrics.json", "samples.jsonl", "per_task.json"]
    per_task = json.loads((tmp_path / "out" / "per_task.json").read_text())
    assert set(per_task) == {"overall", "tasks"} and per_task["tasks"]["billable"]["n"] == 2
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics == result.metrics
    assert {"exact_match", "exact_match_ci_low", "exact_match_ci_high", "majority_baseline", "n", "task/billable/exact_match",
            "task/billable/majority_baseline", "task/billable/n", "task/billable/choice_accuracy_ci_high"} <= set(metrics)
    assert all(isinstance(v, float) and math.isfinite(v) for v in metrics.values())


def test_rewards_score_the_whole_conversation_the_answer_was_generated_from(tiny, tmp_path: Path, monkeypatch):
    """A two-turn held-out row: the reward function gets the rendered prompt with the first turn in it,
    the same text the answer was generated from, not the last question alone."""
    from components.alignment import scoring

    model, tokenizer = tiny
    messages = [{"role": "user", "content": "Which chapter contains C34.1?"},
                {"role": "assistant", "content": "Neoplasms"},
                {"role": "user", "content": "And C50.9?"},
                {"role": "assistant", "content": "Neoplasms"}]
    aligned = tmp_path / "align"
    aligned.mkdir()
    (aligned / "sft_eval.jsonl").write_text(json.dumps({"messages": messages, "task": "code_to_chapter"}) + "\n")
    cfg = PipelineConfig.model_validate({"alignment": {"reward": {"rule": "recording:reward"}}})
    run_evaluate(model, tokenizer, tmp_path / "out", tokenized_dir=tmp_path / "no-tokens", aligned_dir=aligned,
                 cfg=EvaluateConfig(max_new_tokens=2, bootstrap_resamples=0), template_name="auto",
                 system_prompt=None)
    seen = []

    def reward(prompts, completions, **columns):
        seen.extend(prompts)
        return [1.0] * len(prompts)

    monkeypatch.setattr(scoring, "load_rule", lambda path: reward)
    no_reward_stage = SimpleNamespace(has=lambda stage: False)
    samples = [json.loads(line) for line in (tmp_path / "out" / "samples.jsonl").open()]
    metrics = evaluate._answer_rewards(cfg, no_reward_stage, samples, tokenizer, hardware=None)

    assert metrics["verifiable_reward"] == 1.0
    assert [s["verifiable_reward"] for s in samples] == [1.0]  # each answer's score beside it
    assert seen == [render_prompt(tokenizer, "auto", messages[:-1], None)]
    assert all(m["content"] in seen[0] for m in messages[:-1])  # both questions and the first answer


def test_sampled_answers_are_scored_per_question_and_kept_beside_the_greedy_one(tiny, tmp_path: Path, monkeypatch):
    """evaluate.sample_k answers per held-out question: each question's mean reward, overall and per task."""
    from components.alignment import rewards

    model, tokenizer = tiny
    aligned = tmp_path / "align"
    aligned.mkdir()
    rows = [{"messages": [{"role": "user", "content": f"Question {i}?"}, {"role": "assistant", "content": "Yes"}],
             "task": "billable" if i % 2 else "chapter"} for i in range(4)]
    (aligned / "sft_eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = PipelineConfig.model_validate({"alignment": {"reward": {"rule": "recording:reward"}},
                                         "evaluate": {"sample_k": 3, "max_new_tokens": 2, "bootstrap_resamples": 50}})
    run_evaluate(model, tokenizer, tmp_path / "out", tokenized_dir=tmp_path / "no-tokens", aligned_dir=aligned,
                 cfg=cfg.evaluate, template_name="auto", system_prompt=None)
    calls = []

    def reward(prompts, completions, reference, **_):
        calls.append(len(completions))
        return [1.0 if j % 3 == 0 else 0.0 for j in range(len(completions))]  # one of each question's three

    monkeypatch.setattr(rewards, "load_rule", lambda path: reward)
    saved = [json.loads(line) for line in (tmp_path / "out" / "samples.jsonl").open()]
    metrics = evaluate._sampled_rewards(model, cfg, saved, tokenizer)

    assert calls == [12]  # 4 questions x 3 answers, scored in one call
    assert metrics["sampled_verifiable_reward"] == pytest.approx(1 / 3)
    assert metrics["task/billable/sampled_verifiable_reward"] == pytest.approx(1 / 3)
    assert metrics["sampled_verifiable_reward_ci_low"] == pytest.approx(1 / 3)  # every question the same
    assert [len(s["sampled"]) for s in saved] == [3] * 4
    assert all(s["sampled_verifiable_reward"] == pytest.approx(1 / 3) for s in saved)
    assert all("prediction" in s for s in saved)  # the greedy answer stays


@pytest.mark.parametrize("setting", ["1", "0"])
def test_the_generate_bar_follows_lmforge_no_progress(tiny, monkeypatch, capsys, setting):
    # A log (a worker's, CI's) got one "generate: 10%|..." redraw per batch of every evaluation.
    model, tokenizer = tiny
    monkeypatch.setenv("LMFORGE_NO_PROGRESS", setting)
    evaluate.generate(model, tokenizer, ["a", "b", "c"], max_new_tokens=2, batch_size=1)
    assert ("generate:" in capsys.readouterr().err) == (setting == "0")


def test_evaluate_tasks_scores_only_the_named_tasks_and_names_the_ones_there_are(tiny):
    model, tokenizer = tiny
    cfg = EvaluateConfig(tasks=["billable"], max_samples=4, max_new_tokens=2, batch_size=8, bootstrap_resamples=0)
    report, samples = score_heldout(model, tokenizer, FIXTURE, cfg=cfg, template_name="auto", system_prompt=None)
    assert list(report["tasks"]) == ["billable"] and report["overall"]["n"] == 4
    assert {s["task"] for s in samples} == {"billable"}
    with pytest.raises(ValueError, match=r"evaluate.tasks names \['coding'\].*held-out tasks are \['billable', "):
        score_heldout(model, tokenizer, FIXTURE, cfg=cfg.model_copy(update={"tasks": ["billable", "coding"]}),
                      template_name="auto", system_prompt=None)


def test_prompt_lookup_scores_the_same_answers_with_fewer_decoding_passes(tiny, monkeypatch):
    """evaluate.prompt_lookup reaches the decoder and changes nothing the report holds."""
    from components.models import generation

    model, tokenizer = tiny
    passes = []
    real_decode = generation.decode

    def counted(*args, **kwargs):
        stats = {}
        out = real_decode(*args, **kwargs, stats=stats)
        passes.append((kwargs["lookahead"], stats["forward_passes"], stats["accepted"]))
        return out

    monkeypatch.setattr(evaluate, "decode", counted)
    reports = {}
    for lookup in (0, 4):
        cfg = EvaluateConfig(max_samples=4, max_new_tokens=12, batch_size=8, bootstrap_resamples=0,
                             choice_max_answers=0, prompt_lookup=lookup)
        reports[lookup] = score_heldout(model, tokenizer, FIXTURE, cfg=cfg, template_name="auto", system_prompt=None)
    assert reports[0][1] == reports[4][1]  # every sample, answer for answer
    assert reports[0][0] == reports[4][0]
    plain = sum(n for look, n, _ in passes if look == 0)
    looked_up = sum(n for look, n, _ in passes if look == 4)
    assert {look for look, _, _ in passes} == {0, 4} and looked_up < plain
    assert sum(accepted for look, _, accepted in passes if look == 4) > 0
