"""JSON Lines, read and written one way by every data stage: UTF-8, one JSON object per line.

Align reads the user's JSONL and writes the aligned groups; tokenize and evaluation read those
back. Lines are read as bytes and parsed by orjson (several times faster than json) where it
can; the standard library reads the rest (NaN, integers past 64 bits) and words the errors.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson

from components.data.dataset_info import DataError

TO_UTF8 = "convert the file to UTF-8, e.g. `iconv -f latin1 -t utf-8 FILE > FILE.utf8` (with the file's encoding)"


class BadLine(ValueError):
    """A line that is not a JSON object: `reason` is its drop reason (malformed_json or not_utf8)."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


def not_utf8(error: UnicodeDecodeError, unit: str) -> str:
    """A short description of undecodable bytes (never the bytes themselves), with what to do."""
    return f"not UTF-8 (byte 0x{error.object[error.start]:02x} at byte {error.start + 1} of the {unit}); {TO_UTF8}"


def parse_line(line: str | bytes) -> dict:
    """One JSONL line as a dict; `BadLine` says why it is not one.

    >>> parse_line(b'{"text": "I10"}')
    {'text': 'I10'}
    >>> parse_line(b'{"text": "caf\\xe9"}')  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    components.data.jsonl.BadLine: not UTF-8 (byte 0xe9 at byte 14 of the line); convert the file to UTF-8, ...
    """
    try:
        value = orjson.loads(line)
    except orjson.JSONDecodeError:
        value = _parse_slowly(line)
    if not isinstance(value, dict):
        raise BadLine("malformed_json", f"expected a JSON object, got {type(value).__name__}")
    return value


def _parse_slowly(line: str | bytes) -> Any:
    if isinstance(line, bytes):
        try:
            line = line.decode("utf-8")
        except UnicodeDecodeError as e:
            raise BadLine("not_utf8", not_utf8(e, "line")) from None
    try:
        return json.loads(line)
    except json.JSONDecodeError as e:
        raise BadLine("malformed_json", f"malformed JSON: {e.msg} (column {e.colno})") from None


def dumps_line(record: dict) -> str:
    """One JSONL line, UTF-8 kept as is; orjson where it can (str keys, no NaN), else the stdlib."""
    try:
        return orjson.dumps(record, option=orjson.OPT_APPEND_NEWLINE).decode()
    except TypeError:
        return json.dumps(record, ensure_ascii=False) + "\n"


def read_jsonl(path: Path) -> Iterator[tuple[int, dict]]:
    """(line number, record) for every non-blank line; a bad line fails naming `path:line`."""
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield lineno, parse_line(line)
            except BadLine as e:
                raise DataError(f"{path}:{lineno}: {e}") from None


def iter_records(path: Path) -> Iterator[dict]:
    """The records of an aligned JSONL file, one dict per line."""
    for _, record in read_jsonl(path):
        yield record
