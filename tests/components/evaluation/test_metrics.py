"""Text metrics against values worked out by hand (and sacrebleu's own number for a fixed pair)."""

import math

import pytest

from components.evaluation.metrics import bleu, distinct_n, exact_match, normalize_answer, rouge, text_metrics


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
    })
