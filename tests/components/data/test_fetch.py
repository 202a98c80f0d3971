"""The fetch stage: local files and directories, http(s) with sha256 pins and retries, fsspec URIs."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import fsspec
import pytest

from components.artifacts import sha256_file
from components.data.align import iter_records, run_align
from components.data.dataset_info import DataError
from components.data.fetch import retry_after_s, run_fetch
from components.errors import TransientError, is_transient

ROWS = (b'{"text": "E11.9 Type 2 diabetes mellitus without complications"}\n'
        b'{"text": "I10 Essential (primary) hypertension"}\n')
DIGEST = hashlib.sha256(ROWS).hexdigest()
pytestmark = pytest.mark.usefixtures("no_backoff")


def _info(tmp_path: Path, entries: dict) -> Path:
    path = tmp_path / "src" / "dataset_info.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(entries))
    return path


def test_local_file_is_copied_with_provenance(formats_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "fetch"
    result = run_fetch(formats_dir / "dataset_info.json", ["icd10_alpaca"], out)
    copied = out / "raw" / "icd10_alpaca" / "alpaca_sft.json"
    assert copied.read_bytes() == (formats_dir / "alpaca_sft.json").read_bytes()
    assert result.files == ["raw/icd10_alpaca/alpaca_sft.json", "dataset_info.json", "provenance.json"]
    assert result.metrics == {"bytes": copied.stat().st_size, "files": 1}
    info = json.loads((out / "dataset_info.json").read_text())
    assert list(info) == ["icd10_alpaca"]
    assert info["icd10_alpaca"]["file_name"] == "raw/icd10_alpaca/alpaca_sft.json"
    assert info["icd10_alpaca"]["columns"]["response"] == "output"
    prov = json.loads((out / "provenance.json").read_text())["icd10_alpaca"]
    assert prov["source"] == str((formats_dir / "alpaca_sft.json").resolve())
    assert prov["sha256"] == sha256_file(copied)
    assert prov["bytes"] == copied.stat().st_size
    assert prov["license"] == "CC0-1.0 (written for the lmforge tests)"


def test_local_directory_is_copied_whole(formats_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "fetch"
    result = run_fetch(formats_dir / "dataset_info.json", ["icd10_text_dir"], out)
    assert result.files[:2] == ["raw/icd10_text_dir/notes/chapter04.txt", "raw/icd10_text_dir/notes/chapter09.txt"]
    assert result.metrics["files"] == 2
    assert json.loads((out / "dataset_info.json").read_text())["icd10_text_dir"] == {
        "file_name": "raw/icd10_text_dir/notes", "formatting": "text", "sample_by": "paragraph"}
    prov = json.loads((out / "provenance.json").read_text())["icd10_text_dir"]
    assert set(prov["files"]) == {"raw/icd10_text_dir/notes/chapter04.txt", "raw/icd10_text_dir/notes/chapter09.txt"}
    assert prov["license"].startswith("not stated")


def test_missing_local_file_names_where_it_looked(tmp_path: Path) -> None:
    info = _info(tmp_path, {"d": {"file_name": "nowhere.jsonl"}})
    with pytest.raises(DataError, match=r"dataset 'd': file_name 'nowhere.jsonl' not found \(looked at .*src/nowhere"):
        run_fetch(info, ["d"], tmp_path / "fetch")


def test_a_directory_holding_a_symlink_that_leads_out_is_not_copied(tmp_path: Path) -> None:
    (tmp_path / "secret.txt").write_text("not data\n")
    notes = tmp_path / "src" / "notes"
    notes.mkdir(parents=True)
    (notes / "a.txt").write_text("I10 Essential (primary) hypertension\n")
    (notes / "b.txt").symlink_to(tmp_path / "secret.txt")
    info = _info(tmp_path, {"d": {"file_name": "notes", "formatting": "text"}})
    with pytest.raises(DataError, match=r"dataset 'd': file_name 'notes' leads outside .*allow_outside_paths"):
        run_fetch(info, ["d"], tmp_path / "fetch")
    assert not (tmp_path / "fetch" / "raw" / "d").exists()
    run_fetch(info, ["d"], tmp_path / "allowed", allow_outside=True)  # the user's opt-in
    assert (tmp_path / "allowed" / "raw" / "d" / "notes" / "b.txt").read_text() == "not data\n"


def test_http_download_with_a_correct_pin(http_server, tmp_path: Path) -> None:
    base, handler = http_server
    handler.files = {"/icd10/corpus.jsonl": ROWS}
    info = _info(tmp_path, {"d": {"url": f"{base}/icd10/corpus.jsonl", "sha256": DIGEST, "formatting": "text",
                                  "tags": {"license": "public domain (ICD-10-CM)"}}})
    out = tmp_path / "fetch"
    result = run_fetch(info, ["d"], out)
    assert (out / "raw" / "d" / "corpus.jsonl").read_bytes() == ROWS
    assert result.metrics == {"bytes": len(ROWS), "files": 1}
    entry = json.loads((out / "dataset_info.json").read_text())["d"]
    assert entry == {"file_name": "raw/d/corpus.jsonl", "formatting": "text",
                     "tags": {"license": "public domain (ICD-10-CM)"}}
    prov = json.loads((out / "provenance.json").read_text())["d"]
    assert (prov["source"], prov["sha256"], prov["sha256_pinned"]) == (f"{base}/icd10/corpus.jsonl", DIGEST, True)
    run_align(out, {"cpt": ["d"]}, tmp_path / "align")  # the fetched copy is what align reads
    assert [r["text"][:5] for r in iter_records(tmp_path / "align" / "cpt.jsonl")] == ["E11.9", "I10 E"]


def test_http_download_with_a_wrong_pin_names_both_digests(http_server, tmp_path: Path) -> None:
    base, handler = http_server
    handler.files = {"/corpus.jsonl": ROWS}
    info = _info(tmp_path, {"d": {"url": f"{base}/corpus.jsonl", "sha256": "0" * 64, "formatting": "text"}})
    with pytest.raises(DataError) as e:
        run_fetch(info, ["d"], tmp_path / "fetch")
    assert f"sha256 mismatch for {base}/corpus.jsonl: expected {'0' * 64}, got {DIGEST}" in str(e.value)
    assert not list((tmp_path / "fetch" / "raw").iterdir())  # nothing unverified left behind, not even a temp dir


def test_http_download_retries_a_failing_server(http_server, tmp_path: Path) -> None:
    base, handler = http_server
    handler.files, handler.fail_first = {"/corpus.jsonl": ROWS}, 2
    info = _info(tmp_path, {"d": {"url": f"{base}/corpus.jsonl", "sha256": DIGEST, "formatting": "text"}})
    run_fetch(info, ["d"], tmp_path / "fetch", retries=3)
    assert handler.requests == ["/corpus.jsonl"] * 3
    assert (tmp_path / "fetch" / "raw" / "d" / "corpus.jsonl").read_bytes() == ROWS


def test_http_download_gives_up_after_its_retries_still_transient(http_server, tmp_path: Path) -> None:
    base, handler = http_server
    handler.files, handler.fail_first = {"/corpus.jsonl": ROWS}, 10
    info = _info(tmp_path, {"d": {"url": f"{base}/corpus.jsonl", "formatting": "text"}})
    with pytest.raises(TransientError, match=r"download of .*/corpus.jsonl failed after 3 attempts: HTTP 503") as e:
        run_fetch(info, ["d"], tmp_path / "fetch", retries=2)
    assert len(handler.requests) == 3
    assert is_transient(e.value) and not isinstance(e.value, DataError)  # whatever runs the stage may retry it


def test_http_retry_waits_as_retry_after_says(http_server, tmp_path: Path) -> None:
    base, handler = http_server
    handler.files, handler.fail_first, handler.retry_after = {"/corpus.jsonl": ROWS}, 1, "1"
    info = _info(tmp_path, {"d": {"url": f"{base}/corpus.jsonl", "formatting": "text"}})
    run_fetch(info, ["d"], tmp_path / "fetch")  # backoff is 0 s in these tests: the wait is the server's
    assert handler.requests == ["/corpus.jsonl"] * 2
    assert 0.95 <= handler.times[1] - handler.times[0] < 5
    assert (tmp_path / "fetch" / "raw" / "d" / "corpus.jsonl").read_bytes() == ROWS


@pytest.mark.parametrize("status", [404, 403, 410])
def test_http_client_errors_are_not_retried(http_server, tmp_path: Path, status: int) -> None:
    base, handler = http_server
    handler.fail_first, handler.fail_status = 10, status
    info = _info(tmp_path, {"d": {"url": f"{base}/missing.jsonl", "formatting": "text"}})
    with pytest.raises(DataError, match=rf"download of {base}/missing.jsonl failed: HTTP {status}") as e:
        run_fetch(info, ["d"], tmp_path / "fetch")
    assert len(handler.requests) == 1
    assert not is_transient(e.value)


def test_http_rate_limit_is_retried(http_server, tmp_path: Path) -> None:
    base, handler = http_server
    handler.files, handler.fail_first, handler.fail_status = {"/corpus.jsonl": ROWS}, 1, 429
    info = _info(tmp_path, {"d": {"url": f"{base}/corpus.jsonl", "formatting": "text"}})
    run_fetch(info, ["d"], tmp_path / "fetch")
    assert len(handler.requests) == 2


def test_retry_after_header_forms() -> None:
    import doctest

    from components.data import fetch

    result = doctest.testmod(fetch)
    assert result.attempted >= 2 and result.failed == 0
    assert retry_after_s(None) is None and retry_after_s("-5") is None
    assert retry_after_s("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0  # a date in the past: no wait


def test_local_file_errors_are_not_retried(tmp_path: Path) -> None:
    info = _info(tmp_path, {"d": {"file_name": "nowhere.jsonl"}, "u": {"url": f"file://{tmp_path}/nowhere.jsonl"}})
    for name in ("d", "u"):
        with pytest.raises(DataError) as e:
            run_fetch(info, [name], tmp_path / "fetch")
        assert not is_transient(e.value)


def test_fsspec_uri_file_and_directory(tmp_path: Path) -> None:
    fs = fsspec.filesystem("memory")
    fs.pipe("/lmforge-test/corpus.jsonl", ROWS)
    fs.pipe("/lmforge-test/notes/a.txt", b"E11.9 Type 2 diabetes mellitus without complications\n")
    fs.pipe("/lmforge-test/notes/b.txt", b"I10 Essential (primary) hypertension\n")
    try:
        info = _info(tmp_path, {
            "file": {"url": "memory://lmforge-test/corpus.jsonl", "sha256": DIGEST, "formatting": "text"},
            "dir": {"url": "memory://lmforge-test/notes", "formatting": "text"},
            "bad_pin": {"url": "memory://lmforge-test/corpus.jsonl", "sha256": "f" * 64, "formatting": "text"},
        })
        out = tmp_path / "fetch"
        result = run_fetch(info, ["file", "dir"], out)
        assert (out / "raw" / "file" / "corpus.jsonl").read_bytes() == ROWS
        assert result.files[:3] == ["raw/file/corpus.jsonl", "raw/dir/notes/a.txt", "raw/dir/notes/b.txt"]
        assert json.loads((out / "dataset_info.json").read_text())["dir"]["file_name"] == "raw/dir/notes"
        with pytest.raises(DataError, match=f"expected {'f' * 64}, got {DIGEST}"):
            run_fetch(info, ["bad_pin"], tmp_path / "fetch2")
    finally:
        fs.rm("/lmforge-test", recursive=True)


def test_unknown_dataset_name_lists_known_ones(formats_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"dataset 'icd10_nope' not in .*dataset_info.json; known: icd10_alpaca, "):
        run_fetch(formats_dir / "dataset_info.json", ["icd10_alpaca", "icd10_nope"], tmp_path / "fetch")


def test_hub_dataset_is_saved_as_parquet(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The hub is offline in tests: `datasets.load_dataset` is replaced, the rest of the path is real."""
    import datasets

    calls = []

    def fake_load_dataset(path: str, **kwargs) -> datasets.Dataset:
        calls.append((path, kwargs))
        ds = datasets.Dataset.from_list([{"text": "E11.9 Type 2 diabetes mellitus without complications"}])
        ds.info.license = "mit"
        return ds

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    info = _info(tmp_path, {"d": {"hf_hub_url": "org/icd10", "subset": "en", "split": "validation",
                                  "formatting": "text"}})
    out = tmp_path / "fetch"
    result = run_fetch(info, ["d"], out)
    assert calls == [("org/icd10", {"name": "en", "data_dir": None, "split": "validation"})]
    assert result.files[0] == "raw/d/validation.parquet"
    assert json.loads((out / "dataset_info.json").read_text())["d"] == {
        "file_name": "raw/d/validation.parquet", "formatting": "text"}
    prov = json.loads((out / "provenance.json").read_text())["d"]
    assert (prov["source"], prov["license"]) == ("hf_hub:org/icd10", "mit")
    run_align(out, {"cpt": ["d"]}, tmp_path / "align")
    assert list(iter_records(tmp_path / "align" / "cpt.jsonl")) == [
        {"text": "E11.9 Type 2 diabetes mellitus without complications"}]


def _stand_in_hub(monkeypatch: pytest.MonkeyPatch, make) -> list:
    """Replace `datasets.load_dataset` (the hub is offline in tests) by `make(**kwargs)`; records the calls."""
    import datasets

    calls = []

    def fake_load_dataset(path: str, **kwargs):
        calls.append((path, kwargs))
        return make(**kwargs)

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    return calls


def test_hub_dataset_streams_to_jsonl(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """data.streaming: the real streaming reader of `datasets` (over a local file standing in for the
    hub) is written row by row as JSONL, which the align stage reads like any other file."""
    import datasets

    source = tmp_path / "hub" / "rows.jsonl"
    source.parent.mkdir()
    source.write_bytes(ROWS)
    real_load = datasets.load_dataset

    def stream(**kwargs):
        ds = real_load("json", data_files=str(source), split="train", streaming=kwargs.get("streaming", False))
        assert isinstance(ds, datasets.IterableDataset)
        return ds

    calls = _stand_in_hub(monkeypatch, stream)
    info = _info(tmp_path, {"d": {"hf_hub_url": "org/icd10", "split": "train", "formatting": "text"}})
    out = tmp_path / "fetch"
    result = run_fetch(info, ["d"], out, streaming=True)
    assert calls == [("org/icd10", {"name": None, "data_dir": None, "split": "train", "streaming": True})]
    assert result.files[0] == "raw/d/train.jsonl"
    assert json.loads((out / "dataset_info.json").read_text())["d"] == {"file_name": "raw/d/train.jsonl",
                                                                        "formatting": "text"}
    written = (out / "raw" / "d" / "train.jsonl").read_bytes().splitlines()
    assert [json.loads(line) for line in written] == [json.loads(line) for line in ROWS.splitlines()]
    run_align(out, {"cpt": ["d"]}, tmp_path / "align")
    assert [r["text"] for r in iter_records(tmp_path / "align" / "cpt.jsonl")] == [
        "E11.9 Type 2 diabetes mellitus without complications", "I10 Essential (primary) hypertension"]


def test_a_broken_stream_starts_over_and_leaves_no_partial_file(monkeypatch: pytest.MonkeyPatch,
                                                                tmp_path: Path) -> None:
    import datasets

    breaks = {"left": 1}

    def rows():
        yield {"text": "E11.9 Type 2 diabetes mellitus without complications"}
        if breaks["left"]:
            breaks["left"] -= 1
            raise ConnectionResetError("connection reset by peer")
        yield {"text": "I10 Essential (primary) hypertension"}

    _stand_in_hub(monkeypatch, lambda **_: datasets.IterableDataset.from_generator(rows))
    info = _info(tmp_path, {"d": {"hf_hub_url": "org/icd10", "formatting": "text"}})
    run_fetch(info, ["d"], tmp_path / "fetch", streaming=True)
    assert len((tmp_path / "fetch" / "raw" / "d" / "train.jsonl").read_bytes().splitlines()) == 2

    breaks["left"] = 10  # more breaks than retries: fails, and nothing half-written stays behind
    with pytest.raises(TransientError, match=r"streaming 'org/icd10' .* failed after 2 attempts: stream broke after 1 "
                                             r"rows: ConnectionResetError"):
        run_fetch(info, ["d"], tmp_path / "fetch2", retries=1, streaming=True)
    assert not list((tmp_path / "fetch2" / "raw").iterdir())


def test_a_streamed_row_json_cannot_hold_names_the_row(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import datasets

    rows = [{"text": "E11.9", "blob": b""}, {"text": "I10", "blob": b"\x89PNG"}]
    _stand_in_hub(monkeypatch, lambda **_: datasets.IterableDataset.from_generator(lambda: iter(rows)))
    info = _info(tmp_path, {"d": {"hf_hub_url": "org/icd10", "formatting": "text"}})
    with pytest.raises(DataError, match=r"dataset 'd': row 1 of the stream: Type is not JSON serializable: bytes\. "
                                        r"Streaming writes JSONL, .* set data.streaming: false"):
        run_fetch(info, ["d"], tmp_path / "fetch", streaming=True)


def test_streaming_keys_only_the_fetch_of_hub_datasets(tiny_model_dir: Path, tmp_path: Path) -> None:
    """data.streaming changes how a hub dataset is saved, so it is part of fetch's key where a hub
    dataset is fetched, and nowhere else (local sources, align)."""
    from components.pipeline import STAGES_BY_NAME, KeyFacts
    from tests.conftest import ROOT, tiny_pipeline_config

    shipped = ROOT / "data" / "icd10" / "dataset_info.json"
    entries = json.loads(shipped.read_text())
    for entry in entries.values():
        entry["file_name"] = str(shipped.parent / entry["file_name"])
    with_hub = _info(tmp_path, {**entries, "hub_rows": {"hf_hub_url": "org/rows", "formatting": "text"}})

    def keyed(streaming: bool, **overrides) -> dict:
        cfg = tiny_pipeline_config(tiny_model_dir, tmp_path, **{"data.streaming": streaming, **overrides})
        facts = KeyFacts(precision="fp32", tokenizer_digest="tok", model_digest="model")
        return {stage: STAGES_BY_NAME[stage].keyed_on(cfg, facts) for stage in ("fetch", "align")}

    assert keyed(False) == keyed(True)
    hub = {"data.dataset_info": with_hub, "data.cpt": "[icd10_corpus, hub_rows]",
           "data.allow_outside_paths": True}  # the shipped files, named by absolute path
    off, on = keyed(False, **hub), keyed(True, **hub)
    assert off["align"] == on["align"] and off["fetch"] != on["fetch"]
    assert on["fetch"]["sources"]["hub_rows"]["streaming"] is True


def test_a_pinned_hub_revision_is_what_is_loaded(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import datasets

    calls = _stand_in_hub(monkeypatch, lambda **_: datasets.Dataset.from_list([{"text": "I10"}]))
    info = _info(tmp_path, {"d": {"hf_hub_url": "org/icd10", "revision": "c" * 40, "formatting": "text"},
                            "bad": {"url": "https://example.org/x.jsonl", "revision": "main"}})
    out = tmp_path / "fetch"
    run_fetch(info, ["d"], out)
    assert calls == [("org/icd10", {"name": None, "data_dir": None, "split": "train", "revision": "c" * 40})]
    assert json.loads((out / "dataset_info.json").read_text())["d"] == {"file_name": "raw/d/train.parquet",
                                                                        "formatting": "text"}
    with pytest.raises(DataError, match=r"dataset 'bad': field '\(entry\)'.*revision pins a hub dataset"):
        run_fetch(info, ["bad"], tmp_path / "fetch2")
