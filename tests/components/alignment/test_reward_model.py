"""The reward stage's model: TRL RewardTrainer with LoRA + score head, judged by pairwise accuracy."""

from __future__ import annotations

import random

import pytest

from components.alignment.reward_model import load_classifier, pairwise_accuracy, train_reward_model
from components.config import RewardModelConfig
from components.models.loading import load_tokenizer, select_hardware
from components.pipeline import BaseModelRef

GOOD = ["Essential (primary) hypertension", "Cholera due to Vibrio cholerae", "Type 2 diabetes mellitus"]
BAD = ["0123456789 0123456789", "ABCDEFGHIJKLMNOP", ".,:;()- .,:;()-"]


def _pairs(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        prompt = f"<|im_start|>user\nWhat does ICD-10-CM code {rng.choice(['I10', 'A00', 'E11'])} describe?<|im_end|>\n"
        out.append({"prompt": prompt + "<|im_start|>assistant\n", "chosen": rng.choice(GOOD) + "<|im_end|>",
                    "rejected": rng.choice(BAD) + "<|im_end|>"})
    return out


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_reward_model_separates_a_separable_preference_set(tiny_model_dir, tmp_path):
    base = BaseModelRef(str(tiny_model_dir))
    hardware = select_hardware("cpu", "fp32")
    tokenizer = load_tokenizer(base.source)
    model = load_classifier(base, [], hardware, tokenizer.pad_token_id)
    cfg = RewardModelConfig(max_steps=30, learning_rate=5e-3, batch_size=8, logging_steps=5, save_steps=100,
                            warmup_ratio=0.0, max_length=64)
    before = pairwise_accuracy(model, tokenizer, _pairs(40, seed=1), max_length=64)
    trained, history, metrics = train_reward_model(model, tokenizer, _pairs(64, seed=0), cfg, hardware, tmp_path)
    after = pairwise_accuracy(trained.eval(), tokenizer, _pairs(40, seed=1), max_length=64)
    assert after["accuracy"] > 0.9, (before, after)
    assert after["margin"] > 0
    assert metrics["train_loss_last"] < metrics["train_loss_first"]
    # The checkpoint the trainer wrote is marked complete, so a rerun would resume from it.
    assert any((p / "lmforge-complete").exists() for p in (tmp_path / "checkpoints").glob("checkpoint-*"))
