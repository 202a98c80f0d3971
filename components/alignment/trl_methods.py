"""The alignment methods TRL provides, behind one call each: DPO, KTO, ORPO and SimPO on preference
pairs, and GRPO on prompts scored by the pipeline's reward.

Each trains the SFT model (base + cpt/sft adapters merged) as `alignment.finetuning` says (a LoRA
adapter by default); where the method has a reference policy (DPO, KTO, GRPO with beta > 0) and the
method is an adapter, the reference is that same model with the adapter disabled, so no second copy
is loaded (full and freeze: TRL keeps a frozen copy). ORPO and SimPO need no reference.
"""

from __future__ import annotations

import time
from pathlib import Path

from components.alignment.trl_support import common_args, curve_metrics, stage_callback, train_resuming
from components.training.methods import prepare_trainable

PREFERENCE_METHODS = ("dpo", "kto", "orpo", "simpo")


def preference_trainer(method: str, cfg, args: dict):
    """(Trainer class, its config) for a preference method; `args` from trl_support.common_args."""
    if method == "dpo":
        from trl import DPOConfig, DPOTrainer

        return DPOTrainer, DPOConfig(**args, beta=cfg.method_beta, max_length=cfg.max_length, loss_type=["sigmoid"])
    if method == "kto":
        from trl import KTOConfig, KTOTrainer

        return KTOTrainer, KTOConfig(**args, beta=cfg.method_beta, max_length=cfg.max_length)
    if method == "orpo":
        from trl.experimental.orpo import ORPOConfig, ORPOTrainer

        return ORPOTrainer, ORPOConfig(**args, beta=cfg.method_beta, max_length=cfg.max_length)
    if method == "simpo":  # SimPO is CPO's loss "simpo" with the behaviour-cloning term off (Meng et al. 2024)
        from trl.experimental.cpo import CPOConfig, CPOTrainer

        return CPOTrainer, CPOConfig(**args, beta=cfg.method_beta, max_length=cfg.max_length, loss_type="simpo",
                                     cpo_alpha=0.0, simpo_gamma=cfg.simpo_gamma)
    raise ValueError(f"unknown preference method {method!r}; one of {', '.join(PREFERENCE_METHODS)}")


def train_preference(method: str, model, tokenizer, rows: list[dict], cfg, hardware, out_dir: Path, *,
                     metrics_sink=None):
    """Train `method` on rendered rows (prompt/chosen/rejected strings; prompt/completion/label for kto).
    Returns (trained PEFT model, log history, metrics)."""
    import warnings

    from datasets import Dataset

    trainer_cls, args = preference_trainer(method, cfg, common_args(cfg, hardware, out_dir))
    model = prepare_trainable(model, cfg, hardware)  # lora/qlora: a PeftModel, whose disabled adapter is the reference
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*experimental.*")  # ORPO/CPO live in trl.experimental
        trainer = trainer_cls(model=model, args=args, train_dataset=Dataset.from_list(rows),
                              processing_class=tokenizer, callbacks=[stage_callback(metrics_sink, max_kl=cfg.max_kl)])
    return _train(trainer, out_dir)


def grpo_config(cfg, hardware, out_dir: Path, *, answers_per_pass: int | None = None):
    """TRL's GRPOConfig from an AlignmentConfig: each optimizer step samples and scores `cfg.batch_size` x
    `cfg.grad_accum` prompts, each answered `cfg.num_generations` times, in one generation batch.

    The gradient is then taken `answers_per_pass` answers at a time (default: one prompt's group) and
    accumulated (TRL's steps_per_generation = gradient_accumulation_steps: one generation per optimizer step,
    no stale log-probabilities). The "dapo" loss divides by the answer tokens of the whole generation batch,
    so the step's loss and gradient are the ones the whole batch at once would give, while a backward pass
    holds the activations of a group only: the demo's whole batch of 32 answers held 6.9 GB (bench/RESULTS.md,
    "GRPO (TRL) against PPO").
    """
    from trl import GRPOConfig

    answers = cfg.batch_size * cfg.grad_accum * cfg.num_generations
    per_pass = answers_per_pass or cfg.num_generations
    if answers % per_pass:
        raise ValueError(f"answers_per_pass={per_pass} does not divide the step's {answers} answers")
    args = common_args(cfg, hardware, out_dir)
    args.update(per_device_train_batch_size=per_pass, gradient_accumulation_steps=answers // per_pass)
    return GRPOConfig(**args, steps_per_generation=answers // per_pass, loss_type="dapo",
                      num_generations=cfg.num_generations, max_completion_length=cfg.max_new_tokens,
                      temperature=cfg.temperature, top_p=cfg.top_p, beta=cfg.method_beta)


def train_grpo(model, tokenizer, prompts: list[dict], reward, cfg, hardware, out_dir: Path, *, metrics_sink=None,
               stop: list[int] | None = None):
    """GRPO (Shao et al. 2024) with TRL: `cfg.batch_size` prompts per step, `cfg.num_generations` each,
    advantages relative to each prompt's group; `cfg.method_beta` > 0 keeps a KL anchor to the SFT model.
    `stop`: token ids that end an answer (generation.stop_ids: the EOS and the template's end of turn). TRL
    samples until, and masks after, the model's generation_config EOS ids and the tokenizer's: the stop ids
    join them, so GRPO's answers end where evaluation's, RAFT's and PPO's do."""
    from datasets import Dataset
    from trl import GRPOTrainer

    if stop:
        config = model.generation_config
        known = config.eos_token_id if isinstance(config.eos_token_id, list) else [config.eos_token_id]
        config.eos_token_id = sorted({*(i for i in known if i is not None), *stop})
    grpo_args = grpo_config(cfg, hardware, out_dir)
    rows = [{"prompt": p["prompt"], "reference": p["reference"], "task": p["task"]} for p in prompts]
    trainer = GRPOTrainer(model=prepare_trainable(model, cfg, hardware), reward_funcs=[reward], args=grpo_args,
                          train_dataset=Dataset.from_list(rows), processing_class=tokenizer,
                          callbacks=[stage_callback(metrics_sink, max_kl=cfg.max_kl)])
    return _train(trainer, out_dir)


def _train(trainer, out_dir: Path):
    t0 = time.perf_counter()
    output, resumed = train_resuming(trainer, out_dir)
    history = trainer.state.log_history
    metrics = {**curve_metrics(history), "train_loss_mean": float(output.training_loss),
               "train_seconds": time.perf_counter() - t0, "resumed_from_step": float(resumed)}
    for key in ("rewards/margins", "reward", "kl", "rewards/chosen", "rewards/rejected"):
        points = [h[key] for h in history if key in h]
        if points:
            name = key.replace("/", "_")
            metrics[f"{name}_first"], metrics[f"{name}_last"] = float(points[0]), float(points[-1])
    return trainer.model, history, metrics
