"""What every TRL trainer here shares: arguments derived from our TrainConfig and the hardware,
a LoRA config, and one callback for metrics, complete checkpoint markers and divergence guards.

TRL's configs default to bf16 and gradient checkpointing; on these CPUs bf16 is emulated (~20x
slower) and TRL refuses it outright without a GPU, so precision always comes from `Hardware`.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

from components.errors import TrainingDiverged
from components.pipeline import MetricsSink
from components.training.lora import COMPLETE, last_complete_checkpoint, training_arguments


def common_args(cfg, hardware, out_dir: Path) -> dict:
    """Keyword arguments every TRL config takes, from a components.config.TrainConfig (checkpoints under
    out_dir/checkpoints)."""
    return training_arguments(cfg, hardware, Path(out_dir) / "checkpoints")


def lora_config(lora, task_type: str):
    from peft import LoraConfig

    return LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                      target_modules=lora.target_modules, task_type=task_type)


def stage_callback(sink: MetricsSink | None, *, max_kl: float | None = None, kl_keys: tuple[str, ...] = ("kl",)):
    """Forward logs to `sink` with tokens/s, mark checkpoints complete, and stop on NaN or too much KL."""
    from transformers import TrainerCallback

    class AlignmentCallback(TrainerCallback):
        t0 = 0.0

        def on_train_begin(self, args, state, control, **kwargs):
            self.t0 = time.perf_counter()

        def on_log(self, args, state, control, logs=None, **kwargs):
            logs = logs or {}
            loss = logs.get("loss")
            if isinstance(loss, float) and not math.isfinite(loss):
                raise TrainingDiverged(state.global_step, f"loss is {loss}")
            for key in kl_keys:
                kl = logs.get(key)
                if max_kl is not None and isinstance(kl, (int, float)) and kl > max_kl:
                    raise TrainingDiverged(state.global_step, f"KL to the reference {kl:.3f} > max_kl {max_kl}")
            if sink is not None:
                metrics = {k: float(v) for k, v in logs.items() if isinstance(v, (int, float))}
                metrics["elapsed_s"] = time.perf_counter() - self.t0
                sink(state.global_step, metrics)

        def on_save(self, args, state, control, **kwargs):
            ckpt = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if ckpt.is_dir():
                (ckpt / COMPLETE).write_text(str(state.global_step))

    return AlignmentCallback()


def train_resuming(trainer, out_dir: Path) -> tuple[object, int]:
    """trainer.train() from the newest complete checkpoint under out_dir/checkpoints, if any."""
    resume = last_complete_checkpoint(Path(out_dir) / "checkpoints")
    output = trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    return output, int(resume.name.split("-")[1]) if resume else 0


def curve_metrics(history: list[dict]) -> dict[str, float]:
    losses = [h["loss"] for h in history if "loss" in h]
    return {"train_loss_first": float(losses[0]) if losses else float("nan"),
            "train_loss_last": float(losses[-1]) if losses else float("nan")}
