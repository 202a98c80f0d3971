"""One converter per input format: a raw row + its DatasetSpec -> one standard record.

The standard records are described in components/data/records.py. A converter raises `RowError`
for a row that cannot be aligned (the align stage drops it and counts the reason) and `DataError`
for a problem with the whole dataset (the stage fails). Message building and role checks are
shared (components/data/messages.py), so every format obeys the same rules.

The align stage calls a format through `get_converter`, which adds what every format shares
(`convert_row`): unpaired preference records for datasets with a `kto_tag` column, and the row
metadata columns (`task`) copied into the record.

Drop reasons: missing_column, wrong_type, invalid_role_order, empty_prompt, empty_response,
empty_text, chosen_equals_rejected, prompt_mismatch (plus malformed_json, malformed_csv and not_utf8
from reading files). Rows kept after a change, counted apart in the report: trailing_user_turn_trimmed
(an LMFlow conversation ending with a user turn, trimmed as LMFlow does).
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from typing import Any

from components.data.dataset_info import METADATA_COLUMNS, DataError, DatasetSpec
from components.data.messages import (
    RowError,
    conversation_record,
    make_message,
    note_adjustment,
    parse_tool_calls,
    preference_record,
    text_field,
    tool_schemas_json,
    unpaired_preference_record,
)
from components.data.records import Kind

# LLaMA-Factory's defaults for the sharegpt `tags`.
SHAREGPT_TAGS = {
    "role_tag": "from",
    "content_tag": "value",
    "user_tag": "human",
    "assistant_tag": "gpt",
    "observation_tag": "observation",
    "function_tag": "function_call",
    "system_tag": "system",
}
_OPENAI_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant",
                 "tool": "tool", "function": "tool"}


Converter = Callable[[dict, DatasetSpec, Kind], dict]


def supported_kinds(spec: DatasetSpec) -> tuple[Kind, ...]:
    """The record kinds a dataset can align to, from its formatting, ranking flag and columns."""
    if "kto_tag" in spec.columns:  # single answers labeled desirable or not
        labeled = ("alpaca", "sharegpt", "openai", "prompt_completion")
        return ("unpaired_preference",) if spec.formatting in labeled else ()
    if spec.ranking:
        ranked = ("alpaca", "sharegpt", "openai", "prompt_completion", "lmflow")
        return ("preference",) if spec.formatting in ranked else ()
    if spec.formatting == "alpaca":
        # LLaMA-Factory's pretraining text: an alpaca entry whose only column is `prompt` (metadata aside).
        content_columns = set(spec.columns) - set(METADATA_COLUMNS)
        return ("text", "conversation") if content_columns == {"prompt"} else ("conversation",)
    if spec.formatting == "text":
        return ("text",)
    if spec.formatting == "lmflow":
        return ("text", "conversation", "preference")  # the file's own `type` decides; checked on its first row
    return ("conversation",)


# ----------------------------------------------------------------------------- shared pieces


def _column(row: dict, spec: DatasetSpec, key: str, default: str | None, *, required: bool) -> Any:
    """The value of our column `key` (mapped through spec.columns); None when an optional one is absent."""
    name = spec.columns.get(key, default)
    if name is None:
        return None
    if name not in row:
        if required:
            raise RowError("missing_column", name, f"no column '{name}' (columns.{key})")
        return None
    return row[name]


def _text_column(row: dict, spec: DatasetSpec, key: str, default: str, *, required: bool) -> str:
    return text_field(_column(row, spec, key, default, required=required), spec.columns.get(key, default))


def _tools_column(row: dict, spec: DatasetSpec) -> str | None:
    return tool_schemas_json(_column(row, spec, "tools", "tools", required=False), spec.columns.get("tools", "tools"))


def _trained(msg: dict, role: str, field: str) -> bool:
    """Whether a message's turn is trained, by LMFlow's `"loss": true/false` or OpenAI fine-tuning's
    `"weight": 1/0`; absent: trained. Only assistant turns can be marked trained (the prompt is
    trained only by tokenize.train_on_prompt, for every token)."""
    marks = []
    if msg.get("loss") is not None:
        if type(msg["loss"]) is not bool:
            raise RowError("wrong_type", f"{field}.loss", f"'{field}.loss' should be true or false, got {msg['loss']!r}")
        marks.append(("loss", msg["loss"]))
    if msg.get("weight") is not None:
        if type(msg["weight"]) not in (int, float) or msg["weight"] not in (0, 1):
            raise RowError("wrong_type", f"{field}.weight", f"'{field}.weight' should be 0 or 1, got {msg['weight']!r}")
        marks.append(("weight", msg["weight"] == 1))
    for key, trained in marks:
        if trained and role != "assistant":
            raise RowError("wrong_type", f"{field}.{key}", f"'{field}.{key}' marks a {role} message trained; only "
                           "assistant turns are trained per message (tokenize.train_on_prompt trains every token)")
    return all(trained for _, trained in marks)


def _openai_message(msg: Any, field: str) -> dict:
    """An OpenAI-style {"role", "content", "tool_calls"?} message -> ours.

    A tool result keeps its `tool_call_id` and `name`; an assistant turn marked `"loss": false` (LMFlow)
    or `"weight": 0` (OpenAI fine-tuning) is kept untrained (`"train": false`).
    """
    if not isinstance(msg, dict):
        raise RowError("wrong_type", field, f"'{field}' should be an object, got {type(msg).__name__}")
    if "role" not in msg:
        raise RowError("missing_column", "role", f"'{field}' has no 'role'; keys found: {', '.join(map(str, msg))}")
    role = _OPENAI_ROLES.get(msg["role"])
    if role is None:
        raise RowError("invalid_role_order", field, f"'{field}': unknown role {msg['role']!r}")
    content = msg.get("content")
    if isinstance(content, list):  # content parts: keep the text ones, refuse images and audio
        if not all(isinstance(p, dict) and p.get("type") == "text" for p in content):
            raise RowError("wrong_type", field, f"'{field}.content' has non-text parts")
        content = "".join(text_field(p.get("text"), f"{field}.content") for p in content)
    content = text_field(content, f"{field}.content")
    calls = msg.get("tool_calls")
    if calls and role != "assistant":
        raise RowError("invalid_role_order", field, f"'{field}': only assistant messages make tool calls")
    result = {k: text_field(msg.get(k), f"{field}.{k}") or None for k in ("tool_call_id", "name")} if role == "tool" else {}
    return make_message(role, content, parse_tool_calls(calls, f"{field}.tool_calls") if calls else None,
                        train=_trained(msg, role, field) or role != "assistant", **result)


def _openai_messages(value: Any, field: str) -> list[dict]:
    if not isinstance(value, list):
        raise RowError("wrong_type", field, f"'{field}' should be a list of messages, got {type(value).__name__}")
    return [_openai_message(m, f"{field}[{i}]") for i, m in enumerate(value)]


def _answer(value: Any, field: str, parse: Callable[[Any, str], dict]) -> dict:
    """One answer of a preference pair: a string, a message, or a list holding one message."""
    if isinstance(value, str):
        return make_message("assistant", value)
    if isinstance(value, list):
        if len(value) != 1:
            raise RowError("wrong_type", field, f"'{field}' should hold one message, got {len(value)}")
        value = value[0]
    return parse(value, field)


def _answer_column(row: dict, spec: DatasetSpec, key: str, parse: Callable[[Any, str], dict]) -> dict:
    return _answer(_column(row, spec, key, key, required=True), spec.columns.get(key, key), parse)


# ----------------------------------------------------------------------------- converters


def convert_alpaca(row: dict, spec: DatasetSpec, kind: Kind) -> dict:
    """Alpaca: instruction/input/output (+ system, history); chosen/rejected when ranking.

    The user turn is the instruction, then a newline and the input when there is one.

    >>> spec = DatasetSpec(name="d", file_name="d.json")
    >>> convert_alpaca({"instruction": "Code for hypertension?", "input": "", "output": "I10"},
    ...                spec, "conversation")
    {'messages': [{'role': 'user', 'content': 'Code for hypertension?'}, {'role': 'assistant', 'content': 'I10'}]}
    >>> convert_alpaca({"text": "I10 Essential (primary) hypertension"},
    ...                DatasetSpec(name="d", file_name="d.json", columns={"prompt": "text"}), "text")
    {'text': 'I10 Essential (primary) hypertension'}
    """
    prompt_column = spec.columns.get("prompt", "instruction")
    prompt = _text_column(row, spec, "prompt", "instruction", required=True)
    if kind == "text":
        if not prompt.strip():
            raise RowError("empty_text", prompt_column, "empty text")
        return {"text": prompt}
    query = _text_column(row, spec, "query", "input", required=False)
    user = "\n".join(part for part in (prompt, query) if part)
    if not user.strip():
        raise RowError("empty_prompt", prompt_column, "empty instruction and input")
    system = _text_column(row, spec, "system", "system", required=False)
    history_column = spec.columns.get("history", "history")
    history = _column(row, spec, "history", "history", required=False) or []
    if not isinstance(history, list):
        raise RowError("wrong_type", history_column,
                       f"'{history_column}' should be a list of [instruction, response] pairs")
    turns = []
    for i, pair in enumerate(history):
        where = f"{history_column}[{i}]"
        if not (isinstance(pair, (list, tuple)) and len(pair) == 2):
            raise RowError("wrong_type", history_column, f"'{where}' should be an [instruction, response] pair")
        turns += [make_message("user", text_field(pair[0], f"{where}[0]")),
                  make_message("assistant", text_field(pair[1], f"{where}[1]"))]
    if kind == "preference":
        chosen = _text_column(row, spec, "chosen", "chosen", required=True)
        rejected = _text_column(row, spec, "rejected", "rejected", required=True)
        return preference_record([*turns, make_message("user", user)], make_message("assistant", chosen),
                           make_message("assistant", rejected), prompt_column, system=system)
    response_column = spec.columns.get("response", "output")
    response = _text_column(row, spec, "response", "output", required=True)
    if not response.strip():
        raise RowError("empty_response", response_column, "empty response")
    tools = _tools_column(row, spec)
    return conversation_record([*turns, make_message("user", user), make_message("assistant", response)], prompt_column,
                         system=system, tools=tools)


def _sharegpt_message(msg: Any, field: str, tags: dict[str, str]) -> dict:
    if not isinstance(msg, dict):
        raise RowError("wrong_type", field, f"'{field}' should be an object, got {type(msg).__name__}")
    for tag in ("role_tag", "content_tag"):
        if tags[tag] not in msg:
            raise RowError("missing_column", tags[tag],
                           f"'{field}' has no '{tags[tag]}' (tags.{tag}); keys found: {', '.join(map(str, msg))}")
    role, content = msg[tags["role_tag"]], msg[tags["content_tag"]]
    if role == tags["function_tag"]:
        return make_message("assistant", "", parse_tool_calls(content, field))
    roles = {tags["user_tag"]: "user", tags["assistant_tag"]: "assistant", tags["observation_tag"]: "tool",
             tags["system_tag"]: "system"}
    if role not in roles:
        raise RowError("invalid_role_order", field,
                       f"'{field}': unknown role {role!r}; expected one of {', '.join(map(repr, roles))} "
                       f"or {tags['function_tag']!r} (see `tags`)")
    if roles[role] == "tool" and isinstance(content, (dict, list)):
        content = json.dumps(content, ensure_ascii=False)  # a structured tool result, kept as JSON text
    return make_message(roles[role], text_field(content, f"{field}.{tags['content_tag']}"))


def convert_sharegpt(row: dict, spec: DatasetSpec, kind: Kind) -> dict:
    """ShareGPT: a list of {from, value} messages; function_call -> tool_calls, observation -> tool.

    Keys and role values follow `tags` (LLaMA-Factory's defaults). When ranking, `chosen` and
    `rejected` hold one message each and the conversation is the prompt.

    >>> spec = DatasetSpec(name="d", file_name="d.json", formatting="sharegpt")
    >>> messages = convert_sharegpt({"conversations": [
    ...     {"from": "human", "value": "Look up E11.9"},
    ...     {"from": "function_call", "value": '{"name": "lookup_icd10", "arguments": {"code": "E11.9"}}'},
    ...     {"from": "observation", "value": "Type 2 diabetes mellitus without complications"},
    ...     {"from": "gpt", "value": "E11.9 is type 2 diabetes mellitus without complications."}]},
    ...     spec, "conversation")["messages"]
    >>> [m["role"] for m in messages]
    ['user', 'assistant', 'tool', 'assistant']
    >>> messages[1]["tool_calls"]
    [{'name': 'lookup_icd10', 'arguments': {'code': 'E11.9'}}]
    """
    tags = {**SHAREGPT_TAGS, **{k: v for k, v in spec.tags.items() if k in SHAREGPT_TAGS}}
    column = spec.columns.get("messages", "conversations")
    raw = _column(row, spec, "messages", "conversations", required=True)
    if not isinstance(raw, list):
        raise RowError("wrong_type", column, f"'{column}' should be a list of messages, got {type(raw).__name__}")
    messages = [_sharegpt_message(m, f"{column}[{i}]", tags) for i, m in enumerate(raw)]
    system = _text_column(row, spec, "system", "system", required=False)
    if kind == "preference":
        def parse(value: Any, field: str) -> dict:
            return _sharegpt_message(value, field, tags)

        chosen = _answer_column(row, spec, "chosen", parse)
        rejected = _answer_column(row, spec, "rejected", parse)
        return preference_record(messages, chosen, rejected, column, system=system)
    tools = _tools_column(row, spec)
    return conversation_record(messages, column, system=system, tools=tools)


def convert_openai(row: dict, spec: DatasetSpec, kind: Kind) -> dict:
    """OpenAI chat: {"messages": [{"role", "content", "tool_calls"?}]}, tool results as role "tool".

    Tool calls in OpenAI's shape ({"type": "function", "function": {"name", "arguments": "<json>"}})
    become {"name", "arguments": {...}}. When ranking, `chosen` and `rejected` hold one message each.

    >>> convert_openai({"messages": [{"role": "user", "content": "Code for asthma?"},
    ...                              {"role": "assistant", "content": "J45.909"}]},
    ...                DatasetSpec(name="d", file_name="d.jsonl", formatting="openai"), "conversation")
    {'messages': [{'role': 'user', 'content': 'Code for asthma?'}, {'role': 'assistant', 'content': 'J45.909'}]}
    """
    column = spec.columns.get("messages", "messages")
    messages = _openai_messages(_column(row, spec, "messages", "messages", required=True), column)
    system = _text_column(row, spec, "system", "system", required=False)
    if kind == "preference":
        chosen = _answer_column(row, spec, "chosen", _openai_message)
        rejected = _answer_column(row, spec, "rejected", _openai_message)
        return preference_record(messages, chosen, rejected, column, system=system)
    tools = _tools_column(row, spec)
    return conversation_record(messages, column, system=system, tools=tools)


def convert_text(row: dict, spec: DatasetSpec, kind: Kind) -> dict:
    """Plain text: a .txt file split by `sample_by` (line, paragraph, file), or a `text` column.

    >>> convert_text({"text": "E78.5 Hyperlipidemia, unspecified"},
    ...              DatasetSpec(name="d", file_name="d.txt", formatting="text"), "text")
    {'text': 'E78.5 Hyperlipidemia, unspecified'}
    """
    column = spec.columns.get("text", "text")
    text = _text_column(row, spec, "text", "text", required=True)
    if not text.strip():
        raise RowError("empty_text", column, "empty text")
    return {"text": text}


def convert_lmflow(row: dict, spec: DatasetSpec, kind: Kind) -> dict:
    """LMFlow: one JSON object {"type", "instances": [...]} per file; a row is {"type", "instance"}.

    text_only -> text; text2text ({"input", "output"}) and conversation ({"system"?, "tools"?,
    "messages"}, tools as JSON strings) -> conversation; paired_conversation ({"chosen", "rejected"},
    two conversations, or two message lists, that differ only in their last answer) -> preference.
    As LMFlow does, a conversation's trailing user turn (no answer) is trimmed and the row kept.

    >>> convert_lmflow({"type": "text2text", "instance": {"input": "Code for hypothyroidism?",
    ...                                                   "output": "E03.9"}},
    ...                DatasetSpec(name="d", file_name="d.json", formatting="lmflow"), "conversation")
    {'messages': [{'role': 'user', 'content': 'Code for hypothyroidism?'}, {'role': 'assistant', 'content': 'E03.9'}]}
    """
    file_type, inst = row.get("type"), row.get("instance")
    wanted = {"text_only": "text", "text2text": "conversation", "conversation": "conversation",
              "paired_conversation": "preference"}
    if file_type not in wanted:
        raise DataError(f"dataset '{spec.name}': unknown LMFlow type {file_type!r}; known: {', '.join(wanted)}")
    if wanted[file_type] != kind:
        raise DataError(f"dataset '{spec.name}': an LMFlow {file_type} file aligns to {wanted[file_type]} records, "
                        f"but its group needs {kind}")
    if not isinstance(inst, dict):
        raise RowError("wrong_type", "instances", f"an instance should be an object, got {type(inst).__name__}")
    if file_type == "text_only":
        return convert_text(inst, spec, kind)
    if file_type == "text2text":
        for key in ("input", "output"):
            if key not in inst:
                raise RowError("missing_column", key, f"a text2text instance has no '{key}'")
        return conversation_record([make_message("user", text_field(inst["input"], "input")),
                              make_message("assistant", text_field(inst["output"], "output"))], "instance")
    if file_type == "paired_conversation":
        return _lmflow_pair(inst)
    messages, system, tools = _lmflow_conversation(inst, "")
    trimmed = len(messages) > 1 and messages[-1]["role"] == "user"
    if trimmed:
        messages = messages[:-1]
    record = conversation_record(messages, "messages", system=system, tools=tools)
    if trimmed:
        note_adjustment(record, "trailing_user_turn_trimmed", "messages",
                        f"message {len(messages)} (user) has no answer: trimmed, as LMFlow does")
    return record


def _lmflow_conversation(inst: dict, prefix: str) -> tuple[list[dict], str, str | None]:
    """(messages, system, tools) of an LMFlow conversation; `prefix` is where it sits in the instance."""
    if "messages" not in inst:
        raise RowError("missing_column", f"{prefix}messages", f"a conversation instance has no '{prefix}messages'")
    messages = _openai_messages(inst["messages"], f"{prefix}messages")
    if not messages:
        raise RowError("empty_prompt", f"{prefix}messages", f"'{prefix}messages' has no messages")
    return messages, text_field(inst.get("system"), f"{prefix}system"), tool_schemas_json(inst.get("tools"), f"{prefix}tools")


def _lmflow_pair(inst: dict) -> dict:
    """A paired_conversation instance -> a preference record: the shared prompt and the two last answers.

    `chosen` and `rejected` are conversation objects, or plain message lists (the system prompt, if
    any, then in the instance's `system`). Preference records carry no tool schemas, so the pair's
    `tools` are not kept.
    """
    sides = {}
    for side in ("chosen", "rejected"):
        value = inst.get(side)
        if isinstance(value, list):  # the other form LMFlow writes: the conversation's messages alone
            messages = _openai_messages(value, side)
            if not messages:
                raise RowError("empty_prompt", side, f"'{side}' has no messages")
            sides[side] = messages, text_field(inst.get("system"), "system"), None
            continue
        if not isinstance(value, dict):
            reason = "missing_column" if side not in inst else "wrong_type"
            raise RowError(reason, side, f"a paired_conversation instance needs '{side}', a conversation object "
                                         "or a list of messages")
        sides[side] = _lmflow_conversation(value, f"{side}.")
    (chosen, system, _), (rejected, rejected_system, _) = sides["chosen"], sides["rejected"]
    if chosen[:-1] != rejected[:-1] or system != rejected_system:
        raise RowError("prompt_mismatch", "rejected",
                       "'chosen' and 'rejected' differ before their last message; a preference pair is two answers "
                       "to one prompt (the same system prompt and messages up to the answer)")
    return preference_record(chosen[:-1], chosen[-1], rejected[-1], "chosen.messages", system=system)


def convert_prompt_completion(row: dict, spec: DatasetSpec, kind: Kind) -> dict:
    """TRL prompt/completion, standard (strings) or conversational (message lists).

    When ranking, TRL's preference type: prompt + chosen + rejected.

    >>> spec = DatasetSpec(name="d", file_name="d.jsonl", formatting="prompt_completion")
    >>> convert_prompt_completion({"prompt": "Code for GERD?", "completion": "K21.9"},
    ...                           spec, "conversation")
    {'messages': [{'role': 'user', 'content': 'Code for GERD?'}, {'role': 'assistant', 'content': 'K21.9'}]}
    """
    column = spec.columns.get("prompt", "prompt")
    raw_prompt = _column(row, spec, "prompt", "prompt", required=True)
    if isinstance(raw_prompt, list):
        prompt = _openai_messages(raw_prompt, column)
    else:
        prompt = [make_message("user", text_field(raw_prompt, column))]
    if kind == "preference":
        chosen = _answer_column(row, spec, "chosen", _openai_message)
        rejected = _answer_column(row, spec, "rejected", _openai_message)
        return preference_record(prompt, chosen, rejected, column)
    completion_column = spec.columns.get("completion", "completion")
    raw_completion = _column(row, spec, "completion", "completion", required=True)
    if isinstance(raw_completion, list):
        completion = _openai_messages(raw_completion, completion_column)
    else:
        completion = [make_message("assistant", text_field(raw_completion, completion_column))]
    tools = _tools_column(row, spec)
    return conversation_record([*prompt, *completion], column, tools=tools)


CONVERTERS: dict[str, Converter] = {
    "alpaca": convert_alpaca,
    "sharegpt": convert_sharegpt,
    "openai": convert_openai,
    "text": convert_text,
    "lmflow": convert_lmflow,
    "prompt_completion": convert_prompt_completion,
}


def _kto_label(value: Any, field: str) -> bool:
    """LLaMA-Factory's kto_tag: true when the answer is desirable; also "true"/"false" and 1/0 (CSV files)."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in ("true", "false", "1", "0"):
        return value.strip().lower() in ("true", "1")
    raise RowError("wrong_type", field, f"'{field}' should be true or false (is the answer desirable), got {value!r}")


def _metadata(row: dict, spec: DatasetSpec) -> dict[str, str]:
    """The row's metadata columns (`task`) that `spec.columns` maps, by their record key."""
    if spec.formatting == "lmflow" and isinstance(row.get("instance"), dict):
        row = row["instance"]  # an LMFlow row's own fields live in its instance
    out = {}
    for key in METADATA_COLUMNS:
        if key not in spec.columns:
            continue
        field = spec.columns[key]
        value = row.get(field)
        if value is None or value == "":
            raise RowError("missing_column", field, f"no value in column '{field}' (columns.{key})")
        if not isinstance(value, str):
            raise RowError("wrong_type", field, f"'{field}' (columns.{key}) should be a string, got {type(value).__name__}")
        out[key] = value
    return out


def convert_row(convert: Converter, row: dict, spec: DatasetSpec, kind: Kind) -> dict:
    """One row through its format's converter, plus what every format shares.

    For `unpaired_preference` the row is converted as a conversation whose last (assistant) message
    becomes the completion, labeled by the `kto_tag` column. Metadata columns (`task`) are added to
    the record under their key.

    >>> spec = DatasetSpec(name="d", file_name="d.json", columns={"prompt": "q", "response": "a",
    ...                    "kto_tag": "good", "task": "type"})
    >>> convert_row(convert_alpaca, {"q": "Code for GERD?", "a": "K21.9", "good": True, "type": "code"},
    ...             spec, "unpaired_preference")
    {'prompt': [{'role': 'user', 'content': 'Code for GERD?'}], 'completion': [{'role': 'assistant', 'content': 'K21.9'}], 'label': True, 'task': 'code'}
    """
    if kind == "unpaired_preference":
        field = spec.columns["kto_tag"]
        if field not in row:
            raise RowError("missing_column", field, f"no column '{field}' (columns.kto_tag)")
        label = _kto_label(row[field], field)
        record = unpaired_preference_record(convert(row, spec, "conversation"), label)
    else:
        record = convert(row, spec, kind)
    record.update(_metadata(row, spec))
    return record


def get_converter(formatting: str) -> Converter:
    """The converter for a `formatting` name, wrapped by `convert_row`; a DataError listing the known ones otherwise."""
    try:
        return functools.partial(convert_row, CONVERTERS[formatting])
    except KeyError:
        raise DataError(f"unknown format {formatting!r}; known: {', '.join(CONVERTERS)}") from None
