"""compute.parallel_stages: nodes that nothing connects run side by side as Prefect task futures, and the run
comes out as a run one node at a time makes it: the same stages in the same order, the same keys, the same
outputs, on a process pool or on a Dask cluster (compute.task_runner). Training stages never run beside each
other unless compute.parallel_training."""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from prefect import task

from components import tracking
from components.config import load_config
from flows.run_core import _Walk
from flows.task_runner import node_task_runner
from tests.conftest import tiny_pipeline_config

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def sequential_run(tiny_model_dir, tmp_path_factory, prefect_harness) -> dict:
    """The tiny flow one node at a time: what each runner's run is compared with."""
    from flows.domain_adaptation import domain_adaptation

    return domain_adaptation(config=tiny_pipeline_config(tiny_model_dir, tmp_path_factory.mktemp("one")))


# dask: a local cluster of 3 worker processes (compute.dask_address null), started and stopped by the run.
@pytest.mark.parametrize("task_runner", ["process", "dask"])
def test_independent_nodes_run_side_by_side_and_the_run_is_the_sequential_one(task_runner, sequential_run,
                                                                                 tiny_model_dir, tmp_path):
    from flows.domain_adaptation import domain_adaptation

    one = sequential_run
    cfg = tiny_pipeline_config(tiny_model_dir, tmp_path / "three",
                               **{"compute.parallel_stages": "3", "compute.task_runner": task_runner})
    three = domain_adaptation(config=cfg)
    span = {stage: _span(path) for stage, path in three["stages"].items()}
    sequential = {stage: _span(path) for stage, path in one["stages"].items()}

    # One node at a time: each stage starts after the one before it ended.
    order = sorted(sequential, key=lambda n: sequential[n][0])
    assert all(sequential[a][1] <= sequential[b][0] + 0.01 for a, b in zip(order, order[1:]))
    # Three at a time: the base model's evaluation (it needs no training) ran while cpt trained, each in a
    # process of its own; the training stages, chained, did not overlap.
    assert span["evaluate-base"][0] < span["cpt"][1] and span["cpt"][0] < span["evaluate-base"][1], span
    assert span["cpt"][1] <= span["sft"][0]
    # The run is the one a sequential run gives: stages in the table's order, the same keys and outputs.
    # A training stage's curve holds its run's timings and an adapter's config its workspace's path, so the
    # keys after cpt follow each run's own digests; up to it they are the same, and the weights, the
    # metrics and the answers are the same files.
    assert [r["stage"] for r in three["timeline"]] == [r["stage"] for r in one["timeline"]]
    keys = [(r["stage"], r["key"]) for r in three["timeline"]]
    assert keys[:5] == [(r["stage"], r["key"]) for r in one["timeline"]][:5] and keys[4][0] == "cpt"
    assert not any(r["cached"] for r in three["timeline"])
    for stage in ("cpt", "sft", "evaluate-base", "evaluate-cpt", "evaluate-adapted"):
        a, b = (_manifest(s["stages"][stage])["files"] for s in (one, three))
        assert a.keys() == b.keys(), stage
        same = [f for f in a if f.endswith((".safetensors", "metrics.json", "per_task.json", "samples.jsonl"))]
        assert same and all(a[f]["sha256"] == b[f]["sha256"] for f in same), stage
    assert three["columns"] == one["columns"]
    # Every node ran in a worker process (the pool's or the cluster's), not in the flow's: its MLflow run
    # names the process that ran it.
    client = tracking.client_for(cfg.tracking_uri())
    pids = {client.get_run(_manifest(path)["mlflow_run_id"]).data.tags[tracking.PID_TAG]
            for path in three["stages"].values()}
    assert str(os.getpid()) not in pids and len(pids) > 1, pids
    assert three["comparison"]["exact_match"] == one["comparison"]["exact_match"]


def _span(path: str) -> tuple[float, float]:
    """When a stage's body ran (wall clock): from its manifest's start and wall time."""
    manifest = _manifest(path)
    return manifest["started_at_s"], manifest["started_at_s"] + manifest["wall_s"]


def _manifest(path: str) -> dict:
    return json.loads((Path(path) / "manifest.json").read_text())


def _node(name: str, upstream: tuple[str, ...] = (), trains: bool = False):
    return SimpleNamespace(name=name, upstream=upstream, spec=SimpleNamespace(trains=trains))


@pytest.mark.parametrize(("parallel_training", "expected"), [(False, False), (True, True)])
def test_a_training_stage_never_starts_beside_another_unless_allowed(parallel_training, expected):
    cfg = load_config(None, ["compute.parallel_stages=4", f"compute.parallel_training={str(parallel_training).lower()}"])
    walk = _Walk(cfg, SimpleNamespace(submit_stage=object()), None, None, None, None, False)
    reward, evaluation, training = _node("reward", trains=True), _node("evaluate-adapted"), _node("x", trains=True)
    pending = {object(): (reward, "k", 0.0)}
    assert walk._may_start(evaluation, {}, pending, 4)
    assert walk._may_start(training, {}, pending, 4) is expected
    assert not walk._may_start(_node("y", upstream=("cpt",)), {}, pending, 4)  # cpt not complete yet
    assert not walk._may_start(evaluation, {}, {object(): (reward, "k", 0.0)} | {object(): (evaluation, "k", 0.0)}, 2)


def test_a_failed_node_fails_the_walk_after_the_others_finish(monkeypatch):
    """Where one node fails, the nodes beside it finish (they hold their stage locks) before the error ends
    the run: no stage is left half-written by the walk."""
    from concurrent.futures import ThreadPoolExecutor

    from flows import run_core

    finished = threading.Event()

    def produce(node, *_args, force=False):
        if node.name == "bad":
            raise ValueError("bad node")
        time.sleep(0.3)
        finished.set()
        return {"stage": node.name}, False

    pool = ThreadPoolExecutor(2)
    hooks = SimpleNamespace(submit_stage=lambda *a, **k: pool.submit(produce, *a, **k), run_stage=produce)
    cfg = load_config(None, ["compute.parallel_stages=2"])
    monkeypatch.setattr(run_core, "node_key", lambda node, *_: ("k-" + node.name, {}))
    monkeypatch.setattr(run_core, "keyed_digests", lambda *_: {})
    monkeypatch.setattr(run_core, "_refresh", lambda *_: True)
    monkeypatch.setattr(run_core, "_recorded", lambda node, key, produced, *_: (produced[0], {"stage": node.name}))
    walk = _Walk(cfg, hooks, None, None, None, None, False)
    with pytest.raises(ValueError, match="bad node"):
        walk.over([_node("slow"), _node("bad")], {}, [])
    assert finished.is_set()
    manifests, timeline = {}, []
    walk.over([_node("a"), _node("b", ("a",)), _node("c")], manifests, timeline)
    assert list(manifests) == ["a", "b", "c"] and [r["stage"] for r in timeline] == ["a", "b", "c"]


def test_the_dask_runner_without_prefect_dask_says_what_to_install(monkeypatch):
    cfg = load_config(None, ["compute.parallel_stages=2", "compute.task_runner=dask"])
    monkeypatch.setitem(sys.modules, "prefect_dask", None)  # as where the package is not installed
    with pytest.raises(ImportError, match=r"needs prefect-dask .*pip install -e '\.\[dask\]'"):
        with node_task_runner(cfg.compute):
            pass
    process = load_config(None, ["compute.parallel_stages=2"])  # the process pool never imports it
    with node_task_runner(process.compute) as runner:
        assert type(runner).__name__ == "ProcessPoolTaskRunner"


def test_a_running_dask_cluster_is_used_by_address_and_one_with_unfit_workers_refused(prefect_harness):
    """compute.dask_address: nodes go to that cluster's workers. Workers with several threads each would run
    two nodes in one process, daemonic ones may not start a stage's processes: the run refuses both before
    anything is submitted."""
    from distributed import LocalCluster

    def at(address: str):
        return load_config(None, ["compute.parallel_stages=2", "compute.task_runner=dask",
                                  f"compute.dask_address={address}"]).compute

    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False, dashboard_address=None) as cluster:
        with node_task_runner(at(cluster.scheduler_address)) as runner:
            assert runner.submit(_worker_pid, {}).result() == _worker_pid.fn()  # in-process workers
            assert list(runner.client.nthreads().values()) == [1]
    with LocalCluster(n_workers=1, threads_per_worker=2, processes=False, dashboard_address=None) as cluster:
        with pytest.raises(RuntimeError, match=r"run several threads: start them with `dask worker --nthreads 1`"):
            with node_task_runner(at(cluster.scheduler_address)):
                pass
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=True, dashboard_address=None) as cluster:
        with pytest.raises(RuntimeError, match="are daemonic processes.*DASK_DISTRIBUTED__WORKER__DAEMON=False"):
            with node_task_runner(at(cluster.scheduler_address)):
                pass


def test_the_flow_runs_on_a_dask_cluster_started_apart_from_it(sequential_run, tiny_model_dir, tmp_path):
    """A cluster started as a user starts one on other machines (`dask scheduler`, `dask worker --nthreads 1`
    in directories of their own, sharing nothing with the flow but the scheduler's address and the workspace
    path): the flow sends its nodes there, each worker runs some, and the run is the sequential one."""
    from distributed import Client

    from flows.domain_adaptation import domain_adaptation

    env = {**os.environ, "DASK_DISTRIBUTED__WORKER__DAEMON": "False"}
    scheduler_file = tmp_path / "scheduler.json"
    started = [_started([sys.executable, "-m", "distributed.cli.dask_scheduler", "--scheduler-file",
                         str(scheduler_file), "--port", "0", "--dashboard-address", ":0"], tmp_path / "scheduler", env)]
    try:
        for name in ("worker-a", "worker-b"):
            started.append(_started([sys.executable, "-m", "distributed.cli.dask_worker", "--scheduler-file",
                                     str(scheduler_file), "--nthreads", "1", "--local-directory",
                                     str(tmp_path / name)], tmp_path / name, env))
        with Client(scheduler_file=str(scheduler_file), timeout=60) as client:
            client.wait_for_workers(2, timeout=120)
            worker_pids = {str(pid) for pid in client.run(os.getpid).values()}
            address = client.scheduler.address
        cfg = tiny_pipeline_config(tiny_model_dir, tmp_path / "ws", **{
            "compute.parallel_stages": "2", "compute.task_runner": "dask", "compute.dask_address": address})
        run = domain_adaptation(config=cfg)
    finally:
        for process in started:
            process.terminate()
            process.wait(timeout=30)

    assert [r["stage"] for r in run["timeline"]] == [r["stage"] for r in sequential_run["timeline"]]
    assert [r["key"] for r in run["timeline"]][:5] == [r["key"] for r in sequential_run["timeline"]][:5]
    assert run["comparison"]["exact_match"] == sequential_run["comparison"]["exact_match"]
    client = tracking.client_for(cfg.tracking_uri())
    pids = {client.get_run(_manifest(path)["mlflow_run_id"]).data.tags[tracking.PID_TAG]
            for path in run["stages"].values()}
    assert pids <= worker_pids and len(pids) == 2, (pids, worker_pids)  # every node on the cluster, both workers used


def _started(argv: list[str], cwd: Path, env: dict):
    import subprocess

    cwd.mkdir(parents=True, exist_ok=True)
    log = open(cwd / "out.log", "w")  # noqa: SIM115 (closed with the process's end by the OS)
    return subprocess.Popen(argv, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT)


@task
def _worker_pid() -> int:
    return os.getpid()


def test_dask_address_is_refused_without_the_dask_runner():
    with pytest.raises(ValueError, match="compute.dask_address 'tcp://scheduler:8786' is read only with "
                                         "compute.task_runner: dask"):
        load_config(None, ["compute.dask_address=tcp://scheduler:8786"])
