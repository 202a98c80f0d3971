"""The stage graph as one table, and what every stage function receives.

Each row of `STAGE_TABLE` is a node of the domain-adaptation DAG: its kind (what `--from`, `--only`
and `--until` name), the component function that does the work, the nodes it reads, the slice of the
configuration that decides its output (and so its cache key), when it is enabled, how often a
transient failure is retried and whether a crashed attempt resumes. The flow, the cache keys,
`lmforge stages`, `--from/--only/--until` and the Prefect form all read this table and nothing else.

Every stage function has one signature, `fn(cfg, inputs, out_dir) -> StageResult`, so it can be
called from a notebook with a config and the upstream manifests. Adding a stage is one row here plus
one such function (docs/stages.md shows it with a reward stage).

No prefect here, and nothing heavy at import time: `lmforge stages` reads this table.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from components.config import PipelineConfig, hash_json
from components.data.records import GROUP_KINDS, UNTOKENIZED_GROUPS

# The contract every stage function keeps lives below this module (components.models.prepare, which this table
# calls, needs it too); its names stay importable from here.
from components.stage_contract import BaseModelRef, MetricsSink, RunInfo, StageInputs, reads_file  # noqa: F401

if TYPE_CHECKING:
    from components.artifacts import StageResult


@dataclass(frozen=True)
class KeyFacts:
    """Facts from outside the config that decide outputs: the precision the hardware gives, the
    content identity of the base model (tokenizer files alone, and the whole model), what each
    remote data source holds now (components.data.source_versions; asked once per run), and the source of
    the code the config names (components.named_code; read once per run)."""

    precision: str
    tokenizer_digest: str
    model_digest: str
    source_versions: Mapping[str, str] = field(default_factory=dict)  # dataset name -> ETag, checksum, commit
    named_code: Mapping[str, Mapping[str, str]] = field(default_factory=dict)  # config field -> {name, sha256}


Slice = Callable[[PipelineConfig, KeyFacts], dict]


def files_digest(manifest: dict, patterns: tuple[str, ...]) -> str:
    """The digest of a manifest's files that match `patterns`: their names and contents, nothing else (not
    the node's key: the same files from a differently keyed run are the same input)."""
    files = {rel: m["sha256"] for rel, m in manifest["files"].items() if reads_file(patterns, rel)}
    return hash_json({"stage": manifest["stage"], "files": files})


@dataclass(frozen=True)
class StageSpec:
    name: str  # node name, unique: "evaluate-base"
    kind: str  # what --from/--only/--until name: "evaluate"
    entry: str  # "module:function" with the signature fn(cfg, inputs, out_dir) -> StageResult
    keyed_on: Slice  # the configuration slice that decides the output
    upstream: tuple[str, ...] = ()  # nodes read; a disabled one is left out
    # Upstream nodes whose digests go into the key (None: all). Tokenize reads the tokenizer through
    # `prepare` but is keyed on the tokenizer's own digest, so new weights do not re-tokenize.
    keyed_upstream: tuple[str, ...] | None = None
    # The files read from an upstream node, as glob patterns, where the stage reads only some of them: the
    # key then holds the digest of those files alone (upstream_digest), so a new held-out set beside the
    # training rows does not retrain. StageInputs.file refuses any other file of that node. An upstream
    # node not named here is keyed on its whole manifest digest.
    reads: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    enabled: Callable[[PipelineConfig], bool] = lambda cfg: True
    retries: int = 0  # transient failures only (components.errors.is_transient)
    retry_delay_s: tuple[int, ...] = (5, 30)
    resumable: bool = False  # a failed attempt's files (checkpoints) are kept for the next one
    trains: bool = False  # trains a model: not run beside another training stage (compute.parallel_training)
    logs_datasets: bool = False  # its .jsonl/.parquet outputs are logged as MLflow dataset inputs
    # Code the stage imports by a name the config gives (config field -> 'module:function'): the import walk of
    # tasks/keys.py cannot see it, so the named module's source goes into the key (components.named_code).
    loads_by_name: Callable[[PipelineConfig], Mapping[str, str]] = lambda cfg: {}
    summary: str = ""
    evaluates: str = ""  # an evaluate node's model: base, cpt, adapted (cpt + sft) or aligned (EVALUATION_NODES)

    @property
    def module(self) -> str:
        return self.entry.split(":", 1)[0]

    def upstream_digest(self, node: str, manifest: dict) -> str:
        """What this stage's key holds of upstream `node`: the digest of the files it reads from it (their
        content alone), or the node's whole manifest digest."""
        patterns = self.reads.get(node)
        return manifest["digest"] if patterns is None else files_digest(manifest, patterns)

    def function(self) -> Callable[..., StageResult]:
        module, name = self.entry.split(":", 1)
        return getattr(importlib.import_module(module), name)


def _model(cfg: PipelineConfig) -> dict:
    # `base` and `revision` are keyed through the prepare stage's digest (the model's content), not as text.
    return cfg.model.model_dump(mode="json", exclude={"base", "revision"})


def _base_adaptation(cfg: PipelineConfig) -> dict:
    """What prepare changes in the base (added tokens, RoPE scaling): not in the base's own digest."""
    from components.models.prepare import base_adaptation

    return base_adaptation(cfg.model)


def _template(cfg: PipelineConfig) -> dict:
    return {"template": cfg.tokenize.template, "system_prompt": cfg.tokenize.system_prompt}


def _train(kind: str) -> Slice:
    def keyed(cfg: PipelineConfig, facts: KeyFacts) -> dict:
        key = {"train": getattr(cfg, kind).model_dump(mode="json"), "model": _model(cfg), "precision": facts.precision}
        ranks = _launched_ranks(cfg, kind)
        if ranks > 1:  # a step trains batch_size x grad_accum x ranks rows; one rank's keys stay as they were
            key["ranks"] = ranks
        return key

    return keyed


def _launched_ranks(cfg: PipelineConfig, kind: str) -> int:
    """The ranks a cpt/sft stage trains with, as far as the config says (compute.num_gpus x num_nodes; null
    counts 1: the key never asks the machine, and a GPU count is set explicitly where it matters)."""
    launched = getattr(cfg, kind).deepspeed.stage > 0 or cfg.compute.distributed == "ddp"
    return (cfg.compute.num_gpus or 1) * (cfg.compute.num_nodes or 1) if launched else 1


def _local_harness_tasks(cfg: PipelineConfig) -> dict:
    """The content of the shipped lm-eval task YAMLs that evaluate.harness_tasks names: read by name, so the
    code version (tasks/keys.py hashes .py files) does not cover them."""
    if not cfg.evaluate.harness_tasks:
        return {}
    from components.artifacts import sha256_file
    from components.evaluation.harness import local_tasks

    local = local_tasks()
    files = {name: sha256_file(local[name]) for name in cfg.evaluate.harness_tasks if name in local}
    return {"harness_task_files": files} if files else {}


def _evaluate(cfg: PipelineConfig, facts: KeyFacts) -> dict:
    return {"evaluate": cfg.evaluate.model_dump(mode="json"), "model": _model(cfg), **_template(cfg),
            "reward_rule": cfg.alignment.reward.rule, "precision": facts.precision, **_local_harness_tasks(cfg)}


def _promotion(cfg: PipelineConfig, facts: KeyFacts) -> dict:
    # The registered version reaches the key through register's digest; the tracking server decides
    # which registry holds the champion.
    return {"promotion": cfg.promotion.model_dump(mode="json"), "tracking": cfg.tracking.model_dump(mode="json")}


def _both_adapters(cfg: PipelineConfig) -> bool:
    return cfg.cpt.enabled and cfg.sft.enabled


SAMPLING_METHODS = ("raft", "ppo", "grpo")  # alignment methods that score their own samples with a reward


def needs_reward_model(cfg: PipelineConfig) -> bool:
    """Whether the reward stage runs: asked for, or the sampling method's reward uses the model."""
    if cfg.reward.enabled is not None:
        return cfg.reward.enabled
    return cfg.alignment.method in SAMPLING_METHODS and cfg.alignment.reward.model_weight > 0


def _reward_rule(cfg: PipelineConfig) -> dict[str, str]:
    """The verifiable reward rule: the evaluations score every answer with it."""
    rule = cfg.alignment.reward.rule
    return {"alignment.reward.rule": rule} if rule else {}


def _alignment_rule(cfg: PipelineConfig) -> dict[str, str]:
    """The rule, where the alignment method samples and scores (the pair methods never call it)."""
    return _reward_rule(cfg) if cfg.alignment.method in SAMPLING_METHODS else {}


def _rule_baselines(cfg: PipelineConfig) -> dict[str, str]:
    """The question features of data.rule_baselines: the align stage fits and applies them."""
    return {f"data.rule_baselines.{task}": path for task, path in cfg.data.rule_baselines.items()}


def _aligned(cfg: PipelineConfig) -> bool:
    return cfg.alignment.method != "none"


def _reward(cfg: PipelineConfig, facts: KeyFacts) -> dict:
    return {"reward": cfg.reward.model_dump(mode="json"), "model": _model(cfg), **_template(cfg),
            "precision": facts.precision}


def _alignment(cfg: PipelineConfig, facts: KeyFacts) -> dict:
    return {"alignment": cfg.alignment.model_dump(mode="json"), "model": _model(cfg), **_template(cfg),
            "cutoff_len": cfg.tokenize.cutoff_len, "reward_max_length": cfg.reward.max_length,
            "precision": facts.precision}


_MODEL_INPUTS = ("prepare", "tokenize", "align")

# What stages read of `align` and `tokenize` (StageSpec.reads). A new held-out set, prompt set or
# preference set then reruns the stages that read it and no training stage that does not.
TOKENIZED_GROUP_FILES = tuple(f"{g}.jsonl" for g in GROUP_KINDS if g not in UNTOKENIZED_GROUPS)
FETCHED_FILES = ("dataset_info.json", "provenance.json", "raw/*")  # every file the fetch stage writes
HELDOUT_READS: dict[str, tuple[str, ...]] = {"align": ("sft_eval.jsonl",),
                                             "tokenize": ("cpt_eval.parquet", "sft_eval.parquet")}

# Every evaluation scores its answers with the reward rule when one is set. The evaluations of the SFT and
# aligned models also read the reward stage, when it runs, to score them with the reward model: it was
# trained on the SFT model's answers, and the reward-hacking check compares those two columns. The base
# and +cpt models answer in no format it has seen, so they neither pay for its scores nor wait for it.
_EVALUATION_ROWS: tuple[StageSpec, ...] = (
    StageSpec(
        "evaluate-base", "evaluate", "components.evaluation.evaluate:evaluate_stage", evaluates="base",
        upstream=_MODEL_INPUTS, keyed_on=_evaluate, reads=HELDOUT_READS, loads_by_name=_reward_rule,
        summary="held-out evaluation of the base model",
    ),
    StageSpec(
        "evaluate-cpt", "evaluate", "components.evaluation.evaluate:evaluate_stage", evaluates="cpt",
        upstream=(*_MODEL_INPUTS, "cpt"), keyed_on=_evaluate, reads=HELDOUT_READS, loads_by_name=_reward_rule,
        enabled=_both_adapters,
        summary="held-out evaluation after cpt alone",
    ),
    StageSpec(
        "evaluate-adapted", "evaluate", "components.evaluation.evaluate:evaluate_stage", evaluates="adapted",
        upstream=(*_MODEL_INPUTS, "cpt", "sft", "reward"), keyed_on=_evaluate, reads=HELDOUT_READS,
        loads_by_name=_reward_rule,
        summary="held-out evaluation of the adapted model (cpt + sft)",
    ),
    StageSpec(
        "evaluate-aligned", "evaluate", "components.evaluation.evaluate:evaluate_stage", evaluates="aligned",
        upstream=(*_MODEL_INPUTS, "cpt", "sft", "reward", "alignment"), keyed_on=_evaluate, reads=HELDOUT_READS,
        loads_by_name=_reward_rule,
        enabled=_aligned,
        summary="held-out evaluation of the aligned model",
    ),
)
# The evaluation node of each model it scores, in table order ("base" -> "evaluate-base"): the one place those
# names are written; the register and promote rows, the run summary, registry and promotion read them here.
EVALUATION_NODES: dict[str, str] = {s.evaluates: s.name for s in _EVALUATION_ROWS}
_EVAL = EVALUATION_NODES

STAGE_TABLE: tuple[StageSpec, ...] = (
    StageSpec(
        "prepare", "prepare", "components.models.prepare:prepare_stage",
        keyed_on=lambda cfg, facts: {"base": cfg.model.base, "revision": cfg.model.revision,
                                     "trust_remote_code": cfg.model.trust_remote_code, "content": facts.model_digest,
                                     **_base_adaptation(cfg)},
        retries=2, summary="make the base model loadable: convert the embedded GGUF, pin a hub commit, add "
        "domain tokens, scale RoPE",
    ),
    StageSpec(
        "fetch", "fetch", "components.data.fetch:fetch_stage",
        keyed_on=lambda cfg, facts: {"sources": source_fingerprints(cfg, facts.source_versions)},
        summary="copy or download every dataset with provenance (retries transient errors itself)",
    ),
    StageSpec(
        # Keyed on the fetched files, not fetch's key: a refetch that brings the same bytes (a new ETag over
        # an unchanged file) reruns nothing below fetch.
        "align", "align", "components.data.align:align_stage", upstream=("fetch",), logs_datasets=True,
        reads={"fetch": FETCHED_FILES}, loads_by_name=_rule_baselines,
        keyed_on=lambda cfg, facts: {"data": cfg.data.model_dump(mode="json", exclude={
            "dataset_info", "num_proc", "streaming", "allow_outside_paths"})},
        summary="convert every format to the standard records; report dropped rows",
    ),
    StageSpec(
        "tokenize", "tokenize", "components.data.tokenize:tokenize_stage", upstream=("prepare", "align"),
        keyed_upstream=("align",), reads={"align": TOKENIZED_GROUP_FILES},
        # num_proc changes how fast, not what: left out so it does not invalidate the data and training.
        keyed_on=lambda cfg, facts: {"tokenize": cfg.tokenize.model_dump(mode="json", exclude={"num_proc"}),
                                     "tokenizer": facts.tokenizer_digest,
                                     "extra_tokens": _base_adaptation(cfg)["extra_tokens"]},
        summary="chat template, loss masks, packed corpus blocks",
    ),
    StageSpec(
        "cpt", "cpt", "components.training.sft:train_stage", upstream=("prepare", "tokenize"),
        keyed_on=_train("cpt"), reads={"tokenize": ("cpt.parquet",)}, enabled=lambda cfg: cfg.cpt.enabled,
        resumable=True, trains=True,
        summary="continued pretraining (LoRA) on the plain-text corpus",
    ),
    StageSpec(
        "sft", "sft", "components.training.sft:train_stage", upstream=("prepare", "tokenize", "cpt"),
        keyed_on=_train("sft"), reads={"tokenize": ("sft.parquet",)}, enabled=lambda cfg: cfg.sft.enabled,
        resumable=True, trains=True,
        summary="supervised fine-tuning (LoRA) on conversations, loss on answers",
    ),
    StageSpec(
        "reward", "reward", "components.alignment.reward_model:reward_stage", upstream=("prepare", "align", "cpt", "sft"),
        keyed_on=_reward, reads={"align": ("preference.jsonl", "preference_eval.jsonl")}, enabled=needs_reward_model,
        resumable=True, trains=True,
        summary="reward model (LoRA + score head on the SFT model) on preference pairs; held-out pair accuracy",
    ),
    StageSpec(
        "alignment", "alignment", "components.alignment.stage:alignment_stage",
        upstream=("prepare", "align", "cpt", "sft", "reward"), keyed_on=_alignment, enabled=_aligned, resumable=True,
        trains=True, loads_by_name=_alignment_rule,
        reads={"align": ("sft.jsonl", "prompts.jsonl", "preference.jsonl", "kto.jsonl")},
        summary="alignment.method after SFT: raft, ppo, grpo (reward) or dpo, kto, orpo, simpo (pairs)",
    ),
    *_EVALUATION_ROWS,
    StageSpec(
        "quantize", "quantize", "components.quantization.quantize:quantize_stage",
        upstream=(*_MODEL_INPUTS, "cpt", "sft", "alignment"), enabled=lambda cfg: cfg.quantize.enabled,
        reads=HELDOUT_READS,
        keyed_on=lambda cfg, facts: {"quantize": cfg.quantize.model_dump(mode="json"),
                                     "evaluate": cfg.evaluate.model_dump(mode="json"), "model": _model(cfg),
                                     **_template(cfg)},
        summary="merge adapters, save safetensors, score and save bitsandbytes NF4/int8 loads, export GGUF",
    ),
    StageSpec(
        "register", "register", "components.registry:register_stage",
        # Reads every node for the lineage tags; keyed on what decides the registered version.
        upstream=("prepare", "fetch", "align", "tokenize", "cpt", "sft", "reward", "alignment", *_EVAL.values(),
                  "quantize"),
        keyed_upstream=("quantize", _EVAL["adapted"], _EVAL["aligned"], _EVAL["base"]),
        enabled=lambda cfg: cfg.quantize.enabled,
        keyed_on=lambda cfg, facts: {"registry": cfg.registry.model_dump(mode="json"),
                                     "tracking": cfg.tracking.model_dump(mode="json")},
        retries=2, summary="register the merged model in MLflow with lineage tags and an alias",
    ),
    StageSpec(
        "promote", "promote", "components.promotion:promote_stage",
        upstream=("register", _EVAL["base"], _EVAL["adapted"], _EVAL["aligned"]),
        enabled=lambda cfg: cfg.quantize.enabled and cfg.promotion.enabled, keyed_on=_promotion, retries=2,
        summary="move @champion to the new version only if it beats the base and the current champion",
    ),
)

STAGES_BY_NAME: dict[str, StageSpec] = {s.name: s for s in STAGE_TABLE}
# Stage kinds in pipeline order: the names --from/--only/--until accept.
STAGE_KINDS: tuple[str, ...] = tuple(dict.fromkeys(s.kind for s in STAGE_TABLE))


def kind_index(kind: str) -> int:
    if kind not in STAGE_KINDS:
        raise ValueError(f"unknown stage {kind!r}; stages: {', '.join(STAGE_KINDS)}")
    return STAGE_KINDS.index(kind)


@dataclass(frozen=True)
class PlannedNode:
    spec: StageSpec
    upstream: tuple[str, ...]  # the enabled upstream nodes

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def keyed_upstream(self) -> tuple[str, ...]:
        keyed = self.spec.keyed_upstream
        return self.upstream if keyed is None else tuple(u for u in self.upstream if u in keyed)


def planned_nodes(cfg: PipelineConfig) -> list[PlannedNode]:
    """The enabled nodes in run order, each with the enabled nodes it reads."""
    enabled = [s for s in STAGE_TABLE if s.enabled(cfg)]
    names = {s.name for s in enabled}
    nodes = []
    for spec in enabled:
        missing = [u for u in spec.upstream if u not in names and u not in STAGES_BY_NAME]
        if missing:  # a typo in the table, caught by the table's test
            raise ValueError(f"stage {spec.name}: unknown upstream {missing}")
        nodes.append(PlannedNode(spec, tuple(u for u in spec.upstream if u in names)))
    return nodes


def _shown(path: Path, base: Path) -> str:
    """A source path as the key records it: relative to the dataset_info.json when below it, else absolute."""
    return str(path.relative_to(base)) if path.is_relative_to(base) else str(path)


def source_fingerprints(cfg: PipelineConfig, versions: Mapping[str, str] | None = None) -> dict:
    """What the fetch key depends on: the description file, the content of every local source, and the
    current version of every remote one (`versions`, KeyFacts.source_versions; a pinned or unreachable
    source has none and is keyed on its description)."""
    from components.artifacts import file_fingerprint
    from components.data.dataset_info import load_dataset_info, local_files
    from components.data.records import GROUP_KINDS

    info_path = Path(cfg.data.dataset_info)
    names = sorted({n for g in GROUP_KINDS for n in getattr(cfg.data, g)})
    outside = cfg.data.allow_outside_paths
    specs = load_dataset_info(info_path, names, allow_outside=outside)
    out: dict[str, object] = {"dataset_info": file_fingerprint(info_path)}
    for name, spec in specs.items():
        entry = spec.model_dump(mode="json")
        if spec.load_from == "hf_hub":  # how a hub dataset is saved (parquet, or JSONL when streamed)
            entry["streaming"] = cfg.data.streaming
        if spec.file_name:  # the files fetch copies (a directory's hidden files are not)
            paths = local_files(spec, info_path, allow_outside=outside)
            entry["content"] = {_shown(p, info_path.parent): file_fingerprint(p) for p in paths}
        if versions and name in versions:
            entry["version"] = versions[name]
        out[name] = entry
    return out
