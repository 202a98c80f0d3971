"""Chat streams what the model generates: the reply `stream_reply` and `lmforge chat` print must be the
text a plain greedy `model.generate` gives on the same conversation, turn after turn."""

from __future__ import annotations

from pathlib import Path

import pytest

QUESTIONS = ["Is ICD-10-CM code A00.1 billable?", "What does ICD-10-CM code I10 describe?"]


def greedy_reply(model, tokenizer, messages: list[dict], max_new_tokens: int) -> str:
    """The reference: the tokenizer's own chat template, greedy `generate`, the new tokens decoded."""
    import torch

    enc = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    return tokenizer.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)


@pytest.fixture(scope="module")
def talkative_model_dir(tiny_model_dir, tmp_path_factory) -> Path:
    """The tiny model with an untied random output layer that can only pick plain-word tokens.

    With tied embeddings a random model repeats the prompt's last token (a newline) forever, and a
    reply of blank lines cannot tell generated text from none; this one says visible words.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, tie_word_embeddings=False)
    torch.manual_seed(0)
    head = torch.randn_like(model.lm_head.weight)
    for i in range(head.shape[0]):
        text = tokenizer.decode([i])
        if i in tokenizer.all_special_ids or not text.strip() or not all(c.isalnum() or c == " " for c in text):
            head[i] = 0  # logit 0, below the best of ~300 random word logits
    model.lm_head.weight = torch.nn.Parameter(head)
    out = tmp_path_factory.mktemp("talkative-model")
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def test_stream_reply_is_the_greedy_generation(talkative_model_dir):
    from components.chat import load_chat_model, stream_reply
    from components.config import load_config

    cfg = load_config(None, ["compute.device=cpu", "tokenize.system_prompt=Answer briefly."])
    model, tokenizer = load_chat_model(str(talkative_model_dir), cfg)
    history = [{"role": "user", "content": QUESTIONS[0]}]
    pieces = list(stream_reply(model, tokenizer, history, cfg, max_new_tokens=12))
    expected = greedy_reply(model, tokenizer, [{"role": "system", "content": "Answer briefly."}, *history], 12)
    assert "".join(pieces) == expected
    assert len(pieces) > 1  # streamed, not handed over at the end
    assert sum(c.isalnum() for c in expected) >= 6 and QUESTIONS[0] not in expected


def test_cli_chat_prints_each_generated_reply_and_keeps_the_history(talkative_model_dir):
    from typer.testing import CliRunner

    from components.chat import load_chat_model
    from components.config import load_config
    from flows.cli import app

    sets = ["compute.device=cpu", "tokenize.system_prompt=Answer briefly."]
    result = CliRunner().invoke(
        app, ["chat", str(talkative_model_dir), "--max-new-tokens", "10", *[a for s in sets for a in ("--set", s)]],
        input="\n".join(QUESTIONS) + "\n\n", terminal_width=500,
    )
    assert result.exit_code == 0, result.output

    model, tokenizer = load_chat_model(str(talkative_model_dir), load_config(None, sets))
    messages = [{"role": "system", "content": "Answer briefly."}]
    replies = []
    for question in QUESTIONS:
        messages.append({"role": "user", "content": question})
        replies.append(greedy_reply(model, tokenizer, messages, 10))
        messages.append({"role": "assistant", "content": replies[-1]})
    assert replies[0] != replies[1]  # the second turn saw another question (and the first answer)
    assert all(sum(c.isalnum() for c in r) >= 5 for r in replies)
    assert f"model> {replies[0]}\nmodel> {replies[1]}\n" in result.output


def test_speculative_chat_gives_the_greedy_reply(talkative_model_dir, tiny_model_dir):
    """Prompt lookup (our decoder) and a draft model (transformers' assisted generation) only change how fast
    the reply comes: the text is the greedy one either way."""
    from components.chat import load_chat_model, load_draft_model, stream_reply
    from components.config import load_config

    cfg = load_config(None, ["compute.device=cpu", "tokenize.system_prompt=Answer briefly."])
    model, tokenizer = load_chat_model(str(talkative_model_dir), cfg)
    history = [{"role": "user", "content": QUESTIONS[1]}]
    expected = greedy_reply(model, tokenizer, [{"role": "system", "content": "Answer briefly."}, *history], 12)
    looked_up = "".join(stream_reply(model, tokenizer, history, cfg, max_new_tokens=12, prompt_lookup=4))
    draft = load_draft_model(str(tiny_model_dir), cfg, tokenizer)
    assert draft[1] is None  # the same vocabulary: plain assisted generation
    drafted = "".join(stream_reply(model, tokenizer, history, cfg, max_new_tokens=12, draft=draft))
    assert looked_up == expected and drafted == expected
    assert sum(c.isalnum() for c in expected) >= 6
