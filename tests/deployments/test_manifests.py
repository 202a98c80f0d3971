"""The Kubernetes manifests, the Kubernetes work pool's base job template and the Compose file
(deployments/), checked without a cluster or Docker: every manifest against the Kubernetes API's own
JSON schemas in strict mode (kubernetes-validate, which ships them), the job template rendered for a flow
run by the Kubernetes worker's own code (prefect-kubernetes) and the Job it makes validated the same way,
and the references between the pieces (claims, secrets, selectors, the servers' settings) resolved."""

from __future__ import annotations

import asyncio
import copy
import json
import re
import types
import uuid
from pathlib import Path

import pytest
import yaml

from tests.conftest import ROOT

KUBERNETES = ROOT / "deployments" / "kubernetes"
TEMPLATE = KUBERNETES / "base-job-template.json"
COMPOSE = ROOT / "deployments" / "compose.yaml"
K8S_VERSION = "1.32.0"  # the oldest Kubernetes minor still maintained upstream when this was written
SECRET_KEYS = {"lmforge-secrets": {"postgres-password", "prefect-auth"}}  # what docs/deployments.md creates


def _manifest_files() -> list[Path]:
    return sorted(p for p in KUBERNETES.glob("*.yaml") if p.name != "kustomization.yaml")


def _objects() -> list[dict]:
    return [doc for path in _manifest_files() for doc in yaml.safe_load_all(path.read_text()) if doc]


def _validate(obj: dict, *, strict: bool = True) -> None:
    import kubernetes_validate

    kubernetes_validate.validate(obj, K8S_VERSION, strict=strict)


@pytest.mark.parametrize("path", _manifest_files(), ids=lambda p: p.name)
def test_every_manifest_passes_the_kubernetes_schemas_strictly(path):
    import kubernetes_validate

    docs = [doc for doc in yaml.safe_load_all(path.read_text()) if doc]
    assert docs, f"{path.name} holds no object"
    for doc in docs:
        _validate(doc)
    # The check rejects a misspelt field, so passing it means something.
    broken = copy.deepcopy(docs[0])
    broken["metadata"]["nmae"] = "x"
    with pytest.raises(kubernetes_validate.ValidationError):
        _validate(broken)


def test_kustomization_applies_every_manifest_and_generates_the_job_template():
    kustomization = yaml.safe_load((KUBERNETES / "kustomization.yaml").read_text())
    assert sorted(kustomization["resources"]) == sorted(p.name for p in _manifest_files())
    [generated] = kustomization["configMapGenerator"]
    assert generated["files"] == [TEMPLATE.name] and generated["name"] == "lmforge-job-template"


def _containers(obj: dict) -> list[dict]:
    spec = obj.get("spec", {})
    pod = spec.get("template", {}).get("spec", {}) if "template" in spec else {}
    return pod.get("containers", [])


def test_references_between_manifests_resolve():
    objects = _objects()
    names = {(o["kind"], o["metadata"]["name"]) for o in objects} | {("ConfigMap", "lmforge-job-template")}
    assert {o["metadata"].get("namespace", "lmforge") for o in objects if o["kind"] != "Namespace"} == {"lmforge"}
    workloads = [o for o in objects if o["kind"] in ("Deployment", "StatefulSet")]
    for o in workloads:
        where = f"{o['kind']} {o['metadata']['name']}"
        pod = o["spec"]["template"]
        assert o["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items(), where
        for volume in pod["spec"].get("volumes", []):
            if "persistentVolumeClaim" in volume:
                assert ("PersistentVolumeClaim", volume["persistentVolumeClaim"]["claimName"]) in names, where
            if "configMap" in volume:
                assert ("ConfigMap", volume["configMap"]["name"]) in names, where
        if "serviceAccountName" in pod["spec"]:
            assert ("ServiceAccount", pod["spec"]["serviceAccountName"]) in names, where
        for container in pod["spec"]["containers"]:
            _check_env(container, where)
    for service in (o for o in objects if o["kind"] == "Service"):
        selector = service["spec"]["selector"].items()
        assert any(selector <= w["spec"]["template"]["metadata"]["labels"].items() for w in workloads), service
    binding = next(o for o in objects if o["kind"] == "RoleBinding")
    assert ("Role", binding["roleRef"]["name"]) in names
    assert all(("ServiceAccount", s["name"]) in names for s in binding["subjects"])


def _check_env(container: dict, where: str) -> None:
    """Secrets are the documented ones; $(VAR) names a variable defined before it (Kubernetes expands only
    those); settings the servers read are names they know."""
    import prefect.settings
    from mlflow.cli import server

    mlflow_settings = {p.envvar for p in server.params if getattr(p, "envvar", None)}
    defined: set[str] = set()
    for env in container.get("env", []):
        ref = env.get("valueFrom", {}).get("secretKeyRef")
        if ref:
            assert ref["key"] in SECRET_KEYS.get(ref["name"], set()), (where, ref)
        for used in re.findall(r"\$\((\w+)\)", env.get("value", "")):
            assert used in defined, f"{where}: {env['name']} uses $({used}) before it is defined"
        defined.add(env["name"])
        if env["name"].startswith("PREFECT_"):
            assert hasattr(prefect.settings, env["name"]), f"{where}: Prefect has no setting {env['name']}"
        if env["name"].startswith("MLFLOW_") and container["args"][:2] == ["mlflow", "server"]:
            assert env["name"] in mlflow_settings, f"{where}: `mlflow server` reads no {env['name']}"


def test_the_server_commands_parse_with_the_installed_clis():
    """`mlflow server`'s arguments in both setups are options the installed MLflow accepts."""
    from mlflow.cli import server

    compose = yaml.safe_load(COMPOSE.read_text())
    commands = [compose["services"]["mlflow"]["command"]]
    commands += [c["args"] for o in _objects() for c in _containers(o) if c.get("args", [])[:2] == ["mlflow", "server"]]
    assert len(commands) == 2
    for command in commands:
        server.make_context("server", command[2:], resilient_parsing=False)  # raises on an unknown option


def _rendered_job(values: dict) -> dict:
    """The Job the Kubernetes worker creates for a flow run from the template and a deployment's job
    variables (`values`), through prefect-kubernetes's own code."""
    pytest.importorskip("prefect_kubernetes", reason="`pip install prefect-kubernetes` (the test extra) enables this")
    from prefect.client.schemas.objects import FlowRun
    from prefect_kubernetes.worker import KubernetesWorkerJobConfiguration

    template = json.loads(TEMPLATE.read_text())
    # No block or variable references in the template: the client the resolution steps take is never asked.
    configuration = asyncio.run(KubernetesWorkerJobConfiguration.from_template_and_values(
        template, values, client=types.SimpleNamespace()))
    configuration.prepare_for_flow_run(FlowRun(id=uuid.uuid4(), name="brave-otter", flow_id=uuid.uuid4()))
    return configuration.job_manifest


def test_the_job_template_is_a_valid_work_pool_template_and_makes_valid_jobs():
    from prefect.server.schemas.actions import WorkPoolCreate

    template = json.loads(TEMPLATE.read_text())
    WorkPoolCreate(name="lmforge-k8s", type="kubernetes", base_job_template=template)  # what the server checks

    job = _rendered_job({"image": "registry.example.com/lmforge:1.0"})
    _validate(job, strict=False)
    # prefect-kubernetes requires parallelism and completions in the pod spec (its own base manifest puts them
    # there; the API server drops them with a warning); everything else must be exactly right.
    pod = job["spec"]["template"]["spec"]
    assert (pod.pop("parallelism"), pod.pop("completions")) == (1, 1)
    _validate(job)

    [container] = pod["containers"]
    assert container["image"] == "registry.example.com/lmforge:1.0"
    assert container["args"] == ["prefect", "flow-run", "execute"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    claims = {v["name"]: v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"] if "persistentVolumeClaim" in v}
    assert (mounts["workspace"], claims["workspace"]) == ("/srv/lmforge", "lmforge-workspace")
    assert (mounts["hf-cache"], claims["hf-cache"]) == ("/srv/hf", "lmforge-hf-cache")
    pvcs = {o["metadata"]["name"] for o in _objects() if o["kind"] == "PersistentVolumeClaim"}
    assert set(claims.values()) <= pvcs
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["HF_HOME"] == "/srv/hf" and env["LMFORGE_CACHE"].startswith("/srv/hf/")
    assert env["MLFLOW_TRACKING_URI"] == "http://lmforge-mlflow:5000"
    assert job["metadata"]["namespace"] == "lmforge"


def test_a_deployments_job_variables_override_gpus_claims_and_add_secret_env():
    job = _rendered_job({"gpu_count": 4, "workspace_claim": "team-a-workspace", "cpu_limit": "32",
                         "env": [{"name": "MLFLOW_TRACKING_PASSWORD",
                                  "valueFrom": {"secretKeyRef": {"name": "mlflow-auth", "key": "password"}}}]})
    pod = job["spec"]["template"]["spec"]
    del pod["parallelism"], pod["completions"]
    _validate(job)
    [container] = pod["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 4 and container["resources"]["limits"]["cpu"] == "32"
    assert {"name": "workspace", "persistentVolumeClaim": {"claimName": "team-a-workspace"}} in pod["volumes"]
    secret = next(e for e in container["env"] if e["name"] == "MLFLOW_TRACKING_PASSWORD")
    assert secret["valueFrom"]["secretKeyRef"] == {"name": "mlflow-auth", "key": "password"}


def test_compose_file_wires_the_servers_to_postgresql_and_publishes_on_loopback_only():
    import prefect.settings
    from mlflow.cli import server

    compose = yaml.safe_load(COMPOSE.read_text())
    services = compose["services"]
    assert set(services) == {"postgres", "mlflow", "prefect", "worker"}
    declared = set(compose["volumes"])
    for name, service in services.items():
        for dependency in service.get("depends_on", {}):
            assert dependency in services, (name, dependency)
        for port in service.get("ports", []):
            assert port.startswith("127.0.0.1:"), f"{name} publishes {port} beyond loopback"
        for volume in service.get("volumes", []):
            assert volume.split(":")[0] in declared, (name, volume)
        for key, value in service.get("environment", {}).items():
            if key.startswith("PREFECT_"):
                assert hasattr(prefect.settings, key), f"{name}: Prefect has no setting {key}"
            # A password appears only as the variable the user exports, never written into the file.
            assert "PASSWORD" not in key or "${POSTGRES_PASSWORD" in value, (name, key)
    mlflow_settings = {p.envvar for p in server.params if getattr(p, "envvar", None)}
    assert set(services["mlflow"]["environment"]) <= mlflow_settings
    assert services["mlflow"]["environment"]["MLFLOW_BACKEND_STORE_URI"].startswith("postgresql://")
    assert services["prefect"]["environment"]["PREFECT_API_DATABASE_CONNECTION_URL"].startswith("postgresql+asyncpg://")
    created = re.findall(r"CREATE DATABASE (\w+);", compose["configs"]["create-databases"]["content"])
    urls = [services["mlflow"]["environment"]["MLFLOW_BACKEND_STORE_URI"],
            services["prefect"]["environment"]["PREFECT_API_DATABASE_CONNECTION_URL"]]
    assert created == [url.rsplit("/", 1)[1] for url in urls] == ["mlflow", "prefect"]
