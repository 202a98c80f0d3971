"""Text metrics for generated answers: exact match, ROUGE (rouge-score), BLEU (sacrebleu), distinct-n."""

from __future__ import annotations

import re
import string

_PUNCT = str.maketrans("", "", string.punctuation.replace(".", ""))


def normalize_answer(text: str) -> str:
    """Lowercase, drop surrounding whitespace, trailing periods and punctuation other than dots (ICD codes keep theirs)."""
    text = text.strip().lower().translate(_PUNCT)
    text = re.sub(r"\s+", " ", text)
    return text.rstrip(".").strip()


def exact_match(predictions: list[str], references: list[str]) -> float:
    if not predictions:
        return 0.0
    hits = sum(normalize_answer(p) == normalize_answer(r) for p, r in zip(predictions, references, strict=True))
    return hits / len(predictions)


def rouge(predictions: list[str], references: list[str]) -> dict[str, float]:
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=False)
    totals = {"rouge1": 0.0, "rouge2": 0.0, "rougeL": 0.0}
    for p, r in zip(predictions, references, strict=True):
        scores = scorer.score(r, p)
        for k in totals:
            totals[k] += scores[k].fmeasure
    n = max(len(predictions), 1)
    return {k: v / n for k, v in totals.items()}


def bleu(predictions: list[str], references: list[str]) -> float:
    """Corpus BLEU in [0, 1] (sacrebleu, 13a tokens), over the n-gram orders the predictions have: answers
    here are often shorter than 4 tokens (codes, yes/no), and plain BLEU scores such a corpus 0 however right it is."""
    from sacrebleu.metrics import BLEU

    if not predictions:
        return 0.0
    return BLEU(effective_order=True).corpus_score(predictions, [references]).score / 100.0


def distinct_n(predictions: list[str], n: int) -> float:
    grams, total = set(), 0
    for p in predictions:
        toks = p.split()
        for i in range(len(toks) - n + 1):
            grams.add(tuple(toks[i : i + n]))
            total += 1
    return len(grams) / total if total else 0.0


def text_metrics(predictions: list[str], references: list[str]) -> dict[str, float]:
    out = {"exact_match": exact_match(predictions, references), "bleu": bleu(predictions, references)}
    out.update(rouge(predictions, references))
    out["distinct_1"] = distinct_n(predictions, 1)
    out["distinct_2"] = distinct_n(predictions, 2)
    return out
