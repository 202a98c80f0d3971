"""Deployments against a real Prefect server (`prefect server start`, one per module) and a process
worker, as in production: the flow deployed with the tiny-model config, triggered with
`run_deployment`, run by `prefect worker start --run-once`. A trigger that names one field changes
that field only (the rest is the deployment's preset), and only the stages it decides rerun."""

from __future__ import annotations

import asyncio
import subprocess

import pytest
from mlflow.tracking import MlflowClient

from tests.conftest import ROOT, tiny_pipeline_config
from tests.deployments.conftest import PREFECT, api_settings, create_process_pool, running_prefect_server

pytestmark = pytest.mark.e2e

POOL = "lmforge-server-test"


def _run_on_worker(url: str, env: dict, name: str, parameters: dict | None = None):
    """Trigger the deployment, let one `prefect worker --run-once` execute it, return the final flow run."""
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment

    with api_settings(url):
        flow_run = run_deployment(name, parameters=parameters or {}, timeout=0)
    worker = subprocess.run([PREFECT, "worker", "start", "--pool", POOL, "--run-once"], env=env, cwd=ROOT,
                            capture_output=True, text=True, timeout=900)

    async def read():
        async with get_client() as client:
            return await client.read_flow_run(flow_run.id)

    with api_settings(url):
        final = asyncio.run(read())
    assert final.state.is_completed(), f"{final.state}\n{worker.stdout[-3000:]}\n{worker.stderr[-6000:]}"
    return final


def _logger_names(url: str, flow_run_id) -> set[str]:
    """The loggers whose records the flow run's Prefect log holds (what the UI's Logs tab shows)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    async def read():
        async with get_client() as client:
            return await client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])))

    with api_settings(url):
        return {log.name for log in asyncio.run(read())}


def _stage_status(cfg, flow_run_id: str):
    """(stage -> cached, parent run) of a flow run, from its MLflow runs (the parent is tagged with the flow run)."""
    client = MlflowClient(cfg.tracking_uri(), cfg.tracking_uri())
    exp = client.get_experiment_by_name(cfg.tracking.experiment).experiment_id
    tagged = client.search_runs([exp], f"tags.`prefect.flow_run_id` = '{flow_run_id}'")  # the parent and its stages
    parent = [r for r in tagged if "mlflow.parentRunId" not in r.data.tags]
    assert len(parent) == 1
    children = client.search_runs([exp], f"tags.`mlflow.parentRunId` = '{parent[0].info.run_id}'")
    return {r.data.tags["lmforge.stage"]: r.data.tags["lmforge.cached"] == "true"
            for r in children if "lmforge.cached" in r.data.tags}, parent[0]


def test_deployment_run_with_one_changed_field_reruns_only_what_it_decides(prefect_server, tiny_model_dir, tmp_path):
    from deployments.deploy import PlannedDeployment, deploy

    url, env = prefect_server
    cfg = tiny_pipeline_config(tiny_model_dir, tmp_path / "ws")
    create_process_pool(url, POOL)
    with api_settings(url):
        deploy([PlannedDeployment(name="tiny", entrypoint="flows/domain_adaptation.py:domain_adaptation",
                                  work_pool_name=POOL, parameters={"config": cfg.model_dump(mode="json")})])
    name = "domain_adaptation/tiny"

    first = _run_on_worker(url, env, name)
    status, _ = _stage_status(cfg, str(first.id))
    assert status and not any(status.values()), status
    # What the stages report in the worker's process reaches the run's log in the UI.
    assert {"components.data.align", "components.training.sft", "components.registry"} <= _logger_names(url, first.id)

    # One field from the command line or the API: the rest stays the deployment's preset.
    second = _run_on_worker(url, env, name, {"config": {"sft": {"learning_rate": 2e-3}}})
    status, parent = _stage_status(cfg, str(second.id))
    rerun = {stage for stage, cached in status.items() if not cached}
    assert rerun == {"sft", "evaluate-adapted", "quantize", "register", "promote"}, status
    assert {"prepare", "fetch", "align", "tokenize", "cpt", "evaluate-base"} <= set(status)
    params = parent.data.params
    assert float(params["sft.learning_rate"]) == 2e-3
    assert params["sft.max_steps"] == str(cfg.sft.max_steps) and params["workspace"] == cfg.workspace
    # The second run's model is in the registry under the preset's alias, with its lineage.
    registry = MlflowClient(cfg.tracking_uri(), cfg.tracking_uri())
    version = registry.get_model_version_by_alias(cfg.registry.model_name, cfg.registry.alias)
    assert str(version.version) == "2" and version.tags["prefect.flow_run_id"] == str(second.id)
    assert version.tags["lmforge.config_digest"] and version.tags["lmforge.stage_key.sft"]
    assert version.tags["lmforge.base_model"] == str(tiny_model_dir)


def test_a_cron_deployment_gets_scheduled_runs_at_its_times(prefect_server, tiny_model_dir, tmp_path):
    """The server's scheduler turns the deployment's cron into Scheduled flow runs, at the cron's times."""
    import time
    from datetime import datetime, timezone

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId

    from deployments.deploy import PlannedDeployment, deploy

    url, _ = prefect_server
    cfg = tiny_pipeline_config(tiny_model_dir, tmp_path / "ws")
    create_process_pool(url, POOL)
    with api_settings(url):
        [deployment_id] = deploy([PlannedDeployment(
            name="tiny-weekly", entrypoint="flows/domain_adaptation.py:domain_adaptation", work_pool_name=POOL,
            parameters={"config": cfg.model_dump(mode="json")}, crons=(("0 3 * * 1", "UTC"),))])

    async def scheduled():
        async with get_client() as client:
            runs = await client.read_flow_runs(
                deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment_id])))
            return [r for r in runs if r.state and r.state.is_scheduled()]

    deadline = time.monotonic() + 180
    with api_settings(url):
        while not (runs := asyncio.run(scheduled())) and time.monotonic() < deadline:
            time.sleep(2)
    assert runs, "the scheduler made no runs for the cron deployment within 3 minutes"
    now = datetime.now(timezone.utc)
    for run in runs:
        start = run.expected_start_time.astimezone(timezone.utc)
        assert start > now and (start.weekday(), start.hour, start.minute) == (0, 3, 0), start


def test_the_api_refuses_clients_without_the_auth_string(tmp_path):
    """PREFECT_SERVER_API_AUTH_STRING (README, security): requests without it get 401; a client that sends
    it (PREFECT_API_AUTH_STRING) is served."""
    import urllib.error
    import urllib.request
    from base64 import b64encode

    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_AUTH_STRING, temporary_settings

    secret = "admin:test-secret"
    with running_prefect_server(tmp_path, env={"PREFECT_SERVER_API_AUTH_STRING": secret}) as (url, _):
        anonymous = urllib.request.Request(f"{url}/flows/filter", data=b"{}", method="POST",
                                           headers={"Content-Type": "application/json"})
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(anonymous, timeout=30)
        assert refused.value.code == 401
        anonymous.add_header("Authorization", "Basic " + b64encode(secret.encode()).decode())
        with urllib.request.urlopen(anonymous, timeout=30) as ok:
            assert ok.status == 200

        async def flows():
            async with get_client() as client:
                return await client.read_flows()

        with api_settings(url), temporary_settings({PREFECT_API_AUTH_STRING: secret}):
            assert asyncio.run(flows()) == []
