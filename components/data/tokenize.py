"""Tokenize aligned records: conversations to (input_ids, labels), plain text to packed blocks.

Prompt masks come from prefix rendering: for each assistant turn i, the conversation up to i
rendered with the generation prompt is a prefix of the whole rendering, and the tokens after it
up to the end of turn i are that turn's completion. This works with any chat template (the
tokenizer's own or one from `templates.py`) and is checked on the token ids, so a template or a
tokenizer that would make training text differ from inference text fails loudly instead.

Output of `run_tokenize` (one parquet per group, list<int32> columns):
- text groups:         input_ids, labels, position_ids (packed blocks, positions restart per document)
- conversation groups: input_ids, labels (one row per example; the trainer packs per batch)
- preference groups:   copied as JSONL; later stages tokenize the pairs
plus stats.json and samples.txt (decoded examples with trained tokens marked ⟦like this⟧).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import TYPE_CHECKING

import pyarrow as pa
import pyarrow.parquet as pq
from tqdm.auto import tqdm
from transformers.utils.chat_template_utils import render_jinja_template

from components.artifacts import StageResult, atomic_write_json, atomic_write_text
from components.config import TokenizeConfig
from components.data.records import ROLES
from components.data.templates import chat_format, known_templates, resolve_template, stop_string

if TYPE_CHECKING:
    import datasets

log = logging.getLogger(__name__)

IGNORE = -100
MARK_OPEN, MARK_CLOSE = "⟦", "⟧"
ROWS_PER_BATCH = 1000  # rows rendered, encoded and written to parquet at a time (bounds memory)
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


def encode_conversations(
    tokenizer,
    tmpl: ChatTemplate,
    conversations: list[tuple[list[dict], str | list | None]],
    *,
    system_prompt: str | None,
    train_on_prompt: bool,
    mask_history: bool,
    where: list[str] | None = None,
) -> list[tuple[list[int], list[int]]]:
    """Batched `render_conversation`: renders every needed prefix as a string, then encodes them all at once.

    `conversations` holds (messages, tools) pairs; `where` names each one in error messages.
    """
    strings: list[str] = []
    plans = []  # per conversation: (index of the full rendering, [(prompt index, end index, turn), ...])
    for k, (messages, tools) in enumerate(conversations):
        place = where[k] if where else f"conversation {k}"
        try:
            msgs = _normalize_messages(messages, system_prompt)
            tool_list = _parse_tools(tools)
            full = _render(tmpl, msgs, tool_list, add_generation_prompt=False)
            turns = [] if train_on_prompt else [i for i, m in enumerate(msgs) if m["role"] == "assistant"]
            if mask_history:
                turns = turns[-1:]
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
                place = where[k] if where else f"conversation {k}"
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
        return [e.ids for e in backend.encode_batch(texts, add_special_tokens=False)]
    return tokenizer(texts, add_special_tokens=False)["input_ids"]


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
    _padded: int = 0  # tokens if every batch of PAD_WASTE_BATCH rows were padded to its longest
    _batch: tuple[int, int] = (0, 0)  # (rows, longest) of the batch being filled

    def add(self, length: int, trained: int) -> None:
        self.rows += 1
        self.tokens += length
        self.trained_tokens += trained
        self.max_len = max(self.max_len, length)
        n, longest = self._batch
        n, longest = n + 1, max(longest, length)
        if n == PAD_WASTE_BATCH:
            self._padded += n * longest
            n, longest = 0, 0
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
        }


class _ParquetOut:
    """Rows buffered and written in bounded batches to a temp file, renamed into place on close."""

    def __init__(self, path: Path, schema: pa.Schema):
        self.path, self.schema = path, schema
        self.tmp = path.with_name(f".{path.name}.tmp")
        self.writer = pq.ParquetWriter(self.tmp, schema)
        self.rows: list[dict] = []

    def add(self, row: dict) -> None:
        self.rows.append(row)
        if len(self.rows) >= ROWS_PER_BATCH:
            self.flush()

    def flush(self) -> None:
        if self.rows:
            columns = {name: [r[name] for r in self.rows] for name in self.schema.names}
            self.writer.write_table(pa.table(columns, schema=self.schema))
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
    path: Path, tokenizer, tmpl: ChatTemplate, cfg: TokenizeConfig, out: _ParquetOut, stats: _GroupStats, samples: list
) -> None:
    records = iter(tqdm(_read_jsonl(path), desc=f"tokenize {path.stem}", unit=" rows", disable=None, leave=False))
    while chunk := list(islice(records, ROWS_PER_BATCH)):
        for line_no, record in chunk:
            if not isinstance(record, dict) or "messages" not in record:
                raise ValueError(f"{path}:{line_no}: a conversation record needs a 'messages' list; rerun the align stage")
        encoded = encode_conversations(
            tokenizer,
            tmpl,
            [(record["messages"], record.get("tools")) for _, record in chunk],
            system_prompt=cfg.system_prompt,
            train_on_prompt=cfg.train_on_prompt,
            mask_history=cfg.mask_history,
            where=[f"{path}:{line_no}" for line_no, _ in chunk],
        )
        for ids, labels in encoded:
            if len(ids) > cfg.cutoff_len:  # keep the start: the prompt and the beginning of the answer
                ids, labels = ids[: cfg.cutoff_len], labels[: cfg.cutoff_len]
                stats.truncated += 1
            trained = sum(label != IGNORE for label in labels)
            if trained == 0:
                stats.dropped_all_masked += 1
                continue
            stats.add(len(ids), trained)
            out.add({"input_ids": ids, "labels": labels})
            if len(samples) < SAMPLES_PER_GROUP:
                samples.append((ids, labels))


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
                tmpl = tmpl or prepare_template(tokenizer, cfg.template)
                samples: list = []
                _tokenize_conversation_group(path, tokenizer, tmpl, cfg, out, group_stats, samples)
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
