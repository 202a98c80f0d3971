"""run_stage: the manifest-last contract, reuse of a complete output, failure handling, and tracking."""

from __future__ import annotations

import pytest
from mlflow.tracking import MlflowClient

from components import tracking
from components.artifacts import StageResult, read_manifest, stage_dir
from components.config import load_config
from tasks.stages import RunContext, run_stage


@pytest.fixture
def ctx(tmp_path):
    cfg = load_config(None, [f"workspace={tmp_path}"])
    client = tracking.client_for(cfg.tracking_uri())
    exp = tracking.experiment_id(client, "t", tmp_path / "mlartifacts")
    parent = tracking.start_run(client, exp, "parent")
    return cfg, RunContext(cfg.tracking_uri(), exp, parent, "flow-run-1", cfg.digest()), client


def _body(calls):
    def body(out, sink):
        calls.append(out)
        (out / "data.txt").write_text("hello")
        sink(1, {"loss": 2.0})
        sink(2, {"loss": 1.0})
        return StageResult(files=["data.txt"], metrics={"rows": 1.0})
    return body


def test_stage_writes_manifest_and_tracks_a_nested_run(ctx):
    cfg, rc, client = ctx
    calls = []
    manifest = run_stage("align", "k1", rc, cfg, {"api_token": "s3cret", "lr": 0.1}, _body(calls), upstream={})
    assert manifest == read_manifest(stage_dir(cfg.workspace, "align", "k1"))
    run = client.get_run(manifest["mlflow_run_id"])
    assert run.data.tags["mlflow.parentRunId"] == rc.parent_run_id
    assert run.data.params["api_token"] == "***" and run.data.params["lr"] == "0.1"
    assert [m.value for m in client.get_metric_history(run.info.run_id, "loss")] == [2.0, 1.0]
    assert run.info.status == "FINISHED"


def test_complete_output_is_reused_without_running(ctx):
    cfg, rc, _ = ctx
    calls = []
    first = run_stage("align", "k2", rc, cfg, {}, _body(calls), upstream={})
    second = run_stage("align", "k2", rc, cfg, {}, _body(calls), upstream={})
    assert len(calls) == 1 and first == second


def test_failure_leaves_no_manifest_and_marks_the_run_failed(ctx):
    cfg, rc, client = ctx

    def boom(out, sink):
        (out / "partial.txt").write_text("x")
        raise RuntimeError("disk on fire")

    with pytest.raises(RuntimeError, match="disk on fire"):
        run_stage("align", "k3", rc, cfg, {}, boom, upstream={})
    assert read_manifest(stage_dir(cfg.workspace, "align", "k3")) is None
    runs = client.search_runs([rc.experiment_id], "tags.`lmforge.cache_key` = 'k3'")
    assert runs[0].info.status == "FAILED"


def test_partial_output_is_discarded_unless_kept(ctx):
    cfg, rc, _ = ctx
    out = stage_dir(cfg.workspace, "cpt", "k4")
    (out / "checkpoints").mkdir(parents=True)
    (out / "checkpoints" / "ckpt").write_text("state")
    run_stage("cpt", "k4", rc, cfg, {}, lambda o, s: StageResult(files=[]), upstream={}, keep_partial=True)
    assert (out / "checkpoints" / "ckpt").is_file()
    out5 = stage_dir(cfg.workspace, "align", "k5")
    out5.mkdir(parents=True)
    (out5 / "debris").write_text("x")
    run_stage("align", "k5", rc, cfg, {}, lambda o, s: StageResult(files=[]), upstream={})
    assert not (out5 / "debris").exists()
