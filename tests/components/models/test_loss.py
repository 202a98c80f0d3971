"""labeled_positions_loss against each architecture's own forward, on tiny random models built from configs.

The fast path (decoder, then the LM head on labeled positions only) must equal cross-entropy over the
model's own logits for every model type it is allowed for; architectures that transform their logits
in `forward` must take the fallback, and there the fast path would have been wrong. Under every training
method the fast path must equal the model's own loss, and the LoRA variants' flags must reach the adapter.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from components.data import packing
from components.models.loss import PLAIN_HEAD_MODEL_TYPES, labeled_positions_loss, plain_head_logits

VOCAB = 128
_TINY = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, head_dim=8, max_position_embeddings=128, pad_token_id=0, bos_token_id=1,
             eos_token_id=2)
PLAIN_CONFIGS = {
    "llama": ("LlamaConfig", {}),
    "mistral": ("MistralConfig", {}),
    "qwen2": ("Qwen2Config", {}),
    "qwen3": ("Qwen3Config", {}),
    "phi3": ("Phi3Config", {}),
    "gemma": ("GemmaConfig", {}),
    "olmo2": ("Olmo2Config", {}),
    "smollm3": ("SmolLM3Config", {}),
}
# Larger random weights give logits of a few units, large enough for each transform to show.
TRANSFORMED_CONFIGS = {
    "gemma2": ("Gemma2Config", {"final_logit_softcapping": 1.0, "initializer_range": 0.5}),
    "cohere": ("CohereConfig", {"logit_scale": 0.0625, "initializer_range": 0.5}),
    "granite": ("GraniteConfig", {"logits_scaling": 4.0, "initializer_range": 0.5}),
}


def tiny_causal_lm(config_class: str, **overrides):
    import transformers

    torch.manual_seed(0)
    config = getattr(transformers, config_class)(**{**_TINY, **overrides})
    return transformers.AutoModelForCausalLM.from_config(config).eval()


def _rows(n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        length = int(torch.randint(6, 20, (1,), generator=g))
        ids = torch.randint(3, VOCAB, (length,), generator=g).tolist()
        prompt = length // 2
        rows.append({"input_ids": ids, "labels": [-100] * prompt + ids[prompt:]})
    return rows


def _reference_loss(model, rows) -> tuple[float, int]:
    """Summed cross-entropy over the model's own logits, one example at a time (no padding, no packing)."""
    total, count = 0.0, 0
    for row in rows:
        logits = model(input_ids=torch.tensor([row["input_ids"]])).logits[0, :-1]
        targets = torch.tensor(row["labels"][1:])
        keep = targets != -100
        total += float(F.cross_entropy(logits[keep], targets[keep], reduction="sum"))
        count += int(keep.sum())
    return total, count


def _head_on_hidden_loss(model, rows) -> float:
    """What a decoder + LM head shortcut computes, whatever the architecture's forward does to logits."""
    total = 0.0
    for row in rows:
        hidden = model.base_model(input_ids=torch.tensor([row["input_ids"]])).last_hidden_state[0, :-1]
        targets = torch.tensor(row["labels"][1:])
        keep = targets != -100
        total += float(F.cross_entropy(model.get_output_embeddings()(hidden[keep]), targets[keep], reduction="sum"))
    return total


def test_every_plain_head_model_type_is_tested():
    assert set(PLAIN_CONFIGS) == PLAIN_HEAD_MODEL_TYPES


@pytest.mark.parametrize("collate", ["pad_causal", "flatten_batch"])
@pytest.mark.parametrize("model_type", sorted(PLAIN_CONFIGS))
def test_fast_path_equals_the_models_own_logits(model_type, collate):
    model = tiny_causal_lm(PLAIN_CONFIGS[model_type][0], **PLAIN_CONFIGS[model_type][1])
    assert model.config.model_type == model_type and plain_head_logits(model)
    rows = _rows()
    with torch.no_grad():
        loss, n = labeled_positions_loss(model, getattr(packing, collate)(rows, pad_token_id=0))
        ref, ref_n = _reference_loss(model, rows)
    assert n == ref_n
    assert float(loss) == pytest.approx(ref, rel=1e-5)


@pytest.mark.parametrize("collate", ["pad_causal", "flatten_batch"])
@pytest.mark.parametrize("model_type", sorted(TRANSFORMED_CONFIGS))
def test_models_that_transform_logits_use_their_own_forward(model_type, collate):
    model = tiny_causal_lm(TRANSFORMED_CONFIGS[model_type][0], **TRANSFORMED_CONFIGS[model_type][1])
    assert model.config.model_type == model_type and not plain_head_logits(model)
    rows = _rows()
    with torch.no_grad():
        loss, n = labeled_positions_loss(model, getattr(packing, collate)(rows, pad_token_id=0))
        ref, ref_n = _reference_loss(model, rows)
        shortcut = _head_on_hidden_loss(model, rows)
    assert n == ref_n
    assert float(loss) == pytest.approx(ref, rel=1e-5)
    assert shortcut != pytest.approx(ref, rel=1e-2)  # the fast path would have been wrong here


def test_logit_transform_in_the_config_disables_the_fast_path():
    for attribute, value in [("final_logit_softcapping", 30.0), ("logit_scale", 0.5), ("logits_scaling", 2.0)]:
        assert not plain_head_logits(tiny_causal_lm("LlamaConfig", **{attribute: value})), attribute
    assert plain_head_logits(tiny_causal_lm("LlamaConfig", logits_scaling=1.0))


def test_a_class_outside_transformers_uses_its_own_forward():
    """Remote code can reuse a listed model_type with a forward of its own: it is not trusted."""
    from transformers import LlamaForCausalLM

    class DoubledLogits(LlamaForCausalLM):
        def forward(self, *args, **kwargs):
            out = super().forward(*args, **kwargs)
            out.logits = out.logits * 2
            return out

    torch.manual_seed(0)
    model = DoubledLogits(tiny_causal_lm("LlamaConfig").config).eval()
    assert not plain_head_logits(model)
    rows = _rows()
    with torch.no_grad():
        loss, _ = labeled_positions_loss(model, packing.pad_causal(rows, pad_token_id=0))
        assert float(loss) == pytest.approx(_reference_loss(model, rows)[0], rel=1e-5)


@pytest.mark.parametrize("model_type", ["llama", "gemma2"])
def test_peft_wrapped_model_includes_the_adapter(model_type):
    from peft import LoraConfig, get_peft_model

    config_class, overrides = {**PLAIN_CONFIGS, **TRANSFORMED_CONFIGS}[model_type]
    base = tiny_causal_lm(config_class, **overrides)
    # init_lora_weights=False: random B, so the adapter changes the logits and a loss that skipped it would differ.
    peft_model = get_peft_model(base, LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False)).eval()
    rows = _rows()
    with torch.no_grad():
        loss, _ = labeled_positions_loss(peft_model, packing.flatten_batch(rows, pad_token_id=0))
        ref, _ = _reference_loss(peft_model, rows)
        with peft_model.disable_adapter():
            without_adapter, _ = _reference_loss(peft_model, rows)
    assert float(loss) == pytest.approx(ref, rel=1e-5)
    assert without_adapter != pytest.approx(ref, rel=1e-3)


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_chunked_no_grad_projection_gives_the_same_loss(monkeypatch, reduction):
    """Without gradients the fast path projects a few positions at a time; the result does not change."""
    model = tiny_causal_lm("LlamaConfig")
    batch = packing.pad_causal(_rows(), pad_token_id=0)
    with torch.no_grad():
        whole, n = labeled_positions_loss(model, batch, reduction=reduction)
        monkeypatch.setattr("components.models.loss.NO_GRAD_LOSS_CHUNK", 5)
        chunked, chunked_n = labeled_positions_loss(model, batch, reduction=reduction)
    assert n == chunked_n
    assert float(chunked) == pytest.approx(float(whole), rel=1e-5)


@pytest.mark.parametrize("model_type", ["llama", "gemma2"])
def test_no_labeled_position_gives_zero_loss_that_backpropagates(model_type):
    config_class, overrides = {**PLAIN_CONFIGS, **TRANSFORMED_CONFIGS}[model_type]
    model = tiny_causal_lm(config_class, **overrides)
    row = {"input_ids": [5, 6, 7], "labels": [-100, -100, -100]}
    loss, n = labeled_positions_loss(model, packing.pad_causal([row], pad_token_id=0))
    assert n == 0 and loss.detach().item() == 0.0
    loss.backward()


# Every training method (components.training.methods) on a tiny Llama: the fast path must equal the
# model's own forward whatever the method injects (adapters, magnitudes, 4-bit layers, token rows).
METHOD_CONFIGS = {
    "full": dict(finetuning="full"),
    "freeze": dict(finetuning="freeze", freeze={"trainable_layers": 1, "trainable_modules": ["lm_head"]}),
    "lora": dict(finetuning="lora"),
    "rslora": dict(finetuning="lora", lora={"use_rslora": True}),
    "dora": dict(finetuning="lora", lora={"use_dora": True}),
    "pissa": dict(finetuning="lora", lora={"init": "pissa"}),
    "qlora": dict(finetuning="qlora"),
    "qlora_dora": dict(finetuning="qlora", lora={"use_dora": True}),
    "new_tokens": dict(finetuning="lora"),
}


@pytest.mark.parametrize("method", sorted(METHOD_CONFIGS))
def test_fast_path_equals_the_models_own_loss_under_every_training_method(method):
    from components.config import TrainConfig
    from components.models.loading import ADDED_TOKENS_ATTR, select_hardware
    from components.training.methods import prepare_trainable

    model = tiny_causal_lm("LlamaConfig")
    if method == "new_tokens":  # as the prepare stage leaves a base with model.extra_tokens
        setattr(model.config, ADDED_TOKENS_ATTR, [VOCAB - 2, VOCAB - 1])
    model = prepare_trainable(model, TrainConfig(**METHOD_CONFIGS[method]), select_hardware("cpu", "fp32")).eval()
    torch.manual_seed(1)
    randomized = []
    with torch.no_grad():  # random adapter and token weights: a loss that skipped them would differ
        for name, param in model.named_parameters():
            if param.requires_grad and ("lora_B" in name or "trainable_tokens_delta" in name):
                param.normal_(0, 0.5)
                randomized.append(name)
    assert any("trainable_tokens" in n for n in randomized) == (method == "new_tokens")
    causal = model.get_base_model() if hasattr(model, "get_base_model") else model
    assert plain_head_logits(causal)
    rows = _rows()
    rows[0]["input_ids"][-2:] = rows[0]["labels"][-2:] = [VOCAB - 2, VOCAB - 1]
    with torch.no_grad():
        loss, n = labeled_positions_loss(model, packing.pad_causal(rows, pad_token_id=0))
        ref, ref_n = _reference_loss(model, rows)
    assert n == ref_n
    assert float(loss) == pytest.approx(ref, rel=1e-5)


@pytest.mark.parametrize("method", ["lora", "rslora", "dora", "qlora_dora"])
def test_rslora_scales_by_alpha_over_sqrt_r_and_dora_adds_magnitude_vectors(method):
    """The flags reach the adapter: scaling alpha / sqrt(r) with use_rslora (alpha / r without), and with
    use_dora one magnitude vector per adapted layer, initialised to the base weight's row norms."""
    import math

    from components.config import TrainConfig
    from components.models.loading import select_hardware
    from components.training.methods import prepare_trainable

    cfg = TrainConfig(**METHOD_CONFIGS[method])
    base = tiny_causal_lm("LlamaConfig")
    base_weights = {name: param.detach().clone() for name, param in base.named_parameters()}
    model = prepare_trainable(base, cfg, select_hardware("cpu", "fp32"))
    layers = {name: m for name, m in model.named_modules() if hasattr(m, "lora_A") and "default" in m.lora_A}
    assert len(layers) == 2 * 7  # q, k, v, o, gate, up, down in each of the 2 layers

    r, alpha = cfg.lora.r, cfg.lora.alpha
    assert (r, alpha) == (8, 16)  # the defaults, for which the two scalings differ (2 and 5.66)
    expected_scaling = alpha / math.sqrt(r) if cfg.lora.use_rslora else alpha / r
    assert [m.scaling["default"] for m in layers.values()] == pytest.approx([expected_scaling] * len(layers))

    magnitudes = {n: p for n, p in model.named_parameters() if "lora_magnitude_vector" in n}
    if not cfg.lora.use_dora:
        assert magnitudes == {}
        return
    assert len(magnitudes) == len(layers) and all(p.requires_grad for p in magnitudes.values())
    if cfg.finetuning == "qlora":
        return  # the base weight is 4-bit: its norms are those of the dequantized weight
    for name, layer in layers.items():
        magnitude = layer.lora_magnitude_vector["default"].weight
        weight = base_weights[name.removeprefix("base_model.model.") + ".weight"]
        row_norms = [math.sqrt(sum(float(w) ** 2 for w in row)) for row in weight]  # B = 0: ||W + BA|| = ||W||
        assert magnitude.tolist() == pytest.approx(row_norms, rel=1e-5), name


def test_the_fallback_is_logged_once_per_model_class(caplog):
    import logging

    from components.models import loss as loss_module

    config_class, overrides = TRANSFORMED_CONFIGS["gemma2"]
    model = tiny_causal_lm(config_class, **overrides)
    loss_module._fallbacks_logged.clear()
    batch = packing.pad_causal(_rows(), pad_token_id=0)
    with caplog.at_level(logging.INFO, logger="components.models.loss"), torch.no_grad():
        labeled_positions_loss(model, batch)
        labeled_positions_loss(model, batch)
    assert [r.getMessage() for r in caplog.records].count(caplog.records[0].getMessage()) == 1
    assert "Gemma2ForCausalLM (gemma2)" in caplog.records[0].getMessage()


def test_4bit_layers_bitsandbytes_cannot_repack_keep_the_plain_cpu_path():
    # bitsandbytes repacks 4-bit weights for its AVX512-BF16 kernel at the first no-grad eval forward and fails
    # on widths that are not multiples of its blocks (this tiny model's 32-wide inputs). Whatever the CPU, those
    # layers are marked off that path at load, and an eval forward runs.
    import bitsandbytes as bnb

    from components.config import TrainConfig
    from components.models.loading import keep_bnb_cpu_layout, select_hardware
    from components.training.methods import prepare_trainable

    model = prepare_trainable(tiny_causal_lm("LlamaConfig"), TrainConfig(finetuning="qlora"),
                              select_hardware("cpu", "fp32")).eval()
    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert layers and all(not m.support_avx512bf16_for_cpu for m in layers if m.in_features % 64)
    this_cpu = {m: m.support_avx512bf16_for_cpu for m in layers}
    for m in layers:  # as on a CPU with AVX512-BF16, whatever this one has
        m.support_avx512bf16_for_cpu = True
    assert keep_bnb_cpu_layout(model) == sum(1 for m in layers if m.in_features % 64 or m.out_features % 32) > 0
    for m in layers:  # the forward runs on this CPU's own path: the packed one only where it has the kernel
        m.support_avx512bf16_for_cpu = this_cpu[m] and m.support_avx512bf16_for_cpu
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=torch.tensor([[3, 4, 5]])).logits).all()
