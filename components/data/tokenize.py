"""The tokenize stage: aligned records to token ids, one parquet per group, with stats and marked samples.

Conversations are encoded with their chat template and exact loss masks (`chat_render`, sped up by
`conversation_encoder`); the plain-text corpus is packed into blocks (`packing`). Output of
`run_tokenize` (one parquet per group, list<int32> columns):
- text groups:         input_ids, labels, position_ids (packed blocks, positions restart per document)
- conversation groups: input_ids, labels (one row per example; the trainer packs per batch)
- preference groups:   copied as JSONL; later stages tokenize the pairs
plus stats.json and samples.txt (decoded examples with trained tokens marked ⟦like this⟧).
A training group (cpt, sft) left with no rows fails the stage here rather than training later.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import pyarrow as pa
import pyarrow.parquet as pq

from components.artifacts import StageResult, atomic_write_json, atomic_write_text
from components.config import TokenizeConfig
from components.data.chat_render import ChatTemplate, prepare_template
from components.data.conversation_encoder import ConversationEncoder, gc_paused
from components.data.dataset_info import DataError
from components.data.jsonl import BadLine, parse_line, read_jsonl
from components.data.packing import tokenize_text_corpus
from components.data.records import GROUP_KINDS, IGNORE, UNTOKENIZED_GROUPS
from components.data.workers import line_chunks, ordered_map, resolve_num_proc, spawn_pool
from components.runtime import progress

if TYPE_CHECKING:
    import datasets

    from components.config import PipelineConfig
    from components.stage_contract import StageInputs

log = logging.getLogger(__name__)

MARK_OPEN, MARK_CLOSE = "⟦", "⟧"
ROWS_PER_BATCH = 2048  # rows written to parquet at a time (bounds memory)
SAMPLES_PER_GROUP = 3
PAD_WASTE_BATCH = 8  # batch size assumed by stats' padding_waste_if_padded
TRAINING_GROUPS = ("cpt", "sft")  # trained on next: an empty one fails here, not vaguely in training

_INT_LIST = pa.list_(pa.int32())
TEXT_SCHEMA = pa.schema([("input_ids", _INT_LIST), ("labels", _INT_LIST), ("position_ids", _INT_LIST)])
CONVERSATION_SCHEMA = pa.schema([("input_ids", _INT_LIST), ("labels", _INT_LIST)])


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


def _texts(path: Path) -> Iterator[str]:
    for line_no, record in read_jsonl(path):
        text = record.get("text")
        if not isinstance(text, str):
            raise DataError(f"{path}:{line_no}: a text record needs a string field 'text' (got keys {list(record)}); "
                            "rerun the align stage")
        yield text


def _tokenize_text_group(path: Path, tokenizer, cfg: TokenizeConfig, out: _ParquetOut, stats: _GroupStats) -> None:
    texts = progress(_texts(path), desc=f"tokenize {path.stem}", unit=" docs", leave=False)
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
        with gc_paused():
            return self._encode(path, first_line, lines)

    def _encode(self, path: Path, first_line: int, lines: list[bytes]) -> _ChunkResult:
        records, line_nos = [], []
        for line_no, line in enumerate(lines, first_line):
            if not line.strip():
                continue
            try:
                record = parse_line(line)
            except BadLine as exc:
                raise DataError(f"{path}:{line_no}: {exc}; rerun the align stage") from None
            if "messages" not in record:
                raise DataError(f"{path}:{line_no}: a conversation record needs a 'messages' list; "
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
    with progress(desc=bar_desc, unit=" rows", leave=False) as bar:
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

    `groups` maps a group name to its record kind (text, conversation, preference); a group whose
    `<group>.jsonl` is missing is skipped. Writes `<group>.parquet` (or `.jsonl` for pairs),
    stats.json and samples.txt. A training group (cpt, sft) that ends with no rows is a DataError
    naming why its rows were dropped.
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
        if kind in ("preference", "unpaired_preference"):
            shutil.copyfile(path, out_dir / f"{group}.jsonl")
            files.append(f"{group}.jsonl")
            stats[group] = {"kind": kind, "rows": sum(1 for _ in read_jsonl(path)), "copied": True}
            metrics[f"rows_{group}"] = stats[group]["rows"]
            continue
        if kind not in ("text", "conversation"):
            raise ValueError(f"group {group!r} has unknown kind {kind!r}; expected text, conversation or preference")
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
            if group in TRAINING_GROUPS and group_stats.rows == 0:
                raise DataError(_why_empty(group, path, group_stats, cfg))
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
    reports = ["stats.json", "samples.txt"]
    return StageResult(
        files=[*files, *reports], reports=reports,
        metrics=metrics,
        info={"template": tmpl.name if tmpl else cfg.template, "skipped_groups": skipped, "stats": stats},
    )


def _why_empty(group: str, path: Path, stats: _GroupStats, cfg: TokenizeConfig) -> str:
    """Why a training group kept no rows, and what to change."""
    head = f"tokenize: training group '{group}' has no rows left to train on"
    dropped = stats.dropped_all_masked
    if dropped and stats.truncated:
        return (f"{head}: all {dropped} conversations were dropped (dropped_all_masked: no trained token left), "
                f"{stats.truncated} of them after truncation to tokenize.cutoff_len={cfg.cutoff_len}, which cut "
                "off every answer. Raise tokenize.cutoff_len, or shorten the prompts (tokenize.system_prompt "
                "counts too); `lmforge data check` shows the lengths")
    if dropped:
        return (f"{head}: all {dropped} conversations were dropped (dropped_all_masked: no assistant answer to "
                f"train on in {path}); check the sft datasets")
    return f"{head}: {path} holds no non-empty record; check the datasets of data.{group}"


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


def tokenize_stage(cfg: PipelineConfig, inputs: StageInputs, out_dir: Path) -> StageResult:
    """The pipeline's tokenize stage: `align`'s groups with the tokenizer of `prepare`'s base model."""
    from components.models.loading import load_tokenizer  # it imports torch: not in the tokenize workers

    base = inputs.base_model
    tokenizer = load_tokenizer(base.source, **base.load_kwargs())
    groups = {g: GROUP_KINDS[g] for g in GROUP_KINDS if getattr(cfg.data, g) and g not in UNTOKENIZED_GROUPS}
    align_dir = inputs.dir("align", reading=[f"{g}.jsonl" for g in groups])
    return run_tokenize(align_dir, tokenizer, cfg.tokenize, out_dir, groups=groups)
