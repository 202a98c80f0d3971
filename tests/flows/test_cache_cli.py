"""`lmforge stages` with a shared store says per stage whether the store holds its key complete (reading
manifests, downloading nothing), and `lmforge cache prune` cleans the store: a dry run lists and removes
nothing, a run removes and says how much it freed, and bad input is an error that says what to do."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from components.artifacts import StageResult, stage_dir, write_manifest
from components.shared_cache import SharedStageStore
from flows.cli import app
from tests.conftest import tiny_pipeline_config

DAY = 86400.0


@pytest.fixture(autouse=True)
def _no_store_from_the_environment(monkeypatch):
    monkeypatch.delenv("LMFORGE_SHARED_CACHE", raising=False)


def _made(out: Path, stage: str, key: str, files: dict[str, str]) -> dict:
    """A complete stage directory with these files (its manifest last)."""
    for rel, text in files.items():
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        (out / rel).write_text(text)
    return write_manifest(out, stage=stage, key=key, result=StageResult(files=sorted(files)), config={}, upstream={},
                          wall_s=0.0)


def _columns(output: str) -> dict[str, list[str]]:
    """stage -> the cells of its row in a rich table (the header's row under `stage`)."""
    rows = {}
    for line in output.splitlines():
        cells = [c.strip() for c in line.replace("┃", "│").split("│")][1:-1]
        if cells and cells[0]:
            rows[cells[0]] = cells
    return rows


def _stages(cfg, tmp_path: Path, *sets: str):
    from components.config import save_config

    path = tmp_path / "config.yaml"
    save_config(cfg, path)
    return CliRunner().invoke(app, ["stages", str(path), *[a for s in sets for a in ("--set", s)]], terminal_width=250)


def test_stages_says_which_keys_the_shared_store_holds_complete(tiny_model_dir, tmp_path):
    from flows.plan import describe_plan

    store_dir = tmp_path / "store"
    cfg = tiny_pipeline_config(tiny_model_dir, tmp_path / "ws", **{"cache.shared_url": store_dir.as_uri()})
    keys = {r["stage"]: r["key"] for r in describe_plan(cfg, "fp32")}
    store = SharedStageStore(store_dir.as_uri())
    # prepare: computed elsewhere, only in the store. fetch: here, and in the store without one of its files.
    store.publish(_made(tmp_path / "elsewhere", "prepare", keys["prepare"], {"model/config.json": "{}"}))
    fetched = _made(stage_dir(cfg.workspace, "fetch", keys["fetch"]), "fetch", keys["fetch"],
                    {"raw/rows.jsonl": "rows", "dataset_info.json": "{}", "provenance.json": "{}"})
    store.publish(fetched)
    sha = fetched["files"]["raw/rows.jsonl"]["sha256"]
    (store_dir / "blobs" / sha[:2] / sha).unlink()
    result = _stages(cfg, tmp_path)
    assert result.exit_code == 0, result.output
    rows = _columns(result.output)
    header = rows["stage"]
    cached, shared = header.index("cached"), header.index("shared")
    assert rows["prepare"][cached] == "no" and rows["prepare"][shared] == "yes"
    assert rows["prepare"][shared + 1] == "will download" and rows["align"][shared + 1] == "will run"
    assert rows["fetch"][cached] == "yes" and rows["fetch"][shared] == "incomplete"
    assert rows["align"][2] != "-" and rows["align"][shared] == "no"  # keyed on fetch, which is here
    assert rows["tokenize"][2] == "-" and rows["tokenize"][shared] == "-"  # no key before prepare is here
    assert f"shared store: {store_dir.as_uri()}" in result.output
    assert not (Path(cfg.workspace) / "artifacts" / "prepare").exists()  # nothing was downloaded

    without = _stages(cfg, tmp_path, "cache.shared_url=null")
    assert without.exit_code == 0 and "shared" not in _columns(without.output)["stage"]


def _store_with_entries(tmp_path: Path) -> tuple[Path, list[str]]:
    store_dir = tmp_path / "store"
    store = SharedStageStore(store_dir.as_uri())
    for key, age in (("k-new", 1 * DAY), ("k-old", 40 * DAY)):
        store.publish(_made(tmp_path / "ws" / key, "sft", key, {"adapter.bin": f"weights of {key}"}))
        then = time.time() - age
        os.utime(store_dir / "stages" / "sft" / f"{key}.json", (then, then))
    return store_dir, [f"cache.shared_url={store_dir.as_uri()}", f"workspace={tmp_path / 'ws'}"]


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _prune(sets: list[str], *args: str):
    return CliRunner().invoke(app, ["cache", "prune", *args, *[a for s in sets for a in ("--set", s)]],
                              terminal_width=250)


def test_cache_prune_dry_run_lists_what_would_go_and_removes_nothing(tmp_path):
    store_dir, sets = _store_with_entries(tmp_path)
    before = _files(store_dir)
    old_bytes = len((store_dir / "stages" / "sft" / "k-old.json").read_bytes()) + len("weights of k-old")
    result = _prune(sets, "--older-than", "30d", "--dry-run")
    assert result.exit_code == 0, result.output
    assert _files(store_dir) == before
    assert "would remove 1 entry, 1 blob, 0 partial uploads, 0 dead lease records" in result.output
    assert f"would free {old_bytes} B" in result.output
    rows = _columns(result.output)
    assert rows["sft"][1] == "k-old" and "k-new" not in result.output


def test_cache_prune_removes_by_age_and_by_keep(tmp_path):
    store_dir, sets = _store_with_entries(tmp_path)
    result = _prune(sets, "--older-than", "30d")
    assert result.exit_code == 0, result.output
    assert "removed 1 entry, 1 blob," in result.output and "freed" in result.output
    assert sorted(p.name for p in (store_dir / "stages" / "sft").iterdir()) == ["k-new.json"]
    store = SharedStageStore(store_dir.as_uri())
    store.publish(_made(tmp_path / "ws" / "k-newer", "sft", "k-newer", {"adapter.bin": "weights of k-newer"}))
    kept = _prune(sets, "--keep", "1")
    assert kept.exit_code == 0 and "removed 1 entry," in kept.output and _columns(kept.output)["sft"][1] == "k-new"
    assert store.entry_state("sft", "k-newer") == "complete" and store.entry_state("sft", "k-new") == "absent"


def test_cache_prune_errors_name_what_to_fix(tmp_path):
    bad = _prune([f"cache.shared_url={(tmp_path / 'store').as_uri()}"], "--older-than", "30 days")
    assert bad.exit_code == 2 and "--older-than" in bad.output and "30d" in bad.output
    missing = _prune([f"workspace={tmp_path / 'ws'}"], "--keep", "3")
    assert missing.exit_code == 2
    assert "cache.shared_url" in missing.output and "LMFORGE_SHARED_CACHE" in missing.output


def test_stages_with_an_unreadable_store_still_lists_the_local_plan(tiny_model_dir, tmp_path, monkeypatch):
    from components.shared_cache import SharedStageStore

    def refused(self, stage, key):
        raise PermissionError("403 Forbidden")

    monkeypatch.setattr(SharedStageStore, "entry", refused)
    cfg = tiny_pipeline_config(tiny_model_dir, tmp_path / "ws", **{"cache.shared_url": (tmp_path / "store").as_uri()})
    result = _stages(cfg, tmp_path)
    assert result.exit_code == 0, result.output
    assert "could not read the shared store: PermissionError: 403 Forbidden" in result.output
    rows = _columns(result.output)
    shared = rows["stage"].index("shared")
    assert rows["fetch"][shared] == "?" and rows["fetch"][2] != "-" and rows["fetch"][shared + 1] == "will run"
