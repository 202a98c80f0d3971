"""What a remote source holds now: ETag / Last-Modified / a content hash over HTTP, fsspec checksums,
the hub's commit (a stand-in for the hub), pins that skip the lookup, and unreachable sources that fall
back to the description-only key with a warning. The fetch stage's key follows the version."""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

import fsspec
import pytest

from components.config import load_config
from components.data.dataset_info import DatasetSpec
from components.data.source_versions import current_source_versions, resolve_source_versions, source_version
from components.pipeline import STAGES_BY_NAME, KeyFacts
from tests.conftest import ROOT
from tests.servers import free_port, serving_directory

ROWS = b'{"text": "E11.9 Type 2 diabetes mellitus without complications"}\n'
MORE = b'{"text": "I10 Essential (primary) hypertension"}\n'


def _url_spec(url: str, **fields) -> DatasetSpec:
    return DatasetSpec(name="remote", url=url, formatting="text", **fields)


def _write(path: Path, data: bytes, mtime: int) -> None:
    path.write_bytes(data)
    os.utime(path, (mtime, mtime))


@pytest.fixture
def served(tmp_path: Path):
    root = tmp_path / "served"
    root.mkdir()
    _write(root / "corpus.jsonl", ROWS, 1_700_000_000)
    return root


def test_an_etag_is_the_version_and_moves_with_the_file(served: Path) -> None:
    with serving_directory(served, "etag") as (base, handler):
        spec = _url_spec(f"{base}/corpus.jsonl")
        first = source_version(spec)
        assert first.startswith('etag:"') and source_version(spec) == first
        _write(served / "corpus.jsonl", ROWS + MORE, 1_700_000_100)
        assert source_version(spec) not in (None, first)
    assert {method for method, _ in handler.requests} == {"HEAD"}  # the body is not read


def test_last_modified_is_the_version_when_there_is_no_etag(served: Path) -> None:
    with serving_directory(served, "last-modified") as (base, handler):
        spec = _url_spec(f"{base}/corpus.jsonl")
        first = source_version(spec)
        assert first == "last-modified:Tue, 14 Nov 2023 22:13:20 GMT"
        os.utime(served / "corpus.jsonl", (1_700_000_100, 1_700_000_100))
        assert source_version(spec) == "last-modified:Tue, 14 Nov 2023 22:15:00 GMT"
    assert {method for method, _ in handler.requests} == {"HEAD"}


def test_without_etag_or_last_modified_the_content_is_hashed(served: Path) -> None:
    with serving_directory(served, "none") as (base, handler):
        spec = _url_spec(f"{base}/corpus.jsonl")
        assert source_version(spec) == f"sha256:{hashlib.sha256(ROWS).hexdigest()}"
        assert handler.requests == [("HEAD", "/corpus.jsonl"), ("GET", "/corpus.jsonl")]
        os.utime(served / "corpus.jsonl", (1_700_000_100, 1_700_000_100))  # touched, same bytes: same version
        assert source_version(spec) == f"sha256:{hashlib.sha256(ROWS).hexdigest()}"
        _write(served / "corpus.jsonl", ROWS + MORE, 1_700_000_200)
        assert source_version(spec) == f"sha256:{hashlib.sha256(ROWS + MORE).hexdigest()}"


def test_a_server_refusing_head_is_read_with_get(served: Path) -> None:
    with serving_directory(served, "etag") as (base, handler):
        handler.head_status = 405
        assert source_version(_url_spec(f"{base}/corpus.jsonl")) == f"sha256:{hashlib.sha256(ROWS).hexdigest()}"
        assert [m for m, _ in handler.requests] == ["HEAD", "GET"]


def test_a_sha256_pin_makes_no_request(served: Path) -> None:
    with serving_directory(served, "etag") as (base, handler):
        pinned = _url_spec(f"{base}/corpus.jsonl", sha256=hashlib.sha256(ROWS).hexdigest())
        assert resolve_source_versions({"remote": pinned}) == {}
        assert handler.requests == []


def test_an_unreachable_source_warns_naming_it_and_has_no_version(served: Path, caplog) -> None:
    caplog.set_level(logging.WARNING, "components.data.source_versions")
    with serving_directory(served, "etag") as (base, _):
        missing = _url_spec(f"{base}/gone.jsonl")
        down = DatasetSpec(name="down", url=f"http://127.0.0.1:{free_port()}/corpus.jsonl", formatting="text")
        assert resolve_source_versions({"remote": missing, "down": down}) == {}
    text = caplog.text
    assert (f"dataset 'remote': cannot ask {base}/gone.jsonl for its current version "
            f"(HEAD {base}/gone.jsonl: HTTP 404") in text
    assert "dataset 'down': cannot ask http://127.0.0.1:" in text and "ConnectionError" in text
    assert "keyed on its description alone" in text


def test_an_fsspec_object_is_versioned_by_its_checksum() -> None:
    fs = fsspec.filesystem("memory")
    fs.pipe("/lmforge-versions/corpus.jsonl", ROWS)
    fs.pipe("/lmforge-versions/notes/a.txt", b"E11.9\n")
    try:
        file = DatasetSpec(name="f", url="memory://lmforge-versions/corpus.jsonl", formatting="text")
        folder = DatasetSpec(name="d", url="memory://lmforge-versions/notes", formatting="text")
        first = resolve_source_versions({"f": file, "d": folder})
        assert first["f"].startswith("checksum:") and first["d"].startswith("checksums:")
        assert resolve_source_versions({"f": file, "d": folder}) == first
        fs.pipe("/lmforge-versions/notes/b.txt", b"I10\n")  # a new file in the directory
        fs.pipe("/lmforge-versions/corpus.jsonl", ROWS + MORE)
        second = resolve_source_versions({"f": file, "d": folder})
        assert second["f"] != first["f"] and second["d"] != first["d"]
        gone = DatasetSpec(name="g", url="memory://lmforge-versions/nothing.jsonl", formatting="text")
        assert resolve_source_versions({"g": gone}) == {}
    finally:
        fs.rm("/lmforge-versions", recursive=True)


class _StandInHub:
    """huggingface_hub's HfApi.dataset_info, offline: reports `commit` for every dataset, records the calls."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, commit: str):
        from huggingface_hub import HfApi

        self.commit, self.calls = commit, []
        stand_in = self

        class Info:
            def __init__(self, sha: str):
                self.sha = sha

        def dataset_info(_api, repo_id: str, **kwargs):
            stand_in.calls.append((repo_id, kwargs))
            return Info(stand_in.commit)

        monkeypatch.setattr(HfApi, "dataset_info", dataset_info)
        monkeypatch.setenv("HF_HUB_OFFLINE", "0")


def _config(tmp_path: Path, extra: dict):
    """The shipped data plus `extra` entries (all in the cpt group), on the default config."""
    shipped = ROOT / "data" / "icd10" / "dataset_info.json"
    entries = json.loads(shipped.read_text())
    for entry in entries.values():
        entry["file_name"] = str(shipped.parent / entry["file_name"])
    info = tmp_path / "src" / "dataset_info.json"
    info.parent.mkdir(parents=True, exist_ok=True)
    info.write_text(json.dumps({**entries, **extra}))
    return load_config(None, [f"workspace={tmp_path / 'ws'}", f"data.dataset_info={info}",
                              f"data.cpt=[icd10_corpus, {', '.join(extra)}]",
                              "data.allow_outside_paths=true"])  # the shipped files, named by absolute path


def _fetch_slice(cfg) -> dict:
    facts = KeyFacts(precision="fp32", tokenizer_digest="tok", model_digest="model",
                     source_versions=current_source_versions(cfg))
    return STAGES_BY_NAME["fetch"].keyed_on(cfg, facts)


def test_the_fetch_key_follows_the_hub_commit(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    hub = _StandInHub(monkeypatch, "a" * 40)
    cfg = _config(tmp_path, {"hub_rows": {"hf_hub_url": "org/rows", "formatting": "text"}})
    first = _fetch_slice(cfg)
    assert first["sources"]["hub_rows"]["version"] == "commit:" + "a" * 40
    assert _fetch_slice(cfg) == first  # same commit: same key
    hub.commit = "b" * 40
    second = _fetch_slice(cfg)
    assert second != first and second["sources"]["hub_rows"]["version"] == "commit:" + "b" * 40
    assert second["sources"]["icd10_corpus"] == first["sources"]["icd10_corpus"]
    assert [repo for repo, _ in hub.calls] == ["org/rows"] * 3


def test_a_pinned_hub_revision_makes_no_lookup(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    hub = _StandInHub(monkeypatch, "a" * 40)
    cfg = _config(tmp_path, {"hub_rows": {"hf_hub_url": "org/rows", "revision": "c" * 40, "formatting": "text"}})
    entry = _fetch_slice(cfg)["sources"]["hub_rows"]
    assert hub.calls == []
    assert entry["revision"] == "c" * 40 and "version" not in entry


def test_offline_the_hub_is_not_asked_and_the_recorded_commit_is_kept(monkeypatch: pytest.MonkeyPatch,
                                                                       tmp_path: Path, caplog) -> None:
    from components.data.data_changes import record_path

    hub = _StandInHub(monkeypatch, "a" * 40)
    cfg = _config(tmp_path, {"hub_rows": {"hf_hub_url": "org/rows", "formatting": "text"}})
    online = _fetch_slice(cfg)
    path = record_path(cfg)
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"sources": {"hub_rows": {"version": "commit:" + "a" * 40, "sha256": "x"}}}))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    caplog.set_level(logging.INFO, "components.data.source_versions")
    assert _fetch_slice(cfg) == online  # the last run's fetch is reused offline
    assert len(hub.calls) == 1
    assert ("HF_HUB_OFFLINE is set, so the hub is not asked for the current commit of org/rows; keyed on the one "
            f"the last run recorded (commit:{'a' * 40})") in caplog.text

    path.unlink()  # nothing recorded: the commit the local Hugging Face cache knows, else the description alone
    assert "version" not in _fetch_slice(cfg)["sources"]["hub_rows"]
    ref = tmp_path / "hf-cache" / "datasets--org--rows" / "refs" / "main"
    ref.parent.mkdir(parents=True)
    ref.write_text("d" * 40)
    assert _fetch_slice(cfg)["sources"]["hub_rows"]["version"] == "commit:" + "d" * 40
    assert len(hub.calls) == 1


def test_an_unreachable_hub_keys_the_fetch_on_the_description(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                              caplog) -> None:
    from huggingface_hub import HfApi

    def unreachable(_api, repo_id: str, **kwargs):
        raise OSError("Network is unreachable")

    monkeypatch.setattr(HfApi, "dataset_info", unreachable)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    cfg = _config(tmp_path, {"hub_rows": {"hf_hub_url": "org/rows", "formatting": "text"}})
    assert "version" not in _fetch_slice(cfg)["sources"]["hub_rows"]
    assert "dataset 'hub_rows': cannot ask org/rows for its current version (OSError: Network is unreachable)" \
        in caplog.text


def test_local_sources_are_not_asked_for(tmp_path: Path) -> None:
    cfg = _config(tmp_path, {})
    assert current_source_versions(cfg) == {}
