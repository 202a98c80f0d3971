"""Constrained choice on the tiny model: scores equal a plain full-sequence forward; a rigged model is obeyed."""

from __future__ import annotations

import pytest
import torch

from components.evaluation.choice import answer_token_ids, candidate_logprobs, choose

PROMPTS = [
    [{"role": "user", "content": "Is ICD-10-CM code J45 billable?"}],
    [{"role": "user", "content": "Which ICD-10-CM chapter contains code E11.9? Answer with the chapter title."}],
    [{"role": "user", "content": "What does ICD-10-CM code I10 describe?"}],
]
CANDIDATES = ["Yes", "No", "Endocrine, nutritional and metabolic diseases", "Neoplasms"]
SYSTEM = "You are a medical coding assistant."


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    return model, tokenizer


def test_answer_tokens_are_what_training_labels(tiny):
    _, tokenizer = tiny
    prompts, answers = answer_token_ids(tokenizer, "auto", PROMPTS, CANDIDATES, SYSTEM)
    assert tokenizer.decode(prompts[0]).endswith("<|im_start|>assistant\n")
    assert SYSTEM in tokenizer.decode(prompts[0])
    # Each answer is the candidate and the end-of-turn token, nothing of the prompt.
    assert [tokenizer.decode(a) for a in answers[1]] == [f"{c}<|im_end|>" for c in CANDIDATES]


def test_scores_equal_a_full_forward_of_prompt_plus_answer(tiny):
    model, tokenizer = tiny
    prompts, answers = answer_token_ids(tokenizer, "auto", PROMPTS, CANDIDATES, SYSTEM)
    # batch_size 8 with 4 candidates each: two prompts of different lengths share a left-padded batch, one goes alone.
    scores = candidate_logprobs(model, prompts, answers, pad_id=tokenizer.pad_token_id, batch_size=8)
    with torch.no_grad():
        for q, prompt in enumerate(prompts):
            for c, answer in enumerate(answers[q]):
                logp = model(torch.tensor([prompt + answer])).logits[0].log_softmax(-1)
                expected = sum(logp[len(prompt) - 1 + j, t].item() for j, t in enumerate(answer))
                assert scores[q][c] == pytest.approx(expected, abs=1e-3), (q, c)


def _rigged(model, tokenizer, favourite: str):
    """A copy of `model` whose output layer adds +30 to the logits of `favourite`'s tokens."""
    import copy

    rigged = copy.deepcopy(model)
    weight = rigged.get_output_embeddings().weight
    head = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=True)
    with torch.no_grad():
        head.weight.copy_(weight)
        head.bias.zero_()
        head.bias[tokenizer(favourite, add_special_tokens=False)["input_ids"]] = 30.0
    rigged.lm_head = head  # no longer tied to the input embeddings: only the output is biased
    return rigged


@pytest.mark.parametrize("favourite", ["No", "Neoplasms"])
def test_the_rigged_answer_is_chosen(tiny, favourite):
    # The bias makes the favourite's few tokens near certain at every position; every other candidate
    # has a token outside them (about -30 each), so the favourite is the likeliest answer by far.
    model, tokenizer = tiny
    favoured = set(tokenizer(favourite, add_special_tokens=False)["input_ids"])
    for c in CANDIDATES:
        assert c == favourite or set(tokenizer(c, add_special_tokens=False)["input_ids"]) - favoured
    picks, scores = choose(tokenizer, _rigged(model, tokenizer, favourite), "auto", PROMPTS, CANDIDATES,
                           system_prompt=SYSTEM, batch_size=4)
    assert picks == [favourite] * len(PROMPTS)
    for s in scores:
        assert max(s) == s[CANDIDATES.index(favourite)]


def test_adapters_score_alike_without_deprecation_warnings(tiny):
    # A PeftModel's forward takes **kwargs; the cache must still go by the name the model inside takes,
    # or transformers warns about `past_key_values` once per evaluation.
    import copy
    import warnings

    from peft import LoraConfig, get_peft_model

    model, tokenizer = tiny
    prompts, answers = answer_token_ids(tokenizer, "auto", PROMPTS, CANDIDATES, SYSTEM)
    plain = candidate_logprobs(model, prompts, answers, pad_id=tokenizer.pad_token_id, batch_size=8)

    wrapped = get_peft_model(copy.deepcopy(model), LoraConfig(r=2, target_modules=["q_proj"])).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        adapted = candidate_logprobs(wrapped, prompts, answers, pad_id=tokenizer.pad_token_id, batch_size=8)
    # LoRA's B starts at zero, so the adapted model is the plain one.
    assert sum(adapted, []) == pytest.approx(sum(plain, []), abs=1e-4)


def test_docstring_examples_run():
    import doctest

    from components.evaluation import choice

    assert doctest.testmod(choice).failed == 0
