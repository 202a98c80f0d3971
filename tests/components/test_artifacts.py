import json

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
    assert verify_manifest(m)  # same size: the cheap check passes
    assert not verify_manifest(m, deep=True)
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
