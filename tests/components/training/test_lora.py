"""Stage integration on a 2-layer random model: loss logged, trainable params changed, frozen ones not,
adapter reloads, warmup follows the ratio, and a crashed run resumes from its checkpoint.
(The labeled-positions loss itself is checked in tests/components/models/test_loss.py.)"""

from __future__ import annotations

import pytest
import torch
from datasets import Dataset

from components.config import TrainConfig
from components.models.loading import load_model, load_tokenizer, select_hardware
from components.training.checkpoints import last_complete_checkpoint
from components.training.lora import run_lora_training, warmup_steps

CPU = select_hardware("cpu", "fp32")


def _rows(n=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        length = int(torch.randint(6, 20, (1,), generator=g))
        ids = torch.randint(5, 300, (length,), generator=g).tolist()
        prompt = length // 2
        rows.append({"input_ids": ids, "labels": [-100] * prompt + ids[prompt:]})
    return rows


def test_lora_training_changes_only_adapters_and_reloads(tiny_model_dir, tmp_path):
    from peft import PeftModel

    tok = load_tokenizer(str(tiny_model_dir))
    model = load_model(str(tiny_model_dir), CPU)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    logged = []
    cfg = TrainConfig(max_steps=4, batch_size=4, learning_rate=5e-3, logging_steps=1, save_steps=2)
    result = run_lora_training(model, tok, Dataset.from_list(_rows()), cfg, CPU, tmp_path,
                               metrics_sink=lambda step, m: logged.append((step, m)))
    assert [s for s, m in logged if "loss" in m] == [1, 2, 3, 4]
    assert all(m["tokens_per_s"] > 0 for _, m in logged if "loss" in m)
    assert result.metrics["train_tokens"] > 0 and result.metrics["trainable_params"] < result.metrics["total_params"]
    assert "adapter/adapter_model.safetensors" in result.files
    # The adapter was written through a temp directory that is gone now.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter", "checkpoints", "training_curve.json"]

    # The frozen base weights did not move; the LoRA B matrices (zero at init) did.
    reloaded_base = load_model(str(tiny_model_dir), CPU)
    for k, v in reloaded_base.state_dict().items():
        assert torch.equal(v, before[k]), k
    peft_model = PeftModel.from_pretrained(reloaded_base, str(tmp_path / "adapter"))
    lora_b = [p for n, p in peft_model.named_parameters() if "lora_B" in n]
    assert lora_b and all(p.abs().sum() > 0 for p in lora_b)
    ids = torch.tensor([_rows(1, seed=3)[0]["input_ids"]])
    with torch.no_grad():
        assert not torch.allclose(peft_model(ids).logits, load_model(str(tiny_model_dir), CPU)(ids).logits)


def test_padding_free_packing_trains_on_the_same_loss(tiny_model_dir, tmp_path):
    """sft.packing=True: one row per micro-batch, examples kept apart. The first step (LoRA B is zero,
    so the model is the base) sees the same batches and must log the same loss and token count."""
    tok = load_tokenizer(str(tiny_model_dir))
    data = Dataset.from_list(_rows())
    first = {}
    for packing in (False, True):
        logged = []
        cfg = TrainConfig(max_steps=1, batch_size=8, logging_steps=1, save_steps=5, packing=packing)
        result = run_lora_training(load_model(str(tiny_model_dir), CPU), tok, data, cfg, CPU, tmp_path / str(packing),
                                   metrics_sink=lambda step, m: logged.append(m))
        first[packing] = (next(m["loss"] for m in logged if "loss" in m), result.metrics["train_tokens"])
    (loss_padded, tokens_padded), (loss_packed, tokens_packed) = first[False], first[True]
    assert abs(loss_packed - loss_padded) / loss_padded < 1e-4
    assert tokens_packed == tokens_padded


def test_resume_from_last_complete_checkpoint(tiny_model_dir, tmp_path):
    tok = load_tokenizer(str(tiny_model_dir))
    data = Dataset.from_list(_rows())
    cfg = TrainConfig(max_steps=4, batch_size=4, logging_steps=1, save_steps=2)
    run_lora_training(load_model(str(tiny_model_dir), CPU), tok, data, cfg, CPU, tmp_path)
    ckpts = tmp_path / "checkpoints"
    assert last_complete_checkpoint(ckpts).name == "checkpoint-4"
    # Simulate a crash mid-save of step 4: its marker is gone, so it is discarded and step 2 is used.
    (ckpts / "checkpoint-4" / "lmforge-complete").unlink()
    assert last_complete_checkpoint(ckpts).name == "checkpoint-2"
    assert not (ckpts / "checkpoint-4").exists()
    result = run_lora_training(load_model(str(tiny_model_dir), CPU), tok, data, cfg, CPU, tmp_path)
    assert result.metrics["resumed_from_step"] == 2
    assert 0 < result.metrics["train_tokens"]


@pytest.mark.parametrize("resume_at", [2, 4, 6, 10])
def test_a_run_resumed_from_any_checkpoint_ends_where_the_uninterrupted_one_ends(resume_at, tiny_model_dir, tmp_path,
                                                                                  monkeypatch):
    """16 rows in batches of 4: an epoch is 4 steps. Checkpoint 2 is mid-epoch 0, 4 an epoch's end, 6 and 10
    mid-epoch in later epochs (where an order drawn from the global RNG went wrong: the resumed epoch saw
    other rows). The resumed run trains the same rows in the same order, so its curve and adapter are the
    uninterrupted run's."""
    import shutil

    from safetensors.torch import load_file

    import components.training.lora as lora

    keep_all = lora.training_arguments
    monkeypatch.setattr(lora, "training_arguments", lambda *a: {**keep_all(*a), "save_total_limit": None})
    tok = load_tokenizer(str(tiny_model_dir))
    data = Dataset.from_list(_rows())
    cfg = TrainConfig(max_steps=14, batch_size=4, logging_steps=1, save_steps=2, learning_rate=5e-3)
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    curves = {"whole": {}, "resumed": {}}

    def sink(run):
        return lambda step, m: curves[run].update({step: m["loss"]} if "loss" in m else {})

    run_lora_training(load_model(str(tiny_model_dir), CPU), tok, data, cfg, CPU, whole, metrics_sink=sink("whole"))
    shutil.copytree(whole / "checkpoints" / f"checkpoint-{resume_at}",
                    resumed / "checkpoints" / f"checkpoint-{resume_at}")
    result = run_lora_training(load_model(str(tiny_model_dir), CPU), tok, data, cfg, CPU, resumed,
                               metrics_sink=sink("resumed"))
    assert result.metrics["resumed_from_step"] == resume_at
    assert sorted(curves["resumed"]) == list(range(resume_at + 1, 15))
    for step, loss in curves["resumed"].items():
        assert loss == pytest.approx(curves["whole"][step], rel=1e-6), f"loss at step {step}"
    expected = load_file(whole / "adapter" / "adapter_model.safetensors")
    got = load_file(resumed / "adapter" / "adapter_model.safetensors")
    assert expected.keys() == got.keys()
    for name, weight in expected.items():
        torch.testing.assert_close(got[name], weight, rtol=1e-5, atol=1e-7, msg=name)


def test_gradient_checkpointing_recomputes_to_the_same_training(tiny_model_dir, tmp_path):
    """Checkpointed layers (recomputed in the backward pass, LoRA dropout included) train exactly
    as the stored-activation run does, step for step."""
    tok = load_tokenizer(str(tiny_model_dir))
    data = Dataset.from_list(_rows())
    losses = {}
    for checkpointing in (False, True):
        logged = []
        model = load_model(str(tiny_model_dir), CPU)
        cfg = TrainConfig(max_steps=3, batch_size=4, learning_rate=5e-3, logging_steps=1, save_steps=5,
                          gradient_checkpointing=checkpointing)
        cfg.lora.dropout = 0.1
        run_lora_training(model, tok, data, cfg, CPU, tmp_path / str(checkpointing),
                          metrics_sink=lambda step, m: logged.append(m))
        assert model.is_activation_checkpointing == checkpointing
        losses[checkpointing] = [m["loss"] for m in logged if "loss" in m]
    assert len(losses[True]) == 3 and losses[True] == pytest.approx(losses[False], rel=1e-5)


@pytest.mark.parametrize(("ratio", "max_steps", "steps"), [(0.0, 10, 0), (0.05, 24, 2), (0.1, 30, 3), (0.25, 6, 2), (1.0, 4, 4)])
def test_warmup_steps_round_the_ratio_up(ratio, max_steps, steps):
    assert warmup_steps(ratio, max_steps) == steps


@pytest.mark.parametrize("scheduler", ["constant_with_warmup", "linear"])
def test_full_warmup_ratio_warms_up_over_every_step(tiny_model_dir, tmp_path, scheduler):
    """warmup_ratio 1.0 means warm up over all of max_steps (transformers alone reads warmup_steps=1.0 as one step)."""
    import json

    tok = load_tokenizer(str(tiny_model_dir))
    cfg = TrainConfig(max_steps=4, batch_size=4, learning_rate=1e-3, warmup_ratio=1.0, lr_scheduler=scheduler,
                      logging_steps=1, save_steps=10)
    run_lora_training(load_model(str(tiny_model_dir), CPU), tok, Dataset.from_list(_rows()), cfg, CPU, tmp_path)
    curve = json.loads((tmp_path / "training_curve.json").read_text())
    rates = [h["learning_rate"] for h in curve if "learning_rate" in h]
    assert len(rates) == 4
    assert all(a < b for a, b in zip(rates, rates[1:])), rates


@pytest.mark.parametrize("ordered", [True, False])
def test_ordered_training_reads_the_rows_in_file_order(tiny_model_dir, tmp_path, monkeypatch, ordered):
    # A curriculum (data.sft_phases) is the row order of sft.parquet: ordered training keeps it; the default
    # draws length-grouped random batches.
    import components.training.lora as lora

    seen = []

    class Spy(lora.CausalCollator):
        def __call__(self, features):
            seen.extend(len(f["input_ids"]) for f in features)
            return super().__call__(features)

    monkeypatch.setattr(lora, "CausalCollator", Spy)
    rows = [{"input_ids": list(range(5, 5 + n)), "labels": list(range(5, 5 + n))} for n in range(6, 14)]
    cfg = TrainConfig(max_steps=4, batch_size=2, learning_rate=1e-3, logging_steps=1, save_steps=100)
    run_lora_training(load_model(str(tiny_model_dir), CPU), load_tokenizer(str(tiny_model_dir)),
                      Dataset.from_list(rows), cfg, CPU, tmp_path, ordered=ordered)
    assert sorted(seen) == list(range(6, 14))
    assert (seen == list(range(6, 14))) == ordered


def test_without_bars_each_log_is_one_progress_line_not_a_raw_dict(tiny_model_dir, tmp_path, monkeypatch, capsys):
    import doctest

    import components.training.lora as lora

    assert doctest.testmod(lora).failed == 0
    monkeypatch.setenv("LMFORGE_NO_PROGRESS", "1")
    cfg = TrainConfig(max_steps=4, batch_size=4, learning_rate=1e-3, logging_steps=2, save_steps=100)
    run_lora_training(load_model(str(tiny_model_dir), CPU), load_tokenizer(str(tiny_model_dir)),
                      Dataset.from_list(_rows()), cfg, CPU, tmp_path)
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if line.startswith("step ")]
    assert [line.split()[1] for line in lines] == ["2/4", "4/4"]
    assert all(" loss " in line and " lr " in line for line in lines)
    assert "s/step" in lines[0] and lines[-1].endswith("0 s left")
    assert "{'loss'" not in out and "'train_runtime'" not in out
