"""The production setup (README, docs/deployments.md) for real on one machine: PostgreSQL from Debian's
package, `mlflow server` on it with proxied artifacts (clients upload over HTTP, no shared disk), `prefect
server` on it, and process workers polling one pool. One flow run of the tiny pipeline completes on it;
then ten flow runs at once on three workers, with identical and changed configs, compute each stage
exactly once and leave nothing RUNNING (bench/load_test.py records the same for the RESULTS figures).

Skipped, saying why, where PostgreSQL's server binaries are missing (`apt-get install -y postgresql`)."""

from __future__ import annotations

import json

import pytest
from mlflow.tracking import MlflowClient

from tests.conftest import tiny_pipeline_config
from tests.deployments.stack import (
    LOAD_VARIANTS,
    deploy_tiny,
    load_test,
    run_all_at_once,
    running_stack,
    running_workers,
)
from tests.postgres import postgres  # noqa: F401 (the session's PostgreSQL, a fixture)

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def stack(postgres, tmp_path_factory):  # noqa: F811
    with running_stack(postgres, tmp_path_factory.mktemp("stack")) as stack:
        yield stack


def _query(postgres, database: str, sql: str, *args) -> list[tuple]:  # noqa: F811
    import psycopg2

    with psycopg2.connect(postgres.url(database)) as connection, connection.cursor() as cursor:
        cursor.execute(sql, args)
        return cursor.fetchall()


def test_a_flow_run_on_a_worker_against_both_servers_on_postgresql(stack, postgres, tiny_model_dir, tmp_path):  # noqa: F811
    workspace = tmp_path / "ws"
    cfg = tiny_pipeline_config(tiny_model_dir, workspace, **{
        "tracking.tracking_uri": stack.mlflow_url, "tracking.experiment": "one-run", "registry.model_name": "tiny-pg"})
    deployment = deploy_tiny(stack, cfg, "pg-one", "tiny-one")
    with running_workers(stack, "pg-one", count=1, limit=1):
        [flow_run], _ = run_all_at_once(stack, deployment, [{}], timeout=600)
    assert flow_run.state.is_completed(), (flow_run.state, (stack.root / "worker-0.log").read_text()[-6000:])

    client = MlflowClient(stack.mlflow_url, stack.mlflow_url)
    exp = client.get_experiment_by_name("one-run")
    runs = client.search_runs([exp.experiment_id], "")
    stages = {r.data.tags["lmforge.stage"]: r for r in runs if "lmforge.stage" in r.data.tags}
    assert {"tokenize", "cpt", "sft", "register"} <= set(stages)
    assert {r.info.status for r in runs} == {"FINISHED"}
    # Proxied artifacts: every URI goes through the server; nothing was written into the workspace for MLflow.
    assert exp.artifact_location.startswith("mlflow-artifacts:/")
    assert all(r.info.artifact_uri.startswith("mlflow-artifacts:/") for r in runs)
    assert not (workspace / "mlartifacts").exists()
    sft = stages["sft"]
    local = workspace / "artifacts" / "sft" / sft.data.tags["lmforge.cache_key"] / "manifest.json"
    downloaded = client.download_artifacts(sft.info.run_id, "manifest.json", str(tmp_path))
    assert open(downloaded, "rb").read() == local.read_bytes()
    # ...and the server stored the upload under its --artifacts-destination.
    stored = list(stack.artifacts.rglob(f"{sft.info.run_id}/artifacts/manifest.json"))
    assert len(stored) == 1 and stored[0].read_bytes() == local.read_bytes()

    version = client.get_model_version_by_alias("tiny-pg", cfg.registry.alias)
    assert version.version == "1" and version.tags["prefect.flow_run_id"] == str(flow_run.id)
    assert version.source.startswith("mlflow-artifacts:/")
    assert "model/MLmodel" in {f.path for f in client.list_artifacts(version.run_id, "model")}
    # The records are in PostgreSQL: the runs in MLflow's database, the flow run in Prefect's.
    finished = _query(postgres, "mlflow", "SELECT count(*) FROM runs WHERE experiment_id = %s AND status = 'FINISHED'",
                      int(exp.experiment_id))
    assert finished == [(len(runs),)]
    assert _query(postgres, "prefect", "SELECT state_type FROM flow_run WHERE id = %s", str(flow_run.id)) == [("COMPLETED",)]
    # The database password reaches the servers through their settings, never their logs.
    for log in ("mlflow-server.log", "prefect-home/server.log", "worker-0.log"):
        assert postgres.password not in (stack.root / log).read_text(), log


def test_ten_runs_at_once_on_three_workers_compute_each_stage_once(stack, tiny_model_dir, tmp_path):
    cfg = tiny_pipeline_config(tiny_model_dir, tmp_path / "ws", **{
        "tracking.tracking_uri": stack.mlflow_url, "tracking.experiment": "load", "registry.model_name": "tiny-load"})
    # Ten at once on three workers (one run each at a time): four configs, repeated (LOAD_VARIANTS).
    chosen = [LOAD_VARIANTS[i % len(LOAD_VARIANTS)] for i in range(10)]
    figures = load_test(stack, cfg, [parameters for _, parameters in chosen], pool="pg-load", workers=3, limit=1,
                        timeout=1200)
    shown = json.dumps(figures, indent=1)
    assert figures["completed"] == 10, shown
    assert figures["duplicates"] == 0 and figures["never_computed"] == [], shown
    # Each config's stages from the one it changes on, once: as many stage directories as distinct stages.
    assert figures["stage_directories"] == figures["distinct_stages"] == figures["stages_computed"], shown
    assert figures["mlflow_runs_running"] == 0 and set(figures["mlflow_runs_by_status"]) == {"FINISHED"}, shown
    assert figures["registry_versions"] == len({name for name, _ in chosen}) == 4, shown
    assert figures["lineage_errors"] == [] and figures["workers_used"] == 3, shown
