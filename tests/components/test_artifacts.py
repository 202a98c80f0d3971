import json
import os

from components.artifacts import (
    StageResult, atomic_write_text, read_manifest, sha256_file, stage_dir, verify_manifest, write_manifest,
)


def test_manifest_is_written_last_and_verifies(tmp_path):
    out = stage_dir(tmp_path, "align", "abc")
    out.mkdir(parents=True)
    (out / "a.jsonl").write_text('{"text": "x"}\n')
    m = write_manifest(out, stage="align", key="abc", result=StageResult(files=["a.jsonl"], metrics={"rows": 1.0}),
                       config={"k": 1}, upstream={}, wall_s=0.1)
    assert read_manifest(out) == json.loads((out / "manifest.json").read_text()) == m
    assert m["files"]["a.jsonl"]["sha256"] == sha256_file(out / "a.jsonl")
    assert verify_manifest(m, deep=True)


def test_missing_or_changed_file_fails_verification(tmp_path):
    out = tmp_path / "s"
    out.mkdir()
    (out / "f.bin").write_bytes(b"1234")
    m = write_manifest(out, stage="s", key="k", result=StageResult(files=["f.bin"]), config={}, upstream={}, wall_s=0)
    (out / "f.bin").write_bytes(b"4321")
    recorded = m["files"]["f.bin"]["mtime_ns"]
    os.utime(out / "f.bin", ns=(recorded + 10**9,) * 2)
    assert not verify_manifest(m)  # same size, new mtime: rehashed, and the content differs
    os.utime(out / "f.bin", ns=(recorded,) * 2)
    assert verify_manifest(m)  # same size and mtime: the cheap check trusts it
    assert not verify_manifest(m, deep=True)  # --verify deep does not
    (out / "f.bin").write_bytes(b"1234")
    os.utime(out / "f.bin", ns=(recorded + 2 * 10**9,) * 2)
    assert verify_manifest(m)  # touched but unchanged: rehashed, still valid
    (out / "f.bin").unlink()
    assert not verify_manifest(m)


def test_digest_ignores_timing_but_not_content(tmp_path):
    out = tmp_path / "s"
    out.mkdir()
    (out / "f").write_text("a")
    r = StageResult(files=["f"])
    d1 = write_manifest(out, stage="s", key="k", result=r, config={}, upstream={}, wall_s=1)["digest"]
    d2 = write_manifest(out, stage="s", key="k", result=r, config={}, upstream={}, wall_s=9)["digest"]
    (out / "f").write_text("b")
    d3 = write_manifest(out, stage="s", key="k", result=r, config={}, upstream={}, wall_s=1)["digest"]
    assert d1 == d2 != d3


def test_atomic_write_leaves_no_temp_files(tmp_path):
    atomic_write_text(tmp_path / "x.txt", "hello")
    assert [p.name for p in tmp_path.iterdir()] == ["x.txt"]


def test_atomic_dir_appears_whole_and_replaces_the_old_one(tmp_path):
    from components.artifacts import atomic_dir

    target = tmp_path / "raw" / "d"
    with atomic_dir(target) as building:
        (building / "a.jsonl").write_text("new\n")
        assert not target.exists()  # nothing visible under the name until the block succeeds
    assert (target / "a.jsonl").read_text() == "new\n"
    with atomic_dir(target) as building:
        (building / "b.jsonl").write_text("newer\n")
    assert [p.name for p in target.iterdir()] == ["b.jsonl"]
    assert [p.name for p in target.parent.iterdir()] == ["d"]  # no temp or old directory left


def test_atomic_dir_failure_leaves_the_target_as_it_was(tmp_path):
    import pytest

    from components.artifacts import atomic_dir

    target = tmp_path / "d"
    target.mkdir()
    (target / "a.jsonl").write_text("old\n")
    with pytest.raises(RuntimeError, match="download broke"):
        with atomic_dir(target) as building:
            (building / "a.jsonl").write_text("half")
            raise RuntimeError("download broke")
    assert (target / "a.jsonl").read_text() == "old\n"
    assert [p.name for p in tmp_path.iterdir()] == ["d"]
