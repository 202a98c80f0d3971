"""Pruning the shared stage store (a local directory as the fsspec URL): entries go by age or beyond the newest N
of their stage, with the blobs only they name; a dry run removes nothing; an entry whose lease is held stays;
leftover `.part-*` uploads, blobs of a publish that died and dead leases go once they are older than the grace;
a reader never takes an entry pruned under it as complete."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from components.artifacts import StageResult, verify_manifest, write_manifest
from components.shared_cache import SharedStageStore
from components.shared_cache_prune import PRUNE_GRACE_S, parse_duration, plan_prune, prune, stored_entries

DAY = 86400.0


def _age(path: Path, seconds: float) -> None:
    then = time.time() - seconds
    os.utime(path, (then, then))


def _files(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_size for p in sorted(root.rglob("*")) if p.is_file()}


class Store:
    """A store in a local directory, and a workspace where its entries are computed before they are published."""

    def __init__(self, tmp_path: Path):
        self.root, self.ws = tmp_path / "store", tmp_path / "ws"
        self.store = SharedStageStore(self.root.as_uri(), lease_ttl_s=60)

    def publish(self, stage: str, key: str, files: dict[str, str], age_s: float = 0.0) -> dict:
        out = self.ws / stage / key
        for rel, text in files.items():
            (out / rel).parent.mkdir(parents=True, exist_ok=True)
            (out / rel).write_text(text)
        manifest = write_manifest(out, stage=stage, key=key, result=StageResult(files=sorted(files)), config={},
                                  upstream={}, wall_s=0.0)
        self.store.publish(manifest)
        _age(self.manifest(stage, key), age_s)
        return manifest

    def manifest(self, stage: str, key: str) -> Path:
        return self.root / "stages" / stage / f"{key}.json"

    def blob(self, manifest: dict, rel: str) -> Path:
        sha = manifest["files"][rel]["sha256"]
        return self.root / "blobs" / sha[:2] / sha


@pytest.fixture
def s(tmp_path) -> Store:
    return Store(tmp_path)


def test_durations_read_with_their_unit_and_a_bad_one_says_what_to_write():
    assert [parse_duration(t) for t in ("90s", "30m", "12h", "30d", "2w", " 1.5d ")] == [
        90, 1800, 12 * 3600, 30 * DAY, 14 * DAY, 1.5 * DAY]
    for bad in ("30", "d", "3x", "-1d", "", "12 h x"):
        with pytest.raises(ValueError, match=r"as a duration: .*30d"):
            parse_duration(bad)


def test_prune_by_age_removes_old_entries_and_the_blobs_only_they_name(s):
    old = s.publish("sft", "k-old", {"adapter.bin": "old weights", "shared.txt": "same in both"}, age_s=40 * DAY)
    new = s.publish("sft", "k-new", {"adapter.bin": "new weights", "shared.txt": "same in both"}, age_s=2 * DAY)
    s.publish("align", "k-a", {"rows.jsonl": "rows"}, age_s=35 * DAY)
    before = _files(s.root)
    plan = plan_prune(s.store, older_than_s=parse_duration("30d"))
    assert sorted((e.stage, e.key) for e, _ in plan.entries) == [("align", "k-a"), ("sft", "k-old")]
    assert {why for _, why in plan.entries} == {"older than --older-than"}
    done = prune(s.store, plan)
    assert not s.manifest("sft", "k-old").exists() and not s.blob(old, "adapter.bin").exists()
    assert s.blob(old, "shared.txt").exists()  # k-new names it too
    after = _files(s.root)
    assert done.freed_bytes == plan.freed_bytes == sum(before.values()) - sum(after.values())
    assert s.store.entry_state("sft", "k-new") == "complete" and s.store.entry_state("sft", "k-old") == "absent"
    fetched = s.store.fetch("sft", "k-new", s.ws / "elsewhere")
    assert fetched is not None and verify_manifest(fetched, deep=True) and fetched["digest"] == new["digest"]


def test_keep_n_keeps_the_newest_entries_of_each_stage(s):
    for i, age in enumerate((1, 5, 50, 60)):
        s.publish("sft", f"k{i}", {"w.bin": f"weights {i}"}, age_s=age * DAY)
    s.publish("align", "only", {"rows.jsonl": "rows"}, age_s=90 * DAY)
    plan = plan_prune(s.store, keep=2)
    assert sorted(e.key for e, _ in plan.entries) == ["k2", "k3"]
    assert {why for _, why in plan.entries} == {"beyond the newest 2"}
    # Both rules: only what both let go (the newest N stay however old; a recent one beyond N stays too).
    both = plan_prune(s.store, older_than_s=55 * DAY, keep=1)
    assert [e.key for e, _ in both.entries] == ["k3"]
    assert both.entries[0][1] == "older than --older-than, beyond the newest 1"
    prune(s.store, plan)
    assert [(e.stage, e.key) for e in stored_entries(s.store)] == [("sft", "k0"), ("sft", "k1"), ("align", "only")]
    assert plan_prune(s.store, keep=2).entries == []  # nothing more to do


def test_a_dry_run_plan_removes_nothing(s):
    s.publish("sft", "k-old", {"w.bin": "weights"}, age_s=40 * DAY)
    (s.root / "stages" / "sft" / "k-gone.json.part-abc").write_text("half")
    _age(s.root / "stages" / "sft" / "k-gone.json.part-abc", 2 * PRUNE_GRACE_S)
    before = _files(s.root)
    plan = plan_prune(s.store, older_than_s=DAY)
    assert len(plan.entries) == 1 and len(plan.blobs) == 1 and len(plan.partials) == 1
    assert plan.freed_bytes == sum(before.values())  # everything there would go
    assert _files(s.root) == before


def test_an_entry_whose_lease_is_held_is_kept_until_it_is_released(s):
    s.publish("sft", "k-busy", {"w.bin": "weights"}, age_s=40 * DAY)
    with s.store.claim("sft", "k-busy", s.ws / "busy", reuse=False) as fetched:  # a worker recomputes it (--from)
        assert fetched is None
        plan = plan_prune(s.store, older_than_s=DAY)
        assert plan.entries == [] and [e.key for e in plan.protected] == ["k-busy"]
        assert plan.blobs == {}  # its blobs are named by a manifest that stays
        prune(s.store, plan)
        assert s.store.entry_state("sft", "k-busy") == "complete"
    assert [e.key for e, _ in prune(s.store, plan_prune(s.store, older_than_s=DAY)).entries] == ["k-busy"]
    assert not s.manifest("sft", "k-busy").exists()


def test_a_lease_taken_after_the_plan_still_protects_its_entry(s):
    s.publish("sft", "k-late", {"w.bin": "weights"}, age_s=40 * DAY)
    plan = plan_prune(s.store, older_than_s=DAY)
    assert [e.key for e, _ in plan.entries] == ["k-late"]
    with s.store.claim("sft", "k-late", s.ws / "late", reuse=False):
        done = prune(s.store, plan)
    assert done.entries == [] and [e.key for e in done.protected] == ["k-late"]
    assert done.blobs == {}  # its manifest is still there and names them
    assert s.store.entry_state("sft", "k-late") == "complete"


def test_a_partially_published_entry_and_leftover_uploads_are_cleaned_after_the_grace(s):
    manifest = s.publish("sft", "k-died", {"w.bin": "weights", "cfg.json": "{}"})
    s.manifest("sft", "k-died").unlink()  # the publisher died after its blobs, before its manifest
    assert s.store.entry_state("sft", "k-died") == "absent"
    parts = [s.root / "stages" / "sft" / "k-x.json.part-1", s.root / "blobs" / "ab" / "ab12.part-2"]
    for part in parts:
        part.parent.mkdir(parents=True, exist_ok=True)
        part.write_text("half an upload")
    young = plan_prune(s.store)  # a publish in progress looks the same: nothing that recent goes
    assert young.blobs == {} and young.partials == {}
    orphans = [s.blob(manifest, "w.bin"), s.blob(manifest, "cfg.json")]
    for path in (*orphans, *parts):
        _age(path, PRUNE_GRACE_S + 60)
    done = prune(s.store, plan_prune(s.store))
    assert sorted(done.blobs) == sorted(str(p) for p in orphans) and sorted(done.partials) == sorted(map(str, parts))
    assert not any(p.exists() for p in (*orphans, *parts))
    assert done.entries == [] and done.freed_bytes == sum(len(t) for t in ("weights", "{}")) + 2 * len("half an upload")


def test_an_unreadable_manifest_goes_without_any_rule(s):
    s.publish("sft", "k-ok", {"w.bin": "weights"})
    s.manifest("sft", "k-bad").write_text('{"stage": "sf')
    done = prune(s.store, plan_prune(s.store))
    assert [(e.key, why) for e, why in done.entries] == [("k-bad", "unreadable manifest")]
    assert not s.manifest("sft", "k-bad").exists() and s.store.entry_state("sft", "k-ok") == "complete"


def test_dead_leases_go_and_a_live_one_stays(s):
    with s.store.claim("sft", "k-released", s.ws / "r") as fetched:
        assert fetched is None
    leases = s.root / "leases" / "sft"
    expired, live = leases / "k-expired" / "3.json", leases / "k-live" / "1.json"
    for path, expires in ((expired, time.time() - 10), (live, time.time() + 600)):
        path.parent.mkdir(parents=True)
        path.write_text(json.dumps({"worker": "w", "expires_at": expires, "released": False}))
    assert plan_prune(s.store).leases == {}  # all written just now
    for path in (leases / "k-released" / "1.json", expired, live):
        _age(path, PRUNE_GRACE_S + 60)
    done = prune(s.store, plan_prune(s.store))
    assert sorted(done.leases) == sorted(str(p) for p in (leases / "k-released" / "1.json", expired))
    assert live.exists() and not expired.exists()
    assert s.store.live_lease("sft", "k-live")["worker"] == "w"


def test_a_reader_mid_download_refuses_an_entry_pruned_under_it(s, monkeypatch):
    s.publish("sft", "k1", {"a.bin": "first file", "b.bin": "second file"}, age_s=40 * DAY)
    reader, pruner = SharedStageStore(s.store.url), SharedStageStore(s.store.url)
    removed, downloads = [], []
    rm_file, get_file = pruner.fs.rm_file, reader.fs.get_file

    def recorded_rm(path, *args, **kwargs):
        removed.append(path)
        return rm_file(path, *args, **kwargs)

    def racing_get(src, dst, *args, **kwargs):  # the reader has read the manifest; the prune runs now
        if not downloads:
            downloads.append(prune(pruner, plan_prune(pruner, older_than_s=DAY)))
        return get_file(src, dst, *args, **kwargs)

    monkeypatch.setattr(pruner.fs, "rm_file", recorded_rm)
    monkeypatch.setattr(reader.fs, "get_file", racing_get)
    out = s.ws / "reader" / "k1"
    assert reader.fetch("sft", "k1", out) is None  # a file is missing: the copy is refused
    assert not out.exists() and len(downloads[0].entries) == 1
    assert removed[0] == str(s.manifest("sft", "k1")) and len(removed) == 3  # the complete marker first
    # A reader that comes after finds nothing and takes the lease to compute it.
    assert reader.entry_state("sft", "k1") == "absent"
    with reader.claim("sft", "k1", out) as fetched:
        assert fetched is None and reader.live_lease("sft", "k1") is not None
