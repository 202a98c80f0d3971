"""Settings of the reward model and the alignment stage (RAFT, PPO, GRPO, the preference methods).

Part of the pipeline config (components.config re-exports every name; import them from there).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

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
    def _one_process(self):
        _refuse_deepspeed(self.deepspeed.stage, "reward")
        return self


def _refuse_deepspeed(stage: int, section: str) -> None:
    """The reward and alignment stages train in the flow's own process; only cpt and sft launch DeepSpeed."""
    if stage:
        raise ValueError(f"{section}.deepspeed.stage is {stage}, but the {section} stage trains in one process "
                         f"without DeepSpeed (cpt and sft run under it): set {section}.deepspeed.stage to 0, and "
                         "use finetuning qlora or gradient_checkpointing to fit the memory")


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
    whiten_advantages: bool = True


class AlignmentConfig(TrainConfig):
    """Alignment after SFT: one method, on the reward or the preference pairs."""

    method: Literal["none", "raft", "ppo", "dpo", "kto", "orpo", "simpo", "grpo"] = Field(
        "none", description="none; raft, ppo, grpo (sample and score with alignment.reward); dpo, kto, orpo, simpo "
        "(learn from data.preference pairs; kto also from data.kto)."
    )
    reward: RewardFunctionConfig = RewardFunctionConfig()
    beta: float = Field(0.1, ge=0, description="Strength of the anchor to the SFT model (DPO/KTO/ORPO/SimPO beta; "
                        "GRPO's KL coefficient: > 0 keeps a KL anchor).")
    simpo_gamma: float = Field(0.5, ge=0, description="SimPO's target reward margin.")
    max_prompts: int = Field(256, ge=1,
                             description="Prompts the sampling methods draw from (data.prompts, else data.sft).")
    num_generations: int = Field(4, ge=2, description="Completions sampled per prompt (RAFT's K, GRPO's group).")
    temperature: float = Field(1.0, gt=0)
    top_p: float = Field(1.0, gt=0, le=1)
    max_new_tokens: int = Field(24, ge=1)
    max_length: int = Field(256, ge=16, description="Tokens per prompt+answer for the preference methods.")
    max_kl: float | None = Field(
        None, gt=0, description="Stop the stage (keeping the last good checkpoint) when the KL to the reference "
        "exceeds this. Null: no bound."
    )
    raft: RaftSettings = RaftSettings()
    ppo: PPOConfig = PPOConfig()

    @model_validator(mode="after")
    def _ppo_shares_one_model(self):
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
        _refuse_deepspeed(self.deepspeed.stage, "alignment")
        return self
