"""What every TRL trainer here shares: arguments derived from our TrainConfig and the hardware,
and lora.training_callback (metrics, complete checkpoint markers) with a NaN/KL guard.

TRL's configs default to bf16 and gradient checkpointing; on these CPUs bf16 is emulated (~20x
slower) and TRL refuses it outright without a GPU, so precision always comes from `Hardware`.
"""

from __future__ import annotations

from pathlib import Path

from components.errors import TrainingDiverged
from components.stage_contract import MetricsSink
from components.training.checkpoints import checkpoint_number, last_complete_checkpoint
from components.training.lora import non_finite_guard, plain_progress, training_arguments, training_callback


def common_args(cfg, hardware, out_dir: Path) -> dict:
    """Keyword arguments every TRL config takes, from a components.config.TrainConfig (checkpoints under
    out_dir/checkpoints)."""
    return training_arguments(cfg, hardware, Path(out_dir) / "checkpoints")


def divergence_guard(max_kl: float | None, kl_keys: tuple[str, ...] = ("kl",)):
    """A guard for lora.training_callback: lora.non_finite_guard (a NaN loss or gradient norm), then a
    logged KL (any of `kl_keys`) beyond `max_kl`; either stops the run naming the step."""

    def guard(args, state, logs: dict) -> None:
        non_finite_guard(args, state, logs)
        for key in kl_keys:
            kl = logs.get(key)
            if max_kl is not None and isinstance(kl, (int, float)) and kl > max_kl:
                raise TrainingDiverged(state.global_step, f"KL to the reference {kl:.3f} > max_kl {max_kl}")

    return guard


def stage_callback(sink: MetricsSink | None, *, max_kl: float | None = None, kl_keys: tuple[str, ...] = ("kl",)):
    """Forward logs to `sink`, mark checkpoints complete, and stop on NaN or too much KL."""
    return training_callback(sink, guard=divergence_guard(max_kl, kl_keys))


def train_resuming(trainer, out_dir: Path) -> tuple[object, int]:
    """trainer.train() from the newest complete checkpoint under out_dir/checkpoints, if any."""
    resume = last_complete_checkpoint(Path(out_dir) / "checkpoints")
    plain_progress(trainer)
    output = trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    return output, checkpoint_number(resume) if resume else 0


def curve_metrics(history: list[dict]) -> dict[str, float]:
    losses = [h["loss"] for h in history if "loss" in h]
    return {"train_loss_first": float(losses[0]) if losses else float("nan"),
            "train_loss_last": float(losses[-1]) if losses else float("nan")}
