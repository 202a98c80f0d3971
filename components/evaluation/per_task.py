"""Per-task reporting: held-out rows grouped by their `task` label, each task scored beside its majority baseline.

A pooled exact match hides what a model learned: on the ICD-10 data most early hits are Yes/No
coin flips. So every metric is reported per task and overall, each with a 95% interval, next to the
task's majority baseline: the score of always giving its most frequent reference answer (0.5 for a
balanced Yes/No task, about 1/n for open answers). It is not chance: a model that learned only the
answer format and the commonest answer scores exactly this.

A task whose references take few distinct values that repeat (Yes/No, chapter titles) is a
classification task: it is also scored by constrained choice over those values
(components/evaluation/choice.py).

The report (`per_task.json`) is {"overall": entry, "tasks": {task: entry}} with
entry = {"n", "majority_baseline", "answers" (candidate count, classification tasks only), "metrics": {name:
{"value", "ci_low", "ci_high", "ci_method"}}}; `flatten_report` turns it into MLflow metric keys:
`exact_match`, `exact_match_ci_low`, ... for the overall entry and `task/<task>/exact_match`, ...,
`task/<task>/n`, `task/<task>/majority_baseline` per task. A task with a fitted lookup rule
(data.rule_baselines, components/evaluation/rule_baseline.py) also has "rule_baseline": that rule's score
on the same questions, with its interval (`task/<task>/rule_baseline`).
"""

from __future__ import annotations

import math
import re
from collections import Counter

from components.evaluation.intervals import Estimate
from components.evaluation.metrics import normalize_answer

UNLABELED = "unlabeled"  # the task of held-out rows that carry no `task`
# Metrics shown by default in the summary table, in this order.
TABLE_METRICS = ("exact_match", "choice_accuracy")


def group_by_task(records: list[dict], cap: int | None = None) -> dict[str, list[dict]]:
    """Records by their `task` label (first-seen order), at most `cap` per task, file order kept."""
    groups: dict[str, list[dict]] = {}
    for rec in records:
        rows = groups.setdefault(str(rec.get("task") or UNLABELED), [])
        if cap is None or len(rows) < cap:
            rows.append(rec)
    return groups


def answer_set(references: list[str], max_answers: int) -> list[str] | None:
    """The candidate answers of a classification task (distinct references, first spelling of each
    normalized answer, sorted), or None for an open-answer task: more than `max_answers` distinct
    answers, or answers that hardly repeat (fewer than two rows per answer on average).

    >>> answer_set(["Yes", "No", "yes", "No"], 32)
    ['No', 'Yes']
    >>> answer_set(["A00.1", "B01.2", "C03"], 32) is None
    True
    """
    first: dict[str, str] = {}
    for ref in references:
        first.setdefault(normalize_answer(ref), ref)
    if not 2 <= len(first) <= max_answers or len(references) < 2 * len(first):
        return None
    return sorted(first.values())


def majority_rate(references: list[str]) -> float:
    """Share of the most frequent (normalized) reference: what always giving that answer scores.

    >>> majority_rate(["Yes", "No", "yes", "No", "No"])
    0.6
    """
    if not references:
        return math.nan
    return max(Counter(normalize_answer(r) for r in references).values()) / len(references)


def task_entry(n: int, majority_baseline: float, scores: dict[str, Estimate], answers: int | None = None) -> dict:
    """One task's (or the overall) entry of the report."""
    entry = {"n": n, "majority_baseline": majority_baseline, "metrics": {k: finite_values(e.as_dict()) for k, e in scores.items()}}
    if answers is not None:
        entry["answers"] = answers
    return entry


def finite_values(d: dict) -> dict:
    """NaN (no interval) as None, so the report stays valid JSON."""
    return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in d.items()}


def metric_key_part(task: str) -> str:
    """A task name as MLflow accepts it inside a metric key (letters, digits, _ - . space /)."""
    return re.sub(r"[^A-Za-z0-9_\-. ]", "_", task) or "_"


def flatten_report(report: dict) -> dict[str, float]:
    """The report as flat MLflow metrics (see the module docstring); missing intervals are left out."""
    out: dict[str, float] = {}

    def put(prefix: str, entry: dict) -> None:
        out[f"{prefix}n"] = float(entry["n"])
        if entry.get("majority_baseline") is not None and not math.isnan(entry["majority_baseline"]):
            out[f"{prefix}majority_baseline"] = float(entry["majority_baseline"])
        if "answers" in entry:
            out[f"{prefix}answers"] = float(entry["answers"])
        if entry.get("rule_baseline"):
            rule = entry["rule_baseline"]
            out[f"{prefix}rule_baseline"] = float(rule["value"])
            for side in ("ci_low", "ci_high"):
                if rule.get(side) is not None:
                    out[f"{prefix}rule_baseline_{side}"] = float(rule[side])
        for name, m in entry["metrics"].items():
            out[f"{prefix}{name}"] = float(m["value"])
            for side in ("ci_low", "ci_high"):
                if m.get(side) is not None:
                    out[f"{prefix}{name}_{side}"] = float(m[side])

    put("", report["overall"])
    for task, entry in report["tasks"].items():
        put(f"task/{metric_key_part(task)}/", entry)
    return out


def _cell(metric: dict | None) -> str:
    if not metric:
        return ""
    low, high = metric.get("ci_low"), metric.get("ci_high")
    interval = f" [{low:.2f}, {high:.2f}]" if low is not None and high is not None else ""
    return f"{metric['value']:.3f}{interval}"


def per_task_table(per_task_by_column: dict[str, dict], metrics: tuple[str, ...] = TABLE_METRICS) -> str:
    """A markdown table of per-task reports side by side (columns such as base, +cpt, adapted).

    One row per task and metric: n, majority baseline, then each column's value with its 95% interval.
    A metric no column has for a task (choice accuracy of an open-answer task) is left out.
    """
    columns = list(per_task_by_column)
    tasks: dict[str, dict] = {}
    for report in per_task_by_column.values():
        for task, entry in report.get("tasks", {}).items():
            tasks.setdefault(task, entry)
    rules = any(entry.get("rule_baseline") for entry in tasks.values())
    header = ["task", "n", "majority baseline", *(["rule baseline"] if rules else []), "metric", *columns]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    rows = [*((task, entry, lambda r, t=task: r.get("tasks", {}).get(t)) for task, entry in tasks.items())]
    overall = next((r["overall"] for r in per_task_by_column.values() if "overall" in r), None)
    if overall is not None:
        rows.append(("overall", overall, lambda r: r.get("overall")))
    for task, entry, pick in rows:
        for metric in metrics:
            cells = [_cell((pick(report) or {}).get("metrics", {}).get(metric)) for report in per_task_by_column.values()]
            if not any(cells):
                continue
            baseline = entry.get("majority_baseline")
            shown = "" if baseline is None or math.isnan(baseline) else f"{baseline:.3f}"
            rule = [_cell(entry.get("rule_baseline"))] if rules else []
            lines.append("| " + " | ".join([task, str(entry["n"]), shown, *rule, metric, *cells]) + " |")
    return "\n".join(lines)
