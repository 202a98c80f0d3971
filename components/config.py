"""Typed pipeline configuration.

One YAML file composes these models; `--set a.b=c` overrides any field. Field names and
descriptions are the user documentation (they also render as the Prefect UI form).
Unknown keys and wrong types fail before anything runs, naming the field.
The model and data settings live in config_data.py, the training ones in config_training.py and the reward
and alignment ones in config_alignment.py; every name is importable from here.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, ValidationError, ValidationInfo, field_validator

from components.config_alignment import (  # noqa: F401  (re-exported: components.config is the import path)
    AlignmentConfig,
    PPOConfig,
    RaftSettings,
    RewardFunctionConfig,
    RewardModelConfig,
)
from components.config_base import Strict
from components.config_data import DataConfig, ModelConfig, RopeScalingSettings, TokenizeConfig  # noqa: F401  (re-exported)
from components.config_training import (  # noqa: F401  (re-exported)
    DeepSpeedSettings,
    FreezeSettings,
    GaloreSettings,
    LoraSettings,
    QLoraSettings,
    TrainConfig,
)


class EvaluateConfig(Strict):
    """Held-out evaluation, reported per task (the `task` label of each row) with majority baselines and 95% intervals."""

    max_samples: int = Field(
        60, ge=1, description="Held-out instructions scored per task: every row of each task up to this many "
        "(greedy generation, and constrained choice for fixed-answer tasks)."
    )
    tasks: list[str] = Field(
        [], description="Held-out tasks (the rows' `task` label) to score; empty: every task of data.sft_eval. "
        "A name no held-out row carries fails the evaluate stage with the tasks there are."
    )
    max_new_tokens: int = Field(24, ge=1)
    batch_size: int = Field(16, ge=1, description="Prompts per generate call; candidate answers per forward pass.")
    prompt_lookup: int = Field(
        0, ge=0, le=16, description="Prompt-lookup decoding of the greedy answers: up to this many next tokens "
        "proposed per row from its own prompt and answer and checked in one forward pass (the answers are the "
        "greedy ones). Pays off where answers copy from the prompt and rows are few (bench/speculative.py); 0: off."
    )
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
    sample_k: int = Field(
        0, ge=0, description="With a verifiable reward rule (alignment.reward.rule): also sample this many answers "
        "per held-out question and report their mean reward, sampled_verifiable_reward (what RAFT, PPO and GRPO "
        "optimise; the greedy answer can stay put while the distribution moves). 0: greedy answers only."
    )
    sample_temperature: float = Field(0.7, gt=0, description="Temperature of the sample_k answers.")
    harness_tasks: list[str] = Field(
        [], description="lm-evaluation-harness tasks run on the stage's model: local ones shipped in "
        "components/evaluation/harness_tasks (icd10_chapter_mc) or standard ones (pubmedqa, medmcqa, mmlu_*; "
        "skipped with a logged reason when their data cannot be reached, e.g. offline)."
    )
    harness_limit: int | None = Field(None, ge=1, description="At most this many rows per harness task (null: all).")


class QuantizeConfig(Strict):
    enabled: bool = True
    methods: list[Literal["nf4", "int8"]] = Field(
        ["nf4", "int8"], description="bitsandbytes formats to load, score and save (each in its own folder of the stage).")
    gguf: list[Literal["f16", "q8_0", "q4_0"]] = Field(
        [], description="GGUF files to export for llama.cpp and Ollama (Llama-architecture models), each with an "
        "Ollama Modelfile, in gguf-<type>/ of the stage. Q8_0 of the 135M demo model: ~5 s, 145 MB.")
    eval_samples: int = Field(32, ge=1, description="Held-out rows scored for each quantized model.")


class RegistryConfig(Strict):
    model_name: str = Field("lmforge-model", description="Registered model name in MLflow.")
    alias: str = Field("challenger", description="Alias given to each new version.")


class TrackingConfig(Strict):
    tracking_uri: str | None = Field(None, description="MLflow tracking URI; default sqlite under the workspace.")
    experiment: str = "lmforge"
    upload_outputs: bool = Field(
        True, description="Upload every stage's output files (adapters, merged model, tokenized data, reports) to "
        "its MLflow run, once per content digest (a reused stage uploads nothing). The environment variable "
        "LMFORGE_UPLOAD_OUTPUTS=0 turns it off, =1 on.")


class CacheConfig(Strict):
    """A stage cache shared by machines (docs/shared_cache.md)."""

    shared_url: str | None = Field(
        None, description="fsspec URL of a store that workers on several machines share (file:///mnt/shared/lmforge, "
        "s3://bucket/lmforge, gs://bucket/lmforge): a stage missing here is downloaded from it by key, digests "
        "checked, instead of recomputed, and one worker computes a stage the others wait for. null: this workspace "
        "only. The environment variable LMFORGE_SHARED_CACHE overrides it (`off` turns it off).")
    lease_ttl_s: float = Field(
        60.0, ge=1.0, description="Seconds a worker's claim on a stage it computes lasts without renewal (renewed "
        "every third of it): a worker that dies frees the stage for another after at most this long.")


class ComputeConfig(Strict):
    device: Literal["auto", "cpu", "cuda"] = "auto"
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="auto: bf16 on GPUs that support it, fp32 on CPU (CPU bf16 is emulated and ~20x slower)."
    )
    threads: int | None = Field(None, ge=1, description="torch CPU threads; default all cores. Per rank where cpt/sft "
                                "train as several CPU ranks (default there: cores / ranks).")
    distributed: Literal["none", "ddp"] = Field(
        "none", description="How cpt and sft train when their deepspeed.stage is 0. none: in the stage's own "
        "process, on one device. ddp: compute.num_gpus ranks on this node under torchrun, PyTorch "
        "DistributedDataParallel (each rank holds the whole model and a share of each batch; gradients are averaged "
        "every step; nccl on GPUs, gloo on CPU). A stage with deepspeed.stage 2 or 3 runs under the DeepSpeed "
        "launcher either way. The global batch is batch_size x grad_accum x ranks: halve grad_accum when you double "
        "the ranks to keep the curve (docs/distributed.md).")
    num_gpus: int | None = Field(None, ge=1, description="Ranks per node for launched training (deepspeed.stage > 0, "
                                 "or compute.distributed ddp): one per GPU (the DeepSpeed launcher's --num_gpus, "
                                 "torchrun's --nproc-per-node); on a machine without GPUs, CPU processes that share "
                                 "the cores (compute.threads each, default cores / ranks). null: every visible GPU, "
                                 "1 on CPU.")
    num_nodes: int | None = Field(None, ge=1, description="Nodes for DeepSpeed stages (needs hostfile).")
    hostfile: str | None = Field(None, description="DeepSpeed hostfile listing the nodes ('host slots=N' lines).")
    parallel_stages: int = Field(1, ge=1, description="Nodes of the DAG that run at once where nothing connects them "
                                 "(the base model's evaluation beside cpt, the evaluations of finished models beside "
                                 "each other), as Prefect task futures on the flow's task runner. 1 on CPU: two "
                                 "stages on 2 cores only share them. Training stages (cpt, sft, reward, alignment) "
                                 "still run one at a time unless compute.parallel_training.")
    parallel_training: bool = Field(False, description="Let training stages run at the same time as each other "
                                    "(with compute.parallel_stages > 1): only where the devices have room for both "
                                    "(several GPUs, or one with memory for two); false keeps them off a shared GPU.")
    task_runner: Literal["process", "dask"] = Field(
        "process", description="Where the nodes side by side run (compute.parallel_stages > 1; with 1, every node "
        "runs in the flow's process). process: a pool of compute.parallel_stages processes on this machine. dask: "
        "workers of a Dask cluster (prefect-dask; pip install -e '.[dask]'), a local one or compute.dask_address, "
        "so nodes can run on other machines (docs/stages.md; tested with a local cluster only).")
    dask_address: str | None = Field(
        None, description="With compute.task_runner dask: the scheduler of a running Dask cluster "
        "(tcp://scheduler:8786). Its workers must have lmforge installed, one thread each (dask worker --nthreads "
        "1), not daemonic (DASK_DISTRIBUTED__WORKER__DAEMON=False), see this workspace at the same path (a shared "
        "filesystem) and reach the Prefect API and the MLflow tracking server. null: a cluster on this machine "
        "of compute.parallel_stages worker processes, one thread each, started and stopped with the run.")

    @field_validator("dask_address")
    @classmethod
    def _dask_address_needs_dask(cls, address: str | None, info: ValidationInfo) -> str | None:
        if address is not None and info.data.get("task_runner") != "dask":
            raise ValueError(f"compute.dask_address {address!r} is read only with compute.task_runner: dask "
                             f"(it is {info.data.get('task_runner')!r})")
        return address


class PromotionRule(Strict):
    """One condition of the promotion gate, on a held-out metric of the evaluate stage."""

    metric: str = Field(description="A metric the evaluate stage reports: perplexity_sft_eval, exact_match, rougeL, "
                        "bleu, or a per-task figure such as `task/<task>/...`")
    direction: Literal["higher", "lower"] = Field(description="Which way is better for this metric.")
    margin: float = Field(
        0.0, description="How much better than the reference the challenger must be, in the metric's units; "
        "0: at least as good; negative: tolerate that much regression.",
    )


class PromotionConfig(Strict):
    """The gate after registration: alias `champion` moves to the new version only when (1) on every gated
    task the low end of its 95% interval lies above the task's majority baseline, (2) it beats the base model
    on every rule, and (3) it beats the current champion on the same held-out questions: every rule, and a
    paired per-question change whose interval (or point value) clears a margin."""

    enabled: bool = Field(True, description="Run the gate after registration (the `promote` stage).")
    rules: list[PromotionRule] = Field(
        default_factory=lambda: [PromotionRule(metric="perplexity_sft_eval", direction="lower"),
                                 PromotionRule(metric="exact_match", direction="higher")],
        min_length=1, description="Every rule must pass against the base and against the current champion "
        "(the champion's figures count only when they were measured on the same held-out questions).",
    )
    baseline_tasks: list[str] | None = Field(
        None, description="Held-out tasks on which the challenger must beat the majority baseline (always giving "
        "the task's most common answer): the low end of the 95% interval of baseline_metric must lie above it. "
        "null: every task whose majority baseline is below 1; []: no baseline check.",
    )
    baseline_metric: str = Field("exact_match", description="The per-task metric held against the majority baseline "
                                 "(exact_match or choice_accuracy).")
    champion_metric: str = Field(
        "exact_match", description="The per-question score compared with the champion's on the same questions "
        "(exact_match, choice_accuracy, or a per-answer field of the samples such as verifiable_reward).",
    )
    champion_rule: Literal["interval", "point"] = Field(
        "interval", description="interval: the low end of the paired change's 95% bootstrap interval must exceed "
        "champion_margin (a noise-level gain is rejected); point: the mean paired change must exceed it.",
    )
    champion_margin: float = Field(0.0, description="How much the paired change must exceed, in the metric's units.")
    on_other_questions: Literal["rescore", "refuse"] = Field(
        "rescore", description="When the champion was scored on another held-out set (its recorded digest differs): "
        "rescore: the gate has the champion answer the challenger's questions (greedy, exact_match only); "
        "refuse: keep the champion and say why. Figures from different question sets are never compared.",
    )


class PipelineConfig(Strict):
    """The whole domain-adaptation run."""

    workspace: str = Field(".lmforge", description="Artifacts, caches, MLflow database live here.")
    # Titles name each section in the Prefect UI's run form (else four sections would read "TrainConfig").
    model: ModelConfig = Field(ModelConfig(), title="Model", description="The base model and how it is loaded.")
    data: DataConfig = Field(DataConfig(), title="Data", description="Datasets per stage, read from dataset_info.")
    tokenize: TokenizeConfig = Field(TokenizeConfig(), title="Tokenize",
                                     description="Chat template, loss masks, cutoff and packing.")
    cpt: TrainConfig = Field(TrainConfig(max_steps=30, learning_rate=3e-4, batch_size=4), title="Continued pretraining",
                             description="Training on the plain-text domain corpus.")
    sft: TrainConfig = Field(TrainConfig(), title="Supervised fine-tuning",
                             description="Training on conversations, loss on the answers.")
    reward: RewardModelConfig = Field(RewardModelConfig(max_steps=40, learning_rate=1e-4), title="Reward model",
                                      description="A score head trained on the preference pairs.")
    alignment: AlignmentConfig = Field(AlignmentConfig(),
                                       title="Alignment", description="RAFT, PPO, GRPO, DPO, KTO, ORPO or SimPO after SFT.")
    evaluate: EvaluateConfig = Field(EvaluateConfig(), title="Evaluate", description="Held-out evaluation of every model.")
    quantize: QuantizeConfig = Field(QuantizeConfig(), title="Quantize", description="Merge adapters, score 4/8-bit loads.")
    registry: RegistryConfig = Field(RegistryConfig(), title="Registry", description="The MLflow registered model.")
    promotion: PromotionConfig = Field(PromotionConfig(), title="Promotion",
                                       description="When the new version becomes @champion.")
    tracking: TrackingConfig = Field(TrackingConfig(), title="Tracking", description="Where MLflow records runs.")
    cache: CacheConfig = Field(CacheConfig(), title="Shared cache",
                               description="A stage cache shared by workers on several machines.")
    compute: ComputeConfig = Field(ComputeConfig(), title="Compute", description="Device, precision, threads, GPUs.")

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


class _AliasRefused(yaml.YAMLError):
    def __init__(self, what: str, mark: yaml.Mark):
        super().__init__(what)
        self.what, self.line = what, mark.line + 1


class _ConfigLoader(yaml.SafeLoader):
    """YAML's safe loader without anchors and aliases: nine lines of aliases nested a few levels deep
    (a "billion laughs") expand into gigabytes when constructed. A pipeline config has no need of them."""

    def compose_node(self, parent, index):
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent):
            raise _AliasRefused(f"alias '*{event.anchor}'", event.start_mark)
        if getattr(event, "anchor", None):
            raise _AliasRefused(f"anchor '&{event.anchor}'", event.start_mark)
        return super().compose_node(parent, index)


_NO_ALIASES = ("lmforge configs may not use YAML anchors or aliases (a few nested aliases can expand into "
               "gigabytes); write the values out in full")


def _parse_yaml(text: str, where: str) -> Any:
    """`text` parsed as YAML without anchors and aliases; an error names `where` and the line."""
    try:
        return yaml.load(text, Loader=_ConfigLoader)  # noqa: S506 (a SafeLoader subclass)
    except _AliasRefused as exc:
        raise ConfigError(f"{where}, line {exc.line}: {exc.what}: {_NO_ALIASES}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{where} is not valid YAML: {exc}") from exc


def _parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise ConfigError(f"override {item!r} is not KEY=VALUE (e.g. sft.learning_rate=1e-4)")
    key, raw = item.split("=", 1)
    # YAML parsing gives numbers, booleans, null and lists their natural types.
    return key.strip().split("."), _parse_yaml(raw, f"override {item!r}") if raw.strip() else ""


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
        data = _parse_yaml(p.read_text(encoding="utf-8"), f"config file {p}") or {}
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
