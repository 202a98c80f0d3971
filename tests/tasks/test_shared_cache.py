"""The shared stage store through run_stage: two workspaces that share only a store URL (a local directory), a
corrupt or partial remote copy refused and recomputed, and the lease: a worker computing a stage makes the
other wait and download, and a worker killed mid-stage (SIGKILL) frees the stage once its lease expires."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from components import tracking
from components.artifacts import StageResult, read_manifest, stage_dir, verify_manifest
from components.config import load_config
from components.pipeline import STAGES_BY_NAME, RunInfo
from components.shared_cache import SharedStageStore, shared_url
from tasks.stages import run_stage

ROOT = Path(__file__).resolve().parents[2]
ALIGN = STAGES_BY_NAME["align"]
TTL = 2.0


@pytest.fixture(scope="module")
def tracking_uri(tmp_path_factory) -> str:
    """One MLflow database for every workspace of the module, as machines share one tracking server (creating a
    SQLite database costs seconds)."""
    uri = f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"
    tracking.client_for(uri)
    return uri


def _workspace(root: Path, store: Path, uri: str, ttl: float = TTL):
    cfg = load_config(None, [f"workspace={root}", f"cache.shared_url={store.as_uri()}", f"cache.lease_ttl_s={ttl}",
                             f"tracking.tracking_uri={uri}"])
    client = tracking.client_for(cfg.tracking_uri())
    exp = tracking.experiment_id(client, "t", root.parent / "mlartifacts")
    parent = tracking.start_run(client, exp, "parent")
    return cfg, RunInfo(cfg.tracking_uri(), exp, parent, f"flow-run-{root.name}", cfg.digest())


def _body(calls: list, text: str = "rows"):
    def body(out, sink):
        calls.append(out)
        (out / "data").mkdir()
        (out / "data" / "rows.jsonl").write_text(text)
        (out / "report.json").write_text("{}")
        return StageResult(files=["data/rows.jsonl"], reports=["report.json"], info={"where": str(out / "data")})
    return body


@pytest.fixture
def two(tmp_path, monkeypatch, tracking_uri):
    monkeypatch.delenv("LMFORGE_SHARED_CACHE", raising=False)
    monkeypatch.setenv("LMFORGE_UPLOAD_OUTPUTS", "0")  # MLflow uploads have their own test
    store = tmp_path / "store"
    return store, _workspace(tmp_path / "a", store, tracking_uri), _workspace(tmp_path / "b", store, tracking_uri)


def test_a_second_workspace_downloads_the_stage_instead_of_computing_it(two):
    store, (cfg_a, run_a), (cfg_b, run_b) = two
    calls = []
    first = run_stage(ALIGN, "k1", run_a, cfg_a, {}, _body(calls), upstream={})
    second = run_stage(ALIGN, "k1", run_b, cfg_b, {}, _body(calls), upstream={})
    assert len(calls) == 1  # computed once, in workspace a
    out_b = stage_dir(cfg_b.workspace, "align", "k1")
    assert second == read_manifest(out_b) and verify_manifest(second, deep=True)
    assert second["dir"] == str(out_b.resolve()) and second["digest"] == first["digest"]
    assert second["info"]["where"] == str(out_b.resolve() / "data")  # paths inside the stage point here
    same = ("stage", "cache_key", "digest", "metrics", "config", "upstream", "reports", "mlflow_run_id", "flow_run_id")
    assert {k: second[k] for k in same} == {k: first[k] for k in same}
    assert {r: m["sha256"] for r, m in second["files"].items()} == {r: m["sha256"] for r, m in first["files"].items()}
    assert (out_b / "data" / "rows.jsonl").read_text() == "rows"
    assert not [p for p in out_b.parent.iterdir() if p.name.startswith(".k1.") and p.name.endswith(".tmp")]


def test_a_corrupt_or_partial_remote_copy_is_refused_and_recomputed(two, caplog):
    store, (cfg_a, run_a), (cfg_b, run_b) = two
    calls = []
    first = run_stage(ALIGN, "k2", run_a, cfg_a, {}, _body(calls), upstream={})
    sha = first["files"]["data/rows.jsonl"]["sha256"]
    blob = store / "blobs" / sha[:2] / sha
    blob.write_text("ROWS")  # same size, other bytes
    second = run_stage(ALIGN, "k2", run_b, cfg_b, {}, _body(calls), upstream={})
    assert len(calls) == 2 and second["flow_run_id"] == run_b.flow_run_id  # recomputed in b
    assert "does not match its sha256" in caplog.text
    assert blob.read_text() == "rows"  # the bad blob was removed and b's publish put the right one back

    # Partial: the manifest is there, a file is not (a publisher that died, a store that lost an object).
    blob.unlink()
    out_c = Path(cfg_b.workspace).parent / "c"
    cfg_c, run_c = _workspace(out_c, store, cfg_b.tracking.tracking_uri)
    third = run_stage(ALIGN, "k2", run_c, cfg_c, {}, _body(calls), upstream={})
    assert len(calls) == 3 and "is missing" in caplog.text and verify_manifest(third, deep=True)

    # A manifest that is not what its digest says (edited, truncated) is refused too.
    remote = store / "stages" / "align" / "k2.json"
    tampered = json.loads(remote.read_text())
    tampered["files"]["data/rows.jsonl"]["bytes"] += 1
    remote.write_text(json.dumps(tampered))
    store_ = SharedStageStore(store.as_uri())
    assert store_.fetch("align", "k2", Path(cfg_c.workspace) / "elsewhere") is None
    remote.write_text('{"stage": "al')
    assert store_.fetch("align", "k2", Path(cfg_c.workspace) / "elsewhere") is None
    assert not (Path(cfg_c.workspace) / "elsewhere").exists()


def test_a_forced_recompute_does_not_download(two):
    store, (cfg_a, run_a), (cfg_b, run_b) = two
    calls = []
    run_stage(ALIGN, "k3", run_a, cfg_a, {}, _body(calls), upstream={})
    forced = run_stage(ALIGN, "k3", run_b, cfg_b, {}, _body(calls), upstream={}, reuse_shared=False)
    assert len(calls) == 2 and forced["flow_run_id"] == run_b.flow_run_id


def test_the_environment_overrides_the_configured_store(monkeypatch):
    monkeypatch.setenv("LMFORGE_SHARED_CACHE", "file:///mnt/other")
    assert shared_url("file:///mnt/shared") == "file:///mnt/other"
    monkeypatch.setenv("LMFORGE_SHARED_CACHE", "off")
    assert shared_url("file:///mnt/shared") is None
    monkeypatch.delenv("LMFORGE_SHARED_CACHE")
    assert shared_url("file:///mnt/shared") == "file:///mnt/shared" and shared_url(None) is None


# A worker in its own process: run_stage on workspace argv[1] (store argv[2]) with a body that announces it
# started (argv[3]) and sleeps argv[4] seconds before it writes its output.
WORKER = """
import sys, time
from pathlib import Path
from components import tracking
from components.artifacts import StageResult
from components.config import load_config
from components.pipeline import STAGES_BY_NAME, RunInfo
from tasks.stages import run_stage

ws, store, started, sleep_s = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]), float(sys.argv[4])
cfg = load_config(None, [f"workspace={ws}", f"cache.shared_url={store.as_uri()}", "cache.lease_ttl_s=%s",
                         f"tracking.tracking_uri={sys.argv[5]}"])
client = tracking.client_for(cfg.tracking_uri())
exp = tracking.experiment_id(client, "t", ws / "mlartifacts")
run = RunInfo(cfg.tracking_uri(), exp, tracking.start_run(client, exp, "parent"), "flow-run-worker", cfg.digest())

def body(out, sink):
    started.write_text("computing")
    time.sleep(sleep_s)
    (out / "data").mkdir()
    (out / "data" / "rows.jsonl").write_text("rows")
    (out / "report.json").write_text("{}")
    return StageResult(files=["data/rows.jsonl"], reports=["report.json"])

run_stage(STAGES_BY_NAME["align"], "k-lease", run, cfg, {}, body, upstream={})
""" % TTL


def _start_worker(tmp_path: Path, store: Path, sleep_s: float, uri: str) -> tuple[subprocess.Popen, Path]:
    started = tmp_path / "worker-started"
    env = {**os.environ, "LMFORGE_UPLOAD_OUTPUTS": "0", "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-c", WORKER, str(tmp_path / "w"), str(store), str(started), str(sleep_s), uri],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 120
    while not started.exists():
        assert proc.poll() is None, proc.stdout.read()[-3000:]
        assert time.monotonic() < deadline, "the worker never started its stage"
        time.sleep(0.1)
    return proc, started


def test_a_stage_another_worker_computes_is_waited_for_and_downloaded(two, tmp_path):
    store, _, (cfg_b, run_b) = two
    # It works for longer than one TTL: its lease is renewed meanwhile.
    proc, _ = _start_worker(tmp_path, store, 3 * TTL, cfg_b.tracking.tracking_uri)
    calls = []
    try:
        manifest = run_stage(ALIGN, "k-lease", run_b, cfg_b, {}, _body(calls), upstream={})
        assert proc.wait(timeout=60) == 0, proc.stdout.read()[-3000:]
    finally:
        proc.kill()
    assert calls == [] and manifest["flow_run_id"] == "flow-run-worker"  # computed once, by the worker
    assert verify_manifest(manifest, deep=True)


def test_a_killed_lease_holder_is_taken_over_after_its_lease_expires(two, tmp_path):
    store, _, (cfg_b, run_b) = two
    proc, _ = _start_worker(tmp_path, store, 600, cfg_b.tracking.tracking_uri)
    try:
        leases = store / "leases" / "align" / "k-lease"
        record = json.loads((leases / "1.json").read_text())
        assert record["worker"].endswith(f"pid {proc.pid}") and not record["released"]
        time.sleep(TTL)  # a renewal happened meanwhile: the lease outlives its first expiry
        renewed = json.loads((leases / "1.json").read_text())
        assert renewed["expires_at"] > record["expires_at"] and renewed["expires_at"] > time.time()
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        killed_at = time.time()
        calls = []
        manifest = run_stage(ALIGN, "k-lease", run_b, cfg_b, {}, _body(calls), upstream={})
        assert len(calls) == 1 and manifest["flow_run_id"] == run_b.flow_run_id
        # It waited for the expiry, and not longer than one TTL.
        assert time.time() >= renewed["expires_at"] > killed_at - TTL
        assert time.time() - killed_at < TTL + 30
        assert sorted(p.name for p in leases.iterdir()) == ["2.json"]  # the takeover: one more generation
        assert json.loads((leases / "2.json").read_text())["released"]
        assert SharedStageStore(store.as_uri()).has("align", "k-lease")
    finally:
        proc.kill()
