"""Conversations rendered with a chat template: prompts for generation, and token ids with exact loss masks.

One normalisation (`normalize_messages`: roles checked, None values dropped, tool calls in the
template's form, the configured system prompt inserted when the conversation has none) feeds
training, evaluation and chat alike, so a prompt is rendered the same way wherever it is used.

Prompt masks come from prefix rendering: for each assistant turn i, the conversation up to i
rendered with the generation prompt is a prefix of the whole rendering, and the tokens after it
up to the end of turn i are that turn's completion. This works with any chat template (the
tokenizer's own or one from `templates.py`) and is checked on the token ids, so a template or a
tokenizer that would make training text differ from inference text fails loudly instead.

`encode_conversations` is the exact reference; `conversation_encoder.ConversationEncoder` computes
the same ids and labels several times faster and is tested against it.
"""

from __future__ import annotations

import json
from collections.abc import Collection, Sequence
from dataclasses import dataclass

from transformers.utils.chat_template_utils import render_jinja_template

from components.data.encoding import encode_texts
from components.data.messages import TRAIN
from components.data.records import IGNORE, ROLES
from components.data.templates import chat_format, known_templates, resolve_template, stop_string

Conversation = tuple[list[dict], str | list | None]  # (messages, tools)


@dataclass(frozen=True)
class ChatTemplate:
    """A chat template ready for rendering: its name (for errors), Jinja source and end-of-turn token."""

    name: str
    source: str
    stop_id: int | None  # labels after the last end-of-turn token of a turn (e.g. ChatML's "\n") stay masked
    special_tokens: dict


def _resolve(tokenizer, template: str) -> tuple[str, str]:
    """(name, Jinja source) of 'auto', a name from the table, or Jinja source itself ('custom')."""
    if "{%" in template or "{{" in template:
        return "custom", template
    return template, resolve_template(tokenizer, template)


def prepare_template(tokenizer, template: str) -> ChatTemplate:
    """Resolve `template` ('auto', a name from the table, or Jinja source) against a tokenizer."""
    name, source = _resolve(tokenizer, template)
    stop = stop_string(tokenizer, "auto" if name == "custom" else name)
    stop_id = None
    if stop is not None:
        ids = encode_texts(tokenizer, [stop])[0]
        if len(ids) == 1:
            stop_id = ids[0]
        elif name not in ("auto", "custom"):
            raise ValueError(
                f"chat template {name!r} ends assistant turns with {stop!r}, which this tokenizer splits into "
                f"{len(ids)} tokens, so the model could not learn to stop on it. Use tokenize.template: auto if the "
                f"tokenizer has its own template, else one whose stop token the tokenizer has "
                f"(the formats ending with the tokenizer's eos: "
                f"{', '.join(n for n in known_templates() if chat_format(n).stop is None)})."
            )
    return ChatTemplate(name=name, source=source, stop_id=stop_id, special_tokens=dict(tokenizer.special_tokens_map))


def with_system_prompt(messages: list, system_prompt: str | None) -> list:
    """`messages` with the configured system prompt first, unless they start with their own.

    The one place the system prompt is inserted; None keeps the template's own behaviour (some
    templates add a default system prompt).
    """
    first = messages[0] if messages else None
    if system_prompt is None or (isinstance(first, dict) and first.get("role") == "system"):
        return messages
    return [{"role": "system", "content": system_prompt}, *messages]


def normalize_messages(messages, system_prompt: str | None) -> list[dict]:
    """Messages as every chat template takes them: roles checked, None values dropped, tool calls in
    the OpenAI/HF function form, the system prompt inserted (`with_system_prompt`), and our
    per-turn `train` flag taken out (see `untrained_turns`)."""
    if not isinstance(messages, list) or not messages:
        raise ValueError(f"'messages' must be a non-empty list of messages (got {type(messages).__name__})")
    out = []
    for j, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in ROLES:
            got = message.get("role") if isinstance(message, dict) else type(message).__name__
            raise ValueError(f"message {j}: role must be one of {', '.join(ROLES)} (got {got!r})")
        # Like apply_chat_template: a None value (e.g. content=None next to tool_calls) is a missing key.
        message = {key: value for key, value in message.items() if value is not None and key != TRAIN}
        if "tool_calls" in message:
            # Our records hold {"name", "arguments", "id"?}; chat templates expect the OpenAI/HF function form.
            message["tool_calls"] = [_function_form(c) for c in message["tool_calls"]]
        out.append(message)
    return with_system_prompt(out, system_prompt)


def _function_form(call: dict) -> dict:
    if "function" in call:
        return call
    out: dict = {"type": "function", "function": {k: v for k, v in call.items() if k != "id"}}
    if "id" in call:
        out["id"] = call["id"]
    return out


def untrained_turns(messages, system_prompt: str | None) -> set[int]:
    """Indices, in `normalize_messages(messages, system_prompt)`, of the assistant turns a record marks
    `"train": false` (LMFlow's `"loss": false`, OpenAI's `"weight": 0`): no loss on them."""
    shift = len(with_system_prompt(messages, system_prompt)) - len(messages)  # an inserted system prompt
    return {i + shift for i, m in enumerate(messages) if isinstance(m, dict) and m.get(TRAIN) is False}


def parse_tools(tools) -> list | None:
    """A record's `tools` (JSON text of a list of schemas, or the list itself) as a list."""
    if tools is None or isinstance(tools, list):
        return tools
    try:
        parsed = json.loads(tools)
    except json.JSONDecodeError as exc:
        raise ValueError(f"'tools' is not valid JSON ({exc})") from None
    if not isinstance(parsed, list):
        raise ValueError(f"'tools' must be a JSON list of tool schemas (got {type(parsed).__name__})")
    return parsed


def render_template(tmpl: ChatTemplate, messages: list[dict], tools: list | None, *, add_generation_prompt: bool) -> str:
    """The template's text for normalised messages."""
    # The same renderer (and Jinja sandbox) as tokenizer.apply_chat_template, minus its tokenizer round trip.
    rendered, _ = render_jinja_template(
        conversations=[messages],
        tools=tools,
        chat_template=tmpl.source,
        add_generation_prompt=add_generation_prompt,
        **tmpl.special_tokens,
    )
    return rendered[0]


def render_prompt(
    tokenizer, template: str, messages: list[dict], system_prompt: str | None, *, tools: str | list | None = None
) -> str:
    """The generation prompt for `messages`: exactly the text training puts before the answer.

    `template` is 'auto' (the tokenizer's own), a name from the template table, or Jinja source.
    Encode the result without special tokens (the template writes them).
    """
    name, source = _resolve(tokenizer, template)
    tmpl = ChatTemplate(name, source, None, dict(tokenizer.special_tokens_map))
    return render_template(tmpl, normalize_messages(messages, system_prompt), parse_tools(tools),
                           add_generation_prompt=True)


def render_conversation(
    tokenizer,
    template: str,
    messages: list[dict],
    *,
    system_prompt: str | None,
    train_on_prompt: bool,
    mask_history: bool,
    tools: str | None = None,
) -> tuple[list[int], list[int]]:
    """Token ids of a conversation and its labels (-100 where no loss is computed).

    `template` is 'auto' (the tokenizer's own), a name from the template table, or Jinja source.
    Trained tokens are each assistant turn's completion up to and including its end-of-turn
    token (only the last turn with `mask_history`; every token with `train_on_prompt`).
    `system_prompt` is inserted as a system message when the conversation has none; None keeps
    the template's own behaviour (some templates add a default system prompt).
    """
    tmpl = prepare_template(tokenizer, template)
    return encode_conversations(tokenizer, tmpl, [(messages, tools)], system_prompt=system_prompt,
                                train_on_prompt=train_on_prompt, mask_history=mask_history)[0]


def trained_turns(roles: Sequence[str], train_on_prompt: bool, mask_history: bool,
                  untrained: Collection[int] = ()) -> list[int]:
    """Indices of the assistant turns whose completions are trained (none with train_on_prompt: all is):
    every one not in `untrained`, or the last of those with `mask_history`."""
    turns = [] if train_on_prompt else [i for i, role in enumerate(roles) if role == "assistant" and i not in untrained]
    return turns[-1:] if mask_history else turns


def row_name(where: Sequence[str] | None, k: int) -> str:
    """How errors name conversation `k` of a batch: its `file:line` when known."""
    return where[k] if where else f"conversation {k}"


def encode_conversations(
    tokenizer,
    tmpl: ChatTemplate,
    conversations: list[Conversation],
    *,
    system_prompt: str | None,
    train_on_prompt: bool,
    mask_history: bool,
    where: Sequence[str] | None = None,
) -> list[tuple[list[int], list[int]]]:
    """(input_ids, labels) per (messages, tools) pair, the exact way; `where` names each one in errors.

    Every needed prefix is rendered as a string with Jinja, then all are encoded at once.
    """
    strings: list[str] = []
    plans = []  # per conversation: (index of the full rendering, [(prompt index, end index, turn), ...])
    for k, (messages, tools) in enumerate(conversations):
        try:
            msgs = normalize_messages(messages, system_prompt)
            untrained = untrained_turns(messages, system_prompt)
            tool_list = parse_tools(tools)
            full = render_template(tmpl, msgs, tool_list, add_generation_prompt=False)
            spans = []
            full_index = len(strings)
            strings.append(full)
            for i in trained_turns([m["role"] for m in msgs], train_on_prompt, mask_history, untrained):
                prompt = render_template(tmpl, msgs[:i], tool_list, add_generation_prompt=True)
                if not full.startswith(prompt):
                    raise ValueError(_prefix_error(tmpl, f"the first {i} messages plus the generation prompt", "text"))
                prompt_index = len(strings)
                strings.append(prompt)
                end_index = full_index
                if i < len(msgs) - 1:  # the turn ends where the rendering of messages 0..i ends
                    end = render_template(tmpl, msgs[: i + 1], tool_list, add_generation_prompt=False)
                    if not full.startswith(end):
                        raise ValueError(_prefix_error(tmpl, f"the first {i + 1} messages", "text"))
                    end_index = len(strings)
                    strings.append(end)
                spans.append((prompt_index, end_index, i))
        except ValueError as exc:
            raise ValueError(f"{row_name(where, k)}: {exc}") from None
        except Exception as exc:  # template errors (raise_exception), malformed messages
            raise ValueError(f"{row_name(where, k)}: cannot render with chat template {tmpl.name!r}: {exc}") from exc
        plans.append((full_index, spans))

    encoded = encode_texts(tokenizer, strings)
    out = []
    for k, (full_index, spans) in enumerate(plans):
        ids = encoded[full_index]
        if train_on_prompt:
            out.append((ids, list(ids)))
            continue
        labels = [IGNORE] * len(ids)
        for prompt_index, end_index, turn in spans:
            start, end = len(encoded[prompt_index]), len(encoded[end_index])
            if ids[:start] != encoded[prompt_index] or ids[:end] != encoded[end_index]:
                boundary = strings[full_index][max(0, len(strings[prompt_index]) - 12) : len(strings[prompt_index]) + 12]
                what = f"the first {turn} messages plus the generation prompt, or through message {turn},"
                raise ValueError(f"{row_name(where, k)}: {_prefix_error(tmpl, what, 'token')} "
                                 f"(text around the boundary: {boundary!r})")
            end = end_of_turn(ids, start, end, tmpl.stop_id)
            labels[start:end] = ids[start:end]
        out.append((ids, labels))
    return out


def _prefix_error(tmpl: ChatTemplate, what: str, level: str) -> str:
    return (
        f"chat template {tmpl.name!r}: the rendering of {what} is not a {level} prefix of the whole "
        f"conversation's, so the prompt cannot be masked by prefix rendering"
        + (" (the tokenizer merges tokens across the prompt/answer boundary)" if level == "token" else "")
        + f". Choose another tokenize.template (one of: auto, {', '.join(known_templates())}) "
        "or set tokenize.train_on_prompt: true."
    )


def end_of_turn(ids: list[int], start: int, end: int, stop_id: int | None) -> int:
    """End of the trained span: just after the turn's last end-of-turn token (what follows it is layout)."""
    if stop_id is not None:
        for j in range(end - 1, start - 1, -1):
            if ids[j] == stop_id:
                return j + 1
    return end
