"""The template table: every named format masks exactly its answers and renders like apply_chat_template."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from components.config import TokenizeConfig
from components.data.chat_render import encode_conversations, prepare_template, render_conversation, render_prompt
from components.data.conversation_encoder import ConversationEncoder
from components.data.dataset_info import DatasetSpec
from components.data.formats import convert_alpaca
from components.data.records import IGNORE
from components.data.templates import FORMATS, TEMPLATES, chat_format, known_templates, resolve_template
from tests.components.data.conftest import FIXTURES

# Special tokens the named formats use; the tiny tokenizer only knows ChatML's.
FORMAT_TOKENS = [
    "<|eot_id|>", "<|start_header_id|>", "<|end_header_id|>", "<start_of_turn>", "<end_of_turn>",
    "<|end|>", "<|user|>", "<|assistant|>", "<|system|>", "<s>", "</s>",
]
CONVERSATION = [
    {"role": "user", "content": "What does ICD-10-CM code I10 describe?"},
    {"role": "assistant", "content": "Essential (primary) hypertension"},
    {"role": "user", "content": "Is J45 billable?"},
    {"role": "assistant", "content": "No"},
]
SYSTEM = "Answer with the ICD-10-CM fact asked for."


@pytest.fixture
def tiny_tokenizer(tiny_model_dir):
    """The tiny model's tokenizer (ChatML template, eos <|im_end|>): a fresh copy that tests may change."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture
def format_tokenizer(tiny_tokenizer):
    tiny_tokenizer.add_tokens(FORMAT_TOKENS, special_tokens=True)
    tiny_tokenizer.bos_token = "<s>"
    tiny_tokenizer.eos_token = "</s>"  # formats without their own stop token end turns with the model's eos
    return tiny_tokenizer


def trained_spans(tokenizer, ids, labels) -> list[str]:
    spans, current = [], []
    for token, label in zip(ids, labels):
        if label != IGNORE:
            assert label == token
            current.append(token)
        elif current:
            spans.append(tokenizer.decode(current))
            current = []
    if current:
        spans.append(tokenizer.decode(current))
    return spans


def expected_answer(fmt, content: str, eos: str) -> str:
    stop = fmt.stop or eos
    after = fmt.assistant[1].replace("{eos}", eos)
    return fmt.answer_lead + content + after[: after.index(stop) + len(stop)]


@pytest.mark.parametrize("name", sorted(FORMATS))
def test_named_template_masks_exactly_the_answers(format_tokenizer, name):
    fmt = FORMATS[name]
    ids, labels = render_conversation(
        format_tokenizer, name, CONVERSATION, system_prompt=SYSTEM, train_on_prompt=False, mask_history=False
    )
    assert trained_spans(format_tokenizer, ids, labels) == [
        expected_answer(fmt, "Essential (primary) hypertension", "</s>"),
        expected_answer(fmt, "No", "</s>"),
    ]
    # Same text as transformers' own rendering of the template, and the system prompt is in it.
    messages = [{"role": "system", "content": SYSTEM}, *CONVERSATION]
    text = format_tokenizer.apply_chat_template(messages, chat_template=TEMPLATES[name], tokenize=False)
    assert ids == format_tokenizer.encode(text, add_special_tokens=False)
    assert SYSTEM in text
    # Prefix property: every prompt (history + generation prompt) is a token prefix of the whole.
    for i in (1, 3):
        prompt = format_tokenizer.apply_chat_template(
            messages[:i + 1], chat_template=TEMPLATES[name], tokenize=False, add_generation_prompt=True
        )
        prompt_ids = format_tokenizer.encode(prompt, add_special_tokens=False)
        assert ids[: len(prompt_ids)] == prompt_ids
        assert not prompt.endswith(" "), "a generation prompt ending in a space tokenizes differently from ' word'"


@pytest.mark.parametrize("name", ["gemma", "mistral", "llama2"])
def test_formats_without_system_turn_fold_it_into_the_first_user_turn(format_tokenizer, name):
    text = format_tokenizer.apply_chat_template(
        [{"role": "system", "content": SYSTEM}, *CONVERSATION], chat_template=TEMPLATES[name], tokenize=False
    )
    first_user = text.index(CONVERSATION[0]["content"])
    assert text.index(SYSTEM) < first_user and text.count(SYSTEM) == 1
    assert not chat_format(name).supports_system


def test_resolve_template(tiny_tokenizer):
    assert resolve_template(tiny_tokenizer, "auto") == tiny_tokenizer.chat_template
    assert resolve_template(tiny_tokenizer, "qwen") == TEMPLATES["chatml"]
    with pytest.raises(ValueError, match="unknown chat template 'nope'.*chatml.*llama3"):
        resolve_template(tiny_tokenizer, "nope")
    tiny_tokenizer.chat_template = None
    with pytest.raises(ValueError, match="tokenizer has no chat template; set tokenize.template to one of: .*alpaca"):
        resolve_template(tiny_tokenizer, "auto")
    assert set(FORMATS) <= set(known_templates())


def test_stop_token_must_be_a_single_token(tiny_tokenizer):
    with pytest.raises(ValueError, match="'llama3' ends assistant turns with '<\\|eot_id\\|>'.*tokens"):
        prepare_template(tiny_tokenizer, "llama3")


TOOL_CONVERSATION = [
    {"role": "user", "content": "Look up I10."},
    {"role": "assistant", "content": None, "tool_calls": [{"name": "lookup", "arguments": {"code": "I10"}}]},
    {"role": "tool", "content": "Essential (primary) hypertension"},
    {"role": "assistant", "content": "It is essential hypertension."},
]
TOOLS = '[{"name": "lookup", "description": "Describe a code", "parameters": {"type": "object"}}]'


def test_tool_calls_and_results_render_as_json(tiny_tokenizer):
    ids, labels = render_conversation(
        tiny_tokenizer, "chatml", TOOL_CONVERSATION, system_prompt=None, train_on_prompt=False, mask_history=False,
        tools=TOOLS,
    )
    assert trained_spans(tiny_tokenizer, ids, labels) == [
        '<tool_call>{"name": "lookup", "arguments": {"code": "I10"}}</tool_call><|im_end|>',
        "It is essential hypertension.<|im_end|>",
    ]
    text = tiny_tokenizer.decode(ids)
    assert '<|im_start|>tool\nEssential (primary) hypertension<|im_end|>' in text
    assert '<|im_start|>system\nYou can call these tools' in text and '{"name": "lookup", "description"' in text
    # The Hugging Face function-call form renders the same.
    hf_form = [dict(m) for m in TOOL_CONVERSATION]
    hf_form[1]["tool_calls"] = [{"type": "function", "function": {"name": "lookup", "arguments": {"code": "I10"}}}]
    assert render_conversation(
        tiny_tokenizer, "chatml", hf_form, system_prompt=None, train_on_prompt=False, mask_history=False, tools=TOOLS
    ) == (ids, labels)


def test_system_message_after_the_first_is_refused(tiny_tokenizer):
    messages = [*CONVERSATION[:2], {"role": "system", "content": "late"}, *CONVERSATION[2:]]
    with pytest.raises(ValueError, match="conversation 0: .*'alpaca'.*system message must be the first"):
        render_conversation(
            tiny_tokenizer, "alpaca", messages, system_prompt=None, train_on_prompt=False, mask_history=False
        )


@pytest.mark.parametrize("name", sorted(FORMATS))
def test_fast_path_equals_exact_path_for_every_named_template(format_tokenizer, name):
    conversations = [
        (CONVERSATION, None),
        (CONVERSATION[:2], None),
        ([{"role": "system", "content": "Own prompt."}, *CONVERSATION], None),
        ([{"role": "user", "content": " spaced \n"}, {"role": "assistant", "content": "\nE11.9 "}], None),
    ]
    tmpl = prepare_template(format_tokenizer, name)
    for system_prompt, mask_history in ((SYSTEM, False), (None, True)):
        options = {"system_prompt": system_prompt, "train_on_prompt": False, "mask_history": mask_history}
        exact = encode_conversations(format_tokenizer, tmpl, conversations, **options)
        encoder = ConversationEncoder(format_tokenizer, tmpl, verify_rows=0, **options)
        assert encoder.encode(conversations) == exact
        assert encoder.counts["fast"] >= 3, encoder.counts  # the table's templates substitute contents verbatim


HELDOUT = Path(__file__).resolve().parents[3] / "data" / "icd10" / "sft_heldout.jsonl"


def heldout_conversations(n: int) -> list[list[dict]]:
    """The first n held-out rows of the shipped data, aligned as the align stage does."""
    spec = DatasetSpec(name="icd10_instructions_heldout", file_name="sft_heldout.jsonl",
                       columns={"prompt": "instruction", "query": "input", "response": "output"})
    rows = [json.loads(line) for line in HELDOUT.read_text(encoding="utf-8").splitlines()[:n]]
    return [convert_alpaca(row, spec, "conversation")["messages"] for row in rows]


@pytest.mark.parametrize("system_prompt", [TokenizeConfig().system_prompt, None])
@pytest.mark.parametrize("name", ["auto", *sorted(FORMATS)])
def test_evaluation_prompt_is_the_prompt_training_masks(format_tokenizer, name, system_prompt):
    """render_prompt (evaluation, chat) gives, token for token, what training puts before the first trained label."""
    conversations = heldout_conversations(24)
    tmpl = prepare_template(format_tokenizer, name)
    options = {"system_prompt": system_prompt, "train_on_prompt": False, "mask_history": False}
    encoder = ConversationEncoder(format_tokenizer, tmpl, **options)  # training's path
    encoded = encoder.encode([(messages, None) for messages in conversations])
    for messages, (ids, labels) in zip(conversations, encoded):
        prompt = render_prompt(format_tokenizer, name, messages[:-1], system_prompt)
        prompt_ids = format_tokenizer(prompt, add_special_tokens=False)["input_ids"]  # as evaluation encodes it
        first_trained = next(i for i, label in enumerate(labels) if label != IGNORE)
        assert prompt_ids == ids[:first_trained], (name, messages)
        assert (system_prompt is None) or prompt.count(system_prompt) == 1


def test_lmflow_tool_schemas_reach_the_template_as_objects(tiny_tokenizer):
    # LMFlow writes each tool schema as a JSON string; the aligned record carries the schemas themselves.
    record = json.loads((FIXTURES / "golden" / "icd10_lmflow_conversation.jsonl").read_text().splitlines()[0])
    ids, _ = render_conversation(tiny_tokenizer, "chatml", record["messages"], system_prompt=None,
                                 train_on_prompt=False, mask_history=False, tools=record["tools"])
    text = tiny_tokenizer.decode(ids)
    assert '\n{"name": "lookup_icd10", "description": "Look up an ICD-10-CM code"' in text
    assert '\\"name\\"' not in text
