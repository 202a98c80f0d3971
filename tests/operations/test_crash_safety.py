"""Crash safety, with real processes: runs left RUNNING by a killed process are swept to KILLED, a
SIGTERM marks the flow's MLflow runs KILLED, a training stage killed with SIGKILL resumes from its
last complete checkpoint to the same final loss, and a NaN loss stops training naming the step."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from datasets import Dataset

from components import tracking
from components.config import TrainConfig
from components.errors import TrainingDiverged
from components.models.loading import load_model, load_tokenizer, select_hardware
from components.training.lora import run_lora_training
from tests.conftest import ROOT, tiny_pipeline_config

CPU = select_hardware("cpu", "fp32")


def _python(script: str, *args: str, **env: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(script), *args], cwd=ROOT,
                            env={**os.environ, "PYTHONPATH": str(ROOT), **env},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _wait_for(predicate, timeout: float, what: str, proc: subprocess.Popen | None = None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            output = proc.stdout.read()[-4000:] if proc.stdout else "(see its log file)"
            pytest.fail(f"process ended (rc {proc.returncode}) before {what}:\n{output}")
        time.sleep(0.1)
    pytest.fail(f"timed out waiting for {what}")


def test_sweep_marks_runs_of_dead_processes_killed(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = tracking.client_for(uri)
    exp = tracking.experiment_id(client, "sweep")
    child = _python("""
        import sys, time
        from components import tracking
        client = tracking.client_for(sys.argv[1])
        print(tracking.start_run(client, sys.argv[2], "doomed"), flush=True)
        time.sleep(600)
    """, uri, exp)
    dead_run = child.stdout.readline().strip()
    assert dead_run, child.stdout.read()
    child.send_signal(signal.SIGKILL)
    child.wait(30)
    alive_run = tracking.start_run(client, exp, "mine, still running")
    elsewhere = tracking.start_run(client, exp, "other host", tags={tracking.HOST_TAG: "some-other-host"})

    assert tracking.mark_dead_runs_killed(client, exp) == [dead_run]
    assert client.get_run(dead_run).info.status == "KILLED"
    assert "died" in client.get_run(dead_run).data.tags["lmforge.killed_reason"]
    assert client.get_run(alive_run).info.status == "RUNNING"  # its process (this one) lives
    assert client.get_run(elsewhere).info.status == "RUNNING"  # cannot be checked from here
    assert tracking.mark_dead_runs_killed(client, exp) == []


def test_sigterm_marks_the_flow_runs_killed(tiny_model_dir, tmp_path):
    """A flow run stopped with SIGTERM (a worker cancelling it, `kill`) ends its parent and stage runs
    KILLED, not RUNNING forever and not FAILED, and Prefect records the flow run cancelled or crashed."""
    workspace = tmp_path / "ws"
    # A long cpt, so the signal lands while a stage runs.
    cfg = tiny_pipeline_config(tiny_model_dir, workspace, **{"cpt.max_steps": 400, "cpt.save_steps": 1000})
    cfg_file = tmp_path / "cfg.yaml"
    from components.config import save_config

    save_config(cfg, cfg_file)
    # `lmforge run`, as a user or a process worker starts it (with its temporary local Prefect API).
    flow = subprocess.Popen([sys.executable, "-m", "flows.cli", "run", str(cfg_file)], cwd=ROOT,
                            env={**os.environ, "PYTHONPATH": str(ROOT), "PREFECT_HOME": str(tmp_path / "prefect"),
                                 "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "300"},
                            stdout=(tmp_path / "flow.log").open("w"), stderr=subprocess.STDOUT, text=True)
    db = workspace / "mlflow.db"

    def cpt_running():
        if not db.exists():
            return None
        client = tracking.client_for(cfg.tracking_uri())
        exp = client.get_experiment_by_name(cfg.tracking.experiment)
        runs = client.search_runs([exp.experiment_id], "tags.`lmforge.stage` = 'cpt'") if exp else []
        return runs and runs[0].info.status == "RUNNING" and runs[0]

    try:
        cpt = _wait_for(cpt_running, 600, "the cpt stage to start", flow)
    except BaseException:
        print((tmp_path / "flow.log").read_text()[-6000:])
        raise
    flow.send_signal(signal.SIGTERM)
    try:
        flow.wait(120)
    finally:
        flow.kill()
    assert flow.returncode != 0
    client = tracking.client_for(cfg.tracking_uri())
    runs = client.search_runs([cpt.info.experiment_id])
    statuses = {r.info.run_name: r.info.status for r in runs}
    assert statuses["cpt"] == "KILLED", statuses
    parent = next(r for r in runs if "mlflow.parentRunId" not in r.data.tags)
    assert parent.info.status == "KILLED", statuses
    assert "RUNNING" not in statuses.values(), statuses
    # And Prefect's record of the flow run (its SQLite database under PREFECT_HOME; the run's temporary
    # API is gone with it) says it was stopped, not that it is still running.
    flow_run_id = parent.data.tags["prefect.flow_run_id"]
    with sqlite3.connect(tmp_path / "prefect" / "prefect.db") as db_conn:
        [(state,)] = db_conn.execute("select state_type from flow_run where id = ?", (flow_run_id,)).fetchall()
    assert state in ("CANCELLED", "CRASHED"), state


def _rows(n=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        length = int(torch.randint(6, 20, (1,), generator=g))
        ids = torch.randint(5, 300, (length,), generator=g).tolist()
        rows.append({"input_ids": ids, "labels": [-100] * (length // 2) + ids[length // 2:]})
    return rows


TRAIN = dict(max_steps=6, batch_size=4, learning_rate=5e-3, logging_steps=1, save_steps=2)


def test_training_killed_with_sigkill_resumes_to_the_same_final_loss(tiny_model_dir, tmp_path):
    tok = load_tokenizer(str(tiny_model_dir))
    data = Dataset.from_list(_rows())
    whole = run_lora_training(load_model(str(tiny_model_dir), CPU), tok, data, TrainConfig(**TRAIN), CPU,
                              tmp_path / "whole")

    out = tmp_path / "killed"
    # The same training in another process, slowed by its metrics sink (one second a step) so the kill
    # lands after the first checkpoint and before the end.
    child = _python("""
        import sys, time
        from datasets import Dataset
        from components.config import TrainConfig
        from components.models.loading import load_model, load_tokenizer, select_hardware
        from tests.operations.test_crash_safety import TRAIN, _rows
        cpu = select_hardware("cpu", "fp32")
        model_dir, out = sys.argv[1], sys.argv[2]
        from components.training.lora import run_lora_training
        run_lora_training(load_model(model_dir, cpu), load_tokenizer(model_dir), Dataset.from_list(_rows()),
                          TrainConfig(**TRAIN), cpu, out, metrics_sink=lambda step, m: time.sleep(1))
    """, str(tiny_model_dir), str(out))
    _wait_for(lambda: (out / "checkpoints" / "checkpoint-2" / "lmforge-complete").exists(), 300,
              "the first complete checkpoint", child)
    child.send_signal(signal.SIGKILL)
    child.wait(30)
    assert not (out / "adapter").exists()  # it did not finish

    resumed = run_lora_training(load_model(str(tiny_model_dir), CPU), tok, data, TrainConfig(**TRAIN), CPU, out)
    assert 2 <= resumed.metrics["resumed_from_step"] < TRAIN["max_steps"]
    assert resumed.metrics["train_loss_last"] == pytest.approx(whole.metrics["train_loss_last"], rel=1e-5)
    from safetensors.torch import load_file

    a, b = (load_file(d / "adapter" / "adapter_model.safetensors") for d in (tmp_path / "whole", out))
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_nan_loss_stops_training_naming_the_step(tiny_model_dir, tmp_path):
    model = load_model(str(tiny_model_dir), CPU)
    with torch.no_grad():
        model.get_input_embeddings().weight[:] = float("nan")
    with pytest.raises(TrainingDiverged, match=r"training diverged at step 1: grad_norm is nan; the last good checkpoint is kept. Lower the learning rate"):
        run_lora_training(model, load_tokenizer(str(tiny_model_dir)), Dataset.from_list(_rows()),
                          TrainConfig(**TRAIN), CPU, tmp_path)
    assert not (tmp_path / "adapter").exists()
