"""The registered model is a proper MLflow transformers model: `models:/NAME@alias` loads through MLflow's
public pyfunc API and answers OpenAI-style chat, `mlflow models serve` answers `/invocations` on CPU, and
`lmforge chat`'s registry resolution gets a directory transformers loads."""

from __future__ import annotations

import json
import os
import sys
import urllib.request
from pathlib import Path

import pytest

from components import tracking
from components.registry import register_model, resolve_registry_uri, save_mlflow_model, serving_requirements
from tests.servers import free_port, running_server
from tests.tiny_model import build_tiny_model

CHAT = {"messages": [{"role": "user", "content": "Is ICD-10-CM code J45 billable?"}], "max_tokens": 4}


@pytest.fixture(scope="module")
def registered(tmp_path_factory):
    """A tiny model saved as an MLflow model, registered as version 1 @challenger in a SQLite registry."""
    root = tmp_path_factory.mktemp("mlflow-model")
    checkpoint = build_tiny_model(root / "checkpoint")
    uri = f"sqlite:///{root}/mlflow.db"
    client = tracking.client_for(uri)
    experiment = tracking.experiment_id(client, "serve", root / "mlartifacts")
    run_id = tracking.start_run(client, experiment, "model")
    model_dir = save_mlflow_model(checkpoint, root / "mlflow-model", metadata={"lmforge.config_digest": "c0ffee"})
    files = sorted(str(p.relative_to(model_dir)) for p in model_dir.rglob("*") if p.is_file())
    register_model(client, name="icd10-tiny", run_id=run_id, model_dir=model_dir, files=files,
                   tags={"lmforge.base_model": "tiny"}, alias="challenger")
    tracking.end_run(client, run_id)
    return uri, client, checkpoint, root


def test_saved_model_is_an_mlflow_chat_model_with_pinned_requirements_and_lineage(registered):
    import yaml

    _, _, _, root = registered
    mlmodel = yaml.safe_load((root / "mlflow-model" / "MLmodel").read_text())
    assert mlmodel["flavors"]["transformers"]["task"] == "text-generation"  # served with the llm/v1/chat schema
    assert [c["name"] for c in mlmodel["signature"]["inputs"] and json.loads(mlmodel["signature"]["inputs"])][:1] == ["messages"]
    assert "Trained by lmforge" in (root / "mlflow-model" / "model_card.md").read_text()
    assert mlmodel["metadata"] == {"lmforge.config_digest": "c0ffee", "task": "llm/v1/chat"}
    requirements = (root / "mlflow-model" / "requirements.txt").read_text().split()
    assert requirements == serving_requirements()
    assert all("==" in r and "+" not in r for r in requirements)


def test_alias_loads_through_the_public_pyfunc_api_and_chats(registered, monkeypatch):
    import mlflow

    uri, *_ = registered
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)  # how a user points MLflow at the registry
    monkeypatch.setattr(mlflow.tracking._tracking_service.utils, "_tracking_uri", None)  # no earlier set_tracking_uri
    model = mlflow.pyfunc.load_model("models:/icd10-tiny@challenger")
    [reply] = model.predict(CHAT)
    assert reply["object"] == "chat.completion"
    assert reply["choices"][0]["message"]["role"] == "assistant"
    assert reply["usage"]["completion_tokens"] <= CHAT["max_tokens"]


def test_registry_uri_resolves_to_a_checkpoint_with_its_tokenizer(registered, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _, client, checkpoint, _ = registered
    local = resolve_registry_uri(client, "models:/icd10-tiny@challenger", tmp_path / "cache")
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in local.iterdir()}
    ids = AutoTokenizer.from_pretrained(local)("Is code J45 billable?", return_tensors="pt").input_ids
    with torch.no_grad():
        served = AutoModelForCausalLM.from_pretrained(local)(ids).logits
        original = AutoModelForCausalLM.from_pretrained(checkpoint)(ids).logits
    torch.testing.assert_close(served, original)


def test_mlflow_models_serve_answers_invocations_on_cpu(registered, tmp_path):
    uri, *_ = registered
    port = free_port()
    mlflow_cli = str(Path(sys.executable).with_name("mlflow"))
    # mlflow starts `uvicorn` by name: the venv's bin must be on PATH, as it is in an activated venv.
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri,
           "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])}
    command = [mlflow_cli, "models", "serve", "-m", "models:/icd10-tiny@challenger", "--env-manager", "local",
               "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    with running_server(command, env, f"http://127.0.0.1:{port}/ping", tmp_path / "serve.log"):
        request = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=json.dumps(CHAT).encode(),
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=120) as r:
            body = json.loads(r.read())
    reply = body[0] if isinstance(body, list) else body
    assert reply["choices"][0]["message"]["role"] == "assistant", body
