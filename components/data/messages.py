"""The rules every converter's records obey: value checks, tool calls, message building, role order.

Converters (components/data/formats.py) read their format's fields and call these, so alpaca,
sharegpt, OpenAI, LMFlow and prompt/completion rows are held to the same rules:

- roles alternate user/assistant after an optional leading system message;
- tool messages follow an assistant message that made tool calls;
- a conversation ends with an assistant message, a preference prompt with a user or tool message.

A row that breaks one raises `RowError` with its drop reason and the field at fault. A converter that
mends a row instead of dropping it (LMFlow's trailing user turn) notes why with `note_adjustment`;
the align stage counts those notes in its report and keeps the row.
"""

from __future__ import annotations

import json
from typing import Any


class RowError(Exception):
    """A row that cannot be aligned: `reason` is the drop reason, `field` the column or key at fault."""

    def __init__(self, reason: str, field: str | None, message: str):
        super().__init__(message)
        self.reason = reason
        self.field = field
        self.message = message


def text_field(value: Any, field: str) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise RowError("wrong_type", field, f"'{field}' should be a string, got {type(value).__name__}")
    return value


def json_field(value: Any, field: str) -> Any:
    if isinstance(value, str):
        try:
            return json.loads(value)
        except json.JSONDecodeError as e:
            raise RowError("wrong_type", field, f"'{field}' is not valid JSON ({e.msg})") from None
    return value


def parse_tool_call(obj: Any, field: str) -> dict:
    """{"name", "arguments"} or OpenAI's {"id"?, "type": "function", "function": {"name", "arguments"}} -> ours,
    {"name", "arguments", "id"?}."""
    obj = json_field(obj, field)
    call_id = obj.get("id") if isinstance(obj, dict) else None  # OpenAI's id sits beside "function"
    if isinstance(obj, dict) and isinstance(obj.get("function"), dict):
        obj = obj["function"]
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str) or not obj["name"]:
        raise RowError("wrong_type", field, f"'{field}' should be a tool call {{name, arguments}}")
    args = json_field(obj.get("arguments") or {}, f"{field}.arguments")
    if not isinstance(args, dict):
        raise RowError("wrong_type", field, f"'{field}.arguments' should be an object, got {type(args).__name__}")
    call = {"name": obj["name"], "arguments": args}
    if call_id is not None:  # the tool message answering it names it (tool_call_id); some templates render it
        call["id"] = text_field(call_id, f"{field}.id")
    return call


def parse_tool_calls(value: Any, field: str) -> list[dict]:
    value = json_field(value, field)
    calls = value if isinstance(value, list) else [value]
    return [parse_tool_call(c, f"{field}[{i}]") for i, c in enumerate(calls)]


def tool_schemas_json(value: Any, field: str) -> str | None:
    """Tool schemas as the JSON string the records carry; None when there are none.

    A list may hold each schema as a JSON string (LMFlow's `tools`), parsed here so that chat
    templates get objects; empty strings (LMFlow's `[""]` for none) are skipped.
    """
    if value is None or value == "" or value == []:
        return None
    if isinstance(value, str):
        parsed = json_field(value, field)
        if not (isinstance(parsed, list) and any(isinstance(tool, str) for tool in parsed)):
            return value
        value = parsed
    if isinstance(value, dict):
        return json.dumps(value, ensure_ascii=False)
    if not isinstance(value, list):
        raise RowError("wrong_type", field, f"'{field}' should be a JSON string or list of tool schemas")
    schemas = []
    for i, tool in enumerate(value):
        if isinstance(tool, str):
            if not tool.strip():
                continue
            tool = json_field(tool, f"{field}[{i}]")
        if not isinstance(tool, dict):
            raise RowError("wrong_type", field, f"'{field}[{i}]' should be a tool schema (a JSON object), "
                                                f"got {type(tool).__name__}")
        schemas.append(tool)
    return json.dumps(schemas, ensure_ascii=False) if schemas else None


# Keys a record's message may carry beyond role and content (components/data/records.py).
TOOL_RESULT_KEYS = ("tool_call_id", "name")  # a tool message: the call it answers, the tool's name
TRAIN = "train"  # false on an assistant message: no loss on that turn (absent: trained)


def make_message(role: str, content: str, tool_calls: list[dict] | None = None, *, train: bool = True,
                 **tool_result: str | None) -> dict:
    """A record's message; `train=False` marks an assistant turn untrained, `tool_result` holds a tool
    message's tool_call_id and name (None values are left out)."""
    msg = {"role": role, "content": content}
    if tool_calls:
        msg["tool_calls"] = tool_calls
    msg.update((k, v) for k, v in tool_result.items() if v is not None)
    if not train:
        msg[TRAIN] = False
    return msg


def without_train_flag(msg: dict) -> dict:
    """A message of a preference record: which turns train is the preference method's business."""
    return {k: v for k, v in msg.items() if k != TRAIN}


ADJUSTED = "_adjusted"  # a record key the align stage pops: why the row was mended rather than dropped


def note_adjustment(record: dict, reason: str, field: str | None, message: str) -> dict:
    """Note on `record` that its row was changed to be kept (`reason` counts in the alignment report)."""
    record.setdefault(ADJUSTED, []).append((reason, field, message))
    return record


def check_roles(messages: list[dict], field: str, *, complete: bool) -> None:
    """Role order and non-empty turns. complete=True: ends with the assistant; False: a prompt."""
    if not messages:
        raise RowError("empty_prompt", field, f"'{field}' has no messages")
    prev: dict | None = None
    for i, msg in enumerate(messages):
        role = msg["role"]
        if role == "system":
            ok = i == 0
        elif prev is None or prev["role"] == "system":
            ok = role == "user"
        elif prev["role"] == "user":
            ok = role == "assistant"
        elif prev["role"] == "assistant":
            ok = role == ("tool" if prev.get("tool_calls") else "user")
        else:  # after a tool result: another result, or the assistant
            ok = role in ("tool", "assistant")
        if not ok:
            after = f"after {prev['role']}" if prev else "first"
            raise RowError("invalid_role_order", field, f"'{field}' message {i} is {role} {after}")
        prev = msg
    last = messages[-1]["role"]
    wanted = ("assistant",) if complete else ("user", "tool")
    if last not in wanted:
        what = "a conversation" if complete else "a prompt"
        raise RowError("invalid_role_order", field, f"{what} must end with {' or '.join(wanted)}, not {last}")
    for i, msg in enumerate(messages):
        empty = not msg["content"].strip()
        if msg["role"] == "user" and empty:
            raise RowError("empty_prompt", field, f"'{field}' message {i} (user) is empty")
        if msg["role"] == "assistant" and empty and not msg.get("tool_calls"):
            raise RowError("empty_response", field, f"'{field}' message {i} (assistant) is empty")


def with_system(messages: list[dict], system: str) -> list[dict]:
    if system.strip() and not (messages and messages[0]["role"] == "system"):
        return [make_message("system", system), *messages]
    return messages


def conversation_record(messages: list[dict], field: str, *, system: str = "", tools: str | None = None) -> dict:
    check_roles(messages, field, complete=True)  # before adding the system turn: indices match the file
    record: dict = {"messages": with_system(messages, system)}
    if tools:
        record["tools"] = tools
    return record


def unpaired_preference_record(conversation: dict, label: bool) -> dict:
    """A checked conversation record -> TRL's unpaired preference type: its last (assistant) message is the
    completion, the messages before it the prompt. Tool schemas are not kept (as in preference records)."""
    messages = [without_train_flag(m) for m in conversation["messages"]]
    return {"prompt": messages[:-1], "completion": [messages[-1]], "label": label}


def preference_record(prompt: list[dict], chosen: dict, rejected: dict, field: str, *, system: str = "") -> dict:
    check_roles(prompt, field, complete=False)
    prompt = with_system([without_train_flag(m) for m in prompt], system)
    chosen, rejected = without_train_flag(chosen), without_train_flag(rejected)
    for name, msg in (("chosen", chosen), ("rejected", rejected)):
        if msg["role"] != "assistant":
            raise RowError("invalid_role_order", name, f"'{name}' should be an assistant message, not {msg['role']}")
        if not msg["content"].strip() and not msg.get("tool_calls"):
            raise RowError("empty_response", name, f"'{name}' is empty")
    if chosen == rejected:
        raise RowError("chosen_equals_rejected", "chosen", "chosen and rejected answers are identical")
    return {"prompt": prompt, "chosen": [chosen], "rejected": [rejected]}
