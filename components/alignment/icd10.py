"""A verifiable reward for the shipped ICD-10-CM demo: how close an answer is to the reference.

Every demo question has one right answer (a chapter title, a code, a description, Yes/No), so an
answer can be checked without a learned model. Partial credit matters: GRPO learns nothing from a
group whose completions all score 0 (zero variance), and a small model's first answers are rarely
exactly right. The scale, for one answer:

- 1.0  the reference, after normalisation (case, spacing, punctuation; ICD codes keep their dot);
- for a code: 0.5 for the right category (first three characters: K27.9 for K27.4), 0.2 for the
  right chapter letter (K);
- for text: 0.8 x token F1 with the reference (so a near miss never outscores the exact answer);
- 0.0  an empty or looping answer (`rewards.is_degenerate`), or a wrong Yes/No.
"""

from __future__ import annotations

import re
from collections import Counter

from components.alignment.rewards import is_degenerate

CODE = re.compile(r"\b([A-Z]\d[0-9A-Z](?:\.[0-9A-Z]{1,4})?)\b")
_PUNCT = re.compile(r"[^\w\s.]")


def _normal(text: str) -> str:
    text = _PUNCT.sub(" ", text.strip().lower())
    return re.sub(r"\s+", " ", text).strip().rstrip(".").strip()


def _first_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[0] if lines else ""


def token_f1(prediction: str, reference: str) -> float:
    pred, ref = _normal(prediction).split(), _normal(reference).split()
    common = sum((Counter(pred) & Counter(ref)).values())
    if not pred or not ref or not common:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def answer_score(completion: str, reference: str) -> float:
    """The reward of one answer against its reference (see the module docstring for the scale)."""
    answer = _first_line(completion)
    if is_degenerate(answer):
        return 0.0
    if _normal(answer) == _normal(reference):
        return 1.0
    ref_code = CODE.fullmatch(reference.strip().upper())
    if ref_code:
        found = CODE.search(answer.upper())
        if not found:
            return 0.0
        code, want = found.group(1), ref_code.group(1)
        if code == want:
            return 1.0
        if code[:3] == want[:3]:
            return 0.5
        return 0.2 if code[0] == want[0] else 0.0
    if _normal(reference) in ("yes", "no"):
        return 0.0
    return 0.8 * token_f1(answer, reference)


def icd10_reward(prompts: list[str], completions: list[str], reference: list[str], **_) -> list[float]:
    """reward(prompts, completions, **columns) for the ICD demo: `reference` holds the right answers."""
    return [answer_score(c, r) for c, r in zip(completions, reference, strict=True)]
