"""run_stage: the manifest-last contract, reuse of a complete output, failure handling, tracking, retries."""

from __future__ import annotations

import pytest
from mlflow.tracking import MlflowClient

from components import tracking
from components.artifacts import StageResult, read_manifest, stage_dir
from components.config import load_config
from components.pipeline import STAGES_BY_NAME, RunInfo
from tasks.stages import _retry_if_transient, run_stage

ALIGN, CPT = STAGES_BY_NAME["align"], STAGES_BY_NAME["cpt"]


@pytest.fixture
def ctx(tmp_path):
    cfg = load_config(None, [f"workspace={tmp_path}"])
    client = tracking.client_for(cfg.tracking_uri())
    exp = tracking.experiment_id(client, "t", tmp_path / "mlartifacts")
    parent = tracking.start_run(client, exp, "parent")
    return cfg, RunInfo(cfg.tracking_uri(), exp, parent, "flow-run-1", cfg.digest()), client


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
    params = {"api_token": "s3cret", "lr": 0.1, "max_new_tokens": 24, "cutoff_len": 256,
              "source": "https://user:pw@example.org/data.jsonl?token=abc&split=train"}
    manifest = run_stage(ALIGN, "k1", rc, cfg, params, _body(calls), upstream={})
    assert manifest == read_manifest(stage_dir(cfg.workspace, "align", "k1"))
    run = client.get_run(manifest["mlflow_run_id"])
    assert run.data.tags["mlflow.parentRunId"] == rc.parent_run_id
    assert run.data.params["api_token"] == "***" and run.data.params["lr"] == "0.1"
    # Masked by exact names: a field that merely contains "token" stays visible; a URI loses its secrets.
    assert run.data.params["max_new_tokens"] == "24" and run.data.params["cutoff_len"] == "256"
    assert run.data.params["source"] == "https://user:***@example.org/data.jsonl?token=***&split=train"
    assert [m.value for m in client.get_metric_history(run.info.run_id, "loss")] == [2.0, 1.0]
    assert run.info.status == "FINISHED"


def test_the_stage_run_gets_exactly_the_reports_the_stage_declares(ctx):
    """Reports (any name, in a folder too) are MLflow artifacts of the stage run beside its manifest; weights and
    data go under outputs/ only (components/mlflow_outputs.py), with the index naming where each file is."""
    cfg, rc, client = ctx

    def body(out, sink):
        (out / "adapter").mkdir()
        (out / "adapter" / "adapter_model.safetensors").write_bytes(b"weights")
        (out / "sft.jsonl").write_text("{}\n")
        (out / "plots").mkdir()
        for name in ("alignment_report.json", "plots/curve.png"):
            (out / name).write_text("report")
        return StageResult(files=["adapter/adapter_model.safetensors", "sft.jsonl", "alignment_report.json"],
                           reports=["alignment_report.json", "plots/curve.png"])

    manifest = run_stage(CPT, "k-reports", rc, cfg, {}, body, upstream={})
    assert manifest["reports"] == ["alignment_report.json", "plots/curve.png"]
    assert "plots/curve.png" in manifest["files"]  # hashed like every output, listed in `files` or not
    run_id = manifest["mlflow_run_id"]
    logged = {f.path for f in client.list_artifacts(run_id)} | {f.path for f in client.list_artifacts(run_id, "plots")}
    assert logged == {"manifest.json", "alignment_report.json", "plots", "plots/curve.png", "outputs",
                      "outputs_index.json"}
    index = client.download_artifacts(run_id, "outputs_index.json")
    import json

    assert sorted(json.loads(open(index).read())) == sorted(manifest["files"])


def test_complete_output_is_reused_without_running(ctx):
    cfg, rc, _ = ctx
    calls = []
    first = run_stage(ALIGN, "k2", rc, cfg, {}, _body(calls), upstream={})
    second = run_stage(ALIGN, "k2", rc, cfg, {}, _body(calls), upstream={})
    assert len(calls) == 1 and first == second


def test_failure_leaves_no_manifest_and_marks_the_run_failed(ctx):
    cfg, rc, client = ctx

    def boom(out, sink):
        (out / "partial.txt").write_text("x")
        raise RuntimeError("disk on fire")

    with pytest.raises(RuntimeError, match="disk on fire"):
        run_stage(ALIGN, "k3", rc, cfg, {}, boom, upstream={})
    assert read_manifest(stage_dir(cfg.workspace, "align", "k3")) is None
    runs = client.search_runs([rc.experiment_id], "tags.`lmforge.cache_key` = 'k3'")
    assert runs[0].info.status == "FAILED"


def test_a_param_the_tracking_server_refuses_ends_the_stage_run_failed(ctx, monkeypatch):
    from mlflow.exceptions import MlflowException

    cfg, rc, client = ctx
    calls = []

    def refused(*_args):
        raise MlflowException("Invalid value for parameter 'key'")

    monkeypatch.setattr(tracking, "log_params", refused)
    with pytest.raises(MlflowException):
        run_stage(ALIGN, "k-params", rc, cfg, {"lr": 0.1}, _body(calls), upstream={})
    runs = client.search_runs([rc.experiment_id], "tags.`lmforge.cache_key` = 'k-params'")
    assert [r.info.status for r in runs] == ["FAILED"] and calls == []  # not left RUNNING, nothing computed


def test_partial_output_is_discarded_unless_kept(ctx):
    cfg, rc, _ = ctx
    out = stage_dir(cfg.workspace, "cpt", "k4")
    (out / "checkpoints").mkdir(parents=True)
    (out / "checkpoints" / "ckpt").write_text("state")
    run_stage(CPT, "k4", rc, cfg, {}, lambda o, s: StageResult(files=[]), upstream={})
    assert (out / "checkpoints" / "ckpt").is_file()
    out5 = stage_dir(cfg.workspace, "align", "k5")
    out5.mkdir(parents=True)
    (out5 / "debris").write_text("x")
    run_stage(ALIGN, "k5", rc, cfg, {}, lambda o, s: StageResult(files=[]), upstream={})
    assert not (out5 / "debris").exists()


class _State:
    def __init__(self, exc):
        self.exc = exc

    def result(self, raise_on_failure=True):
        return self.exc


@pytest.mark.parametrize(("exc", "retried"), [
    (ConnectionResetError("peer reset"), True),
    (TimeoutError("read timed out"), True),
    (FileNotFoundError("data/missing.jsonl"), False),
    (ValueError("row 3: field 'output' is missing"), False),
])
def test_only_transient_failures_are_retried(exc, retried):
    from components.data.dataset_info import DataError
    from components.errors import TransientError

    assert _retry_if_transient(None, None, _State(exc)) is retried
    assert _retry_if_transient(None, None, _State(TransientError("HTTP 503"))) is True
    assert _retry_if_transient(None, None, _State(DataError("bad JSON on line 2"))) is False
    wrapped = RuntimeError("stage failed")
    wrapped.__cause__ = ConnectionResetError()
    assert _retry_if_transient(None, None, _State(wrapped)) is True  # the cause decides


def test_a_failing_task_with_a_permanent_error_runs_once(prefect_harness, tmp_path):
    """Prefect's own retry loop consults the condition: bad data is not retried 3 times."""
    from prefect import flow, task

    calls = []

    @task(retries=3, retry_delay_seconds=0, retry_condition_fn=_retry_if_transient)
    def flaky(kind: str):
        calls.append(kind)
        if kind == "permanent":
            raise FileNotFoundError("no such file: data/x.jsonl")
        if len(calls) < 3:
            raise ConnectionResetError("reset by peer")
        return "ok"

    @flow
    def probe(kind: str) -> str:
        state = flaky(kind, return_state=True)
        return "failed" if state.is_failed() else state.result()

    assert probe("permanent") == "failed" and calls == ["permanent"]
    calls.clear()
    assert probe("transient") == "ok" and len(calls) == 3


def _uses_a_global():
    return STAGES_BY_NAME


def test_library_prints_inside_a_stage_task_stay_out_of_the_run_log(prefect_harness, caplog):
    """Under the flow's log_prints, Prefect's print patch ignored dill's redirected stdout: datasets'
    hashing of TRL's map functions put their disassembly into the log and dill found no globals. The
    stage task opts out, so dill sees its own capture again."""
    import logging

    from dill.detect import nestedglobals
    from prefect import flow, task

    from tasks.stages import run_node

    @task(log_prints=run_node.log_prints)
    def like_a_stage() -> list[str]:
        return nestedglobals(_uses_a_global)

    @flow(log_prints=True)
    def like_the_flow() -> list[str]:
        return like_a_stage()

    with caplog.at_level(logging.INFO):
        found = like_the_flow()
    assert "STAGES_BY_NAME" in found
    assert not [r for r in caplog.records if "LOAD_GLOBAL" in r.getMessage()]
