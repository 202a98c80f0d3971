"""Training methods as config switches, on the 2-layer tiny model: each trains a few steps on one repeated
batch, the loss falls, exactly the intended parameters change, and what it saved reloads (through
loading.load_with_adapters, as every later stage loads it) to the same logits. Also: vocabulary extension
in the prepare stage, LoRA+ learning rates, the optimizer names, and the clear failures."""

from __future__ import annotations

import pytest
import torch
from datasets import Dataset

from components.config import PipelineConfig, TrainConfig
from components.models.loading import Hardware, check_attention, load_model, load_tokenizer, load_with_adapters, \
    select_hardware
from components.training.lora import run_lora_training
from components.training.methods import OPTIMIZERS, MethodUnavailable, check_available, loraplus_optimizer, \
    prepare_trainable, qlora_quantization

CPU = select_hardware("cpu", "fp32")


def _rows(n=4, seed=0, vocab=300):
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        length = int(torch.randint(8, 16, (1,), generator=g))
        ids = torch.randint(5, vocab, (length,), generator=g).tolist()
        rows.append({"input_ids": ids, "labels": [-100] * (length // 2) + ids[length // 2:]})
    return rows


def _train(model, tok, cfg_kwargs, out_dir, rows=None):
    """Three optimizer steps on the same batch of 4 (constant lr): the loss must fall."""
    logged = []
    cfg = TrainConfig(max_steps=3, batch_size=4, logging_steps=1, save_steps=10, warmup_ratio=0.0,
                      lr_scheduler="constant", **cfg_kwargs)
    result = run_lora_training(model, tok, Dataset.from_list(rows or _rows()), cfg, CPU, out_dir,
                               metrics_sink=lambda step, m: logged.append(m))
    losses = [m["loss"] for m in logged if "loss" in m]
    assert len(losses) == 3 and losses[-1] < losses[0], losses
    return result


def _logits(model, ids):
    model.eval()
    with torch.no_grad():
        return model(torch.tensor([ids])).logits


def _changed(before: dict, model) -> set[str]:
    # LoRA wraps each target as `<name>.base_layer`: compare the base weights under their own names.
    after = {n.replace(".base_layer", ""): p for n, p in model.named_parameters() if "lora_" not in n}
    return {n for n, p in before.items() if not torch.equal(p, after[n].detach())}


PROBE = _rows(1, seed=7)[0]["input_ids"]

METHODS = {
    "full": dict(finetuning="full", learning_rate=5e-3),
    "freeze": dict(finetuning="freeze", learning_rate=5e-3, freeze={"trainable_layers": 1}),
    "lora": dict(finetuning="lora", learning_rate=1e-2),
    "galore": dict(finetuning="full", learning_rate=5e-3, optimizer="galore_adamw",
                   galore={"rank": 8, "target_modules": ["mlp"]}),
    "lomo": dict(finetuning="full", learning_rate=5e-2, optimizer="lomo"),
}


@pytest.mark.parametrize("method", sorted(METHODS))
def test_method_trains_exactly_its_parameters_and_reloads(method, tiny_model_dir, tmp_path):
    tok = load_tokenizer(str(tiny_model_dir))
    model = load_model(str(tiny_model_dir), CPU)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    result = _train(model, tok, METHODS[method], tmp_path)
    changed = _changed(before, model)  # for lora: the base weights, which the adapter must leave alone
    if method == "freeze":
        assert changed == {n for n in before if n.startswith("model.layers.1.")}
    elif method == "lora":
        assert changed == set()
        assert (tmp_path / "adapter" / "adapter_config.json").is_file()
    else:
        assert changed == set(before)
    assert result.info["finetuning"] == METHODS[method]["finetuning"]
    assert (tmp_path / "adapter" / "tokenizer.json").is_file()  # later stages can load the tokenizer from it
    # `model` holds the trained weights (LoRA is injected in place); a reload must give the same logits.
    reloaded = load_with_adapters(str(tiny_model_dir), [tmp_path / "adapter"], CPU)
    assert torch.allclose(_logits(reloaded, PROBE), _logits(model, PROBE), atol=1e-5)
    assert not torch.allclose(_logits(reloaded, PROBE), _logits(load_model(str(tiny_model_dir), CPU), PROBE), atol=1e-4)


def test_pissa_saves_an_adapter_for_the_unchanged_base(tiny_model_dir, tmp_path):
    """PiSSA moves principal components out of the base weights into the adapter; save_trained converts it
    so that merging into the *unchanged* base gives the trained model. (DoRA and rsLoRA change the
    forward only: tests/components/models/test_loss.py runs them.)"""
    tok = load_tokenizer(str(tiny_model_dir))
    model = load_model(str(tiny_model_dir), CPU)
    _train(model, tok, dict(learning_rate=1e-2, lora={"init": "pissa", "use_rslora": True}), tmp_path)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    reloaded = load_with_adapters(str(tiny_model_dir), [tmp_path / "adapter"], CPU)
    assert torch.allclose(_logits(reloaded, PROBE), _logits(model, PROBE), atol=1e-4)


def test_qlora_trains_adapters_on_a_4bit_base(tiny_model_dir, tmp_path):
    from peft import PeftModel

    cfg = TrainConfig(finetuning="qlora")
    tok = load_tokenizer(str(tiny_model_dir))
    model = load_model(str(tiny_model_dir), CPU, quantization_config=qlora_quantization(cfg.qlora, CPU))
    assert model.is_loaded_in_4bit
    _train(model, tok, dict(finetuning="qlora", learning_rate=1e-2), tmp_path)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    # The adapter on a fresh 4-bit base is the trained model; merged into the full-precision base it is close.
    base4 = load_model(str(tiny_model_dir), CPU, quantization_config=qlora_quantization(cfg.qlora, CPU))
    again = PeftModel.from_pretrained(base4, str(tmp_path / "adapter"))
    assert torch.allclose(_logits(again, PROBE), _logits(model, PROBE), atol=1e-5)
    merged = load_with_adapters(str(tiny_model_dir), [tmp_path / "adapter"], CPU)
    assert torch.isfinite(_logits(merged, PROBE)).all()


def test_qlora_quantizes_a_full_precision_model_itself(tiny_model_dir):
    model = prepare_trainable(load_model(str(tiny_model_dir), CPU), TrainConfig(finetuning="qlora"), CPU)
    assert model.get_base_model().is_loaded_in_4bit


def test_extra_tokens_extend_the_vocabulary_once_and_train_their_rows(tiny_model_dir, tmp_path):
    """prepare adds the tokens, mean-initialises their rows and records their ids; LoRA trains those rows
    (peft trainable tokens) and no others; the adapter carries them to the merged model."""
    from components.config import ModelConfig
    from components.models.prepare import base_adaptation, prepare_base

    words = ["<icd>", "</icd>", "hypertension"]
    (tmp_path / "tokens.txt").write_text("# domain terms\nE11.9\n\n<icd>\n")
    model_cfg = ModelConfig(base=str(tiny_model_dir), extra_tokens=words, extra_tokens_file=str(tmp_path / "tokens.txt"))
    assert base_adaptation(model_cfg)["extra_tokens"] == [*words, "E11.9"]  # what the cache keys see
    prepared = prepare_base(model_cfg, tmp_path / "prepare")
    source = prepared.info["source"]
    base_tok, tok = load_tokenizer(str(tiny_model_dir)), load_tokenizer(source)
    new_ids = prepared.info["added_token_ids"]
    assert len(new_ids) == 4 and len(tok) == len(base_tok) + 4
    assert tok.convert_ids_to_tokens(new_ids) == [*words, "E11.9"]
    assert tok.convert_tokens_to_ids("<icd>") in new_ids and len(tok("<icd>").input_ids) == 1
    model = load_model(source, CPU)
    emb = model.get_input_embeddings().weight.detach()
    assert emb.shape[0] == len(tok)
    mean = emb[: len(base_tok)].mean(0)
    assert all((emb[i] - mean).norm() < 0.5 * emb[: len(base_tok)].norm(dim=1).mean() for i in new_ids)

    rows = [{"input_ids": r["input_ids"] + new_ids, "labels": r["labels"] + new_ids} for r in _rows()]
    before = emb.clone()
    _train(model, tok, dict(learning_rate=1e-2), tmp_path / "sft", rows=rows)
    reloaded = load_with_adapters(source, [tmp_path / "sft" / "adapter"], CPU)
    after = reloaded.get_input_embeddings().weight.detach()
    moved = {i for i in range(len(tok)) if not torch.equal(after[i], before[i])}
    assert moved == set(new_ids)
    probe = PROBE + new_ids
    assert torch.allclose(_logits(reloaded, probe), _logits(model, probe), atol=1e-5)


def test_loraplus_gives_the_b_matrices_a_higher_learning_rate(tiny_model_dir, tmp_path):
    from transformers import TrainingArguments

    cfg = TrainConfig(learning_rate=1e-3, lora={"loraplus_lr_ratio": 16})
    model = prepare_trainable(load_model(str(tiny_model_dir), CPU), cfg, CPU)
    args = TrainingArguments(output_dir=str(tmp_path), learning_rate=cfg.learning_rate, use_cpu=True, report_to="none")
    optimizer_cls, kwargs = loraplus_optimizer(model, cfg, args)
    slow, fast = kwargs["params"]
    names = {id(p): n for n, p in model.named_parameters()}
    assert fast["lr"] == pytest.approx(16e-3) and slow["lr"] == pytest.approx(1e-3)
    assert all("lora_B" in names[id(p)] for p in fast["params"]) and all("lora_A" in names[id(p)] for p in slow["params"])
    assert optimizer_cls is torch.optim.AdamW
    assert loraplus_optimizer(model, TrainConfig(), args) is None


@pytest.mark.parametrize("optimizer", ["adamw_8bit", "paged_adamw_8bit", "lion", "adafactor"])
def test_every_optimizer_name_is_one_transformers_builds_and_steps_on_cpu(optimizer, tmp_path):
    from transformers import Trainer, TrainingArguments

    args = TrainingArguments(output_dir=str(tmp_path), optim=OPTIMIZERS[optimizer], learning_rate=1e-3,
                             use_cpu=True, report_to="none")
    linear = torch.nn.Linear(64, 128)  # 8192 weights: above bitsandbytes' 4096 minimum for 8-bit states
    optimizer_cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(args, linear)
    opt = optimizer_cls(linear.parameters(), **kwargs)
    before = linear.weight.detach().clone()
    linear(torch.randn(4, 64)).pow(2).sum().backward()
    opt.step()
    assert not torch.equal(before, linear.weight)


def test_every_configurable_optimizer_has_a_transformers_name():
    from transformers.training_args import OptimizerNames

    names = TrainConfig.model_fields["optimizer"].annotation.__args__
    assert set(names) == set(OPTIMIZERS)
    assert all(OptimizerNames(OPTIMIZERS[n]) for n in names)


def test_fp16_keeps_trainable_weights_in_fp32_for_the_loss_scaler(tiny_model_dir):
    fp16 = Hardware("cpu", "fp16")
    model = prepare_trainable(load_model(str(tiny_model_dir), fp16), TrainConfig(finetuning="freeze"), fp16)
    dtypes = {p.requires_grad: p.dtype for p in model.parameters()}
    assert dtypes == {True: torch.float32, False: torch.float16}


def test_default_config_is_lora_and_old_yaml_still_validates():
    old = PipelineConfig.model_validate({"sft": {"lora": {"r": 4, "alpha": 8, "target_modules": "all-linear"}}})
    assert old.sft.finetuning == "lora" and old.sft.optimizer == "adamw" and old.sft.lora.r == 4
    assert old.alignment.finetuning == "lora"  # every stage that trains takes the same switches


@pytest.mark.parametrize(("settings", "message"), [
    (dict(optimizer="galore_adamw"), "use finetuning full or freeze"),
    (dict(optimizer="lomo", finetuning="full", grad_accum=2), "set grad_accum to 1"),
    (dict(finetuning="qlora", lora={"init": "pissa"}), "cannot start from a 4-bit base"),
])
def test_contradictory_settings_fail_with_the_config(settings, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(**settings)


def test_what_cannot_run_here_fails_at_stage_start_with_what_to_do(monkeypatch):
    import importlib.util

    with pytest.raises(MethodUnavailable, match="adalomo needs a CUDA GPU"):
        check_available(TrainConfig(finetuning="full", optimizer="adalomo"), CPU)
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name in ("liger_kernel", "flash_attn",
                                                                                      "galore_torch") else real(name, *a))
    with pytest.raises(MethodUnavailable, match="pip install liger-kernel"):
        check_available(TrainConfig(use_liger=True), CPU)
    with pytest.raises(MethodUnavailable, match="pip install galore-torch"):
        check_available(TrainConfig(finetuning="full", optimizer="galore_adamw"), CPU)
    with pytest.raises(RuntimeError, match="flash-attn package is not installed"):
        check_attention("flash_attention_2", "cuda")
