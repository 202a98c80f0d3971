"""Shared fixtures: a working copy of tests/fixtures/formats and a local HTTP server."""

from __future__ import annotations

import http.server
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures" / "formats"

# The binary fixtures are written here rather than committed; their golden files are in golden/.
PARQUET_ROWS = [
    {"instruction": "What is the ICD-10-CM code for hypothyroidism, unspecified?", "input": "", "output": "E03.9",
     "system": "You are a medical coding assistant."},
    {"instruction": "Give the ICD-10-CM code for this diagnosis.",
     "input": "Chronic obstructive pulmonary disease, unspecified", "output": "J44.9", "system": None},
    {"instruction": "What is the ICD-10-CM code for major depressive disorder, single episode, unspecified?",
     "input": "", "output": "F32.9", "system": None},
]
ARROW_ROWS = [
    {"instruction": "What is the ICD-10-CM code for chronic kidney disease, stage 3 unspecified?", "input": "",
     "output": "N18.30"},
    {"instruction": "What is the ICD-10-CM code for sepsis, unspecified organism?", "input": "", "output": "A41.9"},
]

# The data group each fixture dataset aligns into (its record kind follows from the group).
FIXTURE_GROUPS = {
    "icd10_alpaca": "sft",
    "icd10_alpaca_csv": "sft",
    "icd10_alpaca_parquet": "sft",
    "icd10_alpaca_arrow": "sft",
    "icd10_pretrain": "cpt",
    "icd10_alpaca_preference": "preference",
    "icd10_sharegpt_tools": "sft",
    "icd10_sharegpt_preference": "preference",
    "icd10_openai": "sft",
    "icd10_text_lines": "cpt",
    "icd10_text_jsonl": "cpt_eval",
    "icd10_text_dir": "cpt",
    "icd10_lmflow": "sft",
    "icd10_lmflow_conversation": "sft",
    "icd10_lmflow_paired": "preference",
    "icd10_lmflow_trailing_user": "sft",
    "icd10_lmflow_loss": "sft",
    "icd10_lmflow_tool_results": "sft",
    "icd10_lmflow_paired_lists": "preference",
    "icd10_prompt_completion": "sft_eval",
    "icd10_prompt_completion_preference": "preference",
}


def write_formats(root: Path) -> Path:
    """tests/fixtures/formats copied to `root`, with the parquet and arrow files written."""
    shutil.copytree(FIXTURES, root, ignore=shutil.ignore_patterns("golden"))
    pq.write_table(pa.Table.from_pylist(PARQUET_ROWS), root / "alpaca_sft.parquet")
    table = pa.Table.from_pylist(ARROW_ROWS)
    with pa.ipc.new_stream(str(root / "alpaca_sft.arrow"), table.schema) as writer:  # the format `datasets` writes
        writer.write_table(table)
    return root


@pytest.fixture
def formats_dir(tmp_path: Path) -> Path:
    """tests/fixtures/formats copied to a temp dir, with the parquet and arrow files written."""
    return write_formats(tmp_path / "formats")


class _Handler(http.server.BaseHTTPRequestHandler):
    """Serves `files` (path -> bytes); the first `fail_first` requests get `fail_status`, with a
    Retry-After header when `retry_after` is set. `times` records when each request came."""

    files: dict[str, bytes] = {}
    fail_first = 0
    fail_status = 503
    retry_after: str | None = None
    requests: list[str] = []
    times: list[float] = []

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        cls = type(self)
        cls.requests.append(self.path)
        cls.times.append(time.monotonic())
        if len(cls.requests) <= cls.fail_first:
            self.send_response(cls.fail_status)
            if cls.retry_after is not None:
                self.send_header("Retry-After", cls.retry_after)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        body = cls.files.get(self.path)
        if body is None:
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def http_server() -> Iterator[tuple[str, type[_Handler]]]:
    """(base URL, handler class) of a server on 127.0.0.1; set handler.files, fail_first, fail_status, retry_after."""
    handler = type("Handler", (_Handler,), {"files": {}, "fail_first": 0, "requests": [], "times": []})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", handler
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def no_backoff(monkeypatch: pytest.MonkeyPatch) -> None:
    """Retries wait 0 s in tests."""
    monkeypatch.setattr("components.data.fetch._BACKOFF_S", 0.0)
