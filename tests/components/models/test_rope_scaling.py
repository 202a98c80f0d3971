"""model.rope_scaling: written into the config as transformers 5 reads it (`rope_parameters`), checked
against the family table, applied at load time and, in the pipeline, once by the prepare stage."""

from __future__ import annotations

import pytest
import torch

from components.config import ModelConfig, RopeScalingSettings
from components.models.loading import ROPE_SCALING_SUPPORT, RopeScalingError, apply_rope_scaling, load_model, \
    select_hardware

CPU = select_hardware("cpu", "fp32")
BASE_WINDOW = 512  # tests/tiny_model.py


@pytest.mark.parametrize("rope_type", ["linear", "dynamic", "yarn", "llama3"])
def test_each_type_loads_a_tiny_llama_with_the_scaled_config(tiny_model_dir, rope_type):
    plain = load_model(str(tiny_model_dir), CPU)
    model = load_model(str(tiny_model_dir), CPU, rope_scaling=RopeScalingSettings(type=rope_type, factor=4.0))
    params = model.config.rope_parameters
    assert params["rope_type"] == rope_type and params["factor"] == 4.0
    assert params["rope_theta"] == plain.config.rope_parameters["rope_theta"]  # kept, not reset
    assert model.model.rotary_emb.rope_type == rope_type
    if rope_type == "dynamic":  # scales only beyond the original window, which it keeps
        assert model.config.max_position_embeddings == BASE_WINDOW
    else:
        assert model.config.max_position_embeddings == 4 * BASE_WINDOW
    if rope_type in ("yarn", "llama3"):
        assert params["original_max_position_embeddings"] == BASE_WINDOW
    if rope_type == "llama3":
        assert (params["low_freq_factor"], params["high_freq_factor"]) == (1.0, 4.0)
    # Past the base window the model still runs, and its positions differ from the unscaled model's.
    ids = torch.randint(5, 300, (1, BASE_WINDOW + 64))
    with torch.no_grad():
        scaled, unscaled = model(ids).logits, plain(ids).logits
    assert torch.isfinite(scaled).all()
    assert not torch.allclose(scaled[0, -1], unscaled[0, -1])


@pytest.mark.parametrize("model_type", sorted(ROPE_SCALING_SUPPORT))
def test_every_family_in_the_table_runs_every_type_it_lists(model_type):
    from transformers import AutoConfig, AutoModelForCausalLM

    for rope_type in sorted(ROPE_SCALING_SUPPORT[model_type]):
        config = AutoConfig.for_model(model_type, vocab_size=64, hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                      max_position_embeddings=32, pad_token_id=0, bos_token_id=1, eos_token_id=2)
        apply_rope_scaling(config, RopeScalingSettings(type=rope_type, factor=2.0))
        model = AutoModelForCausalLM.from_config(config)
        with torch.no_grad():
            assert torch.isfinite(model(torch.randint(0, 64, (1, 48))).logits).all(), (model_type, rope_type)


def test_a_family_without_rope_scaling_fails_clearly():
    from transformers import GPT2Config

    with pytest.raises(RopeScalingError, match="model type 'gpt2' is not in lmforge's RoPE scaling table.*llama"):
        apply_rope_scaling(GPT2Config(), RopeScalingSettings(type="linear", factor=2.0))


def test_an_already_scaled_model_is_not_scaled_twice():
    from transformers import LlamaConfig

    config = LlamaConfig()
    apply_rope_scaling(config, RopeScalingSettings(type="yarn", factor=2.0))
    with pytest.raises(RopeScalingError, match="already scales RoPE"):
        apply_rope_scaling(config, RopeScalingSettings(type="linear", factor=2.0))


def test_the_prepare_stage_writes_the_scaled_model_every_stage_loads(tiny_model_dir, tmp_path):
    from components.models.prepare import prepare_base

    result = prepare_base(ModelConfig(base=str(tiny_model_dir), rope_scaling={"type": "linear", "factor": 2}),
                          tmp_path)
    assert result.info["source"] == str((tmp_path / "model").resolve()) and result.info["revision"] is None
    model = load_model(result.info["source"], CPU)
    assert model.config.rope_parameters["rope_type"] == "linear"
    assert model.config.max_position_embeddings == 2 * BASE_WINDOW
    assert result.info["max_position_embeddings"] == 2 * BASE_WINDOW
