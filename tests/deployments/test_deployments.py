"""prefect.yaml is the one definition of the deployments: its entrypoints load the flow, its parameters
are the presets it names (fully resolved, so a preset edited without regenerating fails here) and pass
the flow's own parameter schema, and `lmforge deploy` (deployments/deploy.py) plans and registers exactly
what it says."""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from deployments.deploy import (
    PREFECT_YAML,
    PlannedDeployment,
    planned_deployments,
    preset_parameters,
    write_prefect_yaml,
)
from flows.cli import app
from tests.servers import free_port

ROOT = Path(__file__).resolve().parents[2]


def _spec() -> dict:
    return yaml.safe_load(PREFECT_YAML.read_text(encoding="utf-8"))


def _flow(entrypoint: str):
    from prefect.flows import load_flow_from_entrypoint

    return load_flow_from_entrypoint(str(ROOT / entrypoint))


def test_prefect_yaml_defines_the_scheduled_the_manual_and_the_rerun_deployment():
    plans = {p.name: p for p in planned_deployments()}
    assert set(plans) == {"icd10-scheduled", "icd10-manual", "icd10-rerun-from-stage"}
    assert plans["icd10-scheduled"].crons == (("0 3 * * 1", "UTC"),)
    assert plans["icd10-manual"].crons == () and plans["icd10-rerun-from-stage"].crons == ()
    assert plans["icd10-rerun-from-stage"].parameters["from_stage"] == "evaluate"
    assert {p.work_pool_name for p in plans.values()} == {"lmforge-local"}


@pytest.mark.parametrize("deployment", _spec()["deployments"], ids=lambda d: d["name"])
def test_entrypoint_loads_the_flow_and_parameters_pass_its_schema(deployment):
    from prefect.utilities.callables import parameter_schema
    from prefect.utilities.schema_tools import ValidationError, validate

    from components.config import PipelineConfig
    from flows.domain_adaptation import domain_adaptation

    flow = _flow(deployment["entrypoint"])
    assert flow.name == domain_adaptation.name
    assert flow.fn.__code__.co_filename == domain_adaptation.fn.__code__.co_filename
    assert flow.fn.__code__.co_firstlineno == domain_adaptation.fn.__code__.co_firstlineno
    schema = parameter_schema(flow).model_dump_for_openapi()
    params = deployment["parameters"]
    # What the Prefect API runs on a deployment's parameters when it enforces the schema (the default).
    validate(params, schema, raise_on_error=True, ignore_required=True)
    PipelineConfig.model_validate(params["config"])
    # The same check rejects a stale field, so passing it above means something.
    stale = copy.deepcopy(params)
    stale["config"]["sft"]["lr"] = 0.1
    with pytest.raises(ValidationError, match="lr"):
        validate(stale, schema, raise_on_error=True, ignore_required=True)


def test_parameters_are_the_presets_they_name():
    from components.config import PipelineConfig

    spec = _spec()
    presets = spec["definitions"]["presets"]
    assert list(presets) == ["configs/demo-cpu.yaml"]
    for preset, params in presets.items():
        assert params == preset_parameters(preset), f"{preset} changed: run lmforge deploy --write-prefect-yaml"
    demo = preset_parameters("configs/demo-cpu.yaml")
    for dep in spec["deployments"]:
        # The preset, plus the stage parameters a deployment sets (the rerun deployment's from_stage).
        assert dep["parameters"]["config"] == demo["config"], dep["name"]
        assert set(dep["parameters"]) - {"config"} <= {"from_stage", "only", "until", "verify"}, dep["name"]
    # The demo preset, not the built-in defaults: the runs a deployment starts are the documented demo.
    assert demo["config"]["sft"]["max_steps"] == yaml.safe_load((ROOT / "configs/demo-cpu.yaml").read_text())["sft"]["max_steps"]
    assert demo["config"] != PipelineConfig().model_dump(mode="json")


def _stale_copy(tmp_path: Path) -> Path:
    """A copy of prefect.yaml whose preset block is empty, as after adding a preset by hand."""
    lines = PREFECT_YAML.read_text(encoding="utf-8").splitlines(keepends=True)
    start = lines.index("definitions:\n")
    end = lines.index("deployments:\n")
    stale = tmp_path / "prefect.yaml"
    stale.write_text("".join(lines[:start]) + "definitions:\n  presets:\n    configs/demo-cpu.yaml: &demo-cpu {}\n\n"
                     + "".join(lines[end:]), encoding="utf-8")
    assert yaml.safe_load(stale.read_text())["deployments"][0]["parameters"] == {}
    return stale


def test_regenerating_a_stale_prefect_yaml_gives_the_committed_file(tmp_path):
    # Regenerating must restore the committed file byte for byte: comments and deployments kept, the preset resolved.
    stale = _stale_copy(tmp_path)
    assert write_prefect_yaml(stale) == ["configs/demo-cpu.yaml"]
    assert stale.read_text(encoding="utf-8") == PREFECT_YAML.read_text(encoding="utf-8")


def test_lmforge_deploy_writes_the_presets_and_prints_the_plan(tmp_path):
    stale = _stale_copy(tmp_path)
    result = CliRunner().invoke(app, ["deploy", "--write-prefect-yaml", "--file", str(stale)], terminal_width=200)
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == "prefect.yaml: parameters regenerated from configs/demo-cpu.yaml"
    assert stale.read_text(encoding="utf-8") == PREFECT_YAML.read_text(encoding="utf-8")

    # --dry-run: one line per deployment with what registering it sets up; no server is asked.
    result = CliRunner().invoke(app, ["deploy", "--dry-run"], terminal_width=200)
    assert result.exit_code == 0, result.output
    lines = result.stdout.strip().splitlines()
    assert [line.split(":")[0] for line in lines] == [f"would register {p.name}" for p in planned_deployments()]
    scheduled, manual, rerun = lines
    assert "on work pool lmforge-local" in manual and "cron '0 3 * * 1' (UTC)" in scheduled
    assert "no schedule" in manual and "parameters" not in manual and rerun.endswith("parameters from_stage=evaluate")

    only = CliRunner().invoke(app, ["deploy", "--dry-run", "--name", "icd10-manual"], terminal_width=200)
    assert only.exit_code == 0 and only.stdout.strip() == manual
    unknown = CliRunner().invoke(app, ["deploy", "--dry-run", "--name", "icd10-nightly"], terminal_width=200)
    assert unknown.exit_code == 2
    assert "not in prefect.yaml: icd10-nightly; there: icd10-scheduled, icd10-manual" in unknown.stdout


def test_lmforge_deploy_says_in_a_line_when_no_prefect_server_answers():
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: f"http://127.0.0.1:{free_port()}/api"}):
        result = CliRunner().invoke(app, ["deploy", "--name", "icd10-manual"], terminal_width=300)
    assert result.exit_code == 2
    assert "does not answer" in result.stdout and "prefect server start --host 127.0.0.1" in result.stdout
    assert "Traceback" not in result.output


def test_the_cli_imports_deployments_only_when_deploying():
    # flows/ must not depend on deployments/ (which loads the flow by its entrypoint): `lmforge run` starts without it.
    code = "import sys, flows.cli; print(sorted(m for m in sys.modules if m.split('.')[0] == 'deployments'))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True, timeout=120)
    assert out.stdout.strip() == "[]"


def test_flow_parameters_render_as_a_typed_form():
    # Custom runs of a deployment show this schema as the form: typed fields with their descriptions.
    from prefect.utilities.callables import parameter_schema

    from components.pipeline import STAGE_KINDS

    schema = parameter_schema(_flow(_spec()["deployments"][0]["entrypoint"])).model_dump_for_openapi()
    props, definitions = schema["properties"], schema["definitions"]
    assert set(props) >= {"config", "from_stage", "only", "until"}
    train = definitions["TrainConfig"]["properties"]
    assert train["learning_rate"]["type"] == "number"
    assert "checkpoint" in train["save_steps"]["description"].lower()
    for name in ("from_stage", "only", "until"):
        choices = {v for option in props[name].get("anyOf", [props[name]]) for v in option.get("enum", [])}
        assert "sft" in choices and choices <= set(STAGE_KINDS), (name, choices)


def test_deploy_py_plans_what_prefect_deploy_reads():
    # `prefect deploy --all` reads prefect.yaml through its own loader; deploy.py must plan the same.
    from prefect.cli.deploy._config import _load_deploy_configs_and_actions
    from rich.console import Console

    configs, _ = _load_deploy_configs_and_actions(PREFECT_YAML, console=Console(quiet=True))
    from_prefect = [
        PlannedDeployment(
            name=c["name"],
            entrypoint=c["entrypoint"],
            work_pool_name=c["work_pool"]["name"],
            parameters=c["parameters"],
            crons=tuple((s["cron"], s.get("timezone")) for s in c.get("schedules") or []),
            tags=tuple(c.get("tags") or ()),
            description=c.get("description"),
        )
        for c in configs
    ]
    assert planned_deployments() == from_prefect


def test_planning_rejects_what_deploy_py_cannot_deploy(tmp_path):
    spec = _spec()
    spec["deployments"][0]["schedules"] = [{"interval": 3600}]
    bad = tmp_path / "prefect.yaml"
    bad.write_text(yaml.safe_dump(spec))
    with pytest.raises(ValueError, match=r"'icd10-scheduled'.*cron"):
        planned_deployments(bad)
    del spec["deployments"][0]["schedules"], spec["deployments"][1]["work_pool"]
    bad.write_text(yaml.safe_dump(spec))
    with pytest.raises(ValueError, match=r"'icd10-manual'.*work_pool\.name"):
        planned_deployments(bad)
    spec = _spec()
    spec["deployments"][1]["pull"] = [{"prefect.deployments.steps.set_working_directory": {"directory": "/opt/x"}}]
    bad.write_text(yaml.safe_dump(spec))
    with pytest.raises(ValueError, match=r"'icd10-manual'.*prefect deploy --name icd10-manual"):
        planned_deployments(bad)


def test_deploy_registers_what_prefect_yaml_defines(prefect_harness, tmp_path):
    import asyncio

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate

    # Same file, a pool and names of this test's own (the session's API is shared with other tests).
    spec = _spec()
    for dep in spec["deployments"]:
        dep["name"] = f"test-{dep['name']}"
        dep["work_pool"]["name"] = "lmforge-test-deploy"
    spec["deployments"][1]["work_pool"]["job_variables"] = {"env": {"HF_HOME": "/srv/hf"}}  # passed through
    path = tmp_path / "prefect.yaml"
    path.write_text(yaml.safe_dump(spec))
    plans = planned_deployments(path)

    async def make_pool():
        async with get_client() as client:
            await client.create_work_pool(WorkPoolCreate(name="lmforge-test-deploy", type="process"), overwrite=True)

    async def read(names):
        async with get_client() as client:
            return [await client.read_deployment_by_name(f"domain_adaptation/{n}") for n in names]

    asyncio.run(make_pool())
    result = CliRunner().invoke(app, ["deploy", "--file", str(path)], terminal_width=300)
    assert result.exit_code == 0, result.output
    registered = asyncio.run(read([p.name for p in plans]))
    # Prefect prints its own table as well; ours is a line per deployment.
    ours = [line for line in result.stdout.splitlines() if line.startswith("registered ")]
    assert [line.rsplit(": id ", 1)[-1] for line in ours] == [str(d.id) for d in registered]
    for plan, dep in zip(plans, registered, strict=True):
        assert dep.work_pool_name == plan.work_pool_name
        assert dep.parameters == plan.parameters
        assert tuple((s.schedule.cron, s.schedule.timezone) for s in dep.schedules) == plan.crons
        assert set(dep.tags) == set(plan.tags)
        assert dep.description == plan.description
        assert dep.entrypoint == plan.entrypoint
        assert (dep.job_variables or None) == plan.job_variables
    assert plans[1].job_variables == {"env": {"HF_HOME": "/srv/hf"}}
