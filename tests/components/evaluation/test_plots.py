"""The pictures are written as PNGs from a training curve and from per-task reports."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from components.evaluation.plots import plot_per_task, plot_training_curves
from tests.components.evaluation.test_per_task import _report

PNG = b"\x89PNG\r\n\x1a\n"


def test_training_curves_png(tmp_path: Path):
    history = [{"step": s, "loss": 3.0 / s, "learning_rate": 1e-3 * (1 - s / 10), "grad_norm": 1.0, "epoch": s / 10}
               for s in range(1, 10)]
    history.append({"step": 9, "train_runtime": 12.0, "train_loss": 1.0})  # the closing entry has no curve
    (tmp_path / "training_curve.json").write_text(json.dumps(history))
    out = plot_training_curves(tmp_path / "training_curve.json", tmp_path / "png" / "curves.png", title="sft")
    assert out.read_bytes().startswith(PNG) and out.stat().st_size > 5000
    with pytest.raises(ValueError, match="no training curve"):
        plot_training_curves([{"step": 1, "epoch": 0.1}], tmp_path / "none.png")


def test_alignment_curves_png(tmp_path: Path):
    """PPO's steps (two losses, reward, KL) and RAFT's iterations (no optimizer step) are drawn too."""
    ppo = [{"step": s, "policy_loss": -0.01 * s, "value_loss": 0.2 / s, "reward_mean": 0.3 + 0.05 * s, "kl": 0.01 * s,
            "tokens_per_s": 60.0} for s in range(1, 6)]
    out = plot_training_curves(ppo, tmp_path / "ppo.png", title="alignment")
    assert out.read_bytes().startswith(PNG) and out.stat().st_size > 5000
    raft = [{"iteration": i, "reward_mean": 0.2 + 0.1 * i, "kept_reward_mean": 0.9, "train_loss": 1.4 - 0.3 * i,
             "sample_tokens_per_s": 40.0} for i in range(3)]
    out = plot_training_curves(raft, tmp_path / "raft.png", title="alignment")
    assert out.read_bytes().startswith(PNG) and out.stat().st_size > 5000


def test_per_task_bars_png(tmp_path: Path):
    base, adapted = _report(), _report()
    adapted["tasks"]["billable"]["metrics"]["exact_match"]["value"] = 0.6
    out = plot_per_task({"base": base, "+cpt": base, "adapted": adapted}, tmp_path / "per_task.png")
    assert out.read_bytes().startswith(PNG) and out.stat().st_size > 5000
    out = plot_per_task({"adapted": adapted}, tmp_path / "choice.png", metric="choice_accuracy")
    assert out.read_bytes().startswith(PNG)
