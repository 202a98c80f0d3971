"""The reward stage: a scalar reward model learned from preference pairs, with TRL's RewardTrainer.

The model is the SFT model (base + the cpt/sft adapters merged) as a sequence classifier with one
output (`num_labels=1`); a LoRA adapter plus the score head is trained on the pairs with the
Bradley-Terry loss and saved as `reward_adapter/`. Pairwise accuracy and the mean margin on the
held-out pairs say whether it can be trusted: at or below `reward.min_accuracy` the stage warns (or
fails, by config) before anything relies on it.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING

from components.alignment.data import preference_pairs, render_pairs
from components.alignment.rewards import load_classifier, score_answers
from components.alignment.trl_support import common_args, curve_metrics, stage_callback, train_resuming
from components.artifacts import StageResult, atomic_dir, atomic_write_json
from components.errors import StageInputError
from components.training.methods import lora_config

if TYPE_CHECKING:
    from components.config import PipelineConfig
    from components.stage_contract import StageInputs

log = logging.getLogger(__name__)


class RewardModelUntrusted(RuntimeError):
    """The reward model ranks held-out pairs no better than the configured bar."""


def pairwise_accuracy(model, tokenizer, pairs: list[dict], *, max_length: int, batch_size: int = 16) -> dict[str, float]:
    """Share of pairs whose chosen answer outscores the rejected one, and the mean margin."""
    if not pairs:
        return {}
    prompts = [p["prompt"] for p in pairs]
    chosen, cut_chosen = score_answers(model, tokenizer, prompts, [p["chosen"] for p in pairs], max_length=max_length,
                                       batch_size=batch_size)
    rejected, cut_rejected = score_answers(model, tokenizer, prompts, [p["rejected"] for p in pairs],
                                           max_length=max_length, batch_size=batch_size)
    margins = [c - r for c, r in zip(chosen, rejected)]
    return {"accuracy": sum(m > 0 for m in margins) / len(margins), "margin": sum(margins) / len(margins),
            "chosen_mean": sum(chosen) / len(chosen), "rejected_mean": sum(rejected) / len(rejected),
            "pairs": float(len(pairs)), "prompts_cut": float(cut_chosen + cut_rejected)}


def train_reward_model(model, tokenizer, train_pairs: list[dict], cfg, hardware, out_dir: Path, *,
                       metrics_sink=None):
    """RewardTrainer with LoRA on `model` (a one-output classifier); returns the trained PEFT model and metrics."""
    from datasets import Dataset
    from trl import RewardConfig, RewardTrainer

    args = RewardConfig(**common_args(cfg, hardware, out_dir), max_length=cfg.max_length)
    trainer = RewardTrainer(model=model, args=args, train_dataset=Dataset.from_list(train_pairs),
                            processing_class=tokenizer, peft_config=lora_config(cfg.lora, "SEQ_CLS"),
                            callbacks=[stage_callback(metrics_sink)])
    t0 = time.perf_counter()
    output, resumed = train_resuming(trainer, out_dir)
    metrics = {**curve_metrics(trainer.state.log_history), "train_loss_mean": float(output.training_loss),
               "train_seconds": time.perf_counter() - t0, "resumed_from_step": float(resumed)}
    return trainer.model, trainer.state.log_history, metrics


def reward_stage(cfg: PipelineConfig, inputs: StageInputs, out_dir: Path) -> StageResult:
    """Stage entry point (see components.pipeline): train and judge the reward model."""
    from components.models.loading import load_tokenizer, select_hardware

    out_dir = Path(out_dir)
    rcfg = cfg.reward
    base, below = inputs.base_model, inputs.adapter_stack()
    hardware = select_hardware(cfg.compute.device, cfg.compute.precision)
    tokenizer = load_tokenizer(base.source, **base.load_kwargs())
    align = inputs.dir("align", reading=("preference.jsonl", "preference_eval.jsonl"))
    pairs, counts = preference_pairs(align / "preference.jsonl")
    held, held_counts = preference_pairs(align / "preference_eval.jsonl")
    if not pairs:
        raise StageInputError(f"the reward model has no usable preference pairs in {align / 'preference.jsonl'} "
                              f"({counts}); list datasets under data.preference")
    render = lambda ps: render_pairs(ps, tokenizer, cfg.tokenize.template, cfg.tokenize.system_prompt)  # noqa: E731
    train, held_out = render(pairs), render(held)
    model = load_classifier(base, below, hardware, tokenizer.pad_token_id)
    peft_model, history, metrics = train_reward_model(model, tokenizer, train, rcfg, hardware, out_dir,
                                                      metrics_sink=inputs.metrics)
    with atomic_dir(out_dir / "reward_adapter") as tmp:
        peft_model.save_pretrained(tmp, safe_serialization=True)
    peft_model.eval()
    judged_on = "held-out" if held_out else "training"
    if not held_out:
        log.warning("no held-out preference pairs (data.preference_eval): judging the reward model on its training "
                    "pairs, which overstates it")
    quality = pairwise_accuracy(peft_model, tokenizer, held_out or train[:256], max_length=rcfg.max_length)
    warnings = []
    if quality["accuracy"] <= rcfg.min_accuracy:
        message = (f"reward model ranks {quality['accuracy']:.2f} of {judged_on} pairs right (bar: > "
                   f"{rcfg.min_accuracy}); more pairs, steps or a higher learning rate may help")
        if rcfg.on_low_accuracy == "fail":
            raise RewardModelUntrusted(message + " (reward.on_low_accuracy=fail)")
        log.warning(message)
        warnings.append(message)
    report = {"train": counts, "held_out": held_counts, "judged_on": judged_on, "quality": quality,
              "warnings": warnings}
    atomic_write_json(out_dir / "reward_report.json", report)
    atomic_write_json(out_dir / "training_curve.json", history)
    metrics.update({f"reward_{k}": v for k, v in quality.items()})
    metrics.update({"pairs_kept": float(counts["kept"]), "pairs_dropped_identical": float(counts["dropped_identical"]),
                    "pairs_dropped_empty": float(counts["dropped_empty"])})
    files = [str(p.relative_to(out_dir)) for p in (out_dir / "reward_adapter").rglob("*") if p.is_file()]
    reports = ["reward_report.json", "training_curve.json"]
    return StageResult(
        files=[*files, *reports], reports=reports, metrics=metrics,
        info={"reward_adapter": str((out_dir / "reward_adapter").resolve()), "reward_below": [str(p) for p in below],
              "precision": hardware.precision, "warnings": warnings},
    )
