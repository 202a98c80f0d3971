"""The production setup on one machine, for the tests and bench/load_test.py: PostgreSQL, `mlflow server` on it
with proxied artifacts, `prefect server` on it, process workers polling one pool; and what a batch of
flow runs on it left behind (stages computed, duplicates, MLflow runs left RUNNING, registry versions)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from mlflow.tracking import MlflowClient

from tests.conftest import ROOT
from tests.deployments.conftest import PREFECT, api_settings, running_prefect_server
from tests.postgres import Postgres
from tests.servers import running_mlflow_server

ENTRYPOINT = "flows/domain_adaptation.py:domain_adaptation"

# The configs of a load test's runs, in trigger order (the suite's ten runs and bench/load_test.py): repeated ones
# must be computed once, changed ones from the stage they change on. Run i takes entry i modulo the length.
LOAD_VARIANTS = [
    ("preset", {}),
    ("sft.learning_rate=2e-3", {"config": {"sft": {"learning_rate": 2e-3}}}),
    ("preset", {}),
    ("evaluate.max_new_tokens=6", {"config": {"evaluate": {"max_new_tokens": 6}}}),
    ("preset", {}),
    ("sft.learning_rate=2e-3", {"config": {"sft": {"learning_rate": 2e-3}}}),
    ("cpt.learning_rate=1e-3", {"config": {"cpt": {"learning_rate": 1e-3}}}),
    ("preset", {}),
    ("sft.learning_rate=2e-3", {"config": {"sft": {"learning_rate": 2e-3}}}),
    ("evaluate.max_new_tokens=6", {"config": {"evaluate": {"max_new_tokens": 6}}}),
]


@dataclass(frozen=True)
class Stack:
    mlflow_url: str
    artifacts: Path  # the MLflow server's --artifacts-destination (only the server writes there)
    prefect_url: str
    worker_env: dict  # what a worker or client needs: the API URL, never the database's password
    root: Path


@contextlib.contextmanager
def running_stack(postgres: Postgres, root: Path, tag: str = "") -> Iterator[Stack]:
    """MLflow and Prefect servers on databases `mlflow<tag>` and `prefect<tag>` of `postgres` (created here)."""
    from tests.postgres import create_databases

    mlflow_db, prefect_db = f"mlflow{tag}", f"prefect{tag}"
    create_databases(postgres, (mlflow_db, prefect_db))
    artifacts = root / "mlflow-artifacts"
    home = root / "prefect-home"
    home.mkdir(parents=True, exist_ok=True)
    database = {"PREFECT_API_DATABASE_CONNECTION_URL": postgres.url(prefect_db, "postgresql+asyncpg")}
    with running_mlflow_server(postgres.url(mlflow_db), artifacts, root / "mlflow-server.log") as mlflow_url, \
            running_prefect_server(home, env=database) as (prefect_url, env):
        worker_env = {k: v for k, v in env.items() if k != "PREFECT_API_DATABASE_CONNECTION_URL"}
        # Workers look for runs every 2 s (default 10 s): runs triggered together start together.
        worker_env["PREFECT_WORKER_QUERY_SECONDS"] = "2"
        yield Stack(mlflow_url, artifacts, prefect_url, worker_env, root)


def deploy_tiny(stack: Stack, cfg, pool: str, name: str) -> str:
    """A process pool and a deployment of the flow whose preset is `cfg`; returns `flow/deployment`."""
    from deployments.deploy import PlannedDeployment, deploy
    from tests.deployments.conftest import create_process_pool

    create_process_pool(stack.prefect_url, pool)
    with api_settings(stack.prefect_url):
        deploy([PlannedDeployment(name=name, entrypoint=ENTRYPOINT, work_pool_name=pool,
                                  parameters={"config": cfg.model_dump(mode="json")})])
    return f"domain_adaptation/{name}"


@contextlib.contextmanager
def running_workers(stack: Stack, pool: str, count: int, limit: int) -> Iterator[list[subprocess.Popen]]:
    """`count` process workers polling `pool`, each running at most `limit` flow runs at once; stopped (with the
    flow runs they started) when the `with` ends. Their output goes to worker-<i>.log under the stack's root."""
    workers = []
    try:
        for i in range(count):
            log = open(stack.root / f"worker-{i}.log", "w")  # noqa: SIM115 (closed with the process below)
            workers.append((subprocess.Popen(
                [PREFECT, "worker", "start", "--pool", pool, "--type", "process", "--limit", str(limit),
                 "--name", f"worker-{i}"], env=stack.worker_env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True), log))
        yield [w for w, _ in workers]
    finally:
        for worker, log in workers:
            for sig in (signal.SIGTERM, signal.SIGKILL):
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(worker.pid, sig)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    worker.wait(30)
            log.close()


def run_all_at_once(stack: Stack, deployment: str, parameters: list[dict], timeout: float) -> tuple[list, float]:
    """Trigger one flow run per entry of `parameters` at once and wait until every one is final (or `timeout`
    seconds pass); returns (the flow runs as last read, wall seconds from the first trigger to the last end)."""
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment

    t0 = time.monotonic()
    with api_settings(stack.prefect_url):
        ids = [run_deployment(deployment, parameters=p, timeout=0).id for p in parameters]

    async def read():
        async with get_client() as client:
            return [await client.read_flow_run(i) for i in ids]

    with api_settings(stack.prefect_url):
        while True:
            runs = asyncio.run(read())
            if all(r.state and r.state.is_final() for r in runs) or time.monotonic() - t0 > timeout:
                break
            time.sleep(2)
    return runs, time.monotonic() - t0


def load_test(stack: Stack, cfg, parameters: list[dict], *, pool: str, workers: int, limit: int,
              timeout: float) -> dict:
    """Deploy `cfg` as the preset, start `workers` workers on `pool`, trigger one flow run per entry of
    `parameters` at once, wait for all, and return what they left behind (`load_figures`)."""
    deployment = deploy_tiny(stack, cfg, pool, f"{pool}-tiny")
    with running_workers(stack, pool, count=workers, limit=limit):
        runs, wall_s = run_all_at_once(stack, deployment, parameters, timeout)
    return load_figures(stack, cfg, runs, wall_s)


def load_figures(stack: Stack, cfg, runs: list, wall_s: float) -> dict:
    """What a batch of flow runs left behind: their states; stages computed (MLflow stage runs not cached),
    distinct stages, duplicates (a stage key computed more than once) and stage keys seen but never computed;
    stage directories with a manifest; MLflow runs by status; registry versions and their lineage errors."""
    client = MlflowClient(stack.mlflow_url, stack.mlflow_url)
    exp = client.get_experiment_by_name(cfg.tracking.experiment)
    every_run = client.search_runs([exp.experiment_id], "", max_results=5000)
    stages = [r for r in every_run if "lmforge.cached" in r.data.tags]
    computed = Counter(_stage_of(r) for r in stages if r.data.tags["lmforge.cached"] == "false")
    distinct = {_stage_of(r) for r in stages}
    workspace = Path(cfg.workspace) / "artifacts"
    versions = client.search_model_versions(f"name = '{cfg.registry.model_name}'")
    return {
        "runs": len(runs),
        "completed": sum(1 for r in runs if r.state and r.state.is_completed()),
        "states": dict(Counter(r.state.name if r.state else "none" for r in runs)),
        "wall_s": round(wall_s, 1),
        "stage_runs": len(stages),
        "distinct_stages": len(distinct),
        "stages_computed": sum(computed.values()),
        "duplicates": sum(n - 1 for n in computed.values()),
        "never_computed": sorted(f"{stage}/{key[:12]}" for stage, key in distinct - set(computed)),
        "stage_directories": len(list(workspace.glob("*/*/manifest.json"))),
        "mlflow_runs_running": sum(1 for r in every_run if r.info.status == "RUNNING"),
        "mlflow_runs_by_status": dict(Counter(r.info.status for r in every_run)),
        "artifact_uri_schemes": sorted({r.info.artifact_uri.split(":", 1)[0] for r in every_run}),
        "registry_versions": len(versions),
        "lineage_errors": _lineage_errors(versions, every_run, {str(r.id) for r in runs}),
        "workers_used": _workers_used(runs),
        "versions": [{"version": v.version, "flow_run": v.tags.get("prefect.flow_run_id"), "run_id": v.run_id,
                      "config_digest": v.tags.get("lmforge.config_digest", "")[:12]} for v in versions],
    }


def _stage_of(run) -> tuple[str, str]:
    return run.data.tags["lmforge.stage"], run.data.tags["lmforge.cache_key"]


def _lineage_errors(versions: list, every_run: list, flow_run_ids: set[str]) -> list[str]:
    """What is wrong with each version's lineage: it must name a flow run of the batch whose parent MLflow run
    has the version's config digest, and each `lmforge.stage_key.<stage>` tag must be the key that flow run's
    <stage> run used. Versions of one config digest more than once are an error too (registered twice)."""
    parents = {r.data.tags.get("prefect.flow_run_id"): r for r in every_run if "mlflow.parentRunId" not in r.data.tags}
    children: dict[str, dict[str, str]] = {}
    for r in every_run:
        if "lmforge.cache_key" in r.data.tags and "mlflow.parentRunId" in r.data.tags:  # not the register's model run
            children.setdefault(r.data.tags["mlflow.parentRunId"], {})[r.data.tags["lmforge.stage"]] = \
                r.data.tags["lmforge.cache_key"]
    errors = []
    for v in versions:
        flow_run = v.tags.get("prefect.flow_run_id")
        parent = parents.get(flow_run)
        if flow_run not in flow_run_ids or parent is None:
            errors.append(f"version {v.version}: flow run {flow_run} is not one of the batch's")
            continue
        if v.tags.get("lmforge.config_digest") != parent.data.tags.get("lmforge.config_digest"):
            errors.append(f"version {v.version}: config digest differs from its flow run's")
        keys = children.get(parent.info.run_id, {})
        for tag, key in v.tags.items():
            stage = tag.removeprefix("lmforge.stage_key.")
            if tag != stage and keys.get(stage) != key:
                errors.append(f"version {v.version}: {stage} key {key[:12]} is not its flow run's {keys.get(stage)}")
    digests = Counter(v.tags.get("lmforge.config_digest") for v in versions)
    errors += [f"config {d[:12]} registered {n} times" for d, n in digests.items() if n > 1]
    return errors


def _workers_used(runs: list) -> int:
    """How many workers ran at least one of `runs` (a worker labels each flow run it takes with its name)."""
    return len({r.labels.get("prefect.worker.name") for r in runs if r.labels.get("prefect.worker.name")})
