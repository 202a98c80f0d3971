"""Text metrics for generated answers, each with a 95% interval.

exact match (Wilson), BLEU-4 (sacrebleu), ROUGE-1/2/L (rouge-score), METEOR and NIST (nltk),
distinct-1/2 and mean length. Intervals: Wilson for exact match; the percentile bootstrap over rows
for the rest, from per-row sufficient statistics for the corpus-level BLEU and NIST and from per-row
values for the means (ROUGE, METEOR, length). Distinct-n has none (see `text_scores`).

METEOR runs without its WordNet synonym stage: nltk reads WordNet from its `nltk_data` download,
which no package registry carries and these machines cannot fetch, so it matches exact words and
Porter stems only (METEOR's first two stages). Scores are comparable with each other, not with
published METEOR figures.
"""

from __future__ import annotations

import math
import re
import string
from collections import Counter
from functools import lru_cache

import numpy as np

from components.evaluation.intervals import DEFAULT_RESAMPLES, Estimate, bootstrap, bootstrap_mean, proportion

_PUNCT = str.maketrans("", "", string.punctuation.replace(".", ""))
NIST_ORDER = 5  # NIST-5, mteval's default


def normalize_answer(text: str) -> str:
    """Lowercase, drop surrounding whitespace, trailing periods and punctuation other than dots (ICD codes keep theirs)."""
    text = text.strip().lower().translate(_PUNCT)
    text = re.sub(r"\s+", " ", text)
    return text.rstrip(".").strip()


def exact_hits(predictions: list[str], references: list[str]) -> list[bool]:
    """Per row: does the normalized prediction equal the normalized reference."""
    return [normalize_answer(p) == normalize_answer(r) for p, r in zip(predictions, references, strict=True)]


def exact_match(predictions: list[str], references: list[str]) -> float:
    if not predictions:
        return 0.0
    return sum(exact_hits(predictions, references)) / len(predictions)


@lru_cache(maxsize=1)
def _tokenizer_13a():
    from sacrebleu.tokenizers.tokenizer_13a import Tokenizer13a

    return Tokenizer13a()


def words(text: str) -> list[str]:
    """Lowercased tokens as BLEU sees them (sacrebleu's 13a: punctuation split off, `E11.9` kept whole)."""
    return _tokenizer_13a()(text.lower()).split()


# ----------------------------------------------------------------------------- BLEU


@lru_cache(maxsize=1)
def _bleu_metric():
    from sacrebleu.metrics import BLEU

    return BLEU(effective_order=True)


def bleu_statistics(predictions: list[str], references: list[str]) -> np.ndarray:
    """Per row: [hypothesis length, reference length, matching 1..4-grams, hypothesis 1..4-grams].

    Corpus BLEU is a function of their column sums, so resampling rows resamples the corpus.
    """
    metric = _bleu_metric()
    rows = []
    for p, r in zip(predictions, references, strict=True):
        s = metric.corpus_score([p], [[r]])
        rows.append([s.sys_len, s.ref_len, *s.counts, *s.totals])
    return np.array(rows, dtype=np.int64).reshape(-1, 10)


def bleu_from_statistics(totals: np.ndarray) -> float:
    """Corpus BLEU in [0, 1] from summed `bleu_statistics` (sacrebleu's exp smoothing, effective order)."""
    from sacrebleu.metrics import BLEU

    sys_len, ref_len = int(totals[0]), int(totals[1])
    correct, total = [int(x) for x in totals[2:6]], [int(x) for x in totals[6:10]]
    if sys_len == 0:
        return 0.0
    return BLEU.compute_bleu(correct, total, sys_len, ref_len, smooth_method="exp", effective_order=True).score / 100.0


def bleu(predictions: list[str], references: list[str]) -> float:
    """Corpus BLEU-4 in [0, 1] (sacrebleu, 13a tokens), over the n-gram orders the predictions have: answers
    here are often shorter than 4 tokens (codes, yes/no), and plain BLEU scores such a corpus 0 however right it is."""
    if not predictions:
        return 0.0
    return bleu_from_statistics(bleu_statistics(predictions, references).sum(axis=0))


# ----------------------------------------------------------------------------- ROUGE, METEOR


def rouge_rows(predictions: list[str], references: list[str]) -> dict[str, list[float]]:
    """Per-row ROUGE-1/2/L F-measures (rouge-score, no stemming)."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=False)
    out: dict[str, list[float]] = {"rouge1": [], "rouge2": [], "rougeL": []}
    for p, r in zip(predictions, references, strict=True):
        scores = scorer.score(r, p)
        for k in out:
            out[k].append(scores[k].fmeasure)
    return out


def rouge(predictions: list[str], references: list[str]) -> dict[str, float]:
    n = max(len(predictions), 1)
    return {k: sum(v) / n for k, v in rouge_rows(predictions, references).items()}


class _NoSynonyms:
    """Stands in for nltk's WordNet reader: no synonym matches (see the module docstring)."""

    @staticmethod
    def synsets(*args, **kwargs) -> list:
        return []


def meteor_rows(predictions: list[str], references: list[str]) -> list[float]:
    """Per-row METEOR (nltk; exact and stem matches, no WordNet synonyms)."""
    from nltk.translate.meteor_score import meteor_score

    out = []
    for p, r in zip(predictions, references, strict=True):
        hyp, ref = words(p), words(r)
        out.append(meteor_score([ref], hyp, wordnet=_NoSynonyms()) if hyp and ref else 0.0)
    return out


def meteor(predictions: list[str], references: list[str]) -> float:
    rows = meteor_rows(predictions, references)
    return sum(rows) / len(rows) if rows else 0.0


# ----------------------------------------------------------------------------- NIST, distinct-n, length


def nist_statistics(predictions: list[str], references: list[str]) -> np.ndarray:
    """Per row: [hypothesis length, reference length, information-weighted matches of order 1..5,
    hypothesis n-grams of order 1..5], with the information weights of Doddington (2002) taken from
    all the references.

    Corpus NIST is a function of the column sums (`nist_from_statistics`), so rows can be resampled
    for an interval with the weights held fixed; on the whole corpus it equals nltk's `corpus_nist`
    (checked in the tests), which cannot be resampled this way.
    """
    from nltk.util import ngrams

    hyps, refs = [words(p) for p in predictions], [words(r) for r in references]
    freq: Counter = Counter()
    for ref in refs:
        for k in range(1, NIST_ORDER + 1):
            freq.update(ngrams(ref, k))
    ref_words = sum(len(r) for r in refs)

    def info(gram: tuple) -> float:  # log2(count(w1..wn-1) / count(w1..wn)); unigrams against all reference words
        prefix = freq[gram[:-1]] if len(gram) > 1 else ref_words
        return math.log2(prefix / freq[gram])

    rows = np.zeros((len(hyps), 2 + 2 * NIST_ORDER))
    for i, (hyp, ref) in enumerate(zip(hyps, refs, strict=True)):
        rows[i, 0], rows[i, 1] = len(hyp), len(ref)
        for k in range(1, NIST_ORDER + 1):
            hyp_grams = Counter(ngrams(hyp, k)) if len(hyp) >= k else Counter()
            overlap = hyp_grams & (Counter(ngrams(ref, k)) if len(ref) >= k else Counter())
            rows[i, 1 + k] = sum(info(g) * c for g, c in overlap.items())
            rows[i, 1 + NIST_ORDER + k] = sum(hyp_grams.values())
    return rows


def nist_from_statistics(totals: np.ndarray) -> float:
    """Corpus NIST from summed `nist_statistics`: the orders with hypothesis n-grams (an order with none scores
    0, as in mteval), times NIST's brevity penalty."""
    from nltk.translate.nist_score import nist_length_penalty

    sys_len, ref_len = totals[0], totals[1]
    if sys_len == 0 or ref_len == 0:
        return 0.0
    matched, counts = totals[2 : 2 + NIST_ORDER], totals[2 + NIST_ORDER :]
    precision = sum(m / c for m, c in zip(matched, counts) if c > 0)
    return float(precision * nist_length_penalty(ref_len, sys_len))


def nist(predictions: list[str], references: list[str]) -> float:
    """Corpus NIST-5 (information-weighted n-gram precision with NIST's brevity penalty; unbounded above)."""
    if not predictions:
        return 0.0
    return nist_from_statistics(nist_statistics(predictions, references).sum(axis=0))


def _ngram_lists(predictions: list[str], n: int) -> list[list[tuple]]:
    out = []
    for p in predictions:
        toks = p.split()
        out.append([tuple(toks[i : i + n]) for i in range(len(toks) - n + 1)])
    return out


def _distinct(grams: list[list[tuple]]) -> float:
    total = sum(len(g) for g in grams)
    return len({x for g in grams for x in g}) / total if total else 0.0


def distinct_n(predictions: list[str], n: int) -> float:
    """Distinct n-grams over all n-grams of the predictions (whitespace tokens; pooled, not per prediction)."""
    return _distinct(_ngram_lists(predictions, n))


def lengths(predictions: list[str]) -> list[int]:
    """Whitespace words per prediction."""
    return [len(p.split()) for p in predictions]


def mean_length(predictions: list[str]) -> float:
    return sum(lengths(predictions)) / len(predictions) if predictions else 0.0


# ----------------------------------------------------------------------------- all of them


def text_scores(predictions: list[str], references: list[str], *, resamples: int = DEFAULT_RESAMPLES,
                seed: int = 0) -> dict[str, Estimate]:
    """Every text metric of `predictions` against `references`, each with its 95% interval."""
    out = {"exact_match": proportion(exact_hits(predictions, references))}
    n = len(predictions)
    stats = bleu_statistics(predictions, references)
    out["bleu"] = bootstrap(lambda idx: bleu_from_statistics(stats[idx].sum(axis=0)), n, resamples=resamples, seed=seed)
    for key, rows in rouge_rows(predictions, references).items():
        out[key] = bootstrap_mean(rows, resamples=resamples, seed=seed)
    out["meteor"] = bootstrap_mean(meteor_rows(predictions, references), resamples=resamples, seed=seed)
    nist_stats = nist_statistics(predictions, references)
    out["nist"] = bootstrap(lambda idx: nist_from_statistics(nist_stats[idx].sum(axis=0)), n, resamples=resamples,
                            seed=seed)
    for order in (1, 2):
        # No interval: resampling with replacement repeats predictions, which lowers distinct-n by construction.
        out[f"distinct_{order}"] = Estimate(distinct_n(predictions, order), math.nan, math.nan, "none")
    out["mean_length"] = bootstrap_mean(lengths(predictions), resamples=resamples, seed=seed)
    return out


def text_metrics(predictions: list[str], references: list[str]) -> dict[str, float]:
    """The values of `text_scores`, without intervals."""
    return {k: e.value for k, e in text_scores(predictions, references, resamples=0).items()}
