"""What a lookup rule on one feature of the question scores: the ceiling of what that feature tells.

Some held-out tasks cannot be answered from what the model can see. Whether an ICD-10-CM code is billable
depends on whether it has subcodes, which an unseen category does not show; all the question gives is the
code's shape. A rule that answers each shape with the answer most common for it among the training rows
is then the ceiling a model can be held to (bench/billable_ceiling.py measures it on the shipped data), and
the evaluation shows it beside the model's score.

`data.rule_baselines` names, per task, a feature of the question (a function question -> hashable key).
The align stage fits the rule on the task's SFT rows (per key, the answer with the larger share of its
class, so a skewed training mix does not decide it; unseen keys get the overall commonest answer) and
writes the rule's answer into each held-out row of the task as `rule_answer`; the evaluation scores it
(components/evaluation/evaluate.py) as `task/<task>/rule_baseline`.
"""

from __future__ import annotations

import importlib
import json
import re
from collections import Counter
from collections.abc import Callable, Hashable
from pathlib import Path

from components.artifacts import atomic_write_text
from components.data.jsonl import iter_records
from components.errors import StageInputError

_CODE = re.compile(r"\b([A-Z]\d[0-9A-Z](?:\.[0-9A-Z]{1,4})?)\b")


def code_shape(question: str) -> Hashable:
    """An ICD-10-CM question's code as its shape: (characters without the dot, first letter).

    >>> code_shape("Is ICD-10-CM code S72.001A billable?")
    (7, 'S')
    """
    match = _CODE.search(question)
    code = match.group(1).replace(".", "") if match else ""
    return (len(code), code[:1])


def load_feature(path: str) -> Callable[[str], Hashable]:
    """The function named by `module:function`; a clear error for a path that names none."""
    module_name, _, attr = path.partition(":")
    try:
        fn = getattr(importlib.import_module(module_name), attr, None) if attr else None
    except ImportError as exc:
        raise StageInputError(f"data.rule_baselines: cannot import {module_name!r} ({exc})") from None
    if not callable(fn):
        raise StageInputError(f"data.rule_baselines: {path!r} names no function; write it as module:function, "
                              "e.g. components.evaluation.rule_baseline:code_shape")
    return fn


def fit_rule(rows: list[tuple[Hashable, str]]) -> tuple[dict[Hashable, str], str]:
    """(answer per key, fallback) from (key, answer) rows: per key the answer with the larger share of its
    class; the fallback is the commonest answer overall.

    >>> fit_rule([((3,), "No"), ((3,), "No"), ((3,), "Yes"), ((4,), "Yes")])
    ({(3,): 'No', (4,): 'Yes'}, 'No')
    """
    totals = Counter(answer for _, answer in rows)
    per_key: dict[Hashable, Counter] = {}
    for key, answer in rows:
        per_key.setdefault(key, Counter())[answer] += 1
    answers = sorted(totals)
    rule = {k: max(answers, key=lambda a, c=c: c[a] / totals[a]) for k, c in per_key.items()}
    return rule, totals.most_common(1)[0][0]


def _question_answer(record: dict) -> tuple[str, str]:
    messages = record["messages"]
    question = next((m["content"] for m in reversed(messages[:-1]) if m["role"] == "user"), "")
    return question, messages[-1]["content"]


def attach_rule_answers(train_file: Path, heldout_file: Path, rules: dict[str, str]) -> dict[str, dict]:
    """Fit each task's rule on `train_file` (aligned SFT records) and rewrite `heldout_file` with each row of
    the task carrying `rule_answer`; returns per task the rule, its training rows and its distinct keys."""
    features = {task: load_feature(path) for task, path in rules.items()}
    fits: dict[str, list] = {task: [] for task in rules}
    for record in iter_records(train_file):
        task = record.get("task")
        if task in features:
            question, answer = _question_answer(record)
            fits[task].append((features[task](question), answer))
    empty = [task for task, rows in fits.items() if not rows]
    if empty:
        raise StageInputError(f"data.rule_baselines names {empty}, which no SFT row carries (give those tasks SFT "
                              "rows, or drop them from data.rule_baselines)")
    fitted = {task: fit_rule(rows) for task, rows in fits.items()}
    lines = []
    for record in iter_records(heldout_file):
        task = record.get("task")
        if task in fitted:
            rule, fallback = fitted[task]
            record = {**record, "rule_answer": rule.get(features[task](_question_answer(record)[0]), fallback)}
        lines.append(json.dumps(record, ensure_ascii=False) + "\n")
    atomic_write_text(heldout_file, "".join(lines))
    return {task: {"rule": rules[task], "train_rows": len(fits[task]), "keys": len(fitted[task][0])} for task in rules}
