"""Text metrics against values worked out by hand (and sacrebleu's and nltk's own numbers for fixed pairs)."""

import math

import pytest

from components.evaluation.metrics import (
    bleu,
    distinct_n,
    exact_match,
    mean_length,
    meteor,
    nist,
    normalize_answer,
    rouge,
    text_metrics,
    text_scores,
    words,
)


def test_normalize_keeps_code_dots_and_drops_case_punctuation_and_extra_space():
    assert normalize_answer("  E11.9. ") == "e11.9"
    assert normalize_answer("Yes!") == "yes"
    assert normalize_answer("Essential (primary)  hypertension\n") == "essential primary hypertension"
    assert normalize_answer("E11.9") != normalize_answer("E119")  # the code's dot is part of the answer


def test_exact_match_counts_normalized_hits():
    assert exact_match(["E11.9", "no", "A00.1"], ["e11.9", "Yes", "A00.0"]) == 1 / 3
    assert exact_match(["Essential (primary) hypertension.", "YES"], ["essential primary hypertension", "yes"]) == 1.0
    assert exact_match([], []) == 0.0
    with pytest.raises(ValueError):
        exact_match(["a", "b"], ["a"])


def test_bleu_by_hand_without_smoothing_or_brevity_penalty():
    # 5 tokens, one wrong at the end: precisions 4/5, 3/4, 2/3, 1/2 and equal lengths.
    assert bleu(["a b c d e"], ["a b c d f"]) == pytest.approx((4 / 5 * 3 / 4 * 2 / 3 * 1 / 2) ** 0.25, rel=1e-9)


def test_bleu_brevity_penalty_by_hand():
    # Every n-gram right but 4 tokens against 6: BP = exp(1 - 6/4).
    assert bleu(["a b c d"], ["a b c d e f"]) == pytest.approx(math.exp(-0.5), rel=1e-9)


def test_bleu_pools_counts_over_the_corpus():
    # Counts summed over both pairs (8/9, 6/7, 4/5, 2/3; 9 tokens against 11), not the mean of sentence scores.
    expected = math.exp(1 - 11 / 9) * (8 / 9 * 6 / 7 * 4 / 5 * 2 / 3) ** 0.25
    assert bleu(["a b c d e", "a b c d"], ["a b c d f", "a b c d e f"]) == pytest.approx(expected, rel=1e-9)
    assert expected != pytest.approx((bleu(["a b c d e"], ["a b c d f"]) + math.exp(-0.5)) / 2, rel=1e-4)


def test_bleu_matches_sacrebleu_on_a_fixed_pair():
    # sacrebleu 2.x corpus BLEU with 13a tokenization (the comma is its own token): 0.8633400213704508.
    pred = ["Cholera due to Vibrio cholerae 01, biovar eltor"]
    ref = ["Cholera due to Vibrio cholerae 01, biovar cholerae"]
    assert bleu(pred, ref) == pytest.approx(0.8633400213704508, rel=1e-9)


def test_bleu_of_short_answers_uses_the_orders_they_have():
    # Codes and yes/no have no 4-grams; plain corpus BLEU would score even a perfect set 0.
    assert bleu(["E11.9", "Yes"], ["E11.9", "Yes"]) == pytest.approx(1.0)
    assert bleu(["E11.9", "No"], ["E11.9", "Yes"]) == pytest.approx(0.5)
    assert bleu(["x y z w"], ["a b c d"]) == 0.0
    assert bleu([], []) == 0.0


def test_rouge_by_hand():
    # 3 of 4 predicted words in a 5-word reference: P 3/4, R 3/5, F 2/3; bigrams 2 of 3 against 4: F 4/7.
    scores = rouge(["cholera due to vibrio"], ["cholera due to salmonella infection"])
    assert scores == pytest.approx({"rouge1": 2 / 3, "rouge2": 4 / 7, "rougeL": 2 / 3})
    # Same words in another order: unigrams all match, no bigram does, the longest common subsequence is 2 of 3.
    assert rouge(["b a c"], ["a b c"]) == pytest.approx({"rouge1": 1.0, "rouge2": 0.0, "rougeL": 2 / 3})
    # Averaged over pairs; case and punctuation are ignored by rouge-score's tokenizer.
    two = rouge(["Typhoid fever.", "cholera due to vibrio"], ["typhoid fever", "cholera due to salmonella infection"])
    assert two == pytest.approx({"rouge1": (1 + 2 / 3) / 2, "rouge2": (1 + 4 / 7) / 2, "rougeL": (1 + 2 / 3) / 2})


def test_distinct_n_by_hand():
    assert distinct_n(["a b a b"], 1) == 0.5  # {a, b} of 4 unigrams
    assert distinct_n(["a b a b"], 2) == pytest.approx(2 / 3)  # {ab, ba} of ab, ba, ab
    assert distinct_n(["a b", "a b"], 1) == 0.5  # pooled over predictions
    assert distinct_n(["a", "b"], 2) == 0.0  # n-grams do not cross from one prediction into the next
    assert distinct_n([""], 1) == 0.0


def test_meteor_by_hand_exact_and_stem_matches_without_wordnet():
    # 3 of 3 hypothesis words match 3 of 6 reference words in one chunk: P 1, R 1/2,
    # Fmean = P R / (0.9 P + 0.1 R) = 0.5 / 0.95, fragmentation penalty 0.5 (1/3)^3.
    assert meteor(["the cat sat"], ["the cat sat on a mat"]) == pytest.approx(0.5 / 0.95 * (1 - 0.5 / 27))
    # "cats" meets "cat" at the Porter stem stage: 2 matches in one chunk, penalty 0.5 (1/2)^3.
    assert meteor(["cats sat"], ["cat sat"]) == pytest.approx(1 - 0.0625)
    # No WordNet: a synonym is no match ("sick" / "ill"), so only "very" counts: P = R = 1/2, penalty 0.5.
    assert meteor(["very sick"], ["very ill"]) == pytest.approx(0.5 * (1 - 0.5))
    assert meteor(["", "x"], ["a", "x"]) == pytest.approx((0 + 0.5) / 2)  # an empty answer scores 0


def test_nist_by_hand_and_against_nltk():
    from nltk.translate.nist_score import corpus_nist

    # References "a b", "a c": 4 words, a twice. Info: a = log2(4/2) = 1, b = c = log2(4/1) = 2,
    # ab = ac = log2(count(a) / count(ab)) = 1. Unigrams: (1+2)+(1+2) over 4 = 1.5; bigrams: 2 over 2 = 1.
    assert nist(["a b", "a c"], ["a b", "a c"]) == pytest.approx(2.5)
    assert nist(["yes"], ["yes"]) == 0.0  # an n-gram in every reference carries no information
    assert nist([], []) == 0.0
    preds = ["Cholera due to Vibrio cholerae 01, biovar eltor", "Typhoid fever", "E11.9", "Essential hypertension"]
    refs = ["Cholera due to Vibrio cholerae 01, biovar cholerae", "Typhoid fever, unspecified", "E11.9",
            "Essential (primary) hypertension"]
    expected = corpus_nist([[words(r)] for r in refs], [words(p) for p in preds], n=5)
    assert nist(preds, refs) == pytest.approx(expected, rel=1e-12)
    # Answers shorter than 5 tokens: nltk divides by zero; the orders they lack count 0, as in mteval.
    short = (["a b", "c"], ["a b", "c d"])
    assert nist(*short) == pytest.approx(corpus_nist([[words(r)] for r in short[1]], [words(p) for p in short[0]], n=2))


def test_mean_length_counts_whitespace_words():
    assert mean_length(["a b c", "yes", ""]) == pytest.approx(4 / 3)
    assert mean_length([]) == 0.0


def test_text_scores_carry_intervals_around_their_values():
    preds = ["E11.9", "No", "Neoplasms", "Essential hypertension", "Yes", "I10"] * 5
    refs = ["E11.9", "Yes", "Neoplasms", "Essential (primary) hypertension", "Yes", "I15.0"] * 5
    scores = text_scores(preds, refs, resamples=200)
    assert scores["exact_match"].value == pytest.approx(0.5) and scores["exact_match"].method == "wilson"
    for name, e in scores.items():
        if e.method == "none":  # distinct-n: no interval (resampling repeats predictions)
            assert math.isnan(e.low) and name.startswith("distinct")
            continue
        assert e.low <= e.value <= e.high, name
    assert scores["bleu"].value == pytest.approx(bleu(preds, refs))
    assert scores["nist"].value == pytest.approx(nist(preds, refs))
    assert text_scores(preds, refs, resamples=200) == scores  # seeded


def test_text_metrics_combines_the_values():
    m = text_metrics(["a b c", "yes"], ["a b d", "yes"])
    assert m == pytest.approx({
        "exact_match": 0.5,
        # Unigrams 3/4, bigrams 1/2, trigrams 0 of 1 (sacrebleu's exp smoothing: 1/2), no 4-grams: 3 orders.
        "bleu": (3 / 4 * 1 / 2 * 1 / 2) ** (1 / 3),
        "rouge1": (2 / 3 + 1) / 2,
        "rouge2": (1 / 2 + 0) / 2,  # "yes" has no bigram, which rouge-score scores 0
        "rougeL": (2 / 3 + 1) / 2,
        "distinct_1": 1.0,
        "distinct_2": 1.0,
        "meteor": meteor(["a b c", "yes"], ["a b d", "yes"]),
        "nist": nist(["a b c", "yes"], ["a b d", "yes"]),
        "mean_length": 2.0,
    })
