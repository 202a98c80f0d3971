"""`lmforge serve` refuses a MODEL it cannot serve before starting anything, naming the spec and what to give."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from flows.cli import app


def serve(*args: str, tmp_path) -> tuple[int, str]:
    result = CliRunner().invoke(app, ["serve", *args, "--set", f"workspace={tmp_path / 'ws'}"], terminal_width=200)
    return result.exit_code, " ".join(result.output.split())


def test_a_missing_model_names_the_spec_and_what_to_give(tmp_path):
    code, out = serve(str(tmp_path / "nowhere"), tmp_path=tmp_path)
    assert code == 2 and "nowhere': no such file or directory" in out and "models:/NAME@alias" in out


def test_a_stage_dir_that_holds_no_model_is_refused(tmp_path):
    stage = tmp_path / "align"
    stage.mkdir()
    (stage / "manifest.json").write_text(json.dumps({"stage": "align", "info": {}}))
    code, out = serve(str(stage), tmp_path=tmp_path)
    assert code == 2 and "align stage output, not a model" in out


def test_an_unknown_registry_alias_is_refused(tmp_path):
    code, out = serve("models:/nothing@champion", tmp_path=tmp_path)
    assert code == 2 and "'models:/nothing@champion': not in the registry" in out
    code, out = serve("models:/nothing", tmp_path=tmp_path)
    assert code == 2 and "models:/NAME@alias or models:/NAME/VERSION" in out


def test_a_gguf_needs_llama_cpp(tmp_path, monkeypatch):
    from components.serving import backends

    real = backends.importable  # a machine without the llamacpp extra, wherever this runs
    monkeypatch.setattr(backends, "importable", lambda module: module != "llama_cpp" and real(module))
    gguf = tmp_path / "model.Q4_0.gguf"
    gguf.write_bytes(b"GGUF")
    code, out = serve(str(gguf), tmp_path=tmp_path)
    assert code == 2 and "pip install 'llama-cpp-python[server]'" in out


def test_an_unknown_variant_is_refused_naming_those_registered(tmp_path, tiny_model_dir):
    from components import tracking
    from components.config import load_config
    from components.registry import register_model

    cfg = load_config(None, [f"workspace={tmp_path / 'ws'}"])
    client = tracking.client_for(cfg.tracking_uri())
    run_id = tracking.start_run(client, tracking.experiment_id(client, "cli", tmp_path / "mlartifacts"), "model")
    files = sorted(p.name for p in tiny_model_dir.iterdir() if p.is_file())
    register_model(client, name="plain", run_id=run_id, model_dir=tiny_model_dir, files=files, tags={}, alias="champion")
    code, out = serve("models:/plain@champion/nf4", tmp_path=tmp_path)
    assert code == 2 and "version 1 of plain has no variant 'nf4'; its variants: merged (" in out


def test_speculation_on_a_backend_without_it_is_refused_before_starting_anything(tmp_path, tiny_model_dir):
    code, out = serve(str(tiny_model_dir), "--backend", "transformers", "--prompt-lookup", "4", tmp_path=tmp_path)
    assert code == 2 and "transformers serve has no speculative decoding" in out and "--prompt-lookup" in out
    assert not (tmp_path / "ws" / "logs").exists()  # no backend was started
