"""Per-task grouping, majority baselines, the flat metric keys and the summary table."""

import doctest
import json

import pytest

from components.evaluation import per_task
from components.evaluation.intervals import Estimate
from components.evaluation.per_task import (
    answer_set,
    flatten_report,
    group_by_task,
    majority_rate,
    per_task_table,
    task_entry,
)


def conversation(question: str, answer: str, task: str | None) -> dict:
    rec = {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]}
    if task:
        rec["task"] = task
    return rec


# Held-out rows as the align stage writes them: a balanced Yes/No task, a chapter task whose majority
# answer is Neoplasms (3 of 5), an open-answer task, and one row without a label.
FIXTURE = [
    conversation("Is A00.1 billable?", "Yes", "billable"),
    conversation("Which chapter contains C34.1?", "Neoplasms", "code_to_chapter"),
    conversation("Is A00 billable?", "No", "billable"),
    conversation("Which chapter contains C50.9?", "Neoplasms", "code_to_chapter"),
    conversation("What is the code for: Cholera, unspecified?", "A00.9", "description_to_code"),
    conversation("Which chapter contains I10?", "Diseases of the circulatory system", "code_to_chapter"),
    conversation("Is B01 billable?", "no", "billable"),
    conversation("Which chapter contains D12.0?", "Neoplasms", "code_to_chapter"),
    conversation("What is the code for: Typhoid fever, unspecified?", "A01.00", "description_to_code"),
    conversation("Is B02.9 billable?", "Yes", "billable"),
    conversation("Which chapter contains I21.9?", "Diseases of the circulatory system", "code_to_chapter"),
    conversation("Hello?", "Hi", None),
]


def test_docstring_examples_run():
    assert doctest.testmod(per_task).failed == 0


def test_rows_group_by_task_in_file_order_with_a_cap():
    groups = group_by_task(FIXTURE)
    assert {t: len(r) for t, r in groups.items()} == {
        "billable": 4, "code_to_chapter": 5, "description_to_code": 2, "unlabeled": 1}
    capped = group_by_task(FIXTURE, cap=2)
    assert [r["messages"][0]["content"] for r in capped["code_to_chapter"]] == [
        "Which chapter contains C34.1?", "Which chapter contains C50.9?"]
    assert all(len(rows) <= 2 for rows in capped.values())


def test_majority_baselines_and_answer_sets_per_task():
    groups = group_by_task(FIXTURE)
    refs = {t: [r["messages"][-1]["content"] for r in rows] for t, rows in groups.items()}
    assert majority_rate(refs["billable"]) == 0.5  # "No" and "no" are one answer
    assert majority_rate(refs["code_to_chapter"]) == 0.6
    assert majority_rate(refs["description_to_code"]) == 0.5
    assert answer_set(refs["billable"], 32) == ["No", "Yes"]
    assert answer_set(refs["code_to_chapter"], 32) == ["Diseases of the circulatory system", "Neoplasms"]
    assert answer_set(refs["code_to_chapter"], 1) is None  # more distinct answers than allowed
    assert answer_set(refs["description_to_code"], 32) is None  # answers that do not repeat: open task
    assert answer_set(["Yes", "Yes"], 32) is None  # one answer is no choice


def _report() -> dict:
    scores = {"exact_match": Estimate(0.25, 0.05, 0.7, "wilson"), "choice_accuracy": Estimate(0.75, 0.3, 0.95, "wilson"),
              "distinct_1": Estimate(0.5, float("nan"), float("nan"), "none")}
    return {
        "overall": task_entry(6, 0.5, {"exact_match": Estimate(0.5, 0.19, 0.81, "wilson")}),
        "tasks": {"billable": task_entry(4, 0.5, scores, answers=2),
                  "open task/v2": task_entry(2, 0.5, {"exact_match": Estimate(1.0, 0.34, 1.0, "wilson")})},
    }


def test_flat_metric_keys():
    flat = flatten_report(_report())
    assert flat == {
        "n": 6.0, "majority_baseline": 0.5, "exact_match": 0.5, "exact_match_ci_low": 0.19, "exact_match_ci_high": 0.81,
        "task/billable/n": 4.0, "task/billable/majority_baseline": 0.5, "task/billable/answers": 2.0,
        "task/billable/exact_match": 0.25, "task/billable/exact_match_ci_low": 0.05,
        "task/billable/exact_match_ci_high": 0.7, "task/billable/choice_accuracy": 0.75,
        "task/billable/choice_accuracy_ci_low": 0.3, "task/billable/choice_accuracy_ci_high": 0.95,
        "task/billable/distinct_1": 0.5,  # no interval, no interval keys
        "task/open task_v2/n": 2.0, "task/open task_v2/majority_baseline": 0.5, "task/open task_v2/exact_match": 1.0,
        "task/open task_v2/exact_match_ci_low": 0.34, "task/open task_v2/exact_match_ci_high": 1.0,
    }
    json.dumps(_report(), allow_nan=False)  # the report is valid JSON: NaN became None


def test_per_task_table_puts_columns_side_by_side():
    base, adapted = _report(), _report()
    adapted["tasks"]["billable"]["metrics"]["exact_match"]["value"] = 0.9
    table = per_task_table({"base": base, "adapted": adapted})
    assert table.splitlines() == [
        "| task | n | majority baseline | metric | base | adapted |",
        "|---|---|---|---|---|---|",
        "| billable | 4 | 0.500 | exact_match | 0.250 [0.05, 0.70] | 0.900 [0.05, 0.70] |",
        "| billable | 4 | 0.500 | choice_accuracy | 0.750 [0.30, 0.95] | 0.750 [0.30, 0.95] |",
        "| open task/v2 | 2 | 0.500 | exact_match | 1.000 [0.34, 1.00] | 1.000 [0.34, 1.00] |",
        "| overall | 6 | 0.500 | exact_match | 0.500 [0.19, 0.81] | 0.500 [0.19, 0.81] |",
    ]
    # A column without a task (an older run) leaves its cell empty.
    del adapted["tasks"]["open task/v2"]
    assert "| open task/v2 | 2 | 0.500 | exact_match | 1.000 [0.34, 1.00] |  |" in per_task_table(
        {"base": base, "adapted": adapted})
