"""Two evaluations of the same held-out questions, compared question by question.

Two means with overlapping intervals can still differ reliably: most of the spread of a held-out
score comes from the questions (some are easy for both models), and it cancels in the per-question
difference. So whether alignment raised the verifiable reward over SFT is judged on the paired
differences: their mean with a percentile-bootstrap interval, overall and per task.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable

from components.evaluation.intervals import DEFAULT_RESAMPLES, bootstrap_mean
from components.evaluation.metrics import normalize_answer
from components.evaluation.per_task import UNLABELED


def _key(sample: dict) -> tuple:
    return (sample.get("task") or UNLABELED, sample.get("rendered_prompt") or sample.get("prompt"), sample["reference"])


def question_key(sample: dict) -> tuple:
    """A held-out question as asked, whatever template or system prompt rendered it: (task, question, reference)."""
    return (sample.get("task") or UNLABELED, sample.get("prompt"), sample["reference"])


def heldout_digest(samples: list[dict]) -> str:
    """sha256 of the set of questions an evaluation scored (question_key of each sample, sorted): two
    evaluations with the same digest answered the same questions, so their figures compare."""
    keys = sorted(json.dumps(question_key(s), ensure_ascii=False) for s in samples)
    return hashlib.sha256("\n".join(keys).encode()).hexdigest()


def with_scores(samples: list[dict], metric: str) -> list[dict]:
    """The samples with a per-question `metric` field: exact_match and choice_accuracy are computed from the
    answer (as the evaluation scores them), any other metric must already be a numeric field of the sample."""
    def score(s: dict) -> float | None:
        if metric == "exact_match":
            return float(normalize_answer(s.get("prediction", "")) == normalize_answer(s["reference"]))
        if metric == "choice_accuracy":
            return float(normalize_answer(s["choice"]) == normalize_answer(s["reference"])) if "choice" in s else None
        value = s.get(metric)
        return float(value) if isinstance(value, (int, float)) else None

    return [{**s, metric: value} for s in samples if (value := score(s)) is not None]


def paired_change(before: list[dict], after: list[dict], metric: str, *,
                  resamples: int = DEFAULT_RESAMPLES, key: Callable[[dict], tuple] = _key) -> dict | None:
    """The change of a per-answer `metric` (a field of the evaluation's samples) from `before` to `after`
    on the questions both answered (matched by `key`: the rendered prompt by default, `question_key` to
    match across templates): {"n", "before", "after", "change": {"value", "ci_low", "ci_high",
    "ci_method"}, "tasks": {task: {"n", "before", "after", "change"}}}. None when no question is shared
    or the samples do not carry the metric (an evaluation without a verifiable reward rule)."""
    earlier = {key(s): s[metric] for s in before if metric in s}
    pairs = [(key(s)[0], earlier[key(s)], s[metric]) for s in after if metric in s and key(s) in earlier]
    if not pairs:
        return None

    def entry(rows: list[tuple[str, float, float]]) -> dict:
        change = bootstrap_mean([b - a for _, a, b in rows], resamples=resamples)
        return {"n": len(rows), "before": sum(a for _, a, _ in rows) / len(rows),
                "after": sum(b for _, _, b in rows) / len(rows), "change": change.as_dict()}

    tasks: dict[str, list] = {}
    for row in pairs:
        tasks.setdefault(row[0], []).append(row)
    return {**entry(pairs), "tasks": {task: entry(rows) for task, rows in tasks.items()}}


def mean_by_task(name: str, values: list[float], tasks: list[str], *, resamples: int = DEFAULT_RESAMPLES) -> dict:
    """Metrics for per-question `values`: `name` (the mean) with `name_ci_low`/`name_ci_high` (bootstrap),
    and `task/<task>/name` per task when there is more than one task."""
    estimate = bootstrap_mean(values, resamples=resamples)
    metrics = {name: estimate.value, f"{name}_ci_low": estimate.low, f"{name}_ci_high": estimate.high}
    by_task: dict[str, list[float]] = {}
    for task, value in zip(tasks, values, strict=True):
        by_task.setdefault(task or UNLABELED, []).append(value)
    if len(by_task) > 1:
        metrics.update({f"task/{task}/{name}": sum(v) / len(v) for task, v in by_task.items()})
    return metrics
