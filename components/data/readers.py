"""Rows of the user's data files, streamed: JSONL and CSV line by line, parquet and arrow in batches,
a .json document or a .txt file as a whole.

Each row comes with its location (`file:line`, `file[index]` or `file#rowN`, the file named as the
caller says: the user's own path or URL), or as a `ParseFailure` where it could not be parsed, so
the align stage can count it against `data.bad_row_budget`. Text must be UTF-8; other bytes fail
naming the file and line, never dumping them.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from components.data.dataset_info import DataError, DatasetSpec
from components.data.jsonl import BadLine, not_utf8, parse_line

DATA_SUFFIXES = (".json", ".jsonl", ".csv", ".parquet", ".arrow", ".txt")
# Metadata that `datasets.save_to_disk` writes next to its .arrow files: never rows.
_METADATA_NAMES = {"dataset_info.json", "state.json"}
SNIPPET_CHARS = 300
BATCH_ROWS = 1024


class ParseFailure:
    """A row that could not be parsed: why (its drop reason and a message) and a snippet of the raw text."""

    def __init__(self, reason: str, message: str, snippet: str):
        self.reason, self.message, self.snippet = reason, message, snippet


Row = dict | ParseFailure


def data_files(root: Path, name: str) -> list[Path]:
    """The data files of dataset `name` fetched to `root` (a file, or a directory read in sorted order)."""
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


def snippet(text: str) -> str:
    """At most SNIPPET_CHARS of a row, for reports."""
    return text if len(text) <= SNIPPET_CHARS else text[:SNIPPET_CHARS] + "..."


def parse_jsonl_line(line: str | bytes) -> Row:
    """A JSONL line as a row, or the failure that names why it is not one."""
    try:
        return parse_line(line)
    except BadLine as e:
        text = line.decode(errors="replace") if isinstance(line, bytes) else line
        return ParseFailure(e.reason, str(e), snippet(text.rstrip("\n")))


def _undecodable(path: Path, where: str) -> DataError:
    """The error for a text file that is not UTF-8: its first undecodable line, and what to do."""
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, 1):
            try:
                line.decode("utf-8")
            except UnicodeDecodeError as e:
                return DataError(f"{where}:{lineno}: {not_utf8(e, 'line')}")
    return DataError(f"{where}: not UTF-8")  # the file changed while it was read


def _utf8_checked(rows: Iterator[tuple[str, Row]], path: Path, where: str) -> Iterator[tuple[str, Row]]:
    """`rows` of a text file read as UTF-8; undecodable bytes fail naming the file and line."""
    try:
        yield from rows
    except UnicodeDecodeError:
        raise _undecodable(path, where) from None


def _jsonl_rows(path: Path, where: str) -> Iterator[tuple[str, Row]]:
    # Read as bytes: a line that is not UTF-8 is a bad row like a malformed one, counted against the budget.
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, 1):
            if line.strip():
                yield f"{where}:{lineno}", parse_jsonl_line(line)


def _json_rows(path: Path, where: str, spec: DatasetSpec) -> Iterator[tuple[str, Row]]:
    # A .json file is one document (LLaMA-Factory's list of rows, or LMFlow's object), read whole.
    try:
        with open(path, encoding="utf-8") as f:
            doc = json.load(f)
    except UnicodeDecodeError:
        raise _undecodable(path, where) from None
    except json.JSONDecodeError as e:
        if e.msg == "Extra data":  # JSON lines under a .json name, as `datasets` also accepts
            yield from _jsonl_rows(path, where)
            return
        raise DataError(f"{where}:{e.lineno}:{e.colno}: not valid JSON ({e.msg})") from None
    if spec.formatting == "lmflow":
        if not (isinstance(doc, dict) and isinstance(doc.get("instances"), list) and "type" in doc):
            raise DataError(f"{where}: an LMFlow file is an object {{\"type\": ..., \"instances\": [...]}}")
        for i, inst in enumerate(doc["instances"]):
            yield f"{where}[{i}]", {"type": doc["type"], "instance": inst}
        return
    if isinstance(doc, dict) and "instances" in doc:
        raise DataError(f"{where} looks like an LMFlow file; set \"formatting\": \"lmflow\" for '{spec.name}'")
    if not isinstance(doc, list):
        raise DataError(f"{where}: expected a JSON list of rows, got {type(doc).__name__}")
    for i, row in enumerate(doc):
        if isinstance(row, dict):
            yield f"{where}[{i}]", row
        else:
            yield f"{where}[{i}]", ParseFailure(
                "malformed_json", f"expected a JSON object, got {type(row).__name__}", snippet(json.dumps(row)))


def _csv_rows(path: Path, where: str) -> Iterator[tuple[str, Row]]:
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        for row in reader:
            if None in row:  # more fields than the header names
                yield f"{where}:{reader.line_num}", ParseFailure(
                    "malformed_csv", f"{len(reader.fieldnames or []) + len(row[None])} fields, header has "
                    f"{len(reader.fieldnames or [])}", snippet(json.dumps(row[None], ensure_ascii=False)))
                continue
            yield f"{where}:{reader.line_num}", row


def _arrow_batches(path: Path) -> Iterator[Any]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    if path.suffix == ".parquet":
        yield from pq.ParquetFile(path).iter_batches(batch_size=BATCH_ROWS)
        return
    with pa.memory_map(str(path)) as source:
        try:
            reader = pa.ipc.open_file(source)
            batches = (reader.get_batch(i) for i in range(reader.num_record_batches))
        except pa.ArrowInvalid:  # `datasets` writes the streaming IPC format
            source.seek(0)
            batches = pa.ipc.open_stream(source)
        yield from batches


def _columnar_rows(path: Path, where: str) -> Iterator[tuple[str, Row]]:
    n = 0
    for batch in _arrow_batches(path):
        for row in batch.to_pylist():
            yield f"{where}#row{n}", row
            n += 1


def _txt_rows(path: Path, where: str, sample_by: str) -> Iterator[tuple[str, Row]]:
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


def read_rows(path: Path, where: str, spec: DatasetSpec) -> Iterator[tuple[str, Row]]:
    """(location, row or parse failure) for every row of one file; `where` names the file in locations."""
    suffix = path.suffix.lower()
    if spec.formatting == "lmflow" and suffix != ".json":
        raise DataError(f"{where}: LMFlow data is a .json file, not {suffix}")
    if suffix == ".jsonl":
        return _jsonl_rows(path, where)
    if suffix == ".json":
        return _json_rows(path, where, spec)
    if suffix == ".csv":
        return _utf8_checked(_csv_rows(path, where), path, where)
    if suffix in (".parquet", ".arrow"):
        return _columnar_rows(path, where)
    if suffix == ".txt":
        return _utf8_checked(_txt_rows(path, where, spec.sample_by), path, where)
    raise DataError(f"{where}: unsupported file type {suffix or '(none)'}; supported: {', '.join(DATA_SUFFIXES)}")
