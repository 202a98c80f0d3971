"""Deployments: the entrypoint loads, the typed form renders, and deploy() registers cron + manual."""

from __future__ import annotations

from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]


def test_prefect_yaml_entrypoints_load():
    from prefect.flows import load_flow_from_entrypoint

    spec = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    assert {d["name"] for d in spec["deployments"]} == {"icd10-weekly", "manual"}
    for dep in spec["deployments"]:
        flow = load_flow_from_entrypoint(str(ROOT / dep["entrypoint"]))
        assert flow.name == "domain_adaptation"
    assert spec["deployments"][0]["schedules"][0]["cron"]


def test_flow_parameters_render_as_a_typed_form():
    from prefect.utilities.callables import parameter_schema

    from flows.domain_adaptation import domain_adaptation

    schema = parameter_schema(domain_adaptation).model_dump_for_openapi()
    props = schema["properties"]
    assert set(props) >= {"config", "from_stage", "only", "until"}
    definitions = schema["definitions"]
    train = definitions["TrainConfig"]["properties"]
    assert train["learning_rate"]["type"] == "number"
    assert "checkpoint" in train["save_steps"]["description"].lower()
    assert "sft" in str(props["from_stage"])


def test_deploy_registers_manual_and_cron_deployments(prefect_harness):
    import asyncio

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate

    from deployments.deploy import deploy

    async def make_pool():
        async with get_client() as client:
            await client.create_work_pool(WorkPoolCreate(name="lmforge-test", type="process"), overwrite=True)

    asyncio.run(make_pool())
    ids = deploy("lmforge-test", "0 3 * * 1", str(ROOT / "configs/demo-cpu.yaml"), name_prefix="t")
    assert len(ids) == 2

    async def read():
        async with get_client() as client:
            return await client.read_deployment_by_name("domain_adaptation/t-scheduled")

    dep = asyncio.run(read())
    assert dep.schedules and dep.schedules[0].schedule.cron == "0 3 * * 1"
    assert dep.parameters["config"]["sft"]["max_steps"] == 150
