"""Two processes at once, for real (spawned interpreters, no mocks): creating one SQLite tracking
database, and computing one stage. Neither may fail, corrupt or duplicate the other's work."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import time
from pathlib import Path

from components import tracking
from components.artifacts import StageResult, read_manifest, stage_dir
from components.config import load_config
from components.pipeline import STAGES_BY_NAME, RunInfo

N = 3
SPAWN = mp.get_context("spawn")  # fresh interpreters, as two flow runs are


def _open_tracking(uri: str, barrier, results) -> None:
    barrier.wait()  # every process opens the fresh database at the same moment
    try:
        client = tracking.client_for(uri)
        exp = tracking.experiment_id(client, "shared")
        results.put(("ok", exp))
    except Exception as exc:  # reported to the test, which shows it
        results.put(("error", f"{type(exc).__name__}: {exc}"))


def test_processes_creating_one_tracking_database_at_once_all_succeed(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    barrier, results = SPAWN.Barrier(N), SPAWN.Queue()
    procs = [SPAWN.Process(target=_open_tracking, args=(uri, barrier, results)) for _ in range(N)]
    for p in procs:
        p.start()
    outcomes = [results.get(timeout=300) for _ in procs]
    for p in procs:
        p.join(60)
    assert all(kind == "ok" for kind, _ in outcomes), outcomes
    assert len({exp for _, exp in outcomes}) == 1  # one experiment, not one per process
    assert tracking.client_for(uri).get_experiment_by_name("shared") is not None


def _compute_stage(workspace: str, run: RunInfo, log_file: str, barrier, results) -> None:
    from tasks.stages import run_stage

    cfg = load_config(None, [f"workspace={workspace}"])

    def body(out: Path, sink) -> StageResult:
        with open(log_file, "a") as f:
            f.write(f"{os.getpid()}\n")
        time.sleep(2)  # long enough that the other process arrives while this one computes
        (out / "data.txt").write_text(f"made by {os.getpid()}")
        return StageResult(files=["data.txt"], metrics={"rows": 1.0})

    barrier.wait()
    try:
        manifest = run_stage(STAGES_BY_NAME["align"], "same-key", run, cfg, {}, body, upstream={})
        results.put(("ok", manifest["digest"], manifest["flow_run_id"]))
    except Exception as exc:
        results.put(("error", f"{type(exc).__name__}: {exc}", ""))


def test_two_runs_computing_one_stage_compute_it_once_and_both_get_it(tmp_path):
    cfg = load_config(None, [f"workspace={tmp_path}"])
    client = tracking.client_for(cfg.tracking_uri())
    exp = tracking.experiment_id(client, "t", tmp_path / "mlartifacts")
    runs = [RunInfo(cfg.tracking_uri(), exp, tracking.start_run(client, exp, f"flow-{i}"), f"flow-run-{i}", "d")
            for i in range(2)]
    log_file = tmp_path / "calls.txt"
    barrier, results = SPAWN.Barrier(2), SPAWN.Queue()
    procs = [SPAWN.Process(target=_compute_stage, args=(str(tmp_path), r, str(log_file), barrier, results))
             for r in runs]
    for p in procs:
        p.start()
    outcomes = [results.get(timeout=300) for _ in procs]
    for p in procs:
        p.join(60)
    assert all(o[0] == "ok" for o in outcomes), outcomes
    assert len(log_file.read_text().split()) == 1  # computed once
    assert len({o[1] for o in outcomes}) == 1  # both runs hold the same output
    out = stage_dir(tmp_path, "align", "same-key")
    manifest = read_manifest(out)
    assert (out / "data.txt").read_text() == f"made by {log_file.read_text().split()[0]}"
    assert {o[2] for o in outcomes} == {manifest["flow_run_id"]}  # the second adopted the first one's manifest
    # One stage run in MLflow, finished; no leftovers beside the stage directory but the lock file.
    stage_runs = client.search_runs([exp], "tags.`lmforge.stage` = 'align'")
    assert [r.info.status for r in stage_runs] == ["FINISHED"]
    assert sorted(p.name for p in out.parent.iterdir()) == [".same-key.lock", "same-key"]
    assert json.loads((out / "manifest.json").read_text())["files"].keys() == {"data.txt"}
