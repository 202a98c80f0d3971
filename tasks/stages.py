"""One thin Prefect task per stage: content cache key, retries, MLflow stage run, manifest out.

Every task body is `run_stage(...)` around one component call. The ML lives in components/.
Caching: the key comes in as an argument (computed by the flow from config + upstream digests + code
version); Prefect persists the JSON manifest under that key, so the UI shows hits as Cached.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from prefect import task

from components import tracking
from components.artifacts import StageResult, atomic_write_json, read_manifest, reset_dir, stage_dir, verify_manifest, write_manifest
from components.config import PipelineConfig
from components.data.records import GROUP_KINDS
from components.resources import PeakMemory, release_free_memory

log = logging.getLogger("lmforge.tasks")

# Files small enough to attach to every stage run in MLflow.
_REPORT_FILES = {
    "report.json", "stats.json", "samples.txt", "metrics.json", "samples.jsonl", "base_metrics.json",
    "training_curve.json", "quantization_report.json", "provenance.json",
}


@dataclass(frozen=True)
class RunContext:
    """What a task needs to know about the flow run it belongs to; plain data, so it crosses processes."""

    tracking_uri: str
    experiment_id: str
    parent_run_id: str
    flow_run_id: str
    config_digest: str


def run_stage(
    stage: str,
    key: str,
    ctx: RunContext,
    cfg: PipelineConfig,
    stage_config: dict,
    body: Callable[[Path, Callable], StageResult],
    *,
    upstream: dict[str, str],
    keep_partial: bool = False,
) -> dict:
    """Run `body(out_dir, metrics_sink)` in the stage's content-addressed dir and write its manifest.

    A valid manifest already on disk is returned as is (Prefect's own record may be gone).
    `keep_partial` keeps checkpoints from a crashed attempt so training resumes instead of restarting.
    """
    out = stage_dir(cfg.workspace, stage, key)
    existing = read_manifest(out)
    if verify_manifest(existing):
        log.info("%s: reusing %s", stage, out)
        return existing
    if not keep_partial:
        reset_dir(out)
    out.mkdir(parents=True, exist_ok=True)
    release_free_memory()  # start from what is in use, not from the previous stage's peak

    client = tracking.client_for(ctx.tracking_uri)
    run_id = tracking.start_run(
        client, ctx.experiment_id, stage, parent=ctx.parent_run_id,
        tags={"lmforge.stage": stage, "lmforge.cache_key": key, "lmforge.cached": "false",
              "prefect.flow_run_id": ctx.flow_run_id},
    )
    tracking.log_params(client, run_id, stage_config)
    sink = tracking.BatchedMetrics(client, run_id)
    t0 = time.perf_counter()
    try:
        with PeakMemory() as peak:
            result = body(out, sink)
        sink.flush()
        wall = time.perf_counter() - t0
        manifest = write_manifest(
            out, stage=stage, key=key, result=result, config=stage_config, upstream=upstream, wall_s=wall,
            extra={"mlflow_run_id": run_id, "flow_run_id": ctx.flow_run_id, **peak.metrics()},
        )
        tracking.log_metrics(client, run_id, {**result.metrics, "stage_wall_s": wall, **peak.metrics("stage_")})
        small = [f for f in manifest["files"] if Path(f).name in _REPORT_FILES]
        tracking.log_artifact_files(client, run_id, out, ["manifest.json", *small])
        tracking.end_run(client, run_id)
    except BaseException:
        sink.flush()
        tracking.end_run(client, run_id, "FAILED")
        raise
    return manifest


def _dir(manifest: dict) -> Path:
    return Path(manifest["dir"])


def _persisted(name: str, **options):
    """A task whose JSON result is cached under the key the flow passes in (first positional argument)."""
    return task(
        name=name,
        cache_key_fn=lambda _ctx, params: params["key"],
        persist_result=True,
        result_serializer="json",
        **options,
    )


@_persisted("fetch", retries=3, retry_delay_seconds=[2, 8, 30])
def fetch(key: str, ctx: RunContext, cfg: PipelineConfig, stage_config: dict) -> dict:
    from components.data.fetch import run_fetch

    names = sorted({n for group in GROUP_KINDS for n in getattr(cfg.data, group)})
    return run_stage(
        "fetch", key, ctx, cfg, stage_config,
        lambda out, _sink: run_fetch(Path(cfg.data.dataset_info), names, out, streaming=cfg.data.streaming),
        upstream={},
    )


@_persisted("align")
def align(key: str, ctx: RunContext, cfg: PipelineConfig, stage_config: dict, fetched: dict) -> dict:
    from components.data.align import run_align

    groups = {g: getattr(cfg.data, g) for g in GROUP_KINDS if getattr(cfg.data, g)}

    def body(out, _sink):
        result = run_align(
            _dir(fetched), groups, out, max_samples=cfg.data.max_samples, seed=cfg.data.seed,
            bad_row_budget=cfg.data.bad_row_budget, mix_strategy=cfg.data.mix_strategy,
            interleave_probs=cfg.data.interleave_probs, identity_name=cfg.data.identity_name,
            identity_author=cfg.data.identity_author, num_proc=cfg.data.num_proc,
        )
        _log_datasets(ctx, out, result, context_of=lambda f: Path(f).stem)
        return result

    return run_stage("align", key, ctx, cfg, stage_config, body, upstream={"fetch": fetched["digest"]})


def _log_datasets(ctx: RunContext, out: Path, result: StageResult, context_of: Callable[[str], str]) -> None:
    """Datasets go to the parent run as inputs, with our full-content sha256 (see tracking.log_dataset)."""
    from components.artifacts import sha256_file

    client = tracking.client_for(ctx.tracking_uri)
    for rel in result.files:
        if rel.endswith((".jsonl", ".parquet")):
            p = out / rel
            tracking.log_dataset(
                client, ctx.parent_run_id, name=Path(rel).stem, path=p, sha256=sha256_file(p),
                rows=int(result.metrics.get(f"rows_written_{Path(rel).stem}", 0)) or None, context=context_of(rel),
            )


@_persisted("tokenize")
def tokenize(key: str, ctx: RunContext, cfg: PipelineConfig, stage_config: dict, aligned: dict, base_source: str) -> dict:
    from components.data.tokenize import run_tokenize
    from components.models.loading import load_tokenizer

    def body(out, _sink):
        tokenizer = load_tokenizer(base_source, revision=cfg.model.revision, trust_remote_code=cfg.model.trust_remote_code)
        groups = {g: GROUP_KINDS[g] for g in GROUP_KINDS if getattr(cfg.data, g)}
        return run_tokenize(_dir(aligned), tokenizer, cfg.tokenize, out, groups=groups)

    return run_stage("tokenize", key, ctx, cfg, stage_config, body, upstream={"align": aligned["digest"]})


@_persisted("train", retries=1, retry_delay_seconds=5)
def train_adapter(
    key: str, ctx: RunContext, cfg: PipelineConfig, stage_config: dict, stage: str,
    tokenized: dict, below: list[dict], base_source: str,
) -> dict:
    """cpt or sft. A retry (or a rerun after a crash) resumes from the last complete checkpoint."""
    from components.models.loading import select_hardware
    from components.training.sft import run_adapter_stage

    train_cfg = getattr(cfg, stage)
    group = "cpt" if stage == "cpt" else "sft"
    hardware = select_hardware(cfg.compute.device, cfg.compute.precision)

    def body(out, sink):
        _configure_threads(cfg)
        stack = [str(_dir(m) / "adapter") for m in below]
        result = run_adapter_stage(
            cfg.model, base_source, [Path(p) for p in stack], _dir(tokenized) / f"{group}.parquet",
            train_cfg, hardware, out, metrics_sink=sink,
        )
        # Enough for `lmforge chat <stage dir>` to rebuild the model: base plus the adapter stack.
        result.info.update(base_source=base_source, adapter_stack=[*stack, str(out / "adapter")])
        return result

    upstream = {"tokenize": tokenized["digest"], **{m["stage"]: m["digest"] for m in below}}
    return run_stage(stage, key, ctx, cfg, stage_config, body, upstream=upstream, keep_partial=True)


@_persisted("evaluate")
def evaluate(
    key: str, ctx: RunContext, cfg: PipelineConfig, stage_config: dict, label: str,
    tokenized: dict, aligned: dict, adapters: list[dict], base_source: str,
) -> dict:
    """Score the base (no adapters) or the adapted model on the held-out sets."""
    from components.evaluation.evaluate import run_evaluate
    from components.models.loading import load_tokenizer, load_with_adapters, select_hardware

    def body(out, _sink):
        _configure_threads(cfg)
        hardware = select_hardware(cfg.compute.device, cfg.compute.precision)
        model = load_with_adapters(
            base_source, [_dir(m) / "adapter" for m in adapters], hardware,
            revision=cfg.model.revision, trust_remote_code=cfg.model.trust_remote_code,
        )
        tokenizer = load_tokenizer(base_source, revision=cfg.model.revision, trust_remote_code=cfg.model.trust_remote_code)
        return run_evaluate(
            model, tokenizer, out, tokenized_dir=_dir(tokenized), aligned_dir=_dir(aligned), cfg=cfg.evaluate,
            template_name=cfg.tokenize.template, system_prompt=cfg.tokenize.system_prompt,
        )

    upstream = {"tokenize": tokenized["digest"], "align": aligned["digest"], **{m["stage"]: m["digest"] for m in adapters}}
    return run_stage(f"evaluate-{label}", key, ctx, cfg, stage_config, body, upstream=upstream)


@_persisted("quantize")
def quantize(
    key: str, ctx: RunContext, cfg: PipelineConfig, stage_config: dict,
    tokenized: dict, aligned: dict, adapters: list[dict], base_source: str,
) -> dict:
    from components.models.loading import select_hardware
    from components.quantization.quantize import run_quantize

    def body(out, _sink):
        _configure_threads(cfg)
        hardware = select_hardware(cfg.compute.device, cfg.compute.precision)
        return run_quantize(
            cfg.model, base_source, [_dir(m) / "adapter" for m in adapters], cfg.quantize, cfg.evaluate, hardware, out,
            tokenized_dir=_dir(tokenized), aligned_dir=_dir(aligned), template_name=cfg.tokenize.template,
            system_prompt=cfg.tokenize.system_prompt,
        )

    upstream = {"tokenize": tokenized["digest"], **{m["stage"]: m["digest"] for m in adapters}}
    return run_stage("quantize", key, ctx, cfg, stage_config, body, upstream=upstream)


@_persisted("register")
def register(
    key: str, ctx: RunContext, cfg: PipelineConfig, stage_config: dict,
    quantized: dict, evaluation: dict, base_evaluation: dict, lineage: dict[str, str],
) -> dict:
    from components.registry import register_model

    def body(out, _sink):
        client = tracking.client_for(ctx.tracking_uri)
        merged = _dir(quantized) / "merged"
        files = [str(p.relative_to(merged)) for p in merged.rglob("*") if p.is_file()]
        run_id = tracking.start_run(
            client, ctx.experiment_id, "model", parent=ctx.parent_run_id, tags={"lmforge.stage": "register"}
        )
        metrics = {f"eval_{k}": v for k, v in evaluation["metrics"].items()}
        metrics.update({f"base_{k}": v for k, v in base_evaluation["metrics"].items()})
        tracking.log_metrics(client, run_id, metrics)
        tags = {**lineage, **{k: f"{v:.6g}" for k, v in metrics.items()}}
        version = register_model(
            client, name=cfg.registry.model_name, run_id=run_id, model_dir=merged, files=files, tags=tags,
            alias=cfg.registry.alias,
        )
        tracking.end_run(client, run_id)
        record = {"name": cfg.registry.model_name, "version": version, "alias": cfg.registry.alias, "model_run_id": run_id}
        atomic_write_json(out / "registered.json", record)
        return StageResult(files=["registered.json"], metrics={"version": float(version)},
                           info={"name": cfg.registry.model_name, "version": version, "alias": cfg.registry.alias})

    upstream = {"quantize": quantized["digest"], "evaluate": evaluation["digest"]}
    return run_stage("register", key, ctx, cfg, stage_config, body, upstream=upstream)


def _configure_threads(cfg: PipelineConfig) -> None:
    import torch

    torch.set_num_threads(cfg.compute.threads or os.cpu_count() or 1)


def record_cached(ctx: RunContext, manifest: dict) -> None:
    """A cached stage still gets a (cheap) nested run that points at the run that produced it."""
    client = tracking.client_for(ctx.tracking_uri)
    run_id = tracking.start_run(
        client, ctx.experiment_id, manifest["stage"], parent=ctx.parent_run_id,
        tags={"lmforge.stage": manifest["stage"], "lmforge.cache_key": manifest["cache_key"], "lmforge.cached": "true",
              "lmforge.produced_by_run": manifest.get("mlflow_run_id", ""),
              "lmforge.produced_by_flow_run": manifest.get("flow_run_id", "")},
    )
    tracking.log_metrics(client, run_id, manifest.get("metrics", {}))
    tracking.end_run(client, run_id)
