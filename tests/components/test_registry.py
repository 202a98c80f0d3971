"""The register stage records every quantized variant with the version: its files as artifacts of the model run
under variants/<name>/, its size and its quality change against the merged model as version tags."""

from __future__ import annotations

import json

from components import tracking
from components.registry import log_variants, register_model


def test_variants_are_artifacts_of_the_model_run_and_tags_of_the_version(tmp_path):
    quantize = tmp_path / "quantize"
    for folder, files in {"merged": ["model.safetensors"], "nf4": ["model.safetensors", "config.json"],
                          "gguf-q8_0": ["model-q8_0.gguf", "Modelfile"]}.items():
        for name in files:
            (quantize / folder).mkdir(parents=True, exist_ok=True)
            (quantize / folder / name).write_bytes(f"{folder}/{name}".encode() * 1000)
    report = {
        "merged": {"bytes_on_disk": 1, "exact_match": 0.5},
        "nf4": {"dir": "nf4", "bytes_on_disk": 2_345_678, "exact_match": 0.375,
                "delta": {"exact_match": -0.125, "task/billable/exact_match": -0.25}},
        "gguf-q8_0": {"dir": "gguf-q8_0", "bytes_on_disk": 1_500_000},
    }
    (quantize / "quantization_report.json").write_text(json.dumps(report))

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = tracking.client_for(uri)
    run_id = tracking.start_run(client, tracking.experiment_id(client, "variants", tmp_path / "mlartifacts"), "model")
    tags = log_variants(client, run_id, quantize)
    assert tags == {"lmforge.variant.nf4.size_mb": "2.3", "lmforge.variant.nf4.delta.exact_match": "-0.125",
                    "lmforge.variant.gguf-q8_0.size_mb": "1.5"}

    def listed(path):
        return sorted(f.path for f in client.list_artifacts(run_id, path))

    assert listed("variants") == ["variants/gguf-q8_0", "variants/nf4"]  # merged is the model itself, not a variant
    assert listed("variants/nf4") == ["variants/nf4/config.json", "variants/nf4/model.safetensors"]
    assert listed("variants/gguf-q8_0") == ["variants/gguf-q8_0/Modelfile", "variants/gguf-q8_0/model-q8_0.gguf"]
    local = client.download_artifacts(run_id, "variants/gguf-q8_0/Modelfile", str(tmp_path / "down"))
    assert open(local, "rb").read() == (quantize / "gguf-q8_0" / "Modelfile").read_bytes()

    (quantize / "merged" / "config.json").write_text("{}")
    version = register_model(client, name="tiny-variants", run_id=run_id, model_dir=quantize / "merged",
                             files=["config.json"], tags=tags, alias="challenger")
    assert {k: v for k, v in client.get_model_version("tiny-variants", version).tags.items()
            if k.startswith("lmforge.variant.")} == tags
