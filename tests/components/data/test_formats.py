"""Converters: one raw row -> one standard record, or a RowError with the drop reason."""

from __future__ import annotations

import doctest
import json
from pathlib import Path

import pytest

from components.data import formats
from components.data.align import iter_records, run_align
from components.data.dataset_info import DataError, DatasetSpec
from components.data.fetch import run_fetch
from components.data.formats import RowError, get_converter, supported_kinds
from tests.components.data.conftest import FIXTURES


def spec(formatting: str = "alpaca", **kwargs) -> DatasetSpec:
    return DatasetSpec(name="d", file_name="d.jsonl", formatting=formatting, **kwargs)


def reason(convert, row: dict, s: DatasetSpec, kind: str) -> str:
    with pytest.raises(RowError) as e:
        convert(row, s, kind)
    return e.value.reason


def test_docstring_examples_run() -> None:
    result = doctest.testmod(formats)
    assert result.attempted >= 6 and result.failed == 0


def test_unknown_format_lists_known_ones() -> None:
    with pytest.raises(DataError, match="unknown format 'xml'; known: alpaca, sharegpt, openai, text, lmflow"):
        get_converter("xml")


def test_supported_kinds() -> None:
    assert supported_kinds(spec()) == ("conversation",)
    assert supported_kinds(spec(columns={"prompt": "text"})) == ("text", "conversation")
    assert supported_kinds(spec(ranking=True)) == ("preference",)
    assert supported_kinds(spec("text")) == ("text",)
    assert supported_kinds(spec("text", ranking=True)) == ()
    assert supported_kinds(spec("sharegpt")) == ("conversation",)


# ----------------------------------------------------------------------------- alpaca

def test_alpaca_history_system_and_input() -> None:
    row = {"instruction": "Code this diagnosis.", "input": "Unspecified asthma, uncomplicated", "output": "J45.909",
           "system": "You are a coder.", "history": [["Which chapter is asthma in?", "Chapter 10."]]}
    assert formats.convert_alpaca(row, spec(), "conversation") == {"messages": [
        {"role": "system", "content": "You are a coder."},
        {"role": "user", "content": "Which chapter is asthma in?"},
        {"role": "assistant", "content": "Chapter 10."},
        {"role": "user", "content": "Code this diagnosis.\nUnspecified asthma, uncomplicated"},
        {"role": "assistant", "content": "J45.909"},
    ]}


def test_alpaca_custom_columns_and_preference() -> None:
    s = spec(ranking=True, columns={"prompt": "q", "chosen": "good", "rejected": "bad"})
    assert formats.convert_alpaca({"q": "Code for GERD?", "good": "K21.9", "bad": "K21.0"}, s, "preference") == {
        "prompt": [{"role": "user", "content": "Code for GERD?"}],
        "chosen": [{"role": "assistant", "content": "K21.9"}],
        "rejected": [{"role": "assistant", "content": "K21.0"}],
    }
    assert reason(formats.convert_alpaca, {"q": "Code?", "good": "I10", "bad": "I10"}, s, "preference") == \
        "chosen_equals_rejected"
    assert reason(formats.convert_alpaca, {"q": "Code?", "good": " ", "bad": "I10"}, s, "preference") == \
        "empty_response"


@pytest.mark.parametrize("row, expected", [
    ({"instruction": "Code for asthma?", "output": ""}, "empty_response"),
    ({"instruction": " ", "input": "", "output": "I10"}, "empty_prompt"),
    ({"instruction": "Code for asthma?"}, "missing_column"),
    ({"instruction": "Code for asthma?", "output": 45.909}, "wrong_type"),
    ({"instruction": "Code?", "output": "I10", "history": "none"}, "wrong_type"),
    ({"instruction": "Code?", "output": "I10", "history": [["only one"]]}, "wrong_type"),
    ({"instruction": "Code?", "output": "I10", "history": [["Earlier?", ""]]}, "empty_response"),
])
def test_alpaca_drop_reasons(row: dict, expected: str) -> None:
    assert reason(formats.convert_alpaca, row, spec(), "conversation") == expected


def test_alpaca_null_values_count_as_empty() -> None:
    row = {"instruction": "Code for asthma?", "input": None, "output": "J45.909", "system": None, "history": None}
    assert formats.convert_alpaca(row, spec(), "conversation")["messages"][0] == {
        "role": "user", "content": "Code for asthma?"}


# ----------------------------------------------------------------------------- sharegpt

def test_sharegpt_custom_tags_and_system_message() -> None:
    s = spec("sharegpt", columns={"messages": "msgs"},
             tags={"role_tag": "role", "content_tag": "text", "user_tag": "patient", "assistant_tag": "coder"})
    row = {"msgs": [{"role": "system", "text": "Answer with codes."}, {"role": "patient", "text": "Asthma?"},
                    {"role": "coder", "text": "J45.909"}], "system": "ignored: the system message wins"}
    assert formats.convert_sharegpt(row, s, "conversation") == {"messages": [
        {"role": "system", "content": "Answer with codes."}, {"role": "user", "content": "Asthma?"},
        {"role": "assistant", "content": "J45.909"}]}


def test_sharegpt_parallel_function_calls() -> None:
    calls = ('[{"name": "lookup_icd10", "arguments": {"code": "I10"}}, '
             '{"name": "lookup_icd10", "arguments": "{\\"code\\": \\"E11.9\\"}"}]')
    row = {"conversations": [
        {"from": "human", "value": "Describe I10 and E11.9."},
        {"from": "function_call", "value": calls},
        {"from": "observation", "value": "Essential (primary) hypertension"},
        {"from": "observation", "value": {"description": "Type 2 diabetes mellitus without complications"}},
        {"from": "gpt", "value": "I10 is essential hypertension; E11.9 is type 2 diabetes without complications."},
    ]}
    messages = formats.convert_sharegpt(row, spec("sharegpt"), "conversation")["messages"]
    assert messages[1]["tool_calls"] == [{"name": "lookup_icd10", "arguments": {"code": "I10"}},
                                         {"name": "lookup_icd10", "arguments": {"code": "E11.9"}}]
    assert messages[3] == {"role": "tool",
                           "content": '{"description": "Type 2 diabetes mellitus without complications"}'}


@pytest.mark.parametrize("conversation, expected", [
    ([{"from": "gpt", "value": "I10"}], "invalid_role_order"),
    ([{"from": "human", "value": "Code?"}], "invalid_role_order"),
    ([{"from": "human", "value": "Code?"}, {"from": "observation", "value": "x"}, {"from": "gpt", "value": "I10"}],
     "invalid_role_order"),
    ([{"from": "human", "value": "Code?"}, {"from": "gpt", "value": "I10"}, {"from": "system", "value": "late"},
      {"from": "gpt", "value": "I10"}], "invalid_role_order"),
    ([{"from": "doctor", "value": "Code?"}, {"from": "gpt", "value": "I10"}], "invalid_role_order"),
    ([{"from": "human", "value": ""}, {"from": "gpt", "value": "I10"}], "empty_prompt"),
    ([{"from": "human", "value": "Code?"}, {"from": "gpt", "value": "  "}], "empty_response"),
    ([{"from": "human", "value": "Code?"}, {"from": "function_call", "value": "not json"}], "wrong_type"),
    ([{"from": "human"}, {"from": "gpt", "value": "I10"}], "missing_column"),
    ([], "empty_prompt"),
    ("human: Code?", "wrong_type"),
])
def test_sharegpt_drop_reasons(conversation, expected: str) -> None:
    assert reason(formats.convert_sharegpt, {"conversations": conversation}, spec("sharegpt"), "conversation") == \
        expected


def test_sharegpt_preference_answer_must_be_the_assistant() -> None:
    row = {"conversations": [{"from": "human", "value": "Code for asthma?"}],
           "chosen": {"from": "human", "value": "J45.909"}, "rejected": {"from": "gpt", "value": "J45.901"}}
    assert reason(formats.convert_sharegpt, row, spec("sharegpt", ranking=True), "preference") == \
        "invalid_role_order"


# ----------------------------------------------------------------------------- openai

def test_openai_content_parts_and_preference() -> None:
    row = {"messages": [{"role": "developer", "content": "Codes only."},
                        {"role": "user", "content": [{"type": "text", "text": "Code for "},
                                                     {"type": "text", "text": "obesity?"}]}],
           "chosen": {"role": "assistant", "content": "E66.9"}, "rejected": [{"role": "assistant", "content": "E66.1"}]}
    assert formats.convert_openai(row, spec("openai", ranking=True), "preference") == {
        "prompt": [{"role": "system", "content": "Codes only."}, {"role": "user", "content": "Code for obesity?"}],
        "chosen": [{"role": "assistant", "content": "E66.9"}],
        "rejected": [{"role": "assistant", "content": "E66.1"}],
    }


@pytest.mark.parametrize("messages, expected", [
    ([{"role": "user", "content": "Code?"}, {"role": "assistant", "content": None}], "empty_response"),
    ([{"role": "user", "content": "Code?", "tool_calls": [{"name": "x", "arguments": {}}]},
      {"role": "assistant", "content": "I10"}], "invalid_role_order"),
    ([{"role": "user", "content": "Code?"},
      {"role": "assistant", "tool_calls": [{"function": {"name": "lookup", "arguments": "[1]"}}]}], "wrong_type"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": "x"}]},
      {"role": "assistant", "content": "I10"}], "wrong_type"),
    ([{"content": "Code?"}, {"role": "assistant", "content": "I10"}], "missing_column"),
    ([{"role": "user", "content": "Code?"}, {"role": "assistant", "tool_calls": [{"name": "lookup", "arguments": {}}]},
      {"role": "user", "content": "Well?"}, {"role": "assistant", "content": "I10"}], "invalid_role_order"),
])
def test_openai_drop_reasons(messages: list, expected: str) -> None:
    assert reason(formats.convert_openai, {"messages": messages}, spec("openai"), "conversation") == expected


def test_assistant_tool_call_may_end_a_conversation() -> None:
    row = {"messages": [{"role": "user", "content": "Look up I10."},
                        {"role": "assistant", "content": "", "tool_calls": [{"name": "lookup", "arguments": {}}]}]}
    assert formats.convert_openai(row, spec("openai"), "conversation")["messages"][-1]["tool_calls"] == [
        {"name": "lookup", "arguments": {}}]


# ----------------------------------------------------------------------------- text, lmflow, prompt_completion

def test_text_column_mapping_and_empty_text() -> None:
    s = spec("text", columns={"text": "body"})
    assert formats.convert_text({"body": "I10 Essential (primary) hypertension"}, s, "text") == {
        "text": "I10 Essential (primary) hypertension"}
    assert reason(formats.convert_text, {"body": "\n"}, s, "text") == "empty_text"
    assert reason(formats.convert_text, {"text": "I10"}, s, "text") == "missing_column"


def test_lmflow_conversation_and_unknown_type() -> None:
    row = {"type": "conversation", "instance": {
        "system": "Codes only.", "tools": ['{"name": "lookup_icd10"}'],
        "messages": [{"role": "user", "content": "Code for hypothyroidism?"},
                     {"role": "assistant", "content": "E03.9"}]}}
    assert formats.convert_lmflow(row, spec("lmflow"), "conversation") == {
        "messages": [{"role": "system", "content": "Codes only."},
                     {"role": "user", "content": "Code for hypothyroidism?"},
                     {"role": "assistant", "content": "E03.9"}],
        "tools": '[{"name": "lookup_icd10"}]',  # LMFlow writes each schema as a JSON string: parsed
    }
    with pytest.raises(DataError, match="unknown LMFlow type 'image_text'; known: text_only, text2text"):
        formats.convert_lmflow({"type": "image_text", "instance": {}}, spec("lmflow"), "conversation")
    assert reason(formats.convert_lmflow, {"type": "text2text", "instance": {"input": "Code?"}}, spec("lmflow"),
                  "conversation") == "missing_column"


def test_lmflow_tools_empty_or_not_json() -> None:
    def conversation(tools: list) -> dict:
        return {"type": "conversation", "instance": {"tools": tools, "messages": [
            {"role": "user", "content": "Code for obesity?"}, {"role": "assistant", "content": "E66.9"}]}}

    assert "tools" not in formats.convert_lmflow(conversation([""]), spec("lmflow"), "conversation")  # LMFlow's "none"
    assert reason(formats.convert_lmflow, conversation(["look up a code"]), spec("lmflow"), "conversation") == "wrong_type"
    assert reason(formats.convert_lmflow, conversation(["[1]"]), spec("lmflow"), "conversation") == "wrong_type"


def pair(chosen: list[str], rejected: list[str], **extra) -> dict:
    def side(texts: list[str]) -> dict:
        roles = ["user", "assistant"] * len(texts)
        return {**extra, "messages": [{"role": r, "content": t} for r, t in zip(roles, texts)]}

    return {"type": "paired_conversation", "instance": {"chosen": side(chosen), "rejected": side(rejected)}}


def test_lmflow_paired_conversation_is_preference_data() -> None:
    row = pair(["Code for GERD?", "K21.9"], ["Code for GERD?", "K21.0"], system="Codes only.", tools=[""])
    assert formats.convert_lmflow(row, spec("lmflow"), "preference") == {
        "prompt": [{"role": "system", "content": "Codes only."}, {"role": "user", "content": "Code for GERD?"}],
        "chosen": [{"role": "assistant", "content": "K21.9"}],
        "rejected": [{"role": "assistant", "content": "K21.0"}],
    }
    assert supported_kinds(spec("lmflow")) == ("text", "conversation", "preference")
    assert supported_kinds(spec("lmflow", ranking=True)) == ("preference",)
    lmflow = spec("lmflow")
    assert reason(formats.convert_lmflow, pair(["Code for GERD?", "K21.9"], ["Code for CKD?", "N18.9"]), lmflow,
                  "preference") == "prompt_mismatch"
    assert reason(formats.convert_lmflow, pair(["Code?", "K21.9"], ["Code?", "K21.9"]), lmflow,
                  "preference") == "chosen_equals_rejected"
    assert reason(formats.convert_lmflow, {"type": "paired_conversation", "instance": {"chosen": {"messages": []}}},
                  lmflow, "preference") == "empty_prompt"
    only_chosen = {"type": "paired_conversation", "instance": {"chosen": {"messages": [{"role": "user", "content": "q"}]}}}
    assert reason(formats.convert_lmflow, only_chosen, lmflow, "preference") == "missing_column"
    with pytest.raises(DataError, match="an LMFlow paired_conversation file aligns to preference records, but its "
                                        "group needs conversation"):
        formats.convert_lmflow(pair(["q", "a"], ["q", "b"]), lmflow, "conversation")


def lmflow_conversation(messages: list[dict], **extra) -> dict:
    return {"type": "conversation", "instance": {**extra, "messages": messages}}


def test_lmflow_trailing_user_turn_is_trimmed_and_noted_as_lmflow_does() -> None:
    row = lmflow_conversation([{"role": "user", "content": "Code for gout?"}, {"role": "assistant", "content": "M10.9"},
                               {"role": "user", "content": "And for pseudogout?"}])
    record = formats.convert_lmflow(row, spec("lmflow"), "conversation")
    assert record.pop("_adjusted") == [("trailing_user_turn_trimmed", "messages",
                                        "message 2 (user) has no answer: trimmed, as LMFlow does")]
    assert record == {"messages": [{"role": "user", "content": "Code for gout?"},
                                   {"role": "assistant", "content": "M10.9"}]}
    lone = lmflow_conversation([{"role": "user", "content": "Code for gout?"}])  # nothing left to train on
    assert reason(formats.convert_lmflow, lone, spec("lmflow"), "conversation") == "invalid_role_order"
    # Other formats keep the rule: a conversation ends with the assistant.
    assert reason(formats.convert_openai, {"messages": row["instance"]["messages"]}, spec("openai"),
                  "conversation") == "invalid_role_order"


def test_per_message_loss_and_weight_mark_assistant_turns_untrained() -> None:
    row = lmflow_conversation([{"role": "user", "content": "Code for gout?", "loss": False},
                               {"role": "assistant", "content": "Gout is M10.9.", "loss": False},
                               {"role": "user", "content": "Code only?", "loss": False},
                               {"role": "assistant", "content": "M10.9", "loss": True}])
    assert formats.convert_lmflow(row, spec("lmflow"), "conversation")["messages"] == [
        {"role": "user", "content": "Code for gout?"},
        {"role": "assistant", "content": "Gout is M10.9.", "train": False},
        {"role": "user", "content": "Code only?"},
        {"role": "assistant", "content": "M10.9"}]
    weighted = {"messages": [{"role": "user", "content": "Code?"}, {"role": "assistant", "content": "I10", "weight": 0}]}
    assert formats.convert_openai(weighted, spec("openai"), "conversation")["messages"][-1] == {
        "role": "assistant", "content": "I10", "train": False}
    for bad in ({"loss": "no"}, {"weight": 0.5}, {"loss": 1}):
        assert reason(formats.convert_lmflow, lmflow_conversation(
            [{"role": "user", "content": "Code?"}, {"role": "assistant", "content": "I10", **bad}]),
            spec("lmflow"), "conversation") == "wrong_type"
    with pytest.raises(RowError, match=r"'messages\[0\]\.loss' marks a user message trained; only assistant turns"):
        formats.convert_lmflow(lmflow_conversation([{"role": "user", "content": "Code?", "loss": True},
                                                    {"role": "assistant", "content": "I10"}]),
                               spec("lmflow"), "conversation")
    # A preference pair's answers carry no training flag: the method decides what trains.
    flagged = pair(["Code?", "I10"], ["Code?", "I11"])
    flagged["instance"]["chosen"]["messages"][-1]["loss"] = False
    assert formats.convert_lmflow(flagged, spec("lmflow"), "preference")["chosen"] == [
        {"role": "assistant", "content": "I10"}]


def test_tool_results_keep_tool_call_id_and_name() -> None:
    row = lmflow_conversation([
        {"role": "user", "content": "Look up I10."},
        {"role": "assistant", "content": "", "tool_calls": [
            {"id": "call_9", "type": "function", "function": {"name": "lookup_icd10", "arguments": '{"code": "I10"}'}}]},
        {"role": "tool", "tool_call_id": "call_9", "name": "lookup_icd10", "content": "Essential hypertension"},
        {"role": "assistant", "content": "I10 is essential hypertension."}])
    messages = formats.convert_lmflow(row, spec("lmflow"), "conversation")["messages"]
    assert messages[1]["tool_calls"] == [{"name": "lookup_icd10", "arguments": {"code": "I10"}, "id": "call_9"}]
    assert messages[2] == {"role": "tool", "content": "Essential hypertension", "tool_call_id": "call_9",
                           "name": "lookup_icd10"}
    row["instance"]["messages"][2]["tool_call_id"] = 9
    assert reason(formats.convert_lmflow, row, spec("lmflow"), "conversation") == "wrong_type"


def test_lmflow_paired_conversation_of_plain_message_lists() -> None:
    def side(answer: str) -> list[dict]:
        return [{"role": "user", "content": "Code for GERD?"}, {"role": "assistant", "content": answer}]

    row = {"type": "paired_conversation",
           "instance": {"system": "Codes only.", "chosen": side("K21.9"), "rejected": side("K21.0")}}
    assert formats.convert_lmflow(row, spec("lmflow"), "preference") == {
        "prompt": [{"role": "system", "content": "Codes only."}, {"role": "user", "content": "Code for GERD?"}],
        "chosen": [{"role": "assistant", "content": "K21.9"}],
        "rejected": [{"role": "assistant", "content": "K21.0"}],
    }
    other = {"type": "paired_conversation", "instance": {"chosen": side("K21.9"), "rejected": [
        {"role": "user", "content": "Code for CKD?"}, {"role": "assistant", "content": "N18.9"}]}}
    assert reason(formats.convert_lmflow, other, spec("lmflow"), "preference") == "prompt_mismatch"
    empty = {"type": "paired_conversation", "instance": {"chosen": [], "rejected": side("K21.0")}}
    assert reason(formats.convert_lmflow, empty, spec("lmflow"), "preference") == "empty_prompt"


def test_prompt_completion_conversational_and_preference() -> None:
    row = {"prompt": [{"role": "user", "content": "Code for sepsis?"}],
           "completion": [{"role": "assistant", "content": "A41.9"}]}
    assert formats.convert_prompt_completion(row, spec("prompt_completion"), "conversation") == {
        "messages": [{"role": "user", "content": "Code for sepsis?"}, {"role": "assistant", "content": "A41.9"}]}
    s = spec("prompt_completion", ranking=True)
    assert reason(formats.convert_prompt_completion, {"prompt": "Code?", "chosen": "A41.9", "rejected": "A41.9"}, s,
                  "preference") == "chosen_equals_rejected"
    assert reason(formats.convert_prompt_completion,
                  {"prompt": "Code?", "chosen": [{"role": "assistant", "content": "A41.9"}] * 2, "rejected": "A41.0"},
                  s, "preference") == "wrong_type"
    assert reason(formats.convert_prompt_completion, {"prompt": "Code?", "completion": ""},
                  spec("prompt_completion"), "conversation") == "empty_response"


def test_row_error_carries_reason_field_and_message() -> None:
    with pytest.raises(RowError) as e:
        formats.convert_alpaca({"instruction": "Code?", "answer": "I10"}, spec(), "conversation")
    assert (e.value.reason, e.value.field, e.value.message) == (
        "missing_column", "output", "no column 'output' (columns.response)")


# ----------------------------------------------------------------------------- shared: row metadata, kto_tag

def _align_fixture(formats_dir: Path, tmp_path: Path, group: str, name: str) -> tuple[list[dict], dict]:
    """One fixture dataset through the fetch and align stages: (aligned records, its report entry)."""
    run_fetch(formats_dir / "dataset_info.json", [name], tmp_path / "fetch")
    run_align(tmp_path / "fetch", {group: [name]}, tmp_path / "align")
    report = json.loads((tmp_path / "align" / "report.json").read_text())[group][name]
    return list(iter_records(tmp_path / "align" / f"{group}.jsonl")), report


def _golden(name: str) -> list[dict]:
    return list(iter_records(FIXTURES / "golden" / f"{name}.jsonl"))


@pytest.mark.parametrize("group, name, dropped", [
    ("sft_eval", "icd10_alpaca_tasks", {"wrong_type": 1, "missing_column": 1}),
    ("kto", "icd10_alpaca_kto", {"wrong_type": 1}),
    ("kto", "icd10_sharegpt_kto", {}),
])
def test_metadata_and_kto_fixtures_align_to_their_golden_files(formats_dir: Path, tmp_path: Path, group: str,
                                                                name: str, dropped: dict) -> None:
    records, report = _align_fixture(formats_dir, tmp_path, group, name)
    assert records == _golden(name)
    assert {reason: d["count"] for reason, d in report["dropped"].items()} == dropped


def test_task_column_travels_into_every_record_kind() -> None:
    columns = {"prompt": "instruction", "response": "output", "task": "type"}
    row = {"instruction": "Code for GERD?", "output": "K21.9", "chosen": "K21.9", "rejected": "K21.0", "type": "code"}
    convert = get_converter("alpaca")
    assert convert(row, spec(columns=columns), "conversation")["task"] == "code"
    assert convert(row, spec(ranking=True, columns={**columns, "chosen": "chosen", "rejected": "rejected"}),
                   "preference")["task"] == "code"
    assert convert({"text": "I10 Essential (primary) hypertension", "type": "corpus"},
                   spec(columns={"prompt": "text", "task": "type"}), "text") == {
        "text": "I10 Essential (primary) hypertension", "task": "corpus"}
    assert "task" not in convert(row, spec(columns={"prompt": "instruction", "response": "output"}), "conversation")
    assert reason(convert, {**row, "type": ""}, spec(columns=columns), "conversation") == "missing_column"
    assert reason(convert, {**row, "type": ["a"]}, spec(columns=columns), "conversation") == "wrong_type"


def test_an_alpaca_text_dataset_may_carry_metadata() -> None:
    assert supported_kinds(spec(columns={"prompt": "text", "task": "type"})) == ("text", "conversation")


def test_kto_tag_makes_unpaired_preference_data() -> None:
    kto = {"prompt": "instruction", "response": "output", "kto_tag": "good"}
    assert supported_kinds(spec(columns=kto)) == ("unpaired_preference",)
    assert supported_kinds(spec("sharegpt", columns={"messages": "conversations", "kto_tag": "label"})) == \
        ("unpaired_preference",)
    assert supported_kinds(spec("text", columns={"kto_tag": "good"})) == ()
    with pytest.raises(ValueError, match="kto_tag labels single answers"):
        spec(ranking=True, columns=kto)
    convert = get_converter("alpaca")
    row = {"instruction": "Code for GERD?", "output": "K21.9"}
    for value, label in ((True, True), (False, False), ("TRUE", True), ("false", False), (1, True), (0, False)):
        assert convert({**row, "good": value}, spec(columns=kto), "unpaired_preference")["label"] is label
    assert reason(convert, {**row, "good": "maybe"}, spec(columns=kto), "unpaired_preference") == "wrong_type"
    assert reason(convert, {**row, "good": 2}, spec(columns=kto), "unpaired_preference") == "wrong_type"
    assert reason(convert, row, spec(columns=kto), "unpaired_preference") == "missing_column"
    assert reason(convert, {**row, "output": " ", "good": True}, spec(columns=kto), "unpaired_preference") == \
        "empty_response"
