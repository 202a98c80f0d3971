"""Settings of the reward model and the alignment stage (RAFT, PPO, GRPO, the preference methods).

Part of the pipeline config (components.config re-exports every name; import them from there).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field, model_validator

from components.config_base import Strict
from components.config_training import TrainConfig


class RewardModelConfig(TrainConfig):
    """The reward model stage: a scalar head (LoRA on the SFT model) trained on preference pairs."""

    enabled: bool | None = Field(
        None, description="Train the reward model. Null: when the alignment reward uses it "
        "(alignment.reward.model_weight > 0)."
    )
    max_length: int = Field(256, ge=16, description="Tokens per prompt+answer; longer pairs are truncated.")
    min_accuracy: float = Field(
        0.55, ge=0, le=1, description="Held-out pairwise accuracy at or below which the reward model is not trusted."
    )
    on_low_accuracy: Literal["warn", "fail"] = Field(
        "warn", description="What a reward model at or below min_accuracy does: warn in the summary, or fail the stage."
    )

    @model_validator(mode="after")
    def _every_setting_is_read(self):
        _refuse_unused(self, "reward", "reward", REWARD_FIELDS)
        return self


# Who reads which field of a training section (dotted names; "section.*" is the whole section). A field
# outside its method's set is refused when it differs from its default (_refuse_unused), so no setting is
# silently ignored; tests/components/test_config_unused_fields.py walks every method x field and proves
# each used one reaches the TRL config, the PPO settings or the LoRA config built from it.
_SCHEDULE = frozenset({"learning_rate", "lr_scheduler", "warmup_ratio", "weight_decay", "max_grad_norm", "seed"})
_PLAIN_LORA = frozenset({"lora.r", "lora.alpha", "lora.dropout", "lora.target_modules"})
# components.training.methods.prepare_trainable: what trains (lora.loraplus_lr_ratio is the Trainer's optimizer's).
_PREPARE_TRAINABLE = _PLAIN_LORA | {"finetuning", "lora.use_rslora", "lora.use_dora", "lora.init",
                                    "lora.train_new_tokens", "freeze.*", "qlora.*"}
# components.training.lora.training_arguments, which every TRL config here is built from.
_TRAINER = _SCHEDULE | {"max_steps", "batch_size", "grad_accum", "logging_steps", "save_steps", "optimizer", "galore.*",
                        "use_liger", "gradient_checkpointing"}
_SAMPLING = frozenset({"max_prompts", "temperature", "top_p", "max_new_tokens"})
_PREFERENCE = _TRAINER | _PREPARE_TRAINABLE | {"beta", "max_length"}
# Read whatever the method: the method itself, and the reward (the evaluation scores every model with reward.rule).
_EVERY_METHOD = frozenset({"method", "reward.*"})

ALIGNMENT_FIELDS: dict[str, frozenset[str]] = {
    "dpo": _EVERY_METHOD | _PREFERENCE,
    "kto": _EVERY_METHOD | _PREFERENCE | {"max_kl"},  # KTO logs its KL estimate ("kl"), which the guard reads
    "orpo": _EVERY_METHOD | _PREFERENCE,
    "simpo": _EVERY_METHOD | _PREFERENCE | {"simpo_gamma"},
    "grpo": _EVERY_METHOD | _TRAINER | _PREPARE_TRAINABLE | _SAMPLING | {"beta", "num_generations", "max_kl"},
    # RAFT and PPO step their own AdamW, one step per batch: optimizer and grad_accum are refused away from adamw
    # and 1 by AlignmentConfig's own check, which says why.
    "raft": _EVERY_METHOD | _SCHEDULE | _PREPARE_TRAINABLE | _SAMPLING | {"batch_size", "num_generations", "raft.*",
                                                                          "missing_eos_penalty"},
    # PPO builds its own LoRA adapter (components/training/ppo_rollout.py build_policy_model: rsLoRA and DoRA,
    # no PiSSA, LoRA+ or new-token rows) and runs without dropout; finetuning must be lora (checked apart).
    # top_p: its ratio and KL use log-probabilities over the whole vocabulary, so nucleus samples are off-policy.
    "ppo": _EVERY_METHOD | _SCHEDULE | (_SAMPLING - {"top_p"}) | {"lora.r", "lora.alpha", "lora.target_modules", "lora.use_rslora",
                                                    "lora.use_dora", "max_steps", "batch_size", "save_steps", "max_kl",
                                                    "missing_eos_penalty", "ppo.*"},
}
# Settings named for the one method that reads them. Under another method they are kept, not refused: their
# name already says they do not apply, and keeping them lets one `--set alignment.method=M` switch a config
# tuned for another method (configs/demo-cpu.yaml's raft settings under grpo, as the README shows).
METHOD_NAMED = {"raft.*": "raft", "ppo.*": "ppo", "simpo_gamma": "simpo"}

# The reward stage: TRL's RewardTrainer with a LoRA adapter from methods.lora_config (always LoRA).
# Its adapter is always LoRA, so the galore_* optimizers (full or freeze only) cannot apply.
REWARD_FIELDS = (_TRAINER - {"galore.*"}) | _PLAIN_LORA | {"enabled", "max_length", "min_accuracy", "on_low_accuracy",
                                                          "lora.use_rslora", "lora.use_dora"}

# Fields read only under another setting: (prefix, whether it is read, the setting that makes it read).
_CONDITIONS = (
    ("lora.", lambda c: c.finetuning in ("lora", "qlora"), "finetuning lora or qlora"),
    ("freeze.", lambda c: c.finetuning == "freeze", "finetuning freeze"),
    ("qlora.", lambda c: c.finetuning == "qlora", "finetuning qlora"),
    ("galore.", lambda c: c.optimizer.startswith("galore_"), "a galore_* optimizer"),
)

# What to use instead, by "method:field", "method:section." or "field" (the first that matches).
_INSTEAD = {
    "enabled": "set alignment.method to none to skip the stage",
    "deepspeed.": "the {stage} trains in one process without DeepSpeed (cpt and sft run under it): leave "
                  "{section}.deepspeed at its defaults, and use finetuning qlora or gradient_checkpointing to fit "
                  "the memory",
    "packing": "only cpt and sft pack rows; the {stage} pads its batches",
    "raft:max_steps": "RAFT trains raft.iterations x raft.steps_per_iteration optimizer steps: set those",
    "raft:save_steps": "RAFT checkpoints after every iteration",
    "raft:logging_steps": "RAFT logs every iteration",
    "ppo:logging_steps": "PPO logs every PPO step",
    "gradient_checkpointing": "its own loop does not recompute activations: lower batch_size (or "
                              "ppo.mini_batch_size), or use grpo or a preference method, which take it",
    "use_liger": "its own loop runs the model unpatched: use grpo or a preference method for Liger's kernels",
    "lora.loraplus_lr_ratio": "one learning rate trains every adapter weight here: set learning_rate (LoRA+ works "
                              "in cpt and sft)",
    "ppo:lora.dropout": "PPO runs without dropout, so that rollouts and updates see the same function",
    "ppo:lora.": "PPO builds its adapter from lora.r, alpha, target_modules, use_rslora and use_dora; its "
                 "reference, reward and value share the unchanged base, which PiSSA init would move and new-token "
                 "rows would change: leave it off, or use grpo, which takes it",
    "reward:lora.": "the reward adapter is plain LoRA (r, alpha, dropout, target_modules; use_rslora, use_dora)",
    "reward:finetuning": "the reward model is always a LoRA adapter plus its score head: leave finetuning lora",
    "reward:freeze.": "the reward model is always a LoRA adapter plus its score head",
    "reward:qlora.": "the reward model is always a LoRA adapter plus its score head",
    "reward:galore.": "the reward model is always a LoRA adapter, which the galore_* optimizers do not train",
    "ppo:freeze.": "PPO always trains a LoRA adapter (finetuning lora)",
    "ppo:qlora.": "PPO always trains a LoRA adapter on the full-precision base (finetuning lora)",
    "ppo:galore.": "PPO steps its own AdamW",
    "raft:galore.": "RAFT steps its own AdamW",
    "ppo:num_generations": "PPO samples one answer per prompt: raise batch_size for more answers per step",
    "ppo:beta": "PPO's KL penalty is ppo.kl_coef (ppo.adaptive_kl steers it)",
    "raft:beta": "RAFT has no KL term: fewer raft.iterations or a lower learning_rate keep it near the SFT model",
    "max_length": "it bounds answers with max_new_tokens (RAFT and PPO cut prompts at tokenize.cutoff_len)",
    "max_kl": "it logs no KL to the reference: bound the drift with ppo, kto or grpo with beta > 0, or with "
              "fewer steps and a lower learning_rate",
    "max_prompts": "the preference methods sample nothing; they learn from data.preference",
    "num_generations": "the preference methods sample nothing; they learn from data.preference",
    "temperature": "the preference methods sample nothing; they learn from data.preference",
    "top_p": "the preference methods sample nothing; they learn from data.preference",
    "max_new_tokens": "the preference methods sample nothing; their length bound is max_length",
    "missing_eos_penalty": "the preference methods sample nothing: their answers come from data.preference",
    # TRL 1.16 has missing_eos_penalty on OnlineDPOConfig only; its GRPOConfig takes none.
    "grpo:missing_eos_penalty": "TRL's GRPO trainer has no such option: let the reward rule score an answer without "
                                "its end lower (it receives completion_ids), or use raft or ppo, which take it",
}


def _instead(method: str, field: str) -> str | None:
    for key in (f"{method}:{field}", field):
        if key in _INSTEAD:
            return _INSTEAD[key]
    sections = [k for k in _INSTEAD if k.endswith(".") and field.startswith(k.split(":")[-1])
                and (":" not in k or k.startswith(method + ":"))]
    return _INSTEAD[max(sections, key=len)] if sections else None


def _leaves(model: BaseModel, prefix: str = "") -> list[tuple[str, Any, Any]]:
    """(dotted name, value, default) of every field, nested sections included."""
    out = []
    for name, info in type(model).model_fields.items():
        value = getattr(model, name)
        if isinstance(value, BaseModel):
            out += _leaves(value, f"{prefix}{name}.")
        else:
            out.append((prefix + name, value, info.get_default(call_default_factory=True)))
    return out


def _covers(used: frozenset[str], field: str) -> bool:
    return field in used or any(u.endswith(".*") and field.startswith(u[:-1]) for u in used)


def _refuse_unused(cfg: TrainConfig, section: str, method: str, used: frozenset[str]) -> None:
    """Refuse any field of `cfg` set away from its default that `method` (an alignment method, or "reward" for
    the reward stage) does not read; the message names the field, the method and what to use instead.

    "Set" means "differs from the field's default": a config written out in full (the Prefect form, a saved
    config) repeats every default, and a default value asks for nothing a method could ignore.
    """
    stage = "reward stage" if section == "reward" else "alignment stage"
    who = "the reward stage" if section == "reward" else f"alignment.method={method}"
    for field, value, default in _leaves(cfg):
        if value == default:
            continue
        if not _covers(used, field) and not (section == "alignment" and _covers(frozenset(METHOD_NAMED), field)):
            instead = _instead(method, field) or f"set it back to {default!r} (or leave it out)"
            raise ValueError(f"{section}.{field} is {value!r}, but {who} does not use it: "
                             + instead.format(stage=stage, section=section))
        for prefix, applies, setting in _CONDITIONS:
            if field.startswith(prefix) and not applies(cfg):
                raise ValueError(f"{section}.{field} is {value!r}, but {who} reads it only with {setting}: set "
                                 f"{section}.{field} back to {default!r} or use {setting}")


class RewardFunctionConfig(Strict):
    """The one reward every method scores completions with: a weighted sum of the backends that are set."""

    rule: str | None = Field(
        None,
        description="Verifiable reward: a dotted path 'module:function' to a callable "
        "reward(prompts, completions, **columns) -> list[float], e.g. components.alignment.icd10:icd10_reward "
        "(the ICD demo's). Null: none. The evaluation reports it as verifiable_reward.",
    )
    rule_weight: float = Field(1.0, description="Weight of the rule reward.")
    model_weight: float = Field(0.0, ge=0, description="Weight of the learned reward model (trains the reward stage).")
    http_url: str | None = Field(
        None, description="Reward endpoint: POST {prompts, completions, columns} -> {rewards: [...]}. Null: none."
    )
    http_weight: float = Field(1.0, description="Weight of the endpoint's reward.")
    http_timeout_s: float = Field(30.0, gt=0)


class RaftSettings(Strict):
    iterations: int = Field(2, ge=1, description="Sample -> rank -> fine-tune rounds.")
    prompts_per_iteration: int = Field(64, ge=1, description="Prompts sampled each round.")
    keep: Literal["best_per_prompt", "top_fraction"] = Field(
        "best_per_prompt", description="Keep each prompt's best completion, or the best fraction of all completions."
    )
    keep_fraction: float = Field(0.25, gt=0, le=1, description="With keep=top_fraction: the share kept.")
    reward_threshold: float | None = Field(
        None, description="Keep only completions whose reward is above this. With a verifiable reward, 0 keeps "
        "no prompt whose every answer failed (fine-tuning on a wrong answer teaches it). Null: no bound."
    )
    steps_per_iteration: int = Field(20, ge=1, description="Optimizer steps of fine-tuning on each round's kept set.")
    contested_only: bool = Field(
        False, description="Keep only prompts whose K completions did not all score the same: a prompt the policy "
        "always gets right (or always wrong) has nothing to rank, and fine-tuning on it repeats what the policy "
        "already does (the filter of Xiong et al. 2025, 'A Minimalist Approach to LLM Reasoning')."
    )


class PPOConfig(Strict):
    ppo_epochs: int = Field(2, ge=1, description="Passes over each batch of rollouts.")
    mini_batch_size: int = Field(4, ge=1)
    kl_coef: float = Field(0.05, ge=0, description="Initial coefficient of the KL penalty to the reference policy.")
    adaptive_kl: bool = Field(False, description="Adapt kl_coef toward target_kl (Ziegler et al. 2019).")
    target_kl: float = Field(6.0, gt=0, description="With adaptive_kl: the KL per response (nats, summed over its "
                             "tokens) the coefficient steers toward.")
    kl_horizon: int = Field(10000, ge=1)
    gamma: float = Field(1.0, ge=0, le=1)
    lam: float = Field(0.95, ge=0, le=1)
    cliprange: float = Field(0.2, gt=0)
    cliprange_value: float = Field(0.2, gt=0)
    vf_coef: float = Field(0.1, ge=0)
    value_learning_rate: float | None = Field(
        None, gt=0, description="The value head's learning rate (its own AdamW group, no weight decay). Null: "
        "alignment.learning_rate.")
    whiten_advantages: bool = True


# Each method's own beta where alignment.beta is null: TRL 1.16's defaults (trl/trainer/dpo_config.py,
# kto_config.py, trl/experimental/orpo/orpo_config.py: 0.1), SimPO's paper (Meng et al. 2024, section 4:
# beta 2.0-2.5; TRL's CPOConfig default of 0.1 is CPO's sigmoid loss), and GRPO's 0.04 (Shao et al. 2024;
# TRL's default until it switched to 0.0, which loads no reference and logs no KL for max_kl to bound).
METHOD_BETA = {"dpo": 0.1, "kto": 0.1, "orpo": 0.1, "simpo": 2.0, "grpo": 0.04}


class AlignmentConfig(TrainConfig):
    """Alignment after SFT: one method, on the reward or the preference pairs.

    A field the chosen method does not read (ALIGNMENT_FIELDS) is refused when set away from its default;
    with method none the stage does not run and the section is not read.
    """

    method: Literal["none", "raft", "ppo", "dpo", "kto", "orpo", "simpo", "grpo"] = Field(
        "none", description="none; raft, ppo, grpo (sample and score with alignment.reward); dpo, kto, orpo, simpo "
        "(learn from data.preference pairs; kto also from data.kto)."
    )
    learning_rate: float = Field(5e-5, gt=0)
    max_steps: int = Field(
        20, ge=1, description="dpo, kto, orpo, simpo, grpo: optimizer steps. ppo: PPO steps, each one rollout of "
        "batch_size prompts followed by ppo.ppo_epochs x ceil(batch_size / ppo.mini_batch_size) optimizer steps. "
        "raft: not read (it trains raft.iterations x raft.steps_per_iteration optimizer steps)."
    )
    batch_size: int = Field(
        4, ge=1, description="What one micro-batch holds: dpo, orpo, simpo: preference pairs; kto: unpaired rows "
        "(each pair gives two); grpo: prompts, each with num_generations answers; raft: kept prompt+answer rows "
        "per optimizer step; ppo: prompts per PPO step (its optimizer steps take ppo.mini_batch_size of them)."
    )
    reward: RewardFunctionConfig = RewardFunctionConfig()
    beta: float | None = Field(
        None, ge=0, description="Strength of the anchor to the SFT model; null: the method's own value. dpo 0.1, "
        "kto 0.1 (their beta); orpo 0.1 (ORPO's lambda, the weight of the odds-ratio term); simpo 2.0 (the reward "
        "scale); grpo 0.04 (its KL coefficient; 0 drops the reference and the KL). raft and ppo have none "
        "(PPO's is ppo.kl_coef)."
    )
    simpo_gamma: float = Field(0.5, ge=0, description="SimPO's target reward margin.")
    max_prompts: int = Field(256, ge=1,
                             description="Prompts the sampling methods draw from (data.prompts, else data.sft).")
    num_generations: int = Field(4, ge=2, description="Completions sampled per prompt (RAFT's K, GRPO's group); "
                                 "PPO samples one per prompt.")
    temperature: float = Field(1.0, gt=0, description="Sampling temperature of raft, ppo and grpo.")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling of raft and grpo; ppo takes 1 only (its "
                         "log-probabilities are over the whole vocabulary).")
    max_new_tokens: int = Field(24, ge=1, description="Tokens per sampled answer (raft, ppo, grpo).")
    max_length: int = Field(256, ge=16,
                            description="Tokens per prompt+answer for the preference methods (dpo, kto, orpo, simpo).")
    missing_eos_penalty: float | None = Field(
        None, ge=0, description="raft and ppo: subtracted from the reward of an answer cut at max_new_tokens "
        "without the end of turn (TRL's missing_eos_penalty), so that the policy learns to finish its answers. "
        "Null: no penalty. grpo and the preference methods refuse it."
    )
    max_kl: float | None = Field(
        None, gt=0, description="Stop the stage (keeping the last good checkpoint) when the KL to the reference "
        "exceeds this: ppo (its per-response KL), kto (its logged KL estimate), grpo with beta > 0 (its logged KL). "
        "The other methods log no KL and refuse it. Null: no bound."
    )
    raft: RaftSettings = RaftSettings()
    ppo: PPOConfig = PPOConfig()

    @property
    def method_beta(self) -> float | None:
        """alignment.beta, or the method's own value where it is null (METHOD_BETA); None for raft and ppo."""
        return self.beta if self.beta is not None else METHOD_BETA.get(self.method)

    @model_validator(mode="after")
    def _method_reads_every_setting(self):
        if self.method == "ppo" and self.top_p < 1:
            raise ValueError(f"alignment.top_p is {self.top_p}, but alignment.method=ppo scores its rollouts' "
                             "log-probabilities (ratio, KL) over the whole vocabulary, so sampling from a nucleus "
                             "would make them off-policy: set alignment.top_p to 1 (temperature still applies)")
        if self.method == "ppo" and self.finetuning != "lora":
            raise ValueError("alignment.method=ppo keeps policy, reference, reward and value on one base model "
                             "through adapters: alignment.finetuning must be lora")
        if self.method in ("raft", "ppo"):
            # Their loops step one AdamW per batch themselves (the schedule and weight decay are honoured).
            unit = "batch_size" if self.method == "raft" else "ppo.mini_batch_size"
            if self.optimizer != "adamw":
                raise ValueError(f"alignment.method={self.method} steps its own AdamW: set alignment.optimizer to "
                                 f"adamw (it is {self.optimizer!r}), or use grpo or a preference method, which "
                                 "take every optimizer")
            if self.grad_accum != 1:
                raise ValueError(f"alignment.method={self.method} takes one optimizer step per batch: set "
                                 f"alignment.grad_accum to 1 (it is {self.grad_accum}) and raise alignment.{unit}")
        if self.method != "none":
            _refuse_unused(self, "alignment", self.method, ALIGNMENT_FIELDS[self.method])
        if self.method == "grpo" and self.max_kl is not None and self.method_beta == 0:
            raise ValueError("alignment.max_kl is set, but alignment.method=grpo with beta 0 loads no reference and "
                             "logs no KL to bound: set alignment.beta above 0 (null: 0.04), or max_kl to null")
        return self
