"""The quantize stage keeps what it scores: each bitsandbytes load is saved and reloads to the same logits, and
every variant (NF4, GGUF) lands in its own folder, in the report and in the manifest's files with its size."""

from __future__ import annotations

import json

import pytest

from components.config import EvaluateConfig, QuantizeConfig
from components.models.loading import load_model, load_tokenizer, select_hardware
from components.pipeline import BaseModelRef
from components.quantization import quantize
from components.quantization.quantize import bnb_config, run_quantize, save_quantized

CPU = select_hardware("cpu", "fp32")


def test_saved_nf4_model_reloads_to_the_logits_of_the_one_in_memory(tiny_model_dir, tmp_path):
    import torch

    tokenizer = load_tokenizer(str(tiny_model_dir))
    ids = tokenizer("Which ICD-10-CM chapter contains code E11.9?", return_tensors="pt").input_ids
    in_memory = load_model(str(tiny_model_dir), CPU, quantization_config=bnb_config("nf4"))
    saved = save_quantized(in_memory, tokenizer, tmp_path / "nf4")
    reloaded = load_model(str(saved), CPU)  # no quantization config: the saved one says NF4
    assert type(reloaded.model.layers[0].mlp.up_proj).__name__ == "Linear4bit"
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, in_memory(ids).logits, atol=0, rtol=0)
        full = load_model(str(tiny_model_dir), CPU)(ids).logits
    assert not torch.equal(reloaded(ids).logits, full)  # quantized for real, not the full-precision weights
    assert load_tokenizer(str(saved))("E11.9").input_ids == tokenizer("E11.9").input_ids


def test_every_variant_is_saved_reported_and_listed_in_the_manifest(tiny_model_dir, tmp_path, monkeypatch):
    # Scoring has its own tests (evaluation/): here a fixed score per model, so the stage runs in seconds.
    import torch

    scores = iter([{"exact_match": 0.5, "exact_match_ci_low": 0.2, "n": 8.0}, {"exact_match": 0.375, "n": 8.0},
                   {"exact_match": 0.4375, "n": 8.0}])
    scored = []
    monkeypatch.setattr(quantize, "evaluate_model",
                        lambda model, tokenizer, **kw: (scored.append(model) or next(scores), []))
    out = tmp_path / "quantize"
    result = run_quantize(BaseModelRef(str(tiny_model_dir)), [], QuantizeConfig(methods=["nf4"], gguf=["q8_0"]),
                          EvaluateConfig(), CPU, out, tokenized_dir=tmp_path, aligned_dir=tmp_path,
                          template_name="auto", system_prompt=None, model_name="tiny (lmforge)")
    report = json.loads((out / "quantization_report.json").read_text())
    assert set(report) == {"merged", "nf4", "gguf-q8_0"}
    assert report["nf4"]["delta"] == pytest.approx({"exact_match": -0.125})
    assert report["gguf-q8_0"]["delta"] == pytest.approx({"exact_match": -0.0625})
    assert report["gguf-q8_0"]["scored_with"] == quantize.GGUF_SCORING and "scored_with" not in report["nf4"]
    # The GGUF scored is the file's Q8_0 weights reloaded: near the merged ones, not them.
    key = "model.layers.0.mlp.down_proj.weight"
    merged, from_gguf = scored[0].state_dict()[key], scored[2].state_dict()[key]
    assert not torch.equal(from_gguf, merged) and torch.allclose(from_gguf, merged, atol=merged.abs().max() / 100)
    for name, folder in (("nf4", "nf4"), ("gguf-q8_0", "gguf-q8_0")):
        on_disk = sum(p.stat().st_size for p in (out / folder).rglob("*") if p.is_file())
        assert report[name]["dir"] == folder and report[name]["bytes_on_disk"] == on_disk > 0
        assert result.info["variants"][name] == {"dir": folder, "bytes_on_disk": on_disk}
        assert result.metrics[f"{name}_bytes_on_disk"] == on_disk
    assert {"nf4/model.safetensors", "nf4/config.json", "nf4/tokenizer.json", "gguf-q8_0/model-q8_0.gguf",
            "gguf-q8_0/Modelfile", "merged/model.safetensors", "quantization_report.json"} <= set(result.files)
    assert all((out / f).is_file() for f in result.files)
    assert json.loads((out / "nf4" / "config.json").read_text())["quantization_config"]["bnb_4bit_quant_type"] == "nf4"


def test_a_checkpoint_gguf_cannot_hold_fails_before_the_scoring(tiny_model_dir, tmp_path, monkeypatch):
    import shutil

    from components.quantization.gguf_export import GGUFExportError

    base = shutil.copytree(tiny_model_dir, tmp_path / "base")
    spec = json.loads((base / "tokenizer.json").read_text())
    spec["model"]["byte_fallback"] = True  # sentencepiece-style: llama.cpp's BPE path would tokenize differently
    (base / "tokenizer.json").write_text(json.dumps(spec))
    scored = []
    monkeypatch.setattr(quantize, "evaluate_model", lambda model, tokenizer, **kw: scored.append(1) or ({}, []))
    with pytest.raises(GGUFExportError, match="byte fallback"):
        run_quantize(BaseModelRef(str(base)), [], QuantizeConfig(methods=["nf4"], gguf=["q4_0"]), EvaluateConfig(),
                     CPU, tmp_path / "quantize", tokenized_dir=tmp_path, aligned_dir=tmp_path, template_name="auto",
                     system_prompt=None)
    assert scored == []
