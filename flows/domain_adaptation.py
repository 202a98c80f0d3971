"""The domain-adaptation flow: fetch -> align -> tokenize -> cpt -> sft -> evaluate -> quantize -> register.

Wiring only. Each stage is a cached Prefect task (tasks/stages.py); the flow computes each stage's
content key from the config and the upstream manifests, asks Prefect for a fresh run only where the
artifacts on disk are missing (or the user forced it), and records the lineage in MLflow.
"""

from __future__ import annotations

import logging
import subprocess
import time
from pathlib import Path

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact
from prefect.context import get_run_context

from components import tracking
from components.artifacts import read_manifest, reset_dir, stage_dir, verify_manifest
from components.config import STAGES, PipelineConfig, Stage, save_config
from components.models.loading import resolve_base, select_hardware
from flows.plan import PlannedStage, planned_stages, stage_config, validate_stage
from tasks import stages as t
from tasks.keys import stage_key

log = logging.getLogger("lmforge.flow")


def git_commit() -> str:
    try:
        return subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True, timeout=5,
            cwd=Path(__file__).resolve().parent,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _call(node: PlannedStage, key: str, ctx: t.RunContext, cfg: PipelineConfig, sc: dict, m: dict, base_source: str):
    """Dispatch one planned node to its task with its upstream manifests."""
    if node.stage == "fetch":
        return t.fetch, (key, ctx, cfg, sc)
    if node.stage == "align":
        return t.align, (key, ctx, cfg, sc, m["fetch"])
    if node.stage == "tokenize":
        return t.tokenize, (key, ctx, cfg, sc, m["align"], base_source)
    if node.stage in ("cpt", "sft"):
        below = [m["cpt"]] if node.stage == "sft" and "cpt" in m else []
        return t.train_adapter.with_options(name=node.stage), (key, ctx, cfg, sc, node.stage, m["tokenize"], below, base_source)
    adapters = [m[s] for s in ("cpt", "sft") if s in m]
    if node.name == "evaluate-base":
        return t.evaluate.with_options(name="evaluate-base"), (key, ctx, cfg, sc, "base", m["tokenize"], m["align"], [], base_source)
    if node.name == "evaluate-adapted":
        return t.evaluate.with_options(name="evaluate-adapted"), (key, ctx, cfg, sc, "adapted", m["tokenize"], m["align"], adapters, base_source)
    if node.stage == "quantize":
        return t.quantize, (key, ctx, cfg, sc, m["tokenize"], m["align"], adapters, base_source)
    if node.stage == "register":
        lineage = {
            "lmforge.config_digest": ctx.config_digest,
            "lmforge.git_commit": git_commit(),
            "prefect.flow_run_id": ctx.flow_run_id,
            "lmforge.data_digest.align": m["align"]["digest"],
            "lmforge.data_digest.tokenize": m["tokenize"]["digest"],
            "lmforge.base_model": cfg.model.base,
            **{f"lmforge.stage_key.{k}": v["cache_key"] for k, v in m.items()},
        }
        return t.register, (key, ctx, cfg, sc, m["quantize"], m["evaluate-adapted"], m["evaluate-base"], lineage)
    raise ValueError(node.name)


@flow(name="domain_adaptation", log_prints=True)
def domain_adaptation(
    config: PipelineConfig = PipelineConfig(),
    from_stage: Stage | None = None,
    only: Stage | None = None,
    until: Stage | None = None,
) -> dict:
    """Adapt a base model to the domain data in `config`; returns the summary (metrics, versions, timings).

    from_stage: recompute this stage and everything after it, even when cached.
    only: run just this stage on cached upstream outputs (they must exist).
    until: stop after this stage (e.g. `tokenize` to check data without training).
    """
    for name in (from_stage, only, until):
        validate_stage(name)
    t_flow = time.perf_counter()
    logger = get_run_logger()
    cfg = config
    workspace = Path(cfg.workspace)
    workspace.mkdir(parents=True, exist_ok=True)
    flow_run_id = str(get_run_context().flow_run.id)
    hardware = select_hardware(cfg.compute.device, cfg.compute.precision)

    client = tracking.client_for(cfg.tracking_uri())
    exp_id = tracking.experiment_id(client, cfg.tracking.experiment, workspace / "mlartifacts")
    parent = tracking.start_run(
        client, exp_id, f"domain_adaptation-{flow_run_id[:8]}",
        tags={"prefect.flow_run_id": flow_run_id, "lmforge.config_digest": cfg.digest(), "lmforge.git_commit": git_commit()},
    )
    ctx = t.RunContext(cfg.tracking_uri(), exp_id, parent, flow_run_id, cfg.digest())
    run_dir = workspace / "runs" / flow_run_id
    save_config(cfg, run_dir / "config.yaml")
    client.log_artifact(parent, str(run_dir / "config.yaml"))
    tracking.log_params(client, parent, cfg.model_dump(mode="json"))

    forced = set(STAGES[STAGES.index(from_stage):]) if from_stage else set()
    manifests: dict[str, dict] = {}
    timeline: list[dict] = []
    status = "FAILED"
    prepare_s = 0.0
    try:
        started = time.perf_counter()
        base_source = resolve_base(cfg.model.base)  # the embedded model is converted on first use (~25 s)
        prepare_s = time.perf_counter() - started
        for node in planned_stages(cfg):
            sc = stage_config(cfg, node, hardware.precision)
            key = stage_key(node.name, node.stage, sc, {u: manifests[u]["digest"] for u in node.upstream})
            out = stage_dir(cfg.workspace, node.name, key)
            if until and STAGES.index(node.stage) > STAGES.index(until):
                break
            if only and node.stage != only:
                # Upstream of --only: must be on disk already; downstream: skipped.
                if STAGES.index(node.stage) > STAGES.index(only):
                    break
                manifest = read_manifest(out)
                if not verify_manifest(manifest):
                    raise RuntimeError(
                        f"--only {only}: upstream stage {node.name} has no complete output for this config "
                        f"(expected {out}); run without --only first"
                    )
                manifests[node.name] = manifest
                continue
            force = node.stage in forced
            if force:
                reset_dir(out)
            refresh = force or not verify_manifest(read_manifest(out))
            task_fn, args = _call(node, key, ctx, cfg, sc, manifests, base_source)
            started = time.perf_counter()
            state = task_fn.with_options(refresh_cache=refresh)(*args, return_state=True)
            manifest = state.result()
            elapsed = time.perf_counter() - started
            # The disk is the source of truth (Prefect's record may come from another workspace).
            manifest = read_manifest(out) or manifest
            cached = state.name == "Cached" or manifest.get("flow_run_id") != flow_run_id
            if cached:
                t.record_cached(ctx, manifest)
            manifests[node.name] = manifest
            timeline.append({"stage": node.name, "key": key, "cached": cached, "task_s": round(elapsed, 3),
                             "stage_s": 0.0 if cached else manifest["wall_s"],
                             "peak_rss_mb": None if cached else manifest.get("peak_rss_mb")})
            logger.info("%-18s %s %s", node.name, "cached " if cached else "ran    ", key)
        status = "FINISHED"
    finally:
        flow_s = time.perf_counter() - t_flow
        summary = _summary(manifests, timeline, flow_s, prepare_s)
        tracking.log_metrics(client, parent, {k: v for k, v in summary["metrics"].items()})
        tracking.end_run(client, parent, status)
    _publish(summary)
    return summary


def _summary(manifests: dict[str, dict], timeline: list[dict], flow_s: float, prepare_s: float = 0.0) -> dict:
    """Metrics, comparison and timings of a run. `prepare_s` (making the base model loadable: the
    embedded GGUF's one-time conversion) is neither a stage nor orchestration, so it is its own figure."""
    stage_s = sum(r["stage_s"] for r in timeline)
    metrics: dict[str, float] = {"flow_wall_s": flow_s, "stage_compute_s": stage_s, "base_prepare_s": prepare_s,
                                 "orchestration_overhead_s": flow_s - stage_s - prepare_s}
    comparison = {}
    base = manifests.get("evaluate-base", {}).get("metrics", {})
    adapted = manifests.get("evaluate-adapted", {}).get("metrics", {})
    for k in sorted(set(base) | set(adapted)):
        comparison[k] = {"base": base.get(k), "adapted": adapted.get(k)}
        if k in adapted:
            metrics[f"adapted_{k}"] = adapted[k]
        if k in base:
            metrics[f"base_{k}"] = base[k]
    registered = manifests.get("register", {}).get("info", {})
    quant = manifests.get("quantize", {}).get("metrics", {})
    return {"metrics": metrics, "comparison": comparison, "registered": registered, "quantization": quant,
            "timeline": timeline, "stages": {k: v["dir"] for k, v in manifests.items()}}


def _publish(summary: dict) -> None:
    """A markdown table in the Prefect UI: base vs adapted on every held-out metric."""
    lines = ["| metric | base | adapted |", "|---|---|---|"]
    for k, v in summary["comparison"].items():
        fmt = lambda x: "" if x is None else f"{x:.4f}"  # noqa: E731
        lines.append(f"| {k} | {fmt(v['base'])} | {fmt(v['adapted'])} |")
    reg = summary.get("registered") or {}
    if reg:
        lines.append(f"\nRegistered **{reg.get('name')}** version {reg.get('version')} as @{reg.get('alias')}.")
    try:
        create_markdown_artifact("\n".join(lines), key="evaluation", description="Held-out evaluation")
    except Exception as exc:  # an artifact is a convenience; never fail a finished run for it
        log.warning("could not publish the evaluation artifact: %s", exc)
