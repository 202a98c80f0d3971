"""Tokenize aligned records: conversations to (input_ids, labels), plain text to packed blocks.

Prompt masks come from prefix rendering: for each assistant turn i, the conversation up to i
rendered with the generation prompt is a prefix of the whole rendering, and the tokens after it
up to the end of turn i are that turn's completion. This works with any chat template (the
tokenizer's own or one from `templates.py`) and is checked on the token ids, so a template or a
tokenizer that would make training text differ from inference text fails loudly instead.

`ConversationEncoder` computes the same ids and labels several times faster (see its docstring);
`encode_conversations(..., fast=False)` is the exact reference it is tested against.

Output of `run_tokenize` (one parquet per group, list<int32> columns):
- text groups:         input_ids, labels, position_ids (packed blocks, positions restart per document)
- conversation groups: input_ids, labels (one row per example; the trainer packs per batch)
- preference groups:   copied as JSONL; later stages tokenize the pairs
plus stats.json and samples.txt (decoded examples with trained tokens marked ⟦like this⟧).
"""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import os
import re
import shutil
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from bisect import bisect_right
from itertools import accumulate, chain, islice
from pathlib import Path
from typing import TYPE_CHECKING

import orjson
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm.auto import tqdm
from transformers.utils.chat_template_utils import render_jinja_template

from components.artifacts import StageResult, atomic_write_json, atomic_write_text
from components.config import TokenizeConfig
from components.data.records import ROLES
from components.data.templates import chat_format, known_templates, resolve_template, stop_string
from components.data.workers import line_chunks, ordered_map, resolve_num_proc, spawn_pool

if TYPE_CHECKING:
    import datasets

log = logging.getLogger(__name__)

IGNORE = -100
MARK_OPEN, MARK_CLOSE = "⟦", "⟧"
ROWS_PER_BATCH = 2048  # rows rendered, encoded and written to parquet at a time (bounds memory)
SAMPLES_PER_GROUP = 3
PAD_WASTE_BATCH = 8  # batch size assumed by stats' padding_waste_if_padded

_INT_LIST = pa.list_(pa.int32())
TEXT_SCHEMA = pa.schema([("input_ids", _INT_LIST), ("labels", _INT_LIST), ("position_ids", _INT_LIST)])
CONVERSATION_SCHEMA = pa.schema([("input_ids", _INT_LIST), ("labels", _INT_LIST)])


# --- conversations -------------------------------------------------------------------------


@dataclass(frozen=True)
class ChatTemplate:
    """A chat template ready for rendering: its name (for errors), Jinja source and end-of-turn token."""

    name: str
    source: str
    stop_id: int | None  # labels after the last end-of-turn token of a turn (e.g. ChatML's "\n") stay masked
    special_tokens: dict


def prepare_template(tokenizer, template: str) -> ChatTemplate:
    """Resolve `template` ('auto', a name from the table, or Jinja source) against a tokenizer."""
    if "{%" in template or "{{" in template:
        name, source = "custom", template
    else:
        name, source = template, resolve_template(tokenizer, template)
    stop = stop_string(tokenizer, "auto" if name == "custom" else name)
    stop_id = None
    if stop is not None:
        ids = _encode(tokenizer, [stop])[0]
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
    return encode_conversations(
        tokenizer,
        tmpl,
        [(messages, tools)],
        system_prompt=system_prompt,
        train_on_prompt=train_on_prompt,
        mask_history=mask_history,
    )[0]


def _trained_turns(roles: list[str] | tuple[str, ...], train_on_prompt: bool, mask_history: bool) -> list[int]:
    turns = [] if train_on_prompt else [i for i, role in enumerate(roles) if role == "assistant"]
    return turns[-1:] if mask_history else turns


def encode_conversations(
    tokenizer,
    tmpl: ChatTemplate,
    conversations: list[tuple[list[dict], str | list | None]],
    *,
    system_prompt: str | None,
    train_on_prompt: bool,
    mask_history: bool,
    where: list[str] | None = None,
    fast: bool = True,
) -> list[tuple[list[int], list[int]]]:
    """Batched `render_conversation`: (input_ids, labels) per conversation.

    `conversations` holds (messages, tools) pairs; `where` names each one in error messages.
    `fast=False` takes the exact path (every prefix rendered with Jinja and encoded) for every row;
    the fast path (`ConversationEncoder`) gives the same result. To encode many batches, make one
    `ConversationEncoder` and reuse it: its caches then carry over.
    """
    if fast:
        encoder = ConversationEncoder(tokenizer, tmpl, system_prompt=system_prompt, train_on_prompt=train_on_prompt,
                                      mask_history=mask_history)
        return encoder.encode(conversations, where)
    # The reference path: renders every needed prefix as a string, then encodes them all at once.
    strings: list[str] = []
    plans = []  # per conversation: (index of the full rendering, [(prompt index, end index, turn), ...])
    for k, (messages, tools) in enumerate(conversations):
        place = _place(where, k)
        try:
            msgs = _normalize_messages(messages, system_prompt)
            tool_list = _parse_tools(tools)
            full = _render(tmpl, msgs, tool_list, add_generation_prompt=False)
            turns = _trained_turns([m["role"] for m in msgs], train_on_prompt, mask_history)
            spans = []
            full_index = len(strings)
            strings.append(full)
            for i in turns:
                prompt = _render(tmpl, msgs[:i], tool_list, add_generation_prompt=True)
                if not full.startswith(prompt):
                    raise ValueError(_prefix_error(tmpl, f"the first {i} messages plus the generation prompt", "text"))
                prompt_index = len(strings)
                strings.append(prompt)
                end_index = full_index
                if i < len(msgs) - 1:  # the turn ends where the rendering of messages 0..i ends
                    end = _render(tmpl, msgs[: i + 1], tool_list, add_generation_prompt=False)
                    if not full.startswith(end):
                        raise ValueError(_prefix_error(tmpl, f"the first {i + 1} messages", "text"))
                    end_index = len(strings)
                    strings.append(end)
                spans.append((prompt_index, end_index, i))
        except ValueError as exc:
            raise ValueError(f"{place}: {exc}") from None
        except Exception as exc:  # template errors (raise_exception), malformed messages
            raise ValueError(f"{place}: cannot render with chat template {tmpl.name!r}: {exc}") from exc
        plans.append((full_index, spans))

    encoded = _encode(tokenizer, strings)
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
                place = _place(where, k)
                boundary = strings[full_index][max(0, len(strings[prompt_index]) - 12) : len(strings[prompt_index]) + 12]
                what = f"the first {turn} messages plus the generation prompt, or through message {turn},"
                raise ValueError(f"{place}: {_prefix_error(tmpl, what, 'token')} (text around the boundary: {boundary!r})")
            end = _end_of_turn(ids, start, end, tmpl.stop_id)
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


def _end_of_turn(ids: list[int], start: int, end: int, stop_id: int | None) -> int:
    """End of the trained span: just after the turn's last end-of-turn token (what follows it is layout)."""
    if stop_id is not None:
        for j in range(end - 1, start - 1, -1):
            if ids[j] == stop_id:
                return j + 1
    return end


def _render(tmpl: ChatTemplate, messages: list[dict], tools: list | None, *, add_generation_prompt: bool) -> str:
    # The same renderer (and Jinja sandbox) as tokenizer.apply_chat_template, minus its tokenizer round trip.
    rendered, _ = render_jinja_template(
        conversations=[messages],
        tools=tools,
        chat_template=tmpl.source,
        add_generation_prompt=add_generation_prompt,
        **tmpl.special_tokens,
    )
    return rendered[0]


def _normalize_messages(messages, system_prompt: str | None) -> list[dict]:
    if not isinstance(messages, list) or not messages:
        raise ValueError(f"'messages' must be a non-empty list of messages (got {type(messages).__name__})")
    out = []
    for j, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in ROLES:
            got = message.get("role") if isinstance(message, dict) else type(message).__name__
            raise ValueError(f"message {j}: role must be one of {', '.join(ROLES)} (got {got!r})")
        # Like apply_chat_template: a None value (e.g. content=None next to tool_calls) is a missing key.
        message = {key: value for key, value in message.items() if value is not None}
        if "tool_calls" in message:
            # Our records hold {"name", "arguments"}; chat templates expect the OpenAI/HF function form.
            calls = message["tool_calls"]
            message["tool_calls"] = [c if "function" in c else {"type": "function", "function": c} for c in calls]
        out.append(message)
    if system_prompt is not None and out[0]["role"] != "system":
        out.insert(0, {"role": "system", "content": system_prompt})
    return out


def _parse_tools(tools) -> list | None:
    if tools is None or isinstance(tools, list):
        return tools
    try:
        parsed = json.loads(tools)
    except json.JSONDecodeError as exc:
        raise ValueError(f"'tools' is not valid JSON ({exc})") from None
    if not isinstance(parsed, list):
        raise ValueError(f"'tools' must be a JSON list of tool schemas (got {type(parsed).__name__})")
    return parsed


def _encode(tokenizer, texts: list[str]) -> list[list[int]]:
    """Encode without adding special tokens (the template writes them), in one parallel batch."""
    if not texts:
        return []
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:  # the Rust tokenizer directly: about twice as fast as tokenizer(...)
        # encode_batch_fast (tokenizers >= 0.20) skips the character offsets: a third less time.
        encode_batch = getattr(backend, "encode_batch_fast", backend.encode_batch)
        return [e.ids for e in encode_batch(texts, add_special_tokens=False)]
    return tokenizer(texts, add_special_tokens=False)["input_ids"]


# --- conversations: the fast path ---------------------------------------------------------

_SENTINEL = "\ue000{}\ue001"  # private-use characters: no template or data writes them
_SENTINEL_RE = re.compile("\ue000(\\d+)\ue001")
# Probe contents. A template that strips, escapes or looks inside message contents (trim, tojson,
# splitting off reasoning, spotting tool responses) renders these differently from a plain
# substitution, and such a conversation shape takes the exact path.
_PROBES = (
    " \n\t{i} \"double\" 'single' \\\\ & <b> é 中 {{ x }} {% y %}\n ",
    "<tool_response>{i}</tool_call>\n<tool_call></tool_response>",
    "<think>\n{i}\n</think>\n\n",
)
CACHE_ENTRIES = 1 << 16  # encoded text pieces kept between batches (memory stays flat in the rows)
VERIFY_ROWS = 16  # rows of each conversation shape also encoded the exact way and compared
JOIN_TEXTS = 16  # new texts encoded per tokenizer input (see ConversationEncoder._encode_texts)


def _escape_braces(text: str) -> str:
    return text.replace("{", "{{").replace("}", "}}")


@dataclass
class _Group:
    """A run of a compiled rendering: constant token ids, or a text with message contents to fill in."""

    ids: list[int] | None  # constant: its tokens; None: variable
    text: str = ""  # variable: a str.format string, {} where the contents go
    refs: tuple[int, ...] = ()  # variable: the messages whose contents fill the {}


@dataclass
class _Cut:
    """A completion boundary in group `group`: after `tokens` tokens when known at compile time, else
    after `chars` characters plus the lengths of the contents `refs` (checked on token ids per row)."""

    group: int
    tokens: int | None
    chars: int = 0
    refs: tuple[int, ...] = ()


@dataclass
class _Shape:
    """A conversation shape (its roles) compiled: its rendering as groups, and the start and end of
    every trained completion as cuts (start, end, start, end, ...)."""

    groups: list[_Group]
    cuts: list[_Cut]
    verified: int = 0


@dataclass
class ConversationEncoder:
    """(input_ids, labels) for batches of conversations: the exact path's result, several times faster.

    On short rows the time goes into Jinja (three renderings per one-turn row) and into encoding
    the same template text (system prompt, role headers) again and again. Instead:

    1. Each conversation shape (its sequence of roles) is rendered once, with placeholders for the
       contents, and split at the tokenizer's added tokens, which tokenizers never merge with the
       text around them. Runs without contents (role headers, end-of-turn tokens) are encoded
       then; a row only fills its contents into the other runs, and encodes the runs not seen
       before, in one batch per call (a bounded cache holds the ones seen).
    2. The completion boundaries are known from the placeholder rendering; one that falls inside
       a run with contents is checked on token ids per row: the run's text before the boundary
       must encode to a prefix of the run's tokens (the exact path's check, run by run).

    What it cannot do exactly goes through the exact path: rows with tools, tool calls, extra keys
    or an empty content; rows whose contents hold an added token's text; shapes whose template
    raises, breaks the prefix property or renders probe contents (edge whitespace, quotes,
    reasoning and tool markup) differently from a substitution; boundaries inside a token. The
    split is used only when no added token strips whitespace or overlaps another, and a probe
    encodes the same split and whole. The first `verify_rows` rows of every shape are also
    encoded the exact way; a difference moves that shape to the exact path (and is logged).
    Together these make a template that treats some contents specially very unlikely to slip
    through, though not impossible: `encode_conversations(..., fast=False)` stays the reference.
    `counts` says how many rows took each path.
    """

    tokenizer: object
    tmpl: ChatTemplate
    system_prompt: str | None
    train_on_prompt: bool
    mask_history: bool
    verify_rows: int = VERIFY_ROWS
    counts: dict = field(default_factory=lambda: {"fast": 0, "exact": 0})

    def __post_init__(self) -> None:
        self._shapes: dict[tuple[str, ...], _Shape | None] = {}
        self._backend = getattr(self.tokenizer, "backend_tokenizer", None)
        self._added: dict[str, int] = {}  # added token -> id, when the split below is exact
        self._split = self._added_token_splitter()
        self._pieces: dict[str, list[int]] = {}  # text -> its ids, for the runs and boundary prefixes seen

    def _added_token_splitter(self) -> re.Pattern | None:
        """A regex that splits text at added tokens as the tokenizer does, or None where that is not exact."""
        backend = self._backend
        if backend is None:
            return None
        added = backend.get_added_tokens_decoder()
        if not added or getattr(backend, "encode_special_tokens", False):
            return None
        for token in added.values():
            if token.lstrip or token.rstrip or token.single_word or (token.normalized and backend.normalizer):
                return None  # the tokenizer would strip or normalize around it
        tokens = {token.content: i for i, token in added.items()}
        # A regex's leftmost-longest matches equal the tokenizer's, and a text's pieces can be encoded
        # apart, only if no token can run into another: none is a proper prefix of one, none ends with
        # what another one starts with.
        prefixes = {t[:i] for t in tokens for i in range(1, len(t) + 1)}
        proper_prefixes = {t[:i] for t in tokens for i in range(1, len(t))}
        if any(a in proper_prefixes or any(a[k:] in prefixes for k in range(1, len(a))) for a in tokens):
            return None
        split = re.compile("(" + "|".join(map(re.escape, sorted(tokens, key=len, reverse=True))) + ")")
        probe = "".join(f"x{t}\n {t}é{t}  {_PROBES[0]}{t}y1{t}{t}" for t in list(tokens)[:64])
        parts = [[tokens[p]] if j % 2 else backend.encode(p, add_special_tokens=False).ids
                 for j, p in enumerate(split.split(probe))]
        if list(chain.from_iterable(parts)) != backend.encode(probe, add_special_tokens=False).ids:
            log.info("tokenize: this tokenizer encodes text split at its added tokens differently from the whole; "
                     "the fast path encodes whole renderings")
            return None
        # A character no added token holds: texts joined by it can be searched for tokens at once.
        apart = next((c for c in ("\x00", "\ue002", "\ufffe") if not any(c in t for t in tokens)), None)
        if apart is None:
            return None
        self._added, self._apart = tokens, apart
        return split

    # -- shapes

    def _render_shape(self, roles: tuple[str, ...], contents: list[str], upto: int, generation: bool) -> str:
        messages = [{"role": r, "content": c} for r, c in zip(roles[:upto], contents[:upto])]
        return _render(self.tmpl, messages, None, add_generation_prompt=generation)

    def _boundaries(self, roles: tuple[str, ...], contents: list[str]) -> tuple[str, list[int]] | None:
        """The rendering and its completion boundaries (start, end per trained turn), or None where a
        prefix rendering is not a text prefix of the whole."""
        n = len(roles)
        full = self._render_shape(roles, contents, n, False)
        positions = []
        for i in _trained_turns(roles, self.train_on_prompt, self.mask_history):
            prompt = self._render_shape(roles, contents, i, True)
            end = self._render_shape(roles, contents, i + 1, False) if i < n - 1 else full
            if not (full.startswith(prompt) and full.startswith(end)):
                return None
            positions += [len(prompt), len(end)]
        return full, positions

    def _compile(self, roles: tuple[str, ...]) -> _Shape | None:
        n = len(roles)
        try:
            rendered = self._boundaries(roles, [_SENTINEL.format(i) for i in range(n)])
        except Exception:  # a template error: the exact path reports it for the row
            return None
        if rendered is None:
            return None
        full, positions = rendered
        sentinels = list(_SENTINEL_RE.finditer(full))
        if any(int(m.group(1)) >= n for m in sentinels):
            return None
        if any(m.start() < p < m.end() for p in positions for m in sentinels):
            return None  # a boundary inside a content
        for probe in _PROBES:  # contents must be substituted verbatim
            contents = [probe.replace("{i}", str(i)) for i in range(n)]
            try:
                real = self._boundaries(roles, contents)
            except Exception:
                return None
            text = "".join(contents[int(x)] if j % 2 else x for j, x in enumerate(_SENTINEL_RE.split(full)))
            shift = [(m.end(), len(contents[int(m.group(1))]) - len(m.group(0))) for m in sentinels]
            moved = [p + sum(d for end, d in shift if end <= p) for p in positions]
            if real != (text, moved):
                return None
        return self._layout(full, positions)

    def _layout(self, full: str, positions: list[int]) -> _Shape | None:
        """Split a placeholder rendering into constant and variable groups and place the boundaries."""
        pieces = self._split.split(full) if self._split is not None else [full]
        groups: list[_Group] = []
        where: list[tuple[int, int]] = []  # per piece: (group, tokens before it in that group)
        for j, piece in enumerate(pieces):
            if j % 2 == 0 and _SENTINEL_RE.search(piece):
                parts = _SENTINEL_RE.split(piece)  # literal, index, literal, ..., literal
                refs = tuple(int(x) for x in parts[1::2])
                groups.append(_Group(None, "{}".join(map(_escape_braces, parts[::2])), refs))
                where.append((len(groups) - 1, 0))
                continue
            if not groups or groups[-1].ids is None:
                groups.append(_Group([]))
            where.append((len(groups) - 1, len(groups[-1].ids)))
            if j % 2:
                groups[-1].ids.append(self._added[piece])
            elif piece:
                groups[-1].ids.extend(self._backend.encode(piece, add_special_tokens=False).ids)
        ends = list(accumulate(map(len, pieces)))
        cuts = []
        for position in positions:
            j = min(bisect_right(ends, position), len(pieces) - 1)  # the piece that starts at or holds it
            offset = position - (ends[j] - len(pieces[j]))
            group, before = where[j]
            if offset == 0:
                cuts.append(_Cut(group, before))
            elif j % 2:
                return None  # inside an added token
            elif groups[group].ids is not None:  # inside constant text: check its tokens once, here
                head = self._backend.encode(pieces[j][:offset], add_special_tokens=False).ids
                whole = self._backend.encode(pieces[j], add_special_tokens=False).ids
                if whole[: len(head)] != head:
                    return None
                cuts.append(_Cut(group, before + len(head)))
            else:
                head = pieces[j][:offset]
                refs = tuple(int(x) for x in _SENTINEL_RE.findall(head))
                cuts.append(_Cut(group, None, len(_SENTINEL_RE.sub("", head)), refs))
        return _Shape(groups, cuts)

    def _shape_of(self, messages, tools) -> tuple[tuple[str, ...] | None, list[str]]:
        """The roles and contents of a plain conversation (role + non-empty string content only)."""
        if tools or type(messages) is not list or not messages:
            return None, []
        roles, contents = [], []
        for message in messages:
            if type(message) is not dict or len(message) != 2:
                return None, []
            role, content = message.get("role"), message.get("content")
            if role not in ROLES or type(content) is not str or not content:
                return None, []
            roles.append(role)
            contents.append(content)
        if self.system_prompt is not None and roles[0] != "system":
            if not self.system_prompt:  # templates test for an empty system prompt: render it exactly
                return None, []
            roles.insert(0, "system")
            contents.insert(0, self.system_prompt)
        return tuple(roles), contents

    # -- encoding

    def encode(
        self, conversations: list[tuple[list[dict], str | list | None]], where: list[str] | None = None
    ) -> list[tuple[list[int], list[int]]]:
        """(input_ids, labels) per (messages, tools) pair; `where` names each one in error messages."""
        with _gc_paused():
            return self._encode_batch(conversations, where)

    def _encode_batch(self, conversations, where):
        if self._backend is None:  # a slow tokenizer: nothing to gain
            self.counts["exact"] += len(conversations)
            return self._exact(conversations, where)
        if len(self._pieces) > CACHE_ENTRIES:
            self._pieces.clear()
        out: list = [None] * len(conversations)
        exact: list[int] = []
        # Rows grouped by shape, so that each step below runs once per group over a column of rows.
        by_shape: dict[tuple[str, ...], tuple[list[int], list[list[str]]]] = {}
        shapes = self._shapes
        for k, (messages, tools) in enumerate(conversations):
            key, contents = self._shape_of(messages, tools)
            if key is not None and key not in shapes:
                shapes[key] = self._compile(key)
            if key is None or shapes[key] is None:
                exact.append(k)
                continue
            rows = by_shape.get(key)
            if rows is None:
                rows = by_shape[key] = ([], [])
            rows[0].append(k)
            rows[1].append(contents)
        columns = {key: self._columns(shapes[key], ks, contents, exact) for key, (ks, contents) in by_shape.items()}
        verify = []
        for key, (ks, _, _) in columns.items():
            shape = shapes[key]
            n = max(0, min(len(ks), self.verify_rows - shape.verified))
            shape.verified += n
            verify += ks[:n]
        pieces = self._pieces
        texts = chain.from_iterable(col if type(col) is list else (col,) for _, texts, heads in columns.values()
                                    for col in (*texts, *heads) if col)
        new = [t for t in dict.fromkeys(texts) if t not in pieces]
        pieces.update(zip(new, self._encode_texts(new)))
        for key, (ks, texts, heads) in columns.items():
            self._assemble(shapes[key], ks, texts, heads, out, exact)
        checked = sorted(set(exact) | set(verify))
        if checked:
            invalid = set()
            results = self._exact([conversations[k] for k in checked], [_place(where, k) for k in checked])
            for k, result in zip(checked, results):
                if out[k] is not None and out[k] != result:
                    key = next(key for key, (ks, _, _) in columns.items() if k in ks)
                    log.warning("tokenize: the fast path differs from the exact one at %s (roles %s); "
                                "encoding conversations of that shape the exact way", _place(where, k), key)
                    shapes[key] = None
                    invalid.add(key)
                    exact.append(k)
                out[k] = result
            # Rows of this batch with a shape just found to differ: redo them the exact way too.
            done = set(checked)
            redo = [k for key in invalid for k in columns[key][0] if k not in done]
            if redo:
                results = self._exact([conversations[k] for k in redo], [_place(where, k) for k in redo])
                for k, result in zip(redo, results):
                    out[k] = result
                exact += redo
        self.counts["exact"] += len(set(exact))
        self.counts["fast"] += len(conversations) - len(set(exact))
        return out

    def _columns(self, shape: _Shape, ks: list[int], contents: list[list[str]], exact: list[int]):
        """For the rows `ks` of one shape: (rows kept, the text of each variable group per row, the
        text before each boundary inside a variable group). A group's or a head's entry is None
        where it is constant, a head's a string where it is the same for every row. Rows whose
        contents hold an added token's text go to `exact`."""
        texts: list[list[str] | None] = []
        for group in shape.groups:
            if group.ids is not None:
                texts.append(None)
            elif len(group.refs) == 1:
                fill, ref = group.text.format, group.refs[0]
                texts.append([fill(c[ref]) for c in contents])
            else:
                fill, refs = group.text.format, group.refs
                texts.append([fill(*[c[r] for r in refs]) for c in contents])
        split = self._split
        if split is not None:  # one search per column; rows only where it finds something
            hits = {i for col in texts if col is not None and split.search(self._apart.join(col))
                    for i, text in enumerate(col) if split.search(text)}
            if hits:
                exact += [ks[i] for i in sorted(hits)]
                keep = [i for i in range(len(ks)) if i not in hits]
                ks, contents = [ks[i] for i in keep], [contents[i] for i in keep]
                texts = [None if col is None else [col[i] for i in keep] for col in texts]
        heads: list = []
        for cut in shape.cuts:
            if cut.tokens is not None:
                heads.append(None)
            elif not cut.refs:  # literal text only: the same for every row
                heads.append(texts[cut.group][0][: cut.chars] if ks else "")
            else:
                col, chars, refs = texts[cut.group], cut.chars, cut.refs
                heads.append([t[: chars + sum(len(c[r]) for r in refs)] for t, c in zip(col, contents)])
        return ks, texts, heads

    def _encode_texts(self, texts: list[str]) -> list[list[int]]:
        """Encode texts that hold no added token. Joined a few at a time by an added token, which
        the tokenizer splits at: it spends about as long per call as on a dozen short words."""
        if self._split is None or len(texts) < 2:
            return _encode(self.tokenizer, texts)
        separator, separator_id = next(iter(self._added.items()))
        joined = [separator.join(texts[i : i + JOIN_TEXTS]) for i in range(0, len(texts), JOIN_TEXTS)]
        out = []
        for ids in _encode(self.tokenizer, joined):
            start = 0
            for _ in range(ids.count(separator_id)):
                end = ids.index(separator_id, start)
                out.append(ids[start:end])
                start = end + 1
            out.append(ids[start:])
        if len(out) != len(texts):  # cannot happen when the split is exact; never trust a miscount
            return _encode(self.tokenizer, texts)
        return out

    def _exact(self, conversations, where):
        return encode_conversations(self.tokenizer, self.tmpl, conversations, system_prompt=self.system_prompt,
                                    train_on_prompt=self.train_on_prompt, mask_history=self.mask_history,
                                    where=where, fast=False)

    def _assemble(self, shape: _Shape, ks: list[int], texts: list, heads: list, out: list, exact: list[int]) -> None:
        """(input_ids, labels) into out[k] for the rows `ks` of one shape, from `_columns`' texts
        and heads; a row whose boundary falls inside a token goes to `exact`."""
        if not ks:
            return
        pieces = self._pieces
        segments = [(group.ids, col) for group, col in zip(shape.groups, texts)]
        if self.train_on_prompt:
            for i, k in enumerate(ks):
                ids = list(chain.from_iterable(const if col is None else pieces[col[i]] for const, col in segments))
                out[k] = (ids, list(ids))
            return
        cuts = [(cut.group, cut.tokens, pieces[head] if type(head) is str else None, head if type(head) is list else None)
                for cut, head in zip(shape.cuts, heads)]
        stop = self.tmpl.stop_id
        for i, k in enumerate(ks):
            encoded = [const if col is None else pieces[col[i]] for const, col in segments]
            ids = list(chain.from_iterable(encoded))
            starts = list(accumulate(map(len, encoded), initial=0))
            bounds = []
            for group, tokens, head_ids, head_col in cuts:
                if tokens is None:
                    if head_col is not None:
                        head_ids = pieces[head_col[i]]
                    tokens = len(head_ids)
                    if encoded[group][:tokens] != head_ids:
                        exact.append(k)  # the boundary falls inside a token
                        break
                bounds.append(starts[group] + tokens)
            else:
                n = len(ids)
                if len(bounds) == 2:  # one trained turn: build the labels in one go
                    start = bounds[0]
                    end = _end_of_turn(ids, start, bounds[1], stop)
                    labels = [IGNORE] * start + ids[start:end] + [IGNORE] * (n - end)
                else:
                    labels = [IGNORE] * n
                    for t in range(0, len(bounds), 2):
                        start = bounds[t]
                        end = _end_of_turn(ids, start, bounds[t + 1], stop)
                        labels[start:end] = ids[start:end]
                out[k] = (ids, labels)


@contextlib.contextmanager
def _gc_paused() -> Iterator[None]:
    """Pause the cyclic garbage collector for one batch.

    A batch allocates many small lists and dicts that live until it ends, and no reference cycles:
    the collector would walk them again and again for nothing (it took over half the time).
    Reference counting still frees everything; collection resumes after the batch.
    """
    collecting = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if collecting:
            gc.enable()


def _place(where: list[str] | None, k: int) -> str:
    return where[k] if where else f"conversation {k}"


# --- plain text ----------------------------------------------------------------------------


def tokenize_text_corpus(tokenizer, texts: Iterable[str], block_size: int) -> Iterator[dict]:
    """Pack documents (each followed by eos) greedily into blocks of `block_size` tokens.

    Each block: input_ids, labels, position_ids. Positions restart at 0 where a document (or its
    continuation in a new block) starts, so attention can be block-diagonal. Labels equal
    input_ids except -100 at each such start: a document's first token is not predicted from
    another document. Empty texts are skipped; the last, partial block is kept.
    """
    if block_size < 1:
        raise ValueError(f"block_size must be positive (got {block_size})")
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the tokenizer has no eos token, needed to separate documents in the packed corpus")
    ids: list[int] = []
    positions: list[int] = []
    texts = iter(texts)
    while chunk := list(islice(texts, ROWS_PER_BATCH)):
        for doc in _encode(tokenizer, [t for t in chunk if t]):
            doc.append(eos)
            taken = 0
            while taken < len(doc):
                take = min(block_size - len(ids), len(doc) - taken)
                ids.extend(doc[taken : taken + take])
                positions.extend(range(take))
                taken += take
                if len(ids) == block_size:
                    yield _text_block(ids, positions)
                    ids, positions = [], []
    if ids:
        yield _text_block(ids, positions)


def _text_block(ids: list[int], positions: list[int]) -> dict:
    labels = [IGNORE if p == 0 else t for t, p in zip(ids, positions)]
    return {"input_ids": ids, "labels": labels, "position_ids": positions}


# --- the stage -----------------------------------------------------------------------------


@dataclass
class _GroupStats:
    rows: int = 0
    tokens: int = 0
    trained_tokens: int = 0
    truncated: int = 0
    dropped_all_masked: int = 0
    max_len: int = 0
    fast_path_rows: int | None = None  # conversations encoded by ConversationEncoder's fast path
    _padded: int = 0  # tokens if every batch of PAD_WASTE_BATCH rows were padded to its longest
    _batch: tuple[int, int] = (0, 0)  # (rows, longest) of the batch being filled

    def add(self, length: int, trained: int) -> None:
        self.add_many([length], [trained])

    def add_many(self, lengths: list[int], trained: list[int]) -> None:
        """`add` for each row's length and trained tokens, in order, in one pass."""
        if not lengths:
            return
        self.rows += len(lengths)
        self.tokens += sum(lengths)
        self.trained_tokens += sum(trained)
        self.max_len = max(self.max_len, max(lengths))
        n, longest = self._batch
        padded = 0
        for length in lengths:
            n += 1
            if length > longest:
                longest = length
            if n == PAD_WASTE_BATCH:
                padded += n * longest
                n = longest = 0
        self._padded += padded
        self._batch = (n, longest)

    def summary(self) -> dict:
        padded = self._padded + self._batch[0] * self._batch[1]
        return {
            "rows": self.rows,
            "tokens": self.tokens,
            "trained_tokens": self.trained_tokens,
            "truncated": self.truncated,
            "dropped_all_masked": self.dropped_all_masked,
            "mean_len": round(self.tokens / self.rows, 2) if self.rows else 0.0,
            "max_len": self.max_len,
            "padding_waste_if_padded": round(1 - self.tokens / padded, 4) if padded else 0.0,
            **({"fast_path_rows": self.fast_path_rows} if self.fast_path_rows is not None else {}),
        }


class _ParquetOut:
    """Rows buffered and written in bounded batches to a temp file, renamed into place on close."""

    def __init__(self, path: Path, schema: pa.Schema):
        self.path, self.schema = path, schema
        self.tmp = path.with_name(f".{path.name}.tmp")
        # Token ids gain little from dictionary pages; zstd alone is as small and a third faster to write.
        self.writer = pq.ParquetWriter(self.tmp, schema, use_dictionary=False, compression="zstd")
        self.rows: list[dict] = []

    def add(self, row: dict) -> None:
        self.rows.append(row)
        if len(self.rows) >= ROWS_PER_BATCH:
            self.flush()

    def write_table(self, table: pa.Table) -> None:
        self.flush()
        self.writer.write_table(table)

    def flush(self) -> None:
        if self.rows:
            columns = [pa.array([r[f.name] for r in self.rows], type=f.type) for f in self.schema]
            self.writer.write_table(pa.Table.from_arrays(columns, schema=self.schema))
            self.rows = []

    def close(self, ok: bool) -> None:
        if ok:
            self.flush()
        self.writer.close()
        if ok:
            os.replace(self.tmp, self.path)
        else:
            self.tmp.unlink(missing_ok=True)


def _read_jsonl(path: Path) -> Iterator[tuple[int, dict]]:
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield line_no, json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{line_no}: not valid JSON ({exc}); rerun the align stage") from None


def _texts(path: Path) -> Iterator[str]:
    for line_no, record in _read_jsonl(path):
        text = record.get("text") if isinstance(record, dict) else None
        if not isinstance(text, str):
            raise ValueError(f"{path}:{line_no}: a text record needs a string field 'text' (got keys {list(record)})")
        yield text


def _tokenize_text_group(path: Path, tokenizer, cfg: TokenizeConfig, out: _ParquetOut, stats: _GroupStats) -> None:
    texts = tqdm(_texts(path), desc=f"tokenize {path.stem}", unit=" docs", disable=None, leave=False)
    for block in tokenize_text_corpus(tokenizer, texts, cfg.cpt_block_size):
        stats.add(len(block["input_ids"]), sum(label != IGNORE for label in block["labels"]))
        out.add(block)


def _tokenize_conversation_group(
    path: Path, tokenizer, tmpl: ChatTemplate, cfg: TokenizeConfig, out: _ParquetOut, stats: _GroupStats,
    samples: list, num_proc: int,
) -> None:
    """Encode a conversation group chunk by chunk; with num_proc > 1, chunks go to worker processes
    (components.data.workers). The main process then only reads lines and writes the workers' Arrow
    tables, in file order, so the output is the same whatever num_proc is."""
    chunks = line_chunks(path)
    if num_proc <= 1:
        encode = _ChunkEncoder(tokenizer, cfg, tmpl)
        results = (encode(path, first, lines) for first, lines in chunks)
        stats.fast_path_rows = _collect(results, out, stats, samples, bar_desc=f"tokenize {path.stem}")
        return
    with spawn_pool(num_proc, _init_worker, (tokenizer, cfg)) as pool:
        results = ordered_map(pool, _encode_in_worker, ((path, *chunk) for chunk in chunks), 2 * num_proc)
        stats.fast_path_rows = _collect(results, out, stats, samples, bar_desc=f"tokenize {path.stem}")


class _Lines:
    """`file:line` of each row of a chunk, formatted only when an error or a warning names one."""

    def __init__(self, path: Path, line_nos: list[int]):
        self.path, self.line_nos = path, line_nos

    def __getitem__(self, k: int) -> str:
        return f"{self.path}:{self.line_nos[k]}"

    def __len__(self) -> int:
        return len(self.line_nos)


@dataclass
class _ChunkResult:
    table: pa.Table
    lengths: list[int]  # tokens per kept row, in order
    trained: list[int]  # trained tokens per kept row
    truncated: int
    dropped_all_masked: int
    samples: list[tuple[list[int], list[int]]]
    fast_rows: int  # rows of this chunk encoded by the fast path


class _ChunkEncoder:
    """Parse, encode and truncate one chunk of JSONL lines into an Arrow table (runs in any process)."""

    def __init__(self, tokenizer, cfg: TokenizeConfig, tmpl: ChatTemplate | None = None):
        self.cfg = cfg
        self.encoder = ConversationEncoder(tokenizer, tmpl or prepare_template(tokenizer, cfg.template),
                                           system_prompt=cfg.system_prompt, train_on_prompt=cfg.train_on_prompt,
                                           mask_history=cfg.mask_history)

    def __call__(self, path: Path, first_line: int, lines: list[bytes]) -> _ChunkResult:
        # The parsed records live until the chunk is done; they are freed (when _encode returns)
        # before collection resumes, which then finds almost nothing new to walk.
        with _gc_paused():
            return self._encode(path, first_line, lines)

    def _encode(self, path: Path, first_line: int, lines: list[bytes]) -> _ChunkResult:
        records, line_nos = [], []
        for line_no, line in enumerate(lines, first_line):
            if not line.strip():
                continue
            try:
                record = orjson.loads(line)
            except orjson.JSONDecodeError as exc:
                raise ValueError(f"{path}:{line_no}: not valid JSON ({exc}); rerun the align stage") from None
            if type(record) is not dict or "messages" not in record:
                raise ValueError(f"{path}:{line_no}: a conversation record needs a 'messages' list; "
                                 "rerun the align stage")
            records.append(record)
            line_nos.append(line_no)
        fast_before = self.encoder.counts["fast"]
        encoded = self.encoder.encode([(r["messages"], r.get("tools")) for r in records],
                                      where=_Lines(path, line_nos))
        cutoff = self.cfg.cutoff_len
        all_ids, all_labels, lengths, trained_counts = [], [], [], []
        truncated = dropped = 0
        for ids, labels in encoded:
            if len(ids) > cutoff:  # keep the start: the prompt and the beginning of the answer
                ids, labels = ids[:cutoff], labels[:cutoff]
                truncated += 1
            trained = len(labels) - labels.count(IGNORE)
            if trained == 0:
                dropped += 1
                continue
            all_ids.append(ids)
            all_labels.append(labels)
            lengths.append(len(ids))
            trained_counts.append(trained)
        table = pa.Table.from_arrays([pa.array(all_ids, type=_INT_LIST), pa.array(all_labels, type=_INT_LIST)],
                                     schema=CONVERSATION_SCHEMA)
        return _ChunkResult(table, lengths, trained_counts, truncated, dropped,
                            list(zip(all_ids[:SAMPLES_PER_GROUP], all_labels[:SAMPLES_PER_GROUP])),
                            self.encoder.counts["fast"] - fast_before)


_WORKER: _ChunkEncoder | None = None


def _init_worker(tokenizer, cfg: TokenizeConfig) -> None:
    global _WORKER
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # the processes are the parallelism
    _WORKER = _ChunkEncoder(tokenizer, cfg)


def _encode_in_worker(path: Path, first_line: int, lines: list[bytes]) -> _ChunkResult:
    return _WORKER(path, first_line, lines)


def _collect(results: Iterable[_ChunkResult], out: _ParquetOut, stats: _GroupStats, samples: list,
             bar_desc: str) -> int:
    """Write chunk results in order, fold their stats; returns the rows that took the fast path."""
    fast = 0
    with tqdm(desc=bar_desc, unit=" rows", disable=None, leave=False) as bar:
        for result in results:
            out.write_table(result.table)
            stats.add_many(result.lengths, result.trained)
            stats.truncated += result.truncated
            stats.dropped_all_masked += result.dropped_all_masked
            samples.extend(result.samples[: SAMPLES_PER_GROUP - len(samples)])
            fast += result.fast_rows
            bar.update(len(result.lengths) + result.dropped_all_masked)
    return fast


def run_tokenize(align_dir: Path, tokenizer, cfg: TokenizeConfig, out_dir: Path, *, groups: dict[str, str]) -> StageResult:
    """Tokenize every aligned group file in `align_dir` into `out_dir`.

    `groups` maps a group name to its record kind (text, conversation, preference, kto); a group
    whose `<group>.jsonl` is missing is skipped. Writes `<group>.parquet` (or `.jsonl` for pairs),
    stats.json and samples.txt.
    """
    align_dir, out_dir = Path(align_dir), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tmpl = None
    files: list[str] = []
    stats: dict[str, dict] = {}
    metrics: dict[str, float] = {}
    sample_text: list[str] = []
    skipped = []
    for group, kind in groups.items():
        path = align_dir / f"{group}.jsonl"
        if not path.is_file():
            log.info("tokenize: no %s, skipping group %s", path, group)
            skipped.append(group)
            continue
        if kind in ("preference", "kto"):
            shutil.copyfile(path, out_dir / f"{group}.jsonl")
            files.append(f"{group}.jsonl")
            stats[group] = {"kind": kind, "rows": sum(1 for _ in _read_jsonl(path)), "copied": True}
            metrics[f"rows_{group}"] = stats[group]["rows"]
            continue
        if kind not in ("text", "conversation"):
            raise ValueError(f"group {group!r} has unknown kind {kind!r}; expected text, conversation, preference or kto")
        group_stats = _GroupStats()
        out = _ParquetOut(out_dir / f"{group}.parquet", TEXT_SCHEMA if kind == "text" else CONVERSATION_SCHEMA)
        ok = False
        try:
            if kind == "text":
                _tokenize_text_group(path, tokenizer, cfg, out, group_stats)
            else:
                tmpl = tmpl or prepare_template(tokenizer, cfg.template)  # fails early on an unknown name
                samples: list = []
                num_proc = resolve_num_proc(cfg.num_proc, path)
                _tokenize_conversation_group(path, tokenizer, tmpl, cfg, out, group_stats, samples, num_proc)
                sample_text.append(
                    f"===== {group} ({len(samples)} of {group_stats.rows} rows; trained tokens in {MARK_OPEN} {MARK_CLOSE})"
                )
                for i, (ids, labels) in enumerate(samples):
                    sample_text.append(f"--- sample {i + 1}\n{format_sample(tokenizer, ids, labels)}")
            ok = True
        finally:
            out.close(ok)
        files.append(f"{group}.parquet")
        stats[group] = {"kind": kind, **group_stats.summary()}
        metrics[f"tokens_{group}"] = group_stats.tokens
        metrics[f"rows_{group}"] = group_stats.rows
        metrics[f"truncated_{group}"] = group_stats.truncated
        log.info("tokenize %s: %s", group, stats[group])
    atomic_write_json(out_dir / "stats.json", stats)
    atomic_write_text(out_dir / "samples.txt", "\n".join(sample_text) + "\n")
    files += ["stats.json", "samples.txt"]
    return StageResult(
        files=files,
        metrics=metrics,
        info={"template": tmpl.name if tmpl else cfg.template, "skipped_groups": skipped, "stats": stats},
    )


def load_tokenized(path: Path) -> datasets.Dataset:
    """A tokenized group file as a datasets.Dataset (memory-mapped Arrow)."""
    import datasets

    return datasets.Dataset.from_parquet(str(path))


def format_sample(tokenizer, input_ids: list[int], labels: list[int]) -> str:
    """Decode a row with its trained spans wrapped in ⟦ ⟧: the quickest way to see a masking bug."""
    parts = []
    start = 0
    for end in range(1, len(input_ids) + 1):
        if end == len(input_ids) or (labels[end] != IGNORE) != (labels[start] != IGNORE):
            text = tokenizer.decode(list(input_ids[start:end]), skip_special_tokens=False)
            parts.append(f"{MARK_OPEN}{text}{MARK_CLOSE}" if labels[start] != IGNORE else text)
            start = end
    return "".join(parts)
