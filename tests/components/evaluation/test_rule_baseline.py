"""The lookup-rule baseline: fitted on the SFT rows in the align stage, scored beside the model per task."""

from __future__ import annotations

import doctest
import json

import pytest

from components.errors import StageInputError
from components.evaluation import rule_baseline
from components.evaluation.per_task import flatten_report, per_task_table
from components.evaluation.rule_baseline import attach_rule_answers


def _row(task: str, question: str, answer: str) -> dict:
    return {"task": task, "messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]}


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_doctests():
    assert doctest.testmod(rule_baseline).failed == 0


def test_the_rule_is_fitted_on_training_rows_and_answers_each_heldout_row_of_its_task(tmp_path):
    q = "Is ICD-10-CM code {} billable?"
    train = [_row("billable", q.format(c), a) for c, a in [("E11", "No"), ("E13", "No"), ("I10", "Yes"),
                                                          ("S72.001A", "Yes"), ("T36.0X1A", "Yes"),
                                                          ("E11.9", "Yes"), ("E10.9", "No"), ("K21.9", "Yes")]]
    train.append(_row("chapter", "Which chapter contains E11?", "Endocrine"))
    heldout = [_row("billable", q.format(c), a) for c, a in [("E10", "No"), ("S42.001A", "Yes"), ("E11.8", "Yes"),
                                                            ("K21.0", "No"), ("Z99.89", "Yes")]]
    heldout.append(_row("chapter", "Which chapter contains I10?", "Circulatory"))
    _write(tmp_path / "sft.jsonl", train)
    _write(tmp_path / "sft_eval.jsonl", heldout)
    info = attach_rule_answers(tmp_path / "sft.jsonl", tmp_path / "sft_eval.jsonl",
                               {"billable": "components.evaluation.rule_baseline:code_shape"})
    assert info == {"billable": {"rule": "components.evaluation.rule_baseline:code_shape", "train_rows": 8, "keys": 6}}
    rows = [json.loads(line) for line in (tmp_path / "sft_eval.jsonl").read_text().splitlines()]
    # (3, E) -> No; (7, S) -> Yes; (4, E) holds one Yes of 5 and one No of 3: No by share of class (a raw count
    # would tie); (4, K) -> Yes; (5, Z) is unseen: the commonest answer overall (Yes, 5 of 8); chapter has no rule.
    assert [r.get("rule_answer") for r in rows] == ["No", "Yes", "No", "Yes", "Yes", None]
    assert rows[0]["messages"] == heldout[0]["messages"]  # the rows themselves unchanged

    with pytest.raises(StageInputError, match=r"names \['coding'\], which no SFT row carries"):
        attach_rule_answers(tmp_path / "sft.jsonl", tmp_path / "sft_eval.jsonl",
                            {"coding": "components.evaluation.rule_baseline:code_shape"})
    with pytest.raises(StageInputError, match="names no function"):
        attach_rule_answers(tmp_path / "sft.jsonl", tmp_path / "sft_eval.jsonl", {"billable": "components.evaluation"})


def test_the_evaluation_scores_the_rule_beside_the_model(tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from components.config import EvaluateConfig
    from components.evaluation.evaluate import score_heldout

    q = "Is ICD-10-CM code {} billable?"
    records = [{**_row("billable", q.format(c), a), "rule_answer": rule}
               for c, a, rule in [("G10", "Yes", "No"), ("F20", "No", "No"), ("S42.001A", "Yes", "Yes"),
                                  ("M54.5", "No", "Yes")]]
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    cfg = EvaluateConfig(max_new_tokens=2, bootstrap_resamples=0, choice_max_answers=0)
    report, _ = score_heldout(model, tokenizer, records, cfg=cfg, template_name="auto", system_prompt=None)
    rule = report["tasks"]["billable"]["rule_baseline"]
    assert rule["value"] == 0.5 and rule["ci_method"] == "wilson" and rule["ci_low"] < 0.5 < rule["ci_high"]
    flat = flatten_report(report)
    assert flat["task/billable/rule_baseline"] == 0.5 and "task/billable/rule_baseline_ci_low" in flat
    table = per_task_table({"adapted": report})
    assert table.splitlines()[0] == "| task | n | majority baseline | rule baseline | metric | adapted |"
    assert "| billable | 4 | 0.500 | 0.500 [" in table
