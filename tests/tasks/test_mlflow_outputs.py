"""Every stage output in MLflow, once: the run that computes a stage holds its files under outputs/; a run that
reuses it (or computes the same content again) uploads nothing and points at the holder; a large file another
run holds is referenced, not uploaded again."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from components import mlflow_outputs, tracking
from components.artifacts import StageResult
from components.config import load_config
from components.pipeline import STAGES_BY_NAME, RunInfo
from tasks.stages import run_stage

SFT = STAGES_BY_NAME["sft"]
WEIGHTS = bytes(range(256)) * 8192  # 2 MiB: a "large" file, deduplicated by content across runs


@pytest.fixture(scope="module")
def tracking_uri(tmp_path_factory) -> str:
    uri = f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"  # one database: creating one costs seconds
    tracking.client_for(uri)
    return uri


@pytest.fixture
def ctx(tmp_path, monkeypatch, tracking_uri):
    """A workspace and an experiment of its own (holders are looked up per experiment)."""
    monkeypatch.delenv("LMFORGE_UPLOAD_OUTPUTS", raising=False)
    monkeypatch.delenv("LMFORGE_SHARED_CACHE", raising=False)
    cfg = load_config(None, [f"workspace={tmp_path}", f"tracking.tracking_uri={tracking_uri}"])
    client = tracking.client_for(cfg.tracking_uri())
    exp = tracking.experiment_id(client, tmp_path.name, tmp_path / "mlartifacts")
    parent = tracking.start_run(client, exp, "parent")
    return cfg, RunInfo(cfg.tracking_uri(), exp, parent, "flow-run-1", cfg.digest()), client, tmp_path / "mlartifacts"


def _body(curve: str = "[1, 2]"):
    def body(out, sink):
        (out / "adapter").mkdir()
        (out / "adapter" / "adapter_model.safetensors").write_bytes(WEIGHTS)
        (out / "adapter" / "adapter_config.json").write_text("{}")
        (out / "checkpoints" / "checkpoint-2").mkdir(parents=True)  # intermediate: in no manifest
        (out / "checkpoints" / "checkpoint-2" / "optimizer.pt").write_bytes(b"state")
        (out / "training_curve.json").write_text(curve)
        return StageResult(files=["adapter/adapter_model.safetensors", "adapter/adapter_config.json",
                                  "training_curve.json"], reports=["training_curve.json"])
    return body


def _stored(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file())


def _index(client, run_id: str) -> dict:
    return json.loads(Path(client.download_artifacts(run_id, mlflow_outputs.INDEX)).read_text())


def test_a_stage_run_holds_its_final_outputs_and_a_reuse_uploads_nothing(ctx):
    cfg, run, client, store = ctx
    manifest = run_stage(SFT, "k1", run, cfg, {}, _body(), upstream={})
    run_id = manifest["mlflow_run_id"]
    held = {f.path for f in client.list_artifacts(run_id, "outputs/adapter")}
    assert held == {"outputs/adapter/adapter_model.safetensors", "outputs/adapter/adapter_config.json"}
    assert "outputs/checkpoints" not in {f.path for f in client.list_artifacts(run_id, "outputs")}
    index = _index(client, run_id)
    assert set(index) == set(manifest["files"])
    assert all(v["uri"] == f"runs:/{run_id}/outputs/{rel}" for rel, v in index.items())
    tags = client.get_run(run_id).data.tags
    assert tags["lmforge.outputs_digest"] == manifest["digest"] and tags["lmforge.outputs_run"] == run_id
    downloaded = client.download_artifacts(run_id, "outputs/adapter/adapter_model.safetensors")
    assert Path(downloaded).read_bytes() == WEIGHTS

    before = _stored(store)
    tracking.record_cached_stage(run, manifest, upload=True)  # what a later run that reuses the stage records
    assert _stored(store) == before
    cached = client.search_runs([run.experiment_id], "tags.`lmforge.cached` = 'true'")[0]
    assert cached.data.tags["lmforge.outputs_run"] == run_id
    assert cached.data.tags["lmforge.outputs_uri"] == f"runs:/{run_id}/outputs"
    assert client.list_artifacts(cached.info.run_id) == []


def test_a_large_file_another_run_holds_is_referenced_not_uploaded_again(ctx):
    cfg, run, client, store = ctx
    first = run_stage(SFT, "k1", run, cfg, {}, _body(), upstream={})
    second = run_stage(SFT, "k2", run, cfg, {}, _body(curve="[3]"), upstream={})  # same weights, another curve
    index = _index(client, second["mlflow_run_id"])
    assert index["adapter/adapter_model.safetensors"]["uri"] == (
        f"runs:/{first['mlflow_run_id']}/outputs/adapter/adapter_model.safetensors")
    assert index["training_curve.json"]["uri"].startswith(f"runs:/{second['mlflow_run_id']}/")
    weights = [p for p in _stored(store) if p.name == "adapter_model.safetensors"]
    assert len(weights) == 1  # stored once


def test_outputs_made_with_uploads_off_are_uploaded_by_the_first_reuse_only(ctx, monkeypatch):
    cfg, run, client, store = ctx
    monkeypatch.setenv("LMFORGE_UPLOAD_OUTPUTS", "0")
    manifest = run_stage(SFT, "k1", run, cfg, {}, _body(), upstream={})
    assert "outputs_index.json" not in {f.path for f in client.list_artifacts(manifest["mlflow_run_id"])}
    monkeypatch.delenv("LMFORGE_UPLOAD_OUTPUTS")
    tracking.record_cached_stage(run, manifest, upload=True)
    holder = mlflow_outputs.holder_of(client, run.experiment_id, manifest["digest"])
    assert holder and holder != manifest["mlflow_run_id"]
    before = _stored(store)
    tracking.record_cached_stage(run, manifest, upload=True)
    assert _stored(store) == before


def test_the_switch(monkeypatch):
    monkeypatch.setenv("LMFORGE_UPLOAD_OUTPUTS", "0")
    assert not mlflow_outputs.uploads_on(True)
    monkeypatch.setenv("LMFORGE_UPLOAD_OUTPUTS", "1")
    assert mlflow_outputs.uploads_on(False)
    monkeypatch.delenv("LMFORGE_UPLOAD_OUTPUTS")
    assert mlflow_outputs.uploads_on(True) and not mlflow_outputs.uploads_on(False)
    assert load_config(None, []).tracking.upload_outputs  # on by default


def test_the_registered_version_names_each_stage_run_and_its_outputs_once(ctx, tmp_path):
    cfg, run, client, _ = ctx
    manifest = run_stage(SFT, "k1", run, cfg, {}, _body(), upstream={})
    name = f"model-{tmp_path.name}"
    client.create_registered_model(name)
    version = client.create_model_version(name, source=str(tmp_path), run_id=manifest["mlflow_run_id"]).version
    assert mlflow_outputs.tag_version_lineage(client, run.experiment_id, name, version, {"sft": manifest},
                                              uploads=True) == 2
    tags = client.get_model_version(name, version).tags
    assert tags["lmforge.stage_run.sft"] == manifest["mlflow_run_id"]
    assert tags["lmforge.outputs.sft"] == f"runs:/{manifest['mlflow_run_id']}/outputs"
    # A rerun that reuses the register stage: nothing to set.
    assert mlflow_outputs.tag_version_lineage(client, run.experiment_id, name, version, {"sft": manifest},
                                              uploads=True) == 0
