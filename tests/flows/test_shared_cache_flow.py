"""Two workspaces that share only a stage store URL (a local directory) and the tracking server: the whole flow
on the tiny model in the first, the first workspace deleted, then the second runs every stage cached, downloaded
from the store, with the same keys and manifests, and uploads nothing to MLflow; every stage's outputs are in
MLflow once, and the registered version names where each stage's outputs are."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from components import tracking
from tests.conftest import tiny_pipeline_config

pytestmark = pytest.mark.e2e

# Machine-local fields: where the stage lies on each machine and when its files were written there.
LOCAL = {"dir"}


def _manifests(summary: dict) -> dict[str, dict]:
    return {stage: json.loads((Path(path) / "manifest.json").read_text()) for stage, path in summary["stages"].items()}


def _portable(manifest: dict) -> dict:
    files = {rel: {"sha256": m["sha256"], "bytes": m["bytes"]} for rel, m in manifest["files"].items()}
    return {**{k: v for k, v in manifest.items() if k not in LOCAL | {"files", "info"}}, "files": files}


def _stored(root: Path) -> list[Path]:
    """The stage outputs in the artifact store (each run's parent logs its config and pictures too)."""
    return sorted(p for p in root.rglob("*") if p.is_file() and ("outputs" in p.parts or p.name == "outputs_index.json"))


def test_a_second_workspace_reuses_every_stage_from_the_shared_store(tiny_model_dir, tmp_path, prefect_harness,
                                                                      monkeypatch):
    from components.shared_cache import open_store
    from flows.domain_adaptation import domain_adaptation
    from flows.plan import describe_plan

    monkeypatch.delenv("LMFORGE_SHARED_CACHE", raising=False)
    monkeypatch.delenv("LMFORGE_UPLOAD_OUTPUTS", raising=False)
    uri = f"sqlite:///{tmp_path / 'mlflow' / 'mlflow.db'}"  # one tracking server for both machines
    artifacts = tmp_path / "mlflow" / "artifacts"
    client = tracking.client_for(uri)
    exp_id = tracking.experiment_id(client, "shared", artifacts)
    store = (tmp_path / "store").as_uri()

    def config(name: str):
        return tiny_pipeline_config(tiny_model_dir, tmp_path / name, **{
            "cache.shared_url": store, "tracking.tracking_uri": uri, "tracking.experiment": "shared"})

    first = domain_adaptation(config=config("a"))
    assert not any(row["cached"] for row in first["timeline"])
    made = _manifests(first)
    uploaded = _stored(artifacts)
    assert len(uploaded) > sum(len(m["files"]) for m in made.values())  # every file of every stage, and the indexes
    shutil.rmtree(tmp_path / "a")  # the second machine has nothing of the first but the store and the server

    # `lmforge stages` on the second machine keys every stage through the store's manifests, downloading nothing.
    planned = describe_plan(config("b"), "fp32", store=open_store(store))
    assert [(r["stage"], r["key"]) for r in planned] == [(row["stage"], row["key"]) for row in first["timeline"]]
    assert {(r["cached"], r["shared"], r["note"]) for r in planned} == {(False, "complete", "will download")}
    assert not (tmp_path / "b" / "artifacts").exists()

    second = domain_adaptation(config=config("b"))
    assert [row["stage"] for row in second["timeline"]] == [row["stage"] for row in first["timeline"]]
    assert all(row["cached"] for row in second["timeline"]), second["timeline"]
    assert [row["key"] for row in second["timeline"]] == [row["key"] for row in first["timeline"]]
    reused = _manifests(second)
    for stage, manifest in reused.items():
        assert Path(manifest["dir"]).is_relative_to(tmp_path / "b"), stage
        assert _portable(manifest) == _portable(made[stage]), stage
    assert reused["prepare"]["info"] == made["prepare"]["info"]  # the tiny model lies outside the workspace

    # MLflow: the second run uploaded nothing; its stage runs point at the first run's copies.
    assert _stored(artifacts) == uploaded
    runs = client.search_runs([exp_id], max_results=1000)
    cached_runs = [r for r in runs if r.data.tags.get("lmforge.cached") == "true"]
    assert len(cached_runs) == len(made) and all(
        r.data.tags["lmforge.outputs_run"] == made[r.data.tags["lmforge.stage"]]["mlflow_run_id"] for r in cached_runs)

    # Every stage's outputs are in its run, and the registered version names them.
    registry = MlflowClient(uri, uri)
    registered = made["register"]["info"]
    version = registry.get_model_version(registered["name"], str(registered["version"]))
    for stage, manifest in made.items():
        assert version.tags[f"lmforge.stage_run.{stage}"] == manifest["mlflow_run_id"], stage
        assert version.tags[f"lmforge.outputs.{stage}"] == f"runs:/{manifest['mlflow_run_id']}/outputs", stage
        index = json.loads(Path(registry.download_artifacts(manifest["mlflow_run_id"], "outputs_index.json")).read_text())
        assert {rel: v["sha256"] for rel, v in index.items()} == {rel: m["sha256"] for rel, m in manifest["files"].items()}
    adapter = next(rel for rel in made["sft"]["files"] if rel.endswith("adapter_model.safetensors"))
    local = Path(registry.download_artifacts(made["sft"]["mlflow_run_id"], f"outputs/{adapter}", str(tmp_path / "dl")))
    from components.artifacts import sha256_file

    assert sha256_file(local) == made["sft"]["files"][adapter]["sha256"]
