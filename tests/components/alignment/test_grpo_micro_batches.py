"""GRPO's memory: components.alignment.trl_methods.grpo_config samples and scores a step's answers as one
generation batch, then takes the gradient one prompt's group at a time (TRL's gradient accumulation), so a
backward pass holds the activations of num_generations answers, not of the whole batch. The step must stay
the one the whole batch at once gives: same answers, same gradient.
"""

from __future__ import annotations

import functools

import pytest
import torch

from components.alignment import trl_methods
from components.alignment.trl_methods import grpo_config, train_grpo
from components.config import AlignmentConfig
from components.models.loading import load_model, load_tokenizer, select_hardware

CPU = select_hardware("cpu", "fp32")
PROMPTS = [{"prompt": " ".join(f"w{(i * 7 + j) % 45}" for j in range(4)), "reference": "0", "task": "toy"}
           for i in range(3)]


def _config(**overrides) -> AlignmentConfig:
    settings = dict(method="grpo", learning_rate=1e-2, batch_size=3, num_generations=4, max_new_tokens=5,
                    max_steps=1, logging_steps=1, save_steps=100, warmup_ratio=0.0, beta=0.04)
    return AlignmentConfig(**{**settings, **overrides})


def _train(model_dir, cfg, out_dir, monkeypatch) -> dict:
    """train_grpo from a seeded LoRA init; what it sampled, the rows of each backward pass, the first step's gradient."""
    import trl
    from transformers import TrainerCallback
    from trl.trainer.grpo_trainer import GRPOTrainer  # the class itself, not an earlier call's patch of trl's name

    seen: dict = {"completions": [], "rows": [], "grads": {}}

    class FirstGradient(TrainerCallback):
        def on_pre_optimizer_step(self, args, state, control, model=None, **_):
            if not seen["grads"]:
                seen["grads"] = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}

    class Recording(GRPOTrainer):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.add_callback(FirstGradient())

        def compute_loss(self, model, inputs, *args, **kwargs):
            seen["rows"].append(int(inputs["completion_ids"].shape[0]))
            return super().compute_loss(model, inputs, *args, **kwargs)

    def word_count(prompts, completions, **_):  # differs between a prompt's answers: the advantages are not all 0
        seen["completions"].append(list(completions))
        return [float(len(c.split())) for c in completions]

    monkeypatch.setattr(trl, "GRPOTrainer", Recording)
    tokenizer = load_tokenizer(str(model_dir))
    model = load_model(str(model_dir), CPU)
    torch.manual_seed(0)  # the LoRA init
    train_grpo(model, tokenizer, PROMPTS, word_count, cfg, CPU, out_dir)
    return seen


def test_grpo_config_generates_the_whole_batch_and_steps_through_its_groups(tmp_path):
    args = grpo_config(_config(batch_size=3, grad_accum=2), CPU, tmp_path)
    assert args.per_device_train_batch_size == 4  # one prompt's answers per backward pass
    assert args.generation_batch_size == 3 * 2 * 4  # a step still samples batch_size x grad_accum prompts x 4
    assert args.steps_per_generation == args.gradient_accumulation_steps == 6  # one generation per optimizer step
    assert args.loss_type == "dapo"  # normalized over the generation batch's tokens: the split leaves the loss alone


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_grpo_step_by_groups_equals_the_whole_batch_at_once(small_model_dir, tmp_path, monkeypatch):
    by_group = _train(small_model_dir, _config(), tmp_path / "by_group", monkeypatch)
    # The layout grpo_config replaced: every answer of the step in one pass.
    monkeypatch.setattr(trl_methods, "grpo_config", functools.partial(grpo_config, answers_per_pass=12))
    whole = _train(small_model_dir, _config(), tmp_path / "whole", monkeypatch)

    assert by_group["rows"] == [4, 4, 4] and whole["rows"] == [12]  # backward passes over 4 answers, not 12
    assert by_group["completions"] == whole["completions"] and len(whole["completions"][0]) == 12
    assert by_group["grads"].keys() == whole["grads"].keys() and by_group["grads"]
    assert any(g.abs().max() > 0 for g in whole["grads"].values())  # a real gradient, not two zeros
    for name, grad in whole["grads"].items():
        torch.testing.assert_close(by_group["grads"][name], grad, rtol=1e-4, atol=1e-6, msg=name)
