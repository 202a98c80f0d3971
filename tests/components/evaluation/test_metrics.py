from components.evaluation.metrics import exact_match, normalize_answer, rouge, text_metrics


def test_normalize_keeps_code_dots_and_drops_case_and_trailing_period():
    assert normalize_answer("  E11.9. ") == "e11.9"
    assert normalize_answer("Yes!") == "yes"


def test_exact_match_counts_normalized_hits():
    assert exact_match(["E11.9", "no", "A00.1"], ["e11.9", "Yes", "A00.0"]) == 1 / 3


def test_rouge_is_one_for_identical_and_lower_otherwise():
    assert rouge(["cholera due to vibrio"], ["cholera due to vibrio"])["rougeL"] == 1.0
    assert rouge(["typhoid fever"], ["cholera due to vibrio"])["rouge1"] == 0.0


def test_text_metrics_has_all_keys():
    m = text_metrics(["a b c"], ["a b d"])
    assert set(m) >= {"exact_match", "bleu", "rouge1", "rouge2", "rougeL", "distinct_1", "distinct_2"}
