"""Training for continued pretraining and SFT: LoRA by default, or any method of
components.training.methods (full, freeze, lora, qlora; the optimizer by name).

The speed on small hardware comes from removing work, not from flags:
- length-grouped batches, right-padded with no attention mask: little padding, and the attention
  kernel takes its plain causal path (measured here: faster on CPU than one packed row with a
  block-diagonal mask, which `components.data.packing.flatten_batch` builds for varlen kernels);
- the LM head (a 576 x 49k matmul per token for SmolLM2) runs only on positions that have a label,
  so prompt and pad tokens cost a forward/backward through the body but never through the vocabulary
  (components.models.loss, which falls back to the model's own forward where that is not exact).
The loop itself is transformers' Trainer (optimizer, schedule, accumulation, checkpoints).
What trains and how it is saved is methods.py's: `prepare_trainable` before, `save_trained` after.
Checkpoints get a complete marker after they are written; a rerun resumes from the newest complete one.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from components.artifacts import StageResult, atomic_write_json
from components.config import TrainConfig
from components.data.packing import flatten_batch, pad_causal
from components.errors import TrainingDiverged
from components.models.loading import Hardware, count_parameters
from components.models.loss import labeled_positions_loss
from components.runtime import progress_bars
from components.stage_contract import MetricsSink
from components.training.checkpoints import COMPLETE, checkpoint_number, last_complete_checkpoint
from components.training.methods import loraplus_optimizer, optimizer_arguments, prepare_trainable, save_trained

log = logging.getLogger(__name__)


class CausalCollator:
    """Right-pad a micro-batch without an attention mask (see components.data.packing.pad_causal),
    or, with `packing`, concatenate it into one row with restarting position ids (flatten_batch)."""

    def __init__(self, pad_token_id: int, packing: bool = False):
        self.pad_token_id, self.packing = pad_token_id, packing

    def __call__(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        if not self.packing:
            return pad_causal(examples, self.pad_token_id)
        batch = flatten_batch(examples, self.pad_token_id)
        batch["num_real_tokens"] = torch.tensor(batch["input_ids"].shape[1])
        return batch


def _epoch_seeded_sampler(batch_size: int, lengths: list[int], seed: int):
    """Transformers' length-grouped order, drawn from a generator seeded by (seed, epoch) instead of the global
    RNG. Trainer's own sampler reads the global RNG when an epoch starts; a run resumed from a checkpoint in the
    middle of a later epoch draws that epoch's order before it restores the RNG, so it trained the rest of the
    epoch on other rows than the run it resumes (the final loss moved by ~1e-3). Seeded per epoch, the order
    depends on nothing but the epoch: Trainer and accelerate call set_epoch before each pass, resumed or not."""
    from transformers.trainer_pt_utils import LengthGroupedSampler, get_length_grouped_indices

    class EpochSeededLengthGroupedSampler(LengthGroupedSampler):
        epoch = 0

        def set_epoch(self, epoch: int) -> None:
            self.epoch = epoch

        def __iter__(self):
            generator = torch.Generator().manual_seed(seed + self.epoch)
            return iter(get_length_grouped_indices(self.lengths, self.batch_size, generator=generator))

    return EpochSeededLengthGroupedSampler(batch_size, lengths=lengths)


def _build_trainer_class():
    from transformers import Trainer

    class PackedTrainer(Trainer):
        """Trainer whose loss skips the LM head on unlabeled positions and counts throughput, and whose
        length-grouped order resumes exactly (_epoch_seeded_sampler)."""

        tokens_seen = 0
        trained_tokens_seen = 0

        def _get_train_sampler(self, train_dataset=None):
            dataset = train_dataset if train_dataset is not None else self.train_dataset
            column = self.args.length_column_name
            if self.args.train_sampling_strategy != "group_by_length" or column not in dataset.column_names:
                return super()._get_train_sampler(train_dataset)
            seed = self.args.data_seed if self.args.data_seed is not None else self.args.seed
            self._lmforge_sampler = _epoch_seeded_sampler(
                self.args.train_batch_size * self.args.gradient_accumulation_steps, list(dataset[column]), seed)
            return self._lmforge_sampler

        def get_resumed_dataloader(self, dataloader, num_batches):
            # Under several ranks accelerate's skipping wrapper hides the sampler from set_epoch (SkipBatchSampler >
            # BatchSamplerShard > BatchSampler > sampler): the resumed epoch drew epoch 0's order. Hand it on here.
            loader = super().get_resumed_dataloader(dataloader, num_batches)
            sampler = getattr(self, "_lmforge_sampler", None)
            if sampler is not None and hasattr(loader, "set_epoch"):
                set_epoch = loader.set_epoch

                def both(epoch: int) -> None:
                    set_epoch(epoch)
                    sampler.set_epoch(epoch)

                loader.set_epoch = both
            return loader

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            real = inputs.pop("num_real_tokens", None)
            loss_sum, n = labeled_positions_loss(model, inputs)
            self.tokens_seen += int(real) if real is not None else int(inputs["input_ids"].numel())
            self.trained_tokens_seen += n
            if num_items_in_batch is not None:
                # Trainer counts labels across the accumulated micro-batches; dividing by it gives a
                # true per-token mean over the whole optimizer step.
                denom = torch.as_tensor(num_items_in_batch, device=loss_sum.device, dtype=loss_sum.dtype)
                loss = loss_sum / denom.clamp(min=1)
                if self.args.n_gpu > 1 or self.accelerator.num_processes > 1:  # DDP and DeepSpeed average over ranks
                    loss = loss * self.accelerator.num_processes
            else:
                loss = loss_sum / max(n, 1)
            return (loss, None) if return_outputs else loss

    return PackedTrainer


Guard = Callable[[Any, Any, dict], None]  # (TrainingArguments, TrainerState, logs); raises to stop training


def training_callback(sink: MetricsSink | None, *, tokens_seen: Callable[[], int] | None = None,
                      guard: Guard | None = None):
    """The Trainer callback of every training stage (our loop here, the TRL trainers in
    components/alignment/trl_support.py).

    Forwards each log to `sink` with elapsed_s (and tokens_per_s when `tokens_seen` reads the trainer's
    token count), marks each checkpoint complete once Trainer has written it (a rerun resumes only from
    complete ones), and hands each log to `guard`, which raises to stop a run that diverged.
    """
    from transformers import TrainerCallback

    class StageCallback(TrainerCallback):
        t0, tokens0, step0 = 0.0, 0, 0

        def on_train_begin(self, args, state, control, **kwargs):
            self.t0 = time.perf_counter()
            self.tokens0 = tokens_seen() if tokens_seen is not None else 0
            self.step0 = state.global_step  # past a resumed checkpoint's steps

        def on_log(self, args, state, control, logs=None, **kwargs):
            logs = logs or {}
            if logs and sink is not None:
                elapsed = time.perf_counter() - self.t0
                metrics = {k: float(v) for k, v in logs.items() if isinstance(v, (int, float))}
                metrics["elapsed_s"] = elapsed
                if tokens_seen is not None:
                    metrics["tokens_per_s"] = (tokens_seen() - self.tokens0) / max(elapsed, 1e-9)
                sink(state.global_step, metrics)
            if not progress_bars() and state.is_world_process_zero and any(k in logs for k in ("loss", "reward")):
                print(progress_line(state.global_step, state.max_steps, logs, time.perf_counter() - self.t0,
                                    state.global_step - self.step0), flush=True)
            if guard is not None:  # after the sink, so the diverging step's figures are recorded
                guard(args, state, logs)

        def on_save(self, args, state, control, **kwargs):
            # Trainer calls on_save once this rank has written its part of the checkpoint; when every rank
            # has (the barrier: another rank's files may still be in flight), rank 0 marks it complete.
            if torch.distributed.is_available() and torch.distributed.is_initialized():
                torch.distributed.barrier()
            ckpt = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if state.is_world_process_zero and ckpt.is_dir():
                (ckpt / COMPLETE).write_text(str(state.global_step))

    return StageCallback()


# What a progress line shows of a log, when the log has it: (key, label, format).
PROGRESS_KEYS = (("loss", "loss", ".4g"), ("reward", "reward", ".3f"), ("kl", "kl", ".3g"),
                 ("learning_rate", "lr", ".2e"), ("grad_norm", "grad", ".3g"))


def progress_line(step: int, max_steps: int, logs: dict, elapsed: float, steps_done: int) -> str:
    """The line a training stage prints per log where no bar is drawn (a worker's log, CI): the step, the
    figures of PROGRESS_KEYS and the time left, in place of Trainer's raw log dicts.

    >>> progress_line(40, 80, {"loss": 1.3641, "learning_rate": 8.645e-05, "epoch": 0.06}, 90.0, 40)
    'step 40/80  loss 1.364  lr 8.65e-05  |  2.2 s/step, 1.5 min left'
    """
    parts = [f"step {step}/{max_steps}"]
    parts += [f"{label} {logs[key]:{fmt}}" for key, label, fmt in PROGRESS_KEYS
              if isinstance(logs.get(key), (int, float))]
    line = "  ".join(parts)
    if steps_done > 0:
        per_step = elapsed / steps_done
        left = per_step * max(max_steps - step, 0)
        line += f"  |  {per_step:.1f} s/step, " + (f"{left / 60:.1f} min left" if left >= 60 else f"{left:.0f} s left")
    return line


def plain_progress(trainer):
    """Without bars, Trainer prints every log as a raw dict (its PrinterCallback); training_callback prints a
    progress line instead (see progress_line)."""
    from transformers.trainer_callback import PrinterCallback

    if not progress_bars():
        trainer.remove_callback(PrinterCallback)
    return trainer


def non_finite_guard(args, state, logs: dict) -> None:
    """Stops training at the first logged step whose loss or gradient norm is NaN or infinite, naming the
    step: going on would only write NaN weights into the checkpoints and the adapter. (Trainer logs a
    NaN loss as the previous mean, logging_nan_inf_filter, so the gradient norm is what shows it.)"""
    bad = {k: v for k, v in logs.items() if k in ("loss", "grad_norm") and not math.isfinite(v)}
    if args.fp16:
        bad.pop("grad_norm", None)  # fp16's loss scaler skips steps whose gradients overflow
    if not bad:
        return
    first = max(state.global_step - args.logging_steps + 1, 1)
    window = "" if first == state.global_step else f" (logged over steps {first}-{state.global_step})"
    raise TrainingDiverged(
        state.global_step, ", ".join(f"{k} is {v}" for k, v in bad.items()) + window,
        advice="Lower the learning rate or max_grad_norm, check the data for broken rows, or train in fp32.")


def warmup_steps(warmup_ratio: float, max_steps: int) -> int:
    """Warmup length in optimizer steps: warmup_ratio x max_steps, rounded up (as transformers rounds a ratio),
    after rounding off float noise (0.1 x 30 is 3.0000000000000004 in floats: 3 steps, not 4).

    An integer on purpose: transformers reads a float `warmup_steps` below 1 as a ratio but 1.0 as one step.
    """
    return math.ceil(round(warmup_ratio * max_steps, 9))


def lr_schedule(optimizer, name: str, warmup_ratio: float, total_steps: int):
    """The learning-rate schedule a TrainConfig names (transformers' own schedules), for the loops that
    step an optimizer themselves (RAFT, PPO): step it after each optimizer step; checkpoint its state."""
    from transformers import get_scheduler

    return get_scheduler(name, optimizer, num_warmup_steps=warmup_steps(warmup_ratio, total_steps),
                         num_training_steps=total_steps)


def training_arguments(cfg: TrainConfig, hardware: Hardware, output_dir: Path) -> dict:
    """The TrainingArguments a stage's TrainConfig and the hardware decide; shared by our loop and the TRL
    trainers (whose configs extend TrainingArguments and default to bf16, which CPUs only emulate)."""
    return dict(
        output_dir=str(output_dir),
        max_steps=cfg.max_steps,
        per_device_train_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.grad_accum,
        learning_rate=cfg.learning_rate,
        lr_scheduler_type=cfg.lr_scheduler,
        warmup_steps=warmup_steps(cfg.warmup_ratio, cfg.max_steps),
        weight_decay=cfg.weight_decay,
        max_grad_norm=cfg.max_grad_norm,
        logging_steps=cfg.logging_steps,
        save_strategy="steps",
        save_steps=cfg.save_steps,
        save_total_limit=2,
        seed=cfg.seed,
        data_seed=cfg.seed,
        bf16=hardware.dtype == torch.bfloat16,
        fp16=hardware.dtype == torch.float16,
        use_cpu=hardware.device == "cpu",
        dataloader_num_workers=0,
        report_to="none",
        disable_tqdm=not progress_bars(),
        # Non-reentrant: works with frozen base weights (no enable_input_require_grads) and keeps
        # the dropout masks of the recomputed forward identical to the first.
        **checkpointing_arguments(cfg.gradient_checkpointing, {"use_reentrant": False}),
        **optimizer_arguments(cfg),
    )


def checkpointing_arguments(enabled: bool, kwargs: dict) -> dict:
    """TrainingArguments' activation checkpointing, under the name this transformers has: later 5.x releases
    call it `activation_checkpointing` (the old name deprecated), 5.17 and earlier only `gradient_checkpointing`."""
    from transformers import TrainingArguments

    name = ("activation_checkpointing" if "activation_checkpointing" in TrainingArguments.__dataclass_fields__
            else "gradient_checkpointing")
    return {name: enabled, f"{name}_kwargs": kwargs if enabled else None}


def _with_lengths(train_dataset, model):
    """The rows with a `length` column (the length-grouped sampler reads it), warning when rows are longer
    than the model's context window."""
    if "length" not in train_dataset.column_names:
        train_dataset = train_dataset.add_column("length", [len(x) for x in train_dataset["input_ids"]])
    window = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    longest = max(train_dataset["length"], default=0)
    if window and longest > window:
        log.warning("rows of up to %d tokens exceed the model's context window of %d: positions beyond it were "
                    "never trained; set model.rope_scaling or lower tokenize.cutoff_len", longest, window)
    return train_dataset


def _run_metrics(history: list[dict], output, trainer, train_s: float) -> dict[str, float]:
    """Loss (first, last, mean) and tokens (seen, trained, per second) of a finished Trainer run."""
    losses = [h["loss"] for h in history if "loss" in h]
    return {
        "train_loss_first": float(losses[0]) if losses else float("nan"),
        "train_loss_last": float(losses[-1]) if losses else float("nan"),
        "train_loss_mean": float(output.training_loss),
        "train_tokens": float(trainer.tokens_seen),
        "train_trained_tokens": float(trainer.trained_tokens_seen),
        "train_seconds": train_s,
        "train_tokens_per_s": trainer.tokens_seen / max(train_s, 1e-9),
    }


def run_lora_training(
    model,
    tokenizer,
    train_dataset,
    cfg: TrainConfig,
    hardware: Hardware,
    out_dir: Path,
    *,
    metrics_sink: MetricsSink | None = None,
    deepspeed: dict | None = None,
    ordered: bool = False,
) -> StageResult:
    """Train `model` as `cfg.finetuning` says over tokenized rows (input_ids, labels[, position_ids]).

    Writes `adapter/` (a PEFT adapter for lora/qlora, the whole model for full/freeze, with the
    tokenizer; see methods.save_trained), `training_curve.json`; checkpoints under `checkpoints/`.
    `ordered` reads the rows in their order (a curriculum), else in length-grouped random batches.
    """
    from transformers import TrainingArguments

    out_dir = Path(out_dir)
    torch.manual_seed(cfg.seed)
    model = prepare_trainable(model, cfg, hardware)
    trainable, total = count_parameters(model)

    ckpt_root = out_dir / "checkpoints"
    args = TrainingArguments(
        **training_arguments(cfg, hardware, ckpt_root),
        remove_unused_columns=False,
        deepspeed=deepspeed,  # a ZeRO config (components.training.deepspeed); the process runs under its launcher
        # Batches of similar lengths: right padding then costs little (the sampler reads `length`).
        train_sampling_strategy="sequential" if ordered else "group_by_length",
        length_column_name="length",
    )
    train_dataset = _with_lengths(train_dataset, model)
    trainer = _build_trainer_class()(
        model=model,
        args=args,
        train_dataset=train_dataset,
        data_collator=CausalCollator(tokenizer.pad_token_id, packing=cfg.packing),
        optimizer_cls_and_kwargs=loraplus_optimizer(model, cfg, args),
    )
    trainer.add_callback(training_callback(metrics_sink, tokens_seen=lambda: trainer.tokens_seen,
                                           guard=non_finite_guard))
    plain_progress(trainer)
    resume = last_complete_checkpoint(ckpt_root)
    if resume is not None:
        log.info("resuming from %s", resume)
    t0 = time.perf_counter()
    output = trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    train_s = time.perf_counter() - t0

    state = None
    if trainer.is_deepspeed_enabled:  # gathering ZeRO-3 shards is collective: every rank takes part
        state = trainer.accelerator.get_state_dict(trainer.deepspeed)
    if not trainer.is_world_process_zero():  # one rank writes the result
        return StageResult(files=[], metrics={}, info={})
    saved = save_trained(model, out_dir / "adapter", tokenizer, state_dict=state)

    history = trainer.state.log_history
    atomic_write_json(out_dir / "training_curve.json", history)
    metrics = {**_run_metrics(history, output, trainer, train_s),
               "trainable_params": float(trainable), "total_params": float(total),
               "resumed_from_step": float(checkpoint_number(resume) if resume else 0)}
    files = [str(p.relative_to(out_dir)) for p in saved]
    files.append("training_curve.json")
    return StageResult(files=files, reports=["training_curve.json"], metrics=metrics,
                       info={"precision": hardware.precision, "device": hardware.device, "finetuning": cfg.finetuning,
                             "optimizer": cfg.optimizer})
