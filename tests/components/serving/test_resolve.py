"""MODEL -> what a backend loads: registry specs parsed, an adapter merged into a served directory once."""

from __future__ import annotations

import pytest

from components.config import load_config
from components.serving import resolve
from components.serving.resolve import (
    RegistrySpec,
    ServeSpecError,
    merged_directory,
    parse_registry_spec,
    resolve_served_model,
)


def test_registry_specs():
    assert parse_registry_spec("models:/icd10-coder@champion") == RegistrySpec("icd10-coder", "champion", None)
    assert parse_registry_spec("models:/icd10-coder/3") == RegistrySpec("icd10-coder", None, "3")
    for bad in ("models:/icd10-coder", "models:/@champion", "models:/a/b/c", "models:/a/latest"):
        with pytest.raises(ServeSpecError, match="models:/NAME@alias or models:/NAME/VERSION"):
            parse_registry_spec(bad)


def test_an_adapter_is_served_merged_into_a_cached_directory(tiny_model_dir, tmp_path, monkeypatch):
    import torch
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    lora = get_peft_model(base, LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False))
    lora.peft_config["default"].base_model_name_or_path = str(tiny_model_dir)
    adapter = tmp_path / "my-adapter"
    lora.save_pretrained(adapter)

    model = resolve_served_model(str(adapter), load_config(None, [f"workspace={tmp_path / 'ws'}"]))
    assert (model.name, model.source, model.adapters) == ("my-adapter", str(tiny_model_dir), (str(adapter),))
    served = merged_directory(model, tmp_path / "cache")
    assert (served / "config.json").is_file() and (served / "tokenizer_config.json").is_file()
    key = "model.layers.0.self_attn.q_proj.weight"
    merged_q, base_q = load_file(served / "model.safetensors")[key], load_file(tiny_model_dir / "model.safetensors")[key]
    assert not torch.equal(merged_q, base_q)  # the adapter is in the weights

    monkeypatch.setattr("components.models.loading.load_with_adapters", lambda *a, **k: pytest.fail("merged again"))
    assert merged_directory(model, tmp_path / "cache") == served  # once: the cached directory is reused
    assert merged_directory(resolve.ServedModel("plain", str(tiny_model_dir)), tmp_path / "cache") == tiny_model_dir
