"""The align stage: fetched raw files -> standard records (JSONL per data group) + a report.

Each dataset is read streaming (JSONL line by line, parquet/arrow in batches, CSV row by row),
converted by its format's converter (components/data/formats.py) and appended to its group's
JSONL, so memory stays bounded by one batch (or by the sample, when a dataset is sampled).
Rows that cannot be aligned are dropped and counted by reason, with up to three examples each,
in report.json. Dropping is normal; a dataset that aligns to nothing is an error, and so is a
row that cannot even be parsed, unless `bad_row_budget` allows it.

The datasets of a training group are concatenated, or interleaved (`mix_strategy`): each dataset
is first aligned to a part file, then `interleave` draws lines from the open part files, so
mixing streams too (memory bounded by the open files, whatever their size).
"""

from __future__ import annotations

import bisect
import csv
import itertools
import json
import logging
import random
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any, Literal, TypeVar

import orjson
from tqdm import tqdm

from components.artifacts import StageResult, atomic_file, atomic_write_json
from components.data.dataset_info import DataError, DatasetSpec, load_dataset_info
from components.data.formats import RowError, get_converter, supported_kinds
from components.data.records import GROUP_KINDS, MIXED_GROUPS, interleave_probs_problem
from components.data.workers import line_chunks, ordered_map, resolve_num_proc, spawn_pool

log = logging.getLogger(__name__)

DATA_SUFFIXES = (".json", ".jsonl", ".csv", ".parquet", ".arrow", ".txt")
# Metadata that `datasets.save_to_disk` writes next to its .arrow files: never rows.
_METADATA_NAMES = {"dataset_info.json", "state.json"}
MAX_EXAMPLES = 3
_EXAMPLE_CHARS = 300
_BATCH_ROWS = 1024
MIX_STRATEGIES = ("concat", "interleave_under", "interleave_over")
PLACEHOLDERS = ("{{name}}", "{{author}}")
T = TypeVar("T")


# ----------------------------------------------------------------------------- reading rows


class _ParseFailure:
    """A row that could not be parsed: where, why, and a snippet of the raw text."""

    def __init__(self, reason: str, message: str, snippet: str):
        self.reason, self.message, self.snippet = reason, message, snippet


def _data_files(root: Path, name: str) -> list[Path]:
    if root.is_file():
        return [root]
    if not root.is_dir():
        raise DataError(f"dataset '{name}': {root} does not exist; run the fetch stage first")
    files = sorted(
        p for p in root.rglob("*")
        if p.is_file() and p.suffix.lower() in DATA_SUFFIXES and p.name not in _METADATA_NAMES
        and not any(part.startswith(".") for part in p.relative_to(root).parts)
    )
    if not files:
        raise DataError(f"dataset '{name}': no data files ({', '.join(DATA_SUFFIXES)}) in {root}")
    return files


def _snippet(text: str) -> str:
    return text if len(text) <= _EXAMPLE_CHARS else text[:_EXAMPLE_CHARS] + "..."


def _loads(line: str) -> Any:
    """json.loads, via orjson (several times faster) for the lines it takes; the stdlib reads the rest
    (NaN, integers past 64 bits) and words the errors."""
    try:
        return orjson.loads(line)
    except orjson.JSONDecodeError:
        return json.loads(line)


def _dumps_line(record: dict) -> str:
    """One JSONL line, UTF-8 kept as is; orjson where it can (str keys, no NaN), else the stdlib."""
    try:
        return orjson.dumps(record, option=orjson.OPT_APPEND_NEWLINE).decode()
    except TypeError:
        return json.dumps(record, ensure_ascii=False) + "\n"


def _parse_jsonl_line(line: str | bytes) -> dict | _ParseFailure:
    try:
        row = _loads(line)
    except json.JSONDecodeError as e:
        text = line.decode(errors="replace") if isinstance(line, bytes) else line
        return _ParseFailure("malformed_json", f"malformed JSON: {e.msg} (column {e.colno})",
                             _snippet(text.rstrip("\n")))
    if not isinstance(row, dict):
        text = line.decode(errors="replace") if isinstance(line, bytes) else line
        return _ParseFailure("malformed_json", f"expected a JSON object, got {type(row).__name__}",
                             _snippet(text.rstrip("\n")))
    return row


def _jsonl_rows(path: Path, where: str) -> Iterator[tuple[str, dict | _ParseFailure]]:
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if line.strip():
                yield f"{where}:{lineno}", _parse_jsonl_line(line)


def _json_rows(path: Path, where: str, spec: DatasetSpec) -> Iterator[tuple[str, dict | _ParseFailure]]:
    # A .json file is one document (LLaMA-Factory's list of rows, or LMFlow's object), read whole.
    try:
        with open(path, encoding="utf-8") as f:
            doc = json.load(f)
    except json.JSONDecodeError as e:
        if e.msg == "Extra data":  # JSON lines under a .json name, as `datasets` also accepts
            yield from _jsonl_rows(path, where)
            return
        raise DataError(f"{path}:{e.lineno}:{e.colno}: not valid JSON ({e.msg})") from None
    if spec.formatting == "lmflow":
        if not (isinstance(doc, dict) and isinstance(doc.get("instances"), list) and "type" in doc):
            raise DataError(f"{path}: an LMFlow file is an object {{\"type\": ..., \"instances\": [...]}}")
        for i, inst in enumerate(doc["instances"]):
            yield f"{where}[{i}]", {"type": doc["type"], "instance": inst}
        return
    if isinstance(doc, dict) and "instances" in doc:
        raise DataError(f"{path} looks like an LMFlow file; set \"formatting\": \"lmflow\" for '{spec.name}'")
    if not isinstance(doc, list):
        raise DataError(f"{path}: expected a JSON list of rows, got {type(doc).__name__}")
    for i, row in enumerate(doc):
        if isinstance(row, dict):
            yield f"{where}[{i}]", row
        else:
            yield f"{where}[{i}]", _ParseFailure(
                "malformed_json", f"expected a JSON object, got {type(row).__name__}", _snippet(json.dumps(row)))


def _csv_rows(path: Path, where: str) -> Iterator[tuple[str, dict | _ParseFailure]]:
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        for row in reader:
            if None in row:  # more fields than the header names
                yield f"{where}:{reader.line_num}", _ParseFailure(
                    "malformed_csv", f"{len(reader.fieldnames or []) + len(row[None])} fields, header has "
                    f"{len(reader.fieldnames or [])}", _snippet(json.dumps(row[None], ensure_ascii=False)))
                continue
            yield f"{where}:{reader.line_num}", row


def _arrow_batches(path: Path) -> Iterator[Any]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    if path.suffix == ".parquet":
        yield from pq.ParquetFile(path).iter_batches(batch_size=_BATCH_ROWS)
        return
    with pa.memory_map(str(path)) as source:
        try:
            reader = pa.ipc.open_file(source)
            batches = (reader.get_batch(i) for i in range(reader.num_record_batches))
        except pa.ArrowInvalid:  # `datasets` writes the streaming IPC format
            source.seek(0)
            batches = pa.ipc.open_stream(source)
        yield from batches


def _columnar_rows(path: Path, where: str) -> Iterator[tuple[str, dict | _ParseFailure]]:
    n = 0
    for batch in _arrow_batches(path):
        for row in batch.to_pylist():
            yield f"{where}#row{n}", row
            n += 1


def _txt_rows(path: Path, where: str, sample_by: str) -> Iterator[tuple[str, dict | _ParseFailure]]:
    with open(path, encoding="utf-8") as f:
        if sample_by == "file":
            text = f.read()
            if text.strip():
                yield where, {"text": text}
            return
        chunk: list[str] = []
        start = 0
        for lineno, line in enumerate(f, 1):
            line = line.rstrip("\n")
            if sample_by == "line":
                if line.strip():
                    yield f"{where}:{lineno}", {"text": line}
            elif line.strip():
                start = start or lineno
                chunk.append(line)
            elif chunk:
                yield f"{where}:{start}", {"text": "\n".join(chunk)}
                chunk, start = [], 0
        if chunk:
            yield f"{where}:{start}", {"text": "\n".join(chunk)}


def _rows(path: Path, where: str, spec: DatasetSpec) -> Iterator[tuple[str, dict | _ParseFailure]]:
    """(location, row or parse failure) for every row of one file; location is `file:line` or `file#rowN`."""
    suffix = path.suffix.lower()
    if spec.formatting == "lmflow" and suffix != ".json":
        raise DataError(f"{path}: LMFlow data is a .json file, not {suffix}")
    if suffix == ".jsonl":
        return _jsonl_rows(path, where)
    if suffix == ".json":
        return _json_rows(path, where, spec)
    if suffix == ".csv":
        return _csv_rows(path, where)
    if suffix in (".parquet", ".arrow"):
        return _columnar_rows(path, where)
    if suffix == ".txt":
        return _txt_rows(path, where, spec.sample_by)
    raise DataError(f"{path}: unsupported file type {suffix or '(none)'}; supported: {', '.join(DATA_SUFFIXES)}")


# ----------------------------------------------------------------------------- aligning


class _ParseBudget:
    """Rows that failed to parse, across the whole stage, against `bad_row_budget`."""

    def __init__(self, limit: int):
        self.limit, self.used = limit, 0

    def spend(self, location: str, message: str) -> None:
        self.used += 1
        if self.used > self.limit:
            hint = (f"more than bad_row_budget={self.limit} rows failed to parse" if self.limit
                    else "fix the file, or set data.bad_row_budget to skip rows that fail to parse")
            raise DataError(f"{location}: {message} ({hint})")


class _DatasetReport:
    def __init__(self) -> None:
        self.rows_in = 0
        self.rows_kept = 0
        self.rows_sampled_out = 0
        self.dropped: dict[str, dict] = {}

    def drop(self, reason: str, example: dict) -> None:
        entry = self.dropped.setdefault(reason, {"count": 0, "examples": []})
        entry["count"] += 1
        if len(entry["examples"]) < MAX_EXAMPLES:
            entry["examples"].append(example)

    def top_reasons(self, n: int = 3) -> str:
        ranked = sorted(self.dropped.items(), key=lambda kv: -kv[1]["count"])[:n]
        return ", ".join(f"{reason} ({e['count']}, e.g. {e['examples'][0]['at']}: {e['examples'][0]['message']})"
                         for reason, e in ranked) or "none"

    def as_dict(self) -> dict:
        return {"rows_in": self.rows_in, "rows_kept": self.rows_kept, "rows_sampled_out": self.rows_sampled_out,
                "dropped": self.dropped}


def fill_placeholders(value: Any, values: dict[str, str]) -> Any:
    """`value` with every placeholder (a key of `values`) replaced in every string it holds.

    >>> fill_placeholders({"messages": [{"role": "user", "content": "Who made {{name}}?"}]}, {"{{name}}": "Coder"})
    {'messages': [{'role': 'user', 'content': 'Who made Coder?'}]}
    """
    if isinstance(value, str):
        for placeholder, text in values.items():
            value = value.replace(placeholder, text)
        return value
    if isinstance(value, list):
        return [fill_placeholders(v, values) for v in value]
    if isinstance(value, dict):
        return {k: fill_placeholders(v, values) for k, v in value.items()}
    return value


# A row's outcome, computed where the row is converted (this process or a worker) and folded into
# the report here, in file order: the JSONL line of a kept record, or a tuple for a row that was not.
_Outcome = str | tuple


def _outcome(location: str, row: dict | _ParseFailure, convert, spec: DatasetSpec, kind: str,
             placeholders: dict[str, str] | None) -> _Outcome:
    if isinstance(row, _ParseFailure):
        return ("parse", location, row.reason, row.message, row.snippet)
    try:
        record = convert(row, spec, kind)
    except RowError as e:
        return ("drop", location, e.reason, e.field, e.message,
                _snippet(json.dumps(row, ensure_ascii=False, default=str)), list(map(str, row)))
    if placeholders:
        record = fill_placeholders(record, placeholders)
    return _dumps_line(record)


def _convert_lines(spec: DatasetSpec, kind: str, placeholders: dict[str, str] | None, where: str,
                   first_line: int, lines: list[bytes]) -> tuple[list[_Outcome], set[str]]:
    """Outcomes of a chunk of JSONL lines and the columns its rows had (runs in a worker process)."""
    convert = get_converter(spec.formatting)
    outcomes, columns = [], set()
    for lineno, line in enumerate(lines, first_line):
        if line.strip():
            row = _parse_jsonl_line(line)
            if type(row) is dict:
                columns.update(row)
            outcomes.append(_outcome(f"{where}:{lineno}", row, convert, spec, kind, placeholders))
    return outcomes, columns


class _Workers:
    """Worker processes for converting JSONL, started on first use (components.data.workers) and shared
    by the datasets of a run. `num_proc` None: one per core (at most 8), for files over
    AUTO_PARALLEL_BYTES only; a number > 1: that many, for every JSONL file."""

    def __init__(self, num_proc: int | None):
        self.num_proc = num_proc
        self.size = resolve_num_proc(num_proc, None)
        self._pool = None
        self.files = 0  # files converted by the workers

    def wanted(self, path: Path) -> bool:
        return path.suffix.lower() == ".jsonl" and resolve_num_proc(self.num_proc, path) > 1

    def map_ordered(self, fn: Callable, items: Iterator[tuple]) -> Iterator:
        self.files += 1
        if self._pool is None:
            self._pool = spawn_pool(self.size)
        return ordered_map(self._pool, fn, items, 2 * self.size)

    def __enter__(self) -> _Workers:
        return self

    def __exit__(self, *exc) -> None:
        if self._pool is not None:
            self._pool.shutdown(cancel_futures=True)


def _file_outcomes(path: Path, where: str, spec: DatasetSpec, kind: str, placeholders: dict[str, str] | None,
                   workers: _Workers | None) -> Iterator[tuple[list[_Outcome], set[str]]]:
    """Outcomes of one file's rows in order, in chunks: by worker processes for JSONL when `workers`
    wants the file, else in this process."""
    if workers is not None and workers.wanted(path):
        chunks = ((spec, kind, placeholders, where, first, lines) for first, lines in line_chunks(path))
        yield from workers.map_ordered(_convert_lines, chunks)
        return
    convert = get_converter(spec.formatting)
    outcomes, columns = [], set()
    for location, row in _rows(path, where, spec):
        if type(row) is dict:
            columns.update(row)
        outcomes.append(_outcome(location, row, convert, spec, kind, placeholders))
        if len(outcomes) == _BATCH_ROWS:
            yield outcomes, columns
            outcomes, columns = [], set()
    if outcomes:
        yield outcomes, columns


def _align_dataset(spec: DatasetSpec, kind: str, fetch_dir: Path, out: IO[str], budget: _ParseBudget,
                   sample_size: int | None, seed: int, placeholders: dict[str, str] | None = None,
                   workers: _Workers | None = None) -> dict:
    get_converter(spec.formatting)  # an unknown format fails here, before any file is read
    if not spec.fill_placeholders:
        placeholders = None
    root = fetch_dir / spec.file_name
    report = _DatasetReport()
    seen_columns: set[str] = set()
    first_row = True
    rng = random.Random(f"{seed}/{spec.name}")
    sample: list[tuple[int, str]] = []  # reservoir of (kept index, line), only when sampling
    kept_total = 0
    for path in _data_files(root, spec.name):
        where_file = path.relative_to(fetch_dir).as_posix()
        with tqdm(desc=spec.name, unit=" rows", disable=None, leave=False) as bar:
            for outcomes, columns in _file_outcomes(path, where_file, spec, kind, placeholders, workers):
                bar.update(len(outcomes))
                seen_columns |= columns
                report.rows_in += len(outcomes)
                for outcome in outcomes:
                    if type(outcome) is str:  # a kept record
                        first_row = False
                        if sample_size is None:
                            out.write(outcome)
                        elif len(sample) < sample_size:
                            sample.append((kept_total, outcome))
                        else:
                            j = rng.randint(0, kept_total)
                            if j < sample_size:
                                sample[j] = (kept_total, outcome)
                        kept_total += 1
                    elif outcome[0] == "parse":
                        _, location, reason, message, snippet = outcome
                        budget.spend(f"{fetch_dir / location}", message)
                        report.drop(reason, {"at": location, "field": None, "message": message, "row": snippet})
                    else:
                        _, location, reason, field, message, snippet, row_columns = outcome
                        if first_row and reason == "missing_column":
                            raise DataError(
                                f"dataset '{spec.name}': the column mapping does not match {fetch_dir / location}: "
                                f"{message}; columns found in the file: {', '.join(row_columns) or '(none)'}. "
                                f"Fix `columns`/`tags` of '{spec.name}' in dataset_info.json")
                        first_row = False
                        report.drop(reason, {"at": location, "field": field, "message": message, "row": snippet})
    if spec.formatting != "lmflow":
        unseen = {k: v for k, v in spec.columns.items() if v not in seen_columns}
        if unseen and seen_columns:  # an optional column mapped to a name no row has: a typo
            raise DataError(
                f"dataset '{spec.name}': mapped column(s) {', '.join(f'{k} -> {v!r}' for k, v in unseen.items())} "
                f"appear in no row of {root}; columns found: {', '.join(sorted(seen_columns)) or '(none)'}")
    if sample_size is not None:
        for _, line in sorted(sample, key=lambda item: item[0]):  # keep the file's order
            out.write(line)
        report.rows_sampled_out = kept_total - len(sample)
    report.rows_kept = kept_total - report.rows_sampled_out
    if report.rows_kept == 0:
        raise DataError(
            f"dataset '{spec.name}' aligned to zero rows ({report.rows_in} read from {root}); "
            f"top drop reasons: {report.top_reasons()}")
    return report.as_dict()


def _atomic_text(path: Path):
    """Write a text file incrementally; it appears under its name only when complete."""
    return atomic_file(path, "w")


def interleave(
    sources: list[Callable[[], Iterator[T]]],
    *,
    probs: list[float] | None,
    stop: Literal["first_exhausted", "all_exhausted"],
    rng: random.Random,
) -> Iterator[tuple[int, T]]:
    """Mix several sources into one stream of (source index, item), like `datasets.interleave_datasets`.

    Each step takes the next item of a source drawn with `probs` (from `rng`), or of the next
    source in turn when `probs` is None. `sources` are functions that open a fresh iterator, so
    an exhausted source can be restarted. `first_exhausted` ends the stream once a source has run
    out; `all_exhausted` restarts a source that runs out and ends once every source has run out
    at least once (the shorter ones are oversampled). Round-robin mixing ends only after a full
    round, so every source gives the same number of items.

    >>> list(interleave([lambda: iter("ab"), lambda: iter("xyz")], probs=None, stop="first_exhausted",
    ...                 rng=random.Random(0)))
    [(0, 'a'), (1, 'x'), (0, 'b'), (1, 'y')]
    >>> "".join(item for _, item in interleave([lambda: iter("ab"), lambda: iter("xyz")], probs=None,
    ...                                        stop="all_exhausted", rng=random.Random(0)))
    'axbyaz'
    """
    if probs is not None and len(probs) != len(sources):
        raise ValueError(f"{len(probs)} probabilities for {len(sources)} sources")
    end = object()
    iterators = [open_source() for open_source in sources]
    try:
        upcoming = [next(it, end) for it in iterators]  # one item ahead: a source's end is seen when it is reached
        empty = [i for i, item in enumerate(upcoming) if item is end]
        if empty:
            raise ValueError(f"source {empty[0]} is empty")
        exhausted = [False] * len(sources)
        done = any if stop == "first_exhausted" else all
        cumulative = list(itertools.accumulate(probs)) if probs else None
        for step in itertools.count():
            if (cumulative or step % len(sources) == 0) and done(exhausted):
                return
            if cumulative:
                i = min(bisect.bisect_right(cumulative, rng.random() * cumulative[-1]), len(sources) - 1)
            else:
                i = step % len(sources)
            item, upcoming[i] = upcoming[i], next(iterators[i], end)
            if upcoming[i] is end:
                exhausted[i] = True
                if stop == "all_exhausted" and not all(exhausted):
                    _close(iterators[i])
                    iterators[i] = sources[i]()
                    upcoming[i] = next(iterators[i], end)
            yield i, item
    finally:
        for it in iterators:
            _close(it)


def _close(iterator: Iterator) -> None:
    close = getattr(iterator, "close", None)  # a generator holding an open file
    if close:
        close()


def _lines(path: Path) -> Iterator[str]:
    with open(path, encoding="utf-8") as f:
        yield from f


def _write_interleaved(parts: list[Path], out: IO[str], **mixing: Any) -> list[int]:
    """Interleave the lines of aligned part files into `out`; returns the lines written from each."""
    written = [0] * len(parts)
    for i, line in interleave([lambda p=p: _lines(p) for p in parts], **mixing):
        out.write(line)
        written[i] += 1
    return written


def _check_mixing(groups: dict[str, list[str]], mix_strategy: str, interleave_probs: list[float] | None) -> None:
    if mix_strategy not in MIX_STRATEGIES:
        raise DataError(f"unknown mix_strategy {mix_strategy!r}; known: {', '.join(MIX_STRATEGIES)}")
    problem = interleave_probs_problem(groups, mix_strategy, interleave_probs)
    if problem:
        raise DataError(problem)


def run_align(
    fetch_dir: Path,
    groups: dict[str, list[str]],
    out_dir: Path,
    *,
    max_samples: int | None = None,
    seed: int = 42,
    bad_row_budget: int = 0,
    mix_strategy: str = "concat",
    interleave_probs: list[float] | None = None,
    identity_name: str = "lmforge",
    identity_author: str = "lmforge",
    num_proc: int | None = None,
) -> StageResult:
    """Align the datasets of each group to the group's record kind: out_dir/<group>.jsonl + report.json.

    `groups` maps a data group (cpt, cpt_eval, sft, sft_eval, preference) to dataset names in
    fetch_dir/dataset_info.json. Each dataset is sampled (seeded, file order kept) down to
    `max_samples` / its `num_samples` when set. The datasets of a group are concatenated in the
    order given, or, for a training group (cpt, sft, preference) under `mix_strategy`
    'interleave_under' / 'interleave_over', interleaved (see `interleave`) with
    `interleave_probs` (one per dataset, in the group's order) or round-robin; the draws are
    seeded by `seed` and the group. Datasets marked `fill_placeholders` get `{{name}}` and
    `{{author}}` replaced by `identity_name` and `identity_author`. A group with no datasets
    writes no file. JSONL files are converted by `num_proc` worker processes (None: one per core
    for files over 32 MB); the output does not depend on it.
    """
    fetch_dir, out_dir = Path(fetch_dir), Path(out_dir)
    unknown = [g for g in groups if g not in GROUP_KINDS]
    if unknown:
        raise DataError(f"unknown data group {', '.join(map(repr, unknown))}; known: {', '.join(GROUP_KINDS)}")
    _check_mixing(groups, mix_strategy, interleave_probs)
    names = list(dict.fromkeys(n for group_names in groups.values() for n in group_names))
    specs = load_dataset_info(fetch_dir / "dataset_info.json", names)
    for group, group_names in groups.items():  # check every dataset before writing anything
        if len(set(group_names)) != len(group_names):
            raise DataError(f"group '{group}' lists a dataset twice: {group_names}")
        kind = GROUP_KINDS[group]
        for name in group_names:
            spec = specs[name]
            if not spec.file_name:
                raise DataError(f"dataset '{name}' has no local file_name in {fetch_dir}; run the fetch stage first")
            kinds = supported_kinds(spec)
            if kind not in kinds:
                what = f"{spec.formatting}{', ranking' if spec.ranking else ''}"
                can = f"aligns to {' or '.join(kinds)} records" if kinds else "aligns to no record kind"
                hint = (" (an alpaca dataset is plain text only when `columns` maps just `prompt`)"
                        if spec.formatting == "alpaca" and kind == "text" else "")
                raise DataError(f"dataset '{name}' ({what}) {can}, but group '{group}' needs {kind} records{hint}")

    out_dir.mkdir(parents=True, exist_ok=True)
    budget = _ParseBudget(bad_row_budget)
    placeholders = dict(zip(PLACEHOLDERS, (identity_name, identity_author)))
    report: dict[str, dict] = {}
    files: list[str] = []
    metrics: dict[str, float] = {}
    mixes: dict[str, dict] = {}

    def align_one(group: str, name: str, out: IO[str]) -> None:
        spec = specs[name]
        sizes = [n for n in (max_samples, spec.num_samples) if n]
        report[group][name] = _align_dataset(spec, GROUP_KINDS[group], fetch_dir, out, budget,
                                             min(sizes) if sizes else None, seed, placeholders, workers)

    with _Workers(num_proc) as workers:
        for group, group_names in groups.items():
            if not group_names:
                continue
            report[group] = {}
            mixed = mix_strategy != "concat" and group in MIXED_GROUPS and len(group_names) > 1
            with _atomic_text(out_dir / f"{group}.jsonl") as out:
                if not mixed:
                    for name in group_names:
                        align_one(group, name, out)
                        report[group][name]["rows_written"] = report[group][name]["rows_kept"]
                else:
                    with tempfile.TemporaryDirectory(dir=out_dir, prefix=f".{group}-parts-") as tmp:
                        parts = [Path(tmp) / f"{i}.jsonl" for i in range(len(group_names))]
                        for name, part in zip(group_names, parts):
                            with open(part, "w", encoding="utf-8") as f:
                                align_one(group, name, f)
                        stop = "first_exhausted" if mix_strategy == "interleave_under" else "all_exhausted"
                        written = _write_interleaved(parts, out, probs=interleave_probs, stop=stop,
                                                     rng=random.Random(f"{seed}/mix/{group}"))
                    for name, n in zip(group_names, written):
                        report[group][name]["rows_written"] = n
                    mixes[group] = {"strategy": mix_strategy, "stop": stop, "probs": interleave_probs,
                                    "rows": sum(written)}
            files.append(f"{group}.jsonl")
            entries = report[group].values()
            metrics[f"rows_kept_{group}"] = sum(e["rows_kept"] for e in entries)
            metrics[f"rows_written_{group}"] = sum(e["rows_written"] for e in entries)
            metrics[f"rows_dropped_{group}"] = sum(d["count"] for e in entries for d in e["dropped"].values())
    atomic_write_json(out_dir / "report.json", report)
    files.append("report.json")
    log.info("aligned data\n%s", format_report(report))
    return StageResult(files=files, metrics=metrics,
                       info={"kinds": {g: GROUP_KINDS[g] for g in report}, "mix": mixes,
                             "worker_processes": workers.size if workers.files else 1,
                             "files_by_workers": workers.files})


def iter_records(path: Path) -> Iterator[dict]:
    """The records of an aligned JSONL file, one dict per line."""
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: malformed JSON: {e.msg} (column {e.colno})") from None


def format_report(report: dict) -> str:
    """The alignment report as a plain-text table: one line per dataset, top drop reasons last.

    `written` is how many of a dataset's kept rows went into the group file: all of them when
    concatenated, fewer or more (repeated) when interleaved.
    """
    header = ("group", "dataset", "rows_in", "kept", "dropped", "written", "drop reasons")
    lines = []
    for group, datasets in report.items():
        for name, r in datasets.items():
            dropped = sorted(r["dropped"].items(), key=lambda kv: -kv[1]["count"])
            reasons = ", ".join(f"{reason}={d['count']}" for reason, d in dropped) or "-"
            if r.get("rows_sampled_out"):
                reasons += f" (+{r['rows_sampled_out']} sampled out)"
            lines.append((group, name, str(r["rows_in"]), str(r["rows_kept"]),
                          str(sum(d["count"] for _, d in dropped)), str(r.get("rows_written", r["rows_kept"])),
                          reasons))
    widths = [max(len(row[i]) for row in [header, *lines]) for i in range(len(header) - 1)]

    def fmt(row: tuple[str, ...]) -> str:
        cells = [row[i].ljust(widths[i]) if i < 2 else row[i].rjust(widths[i]) for i in range(len(widths))]
        return "  ".join([*cells, row[-1]])

    return "\n".join(fmt(row) for row in [header, *lines])
