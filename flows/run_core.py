"""The walk over the stage table that every run makes, without Prefect in it.

`adapt` computes each node's content key from its config slice and upstream manifests, reuses a complete
output on disk or asks `RunHooks.run_stage` to produce it, records the run in MLflow (a parent run, one
nested run per stage) and returns the summary (components/run_summary.py). The Prefect flow
(flows/domain_adaptation.py) gives it hooks that run each stage as a cached, retried Prefect task.

A rerun whose every stage is already complete has nothing for Prefect to schedule, and starting Prefect's
temporary API costs more than the rest of such a run (bench/rerun_time.md). `lmforge run` therefore checks
first (`cached_plan`, the same check as `lmforge stages`) and, when a local run would only reuse, calls
`run_cached`: the same walk, the same MLflow records and summary, and no Prefect flow run (with a
PREFECT_API_URL configured, a run always goes through Prefect, so a server's history stays whole).
"""

from __future__ import annotations

import logging
import subprocess
import time
import uuid
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from components import mlflow_outputs, shared_cache, tracking
from components.artifacts import read_manifest, reset_dir, stage_dir, verify_manifest
from components.config import PipelineConfig, save_config
from components.errors import StageInputError
from components.pipeline import RunInfo, kind_index, planned_nodes
from components.run_summary import data_change_lines, draw_pictures, run_summary
from flows.plan import key_facts, keyed_digests, node_key

log = logging.getLogger("lmforge.flow")


def git_commit() -> str:
    try:
        return subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True, timeout=5,
            cwd=Path(__file__).resolve().parent,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


# (node, key, refresh, run, cfg, config slice, upstream manifests, keyed digests, force=) -> (manifest, reused);
# force: `--from` recomputes the node, even where a shared store holds it
StageRunner = Callable[..., tuple[dict, bool]]


@dataclass
class RunHooks:
    """What differs between a run under Prefect and one without: the run's id, where its lines go, how a
    stage that is not complete on disk gets produced, and what publishes the summary."""

    run_id: str
    logger: logging.Logger | logging.LoggerAdapter
    run_stage: StageRunner
    tags: dict[str, str]
    publish: Callable[[dict], None] = lambda summary: None
    # run_stage started now, its (manifest, reused) in a Future: how nodes run side by side
    # (compute.parallel_stages > 1). None: one node at a time.
    submit_stage: Callable[..., Future] | None = None


def adapt(cfg: PipelineConfig, hooks: RunHooks, *, precision: str, from_stage: str | None = None,
          only: str | None = None, until: str | None = None, verify: Literal["fast", "deep"] = "fast") -> dict:
    """Walk the plan of `cfg` (module docstring); returns the summary."""
    for name in (from_stage, only, until):
        if name is not None:
            kind_index(name)
    t_flow = time.perf_counter()
    workspace = Path(cfg.workspace)
    workspace.mkdir(parents=True, exist_ok=True)
    deep = verify == "deep"

    client = tracking.client_for(cfg.tracking_uri())
    # A tracking server keeps artifacts where it is told (`--artifacts-destination`; clients upload over HTTP):
    # a workspace path would be a directory on this machine only.
    served = cfg.tracking_uri().startswith(("http://", "https://"))
    exp_id = tracking.experiment_id(client, cfg.tracking.experiment, None if served else workspace / "mlartifacts")
    tracking.mark_dead_runs_killed(client, exp_id)  # runs left RUNNING by processes killed earlier (kill -9)
    commit = git_commit()
    parent = tracking.start_run(
        client, exp_id, f"domain_adaptation-{hooks.run_id[:8]}",
        tags={**hooks.tags, "lmforge.config_digest": cfg.digest(), "lmforge.git_commit": commit},
    )
    run = RunInfo(cfg.tracking_uri(), exp_id, parent, hooks.run_id, cfg.digest(), commit)
    run_dir = workspace / "runs" / hooks.run_id

    manifests: dict[str, dict] = {}
    timeline: list[dict] = []
    status = "FAILED"
    summary: dict = {}
    try:  # from here on, whatever fails ends the parent run FAILED (or KILLED), never leaves it RUNNING
        save_config(cfg, run_dir / "config.yaml", masked=True)
        client.log_artifact(parent, str(run_dir / "config.yaml"))
        tracking.log_params(client, parent, cfg.model_dump(mode="json"))
        walk = _Walk(cfg, hooks, run, key_facts(cfg, precision), from_stage, only, deep)
        walk.over([n for n in planned_nodes(cfg)
                  if not (until and kind_index(n.spec.kind) > kind_index(until))
                  and not (only and kind_index(n.spec.kind) > kind_index(only))], manifests, timeline)
        if "register" in manifests:
            _tag_lineage(client, exp_id, manifests, cfg, hooks.logger)
        status = "FINISHED"
    except BaseException as exc:
        status = tracking.end_status(exc)  # Ctrl-C or SIGTERM (Prefect raises it in the flow): KILLED
        raise
    finally:
        try:  # the summary is a convenience: whatever fails in it, the parent run still ends
            summary = run_summary(manifests, timeline, time.perf_counter() - t_flow)
            summary["data_changes"] = data_change_lines(cfg, manifests, hooks.run_id, hooks.logger)
            tracking.log_metrics(client, parent, dict(summary["metrics"]))
            draw_pictures(summary, manifests, run_dir, client, parent)
        except Exception as exc:
            log.warning("could not summarise the run: %s", exc)
            if status == "FINISHED":
                raise
        finally:
            tracking.end_run(client, parent, status)
    hooks.publish(summary)
    return summary


@dataclass
class _Walk:
    """The nodes of one run in the stage table's order, each once its upstream nodes are complete: one at a
    time, or (compute.parallel_stages > 1, with hooks that submit) up to that many side by side, training
    stages never beside each other unless compute.parallel_training. The manifests and the timeline come out
    in the table's order either way, as a run one node at a time gives them."""

    cfg: PipelineConfig
    hooks: RunHooks
    run: RunInfo
    facts: object
    from_stage: str | None
    only: str | None
    deep: bool

    def over(self, nodes: list, manifests: dict[str, dict], timeline: list[dict]) -> None:
        compute = self.cfg.compute
        limit = compute.parallel_stages if self.hooks.submit_stage is not None else 1
        rows: dict[str, dict] = {}
        pending: dict[Future, tuple] = {}
        waiting = list(nodes)
        try:
            while waiting or pending:
                node = next((n for n in waiting if self._may_start(n, manifests, pending, limit)), None)
                if node is not None:
                    waiting.remove(node)
                    self._start(node, manifests, rows, pending, limit)
                    continue
                if not pending:
                    raise RuntimeError(f"no node can start: {[n.name for n in waiting]} wait on nodes not planned")
                for future in wait(pending, return_when=FIRST_COMPLETED).done:
                    node, key, started = pending.pop(future)
                    manifests[node.name], rows[node.name] = self._finished(node, key, future.result(), started)
        finally:
            if pending:  # a node failed: the others finish (they hold their stage locks) before the run ends
                wait(pending)
        order = [n.name for n in nodes]
        ordered = {name: manifests[name] for name in order if name in manifests}
        manifests.clear()
        manifests.update(ordered)
        timeline.extend(rows[name] for name in order if name in rows)

    def _may_start(self, node, manifests: dict, pending: dict, limit: int) -> bool:
        if len(pending) >= limit or any(u not in manifests for u in node.upstream):
            return False
        training = node.spec.trains and not self.cfg.compute.parallel_training
        return not (training and any(n.spec.trains for n, _, _ in pending.values()))

    def _start(self, node, manifests: dict, rows: dict, pending: dict, limit: int) -> None:
        key, sc = node_key(node, self.cfg, self.facts, manifests)
        out = stage_dir(self.cfg.workspace, node.name, key)
        if self.only and node.spec.kind != self.only:
            manifests[node.name] = _complete_upstream(node.name, key, out, self.only, self.deep, self.cfg)
            return
        force = self.from_stage is not None and kind_index(node.spec.kind) >= kind_index(self.from_stage)
        refresh = _refresh(out, force, self.deep)
        args = (node, key, refresh, self.run, self.cfg, sc, {u: manifests[u] for u in node.upstream},
                keyed_digests(node, manifests))
        started = time.perf_counter()
        if limit == 1:
            manifests[node.name], rows[node.name] = self._finished(
                node, key, self.hooks.run_stage(*args, force=force), started)
        else:
            pending[self.hooks.submit_stage(*args, force=force)] = (node, key, started)

    def _finished(self, node, key: str, produced: tuple[dict, bool], started: float) -> tuple[dict, dict]:
        return _recorded(node, key, produced, time.perf_counter() - started, self.hooks, self.run, self.cfg)


def _complete_upstream(name: str, key: str, out: Path, only: str, deep: bool, cfg: PipelineConfig) -> dict:
    """An upstream stage of `--only`: complete on disk, or downloaded from the shared store; else an error."""
    manifest = read_manifest(out)
    if verify_manifest(manifest, deep=deep):
        return manifest
    store = shared_cache.open_store(cfg.cache.shared_url, cfg.cache.lease_ttl_s)
    fetched = store.fetch(name, key, out) if store is not None else None
    if fetched is None:
        raise StageInputError(
            f"--only {only}: upstream stage {name} has no complete output for this config "
            f"(expected {out}{', nor in the shared store ' + store.url if store else ''}); run without --only first"
        )
    return fetched


def _tag_lineage(client, exp_id: str, manifests: dict[str, dict], cfg: PipelineConfig, logger) -> None:
    """The registered version names the run of every stage it was made from and where its outputs are."""
    info = manifests["register"].get("info", {})
    try:
        mlflow_outputs.tag_version_lineage(client, exp_id, info["name"], str(info["version"]), manifests,
                                           uploads=mlflow_outputs.uploads_on(cfg.tracking.upload_outputs))
    except Exception as exc:  # the version stands; its stage tags are a convenience for browsing
        logger.warning("could not tag the registered version with its stage runs: %s", exc)


def _reused(node, manifest: dict, run: RunInfo, cfg: PipelineConfig) -> None:
    """A reused stage: its nested MLflow run (pointing at the outputs, uploading them where no run holds
    them), and its copy in the shared store where that lacks it (a workspace that computed before sharing)."""
    tracking.record_cached_stage(run, manifest, upload=mlflow_outputs.uploads_on(cfg.tracking.upload_outputs))
    store = shared_cache.open_store(cfg.cache.shared_url, cfg.cache.lease_ttl_s)
    if store is not None and not store.has(node.name, manifest["cache_key"]):
        store.try_publish(manifest)


def _refresh(out: Path, force: bool, deep: bool) -> bool:
    """Whether a node's output must be produced (not reused): forced, or not complete on disk."""
    if force:
        reset_dir(out)
    refresh = force or not verify_manifest(read_manifest(out), deep=deep)
    if refresh and not force:
        # A stale or tampered output is never reused (nor adopted by run_stage): its manifest goes.
        # A resumable stage keeps its checkpoints; a non-resumable one is emptied by run_stage, under
        # the stage lock.
        (out / "manifest.json").unlink(missing_ok=True)
    return refresh


def _recorded(node, key: str, produced: tuple[dict, bool], elapsed: float, hooks: RunHooks, run: RunInfo,
              cfg: PipelineConfig) -> tuple[dict, dict]:
    """A node that `hooks.run_stage` produced or reused: its manifest (from disk, the source of truth) and
    its row of the timeline; a reused one gets its MLflow record."""
    manifest, cached = produced
    out = stage_dir(cfg.workspace, node.name, key)
    # The disk is the source of truth (Prefect's record may come from another workspace).
    manifest = read_manifest(out) or manifest
    cached = cached or manifest.get("flow_run_id") != hooks.run_id
    if cached:
        _reused(node, manifest, run, cfg)
    hooks.logger.info("%-18s %s %s", node.name, "cached " if cached else "ran    ", key)
    return manifest, {"stage": node.name, "key": key, "cached": cached, "task_s": round(elapsed, 3),
                      "stage_s": 0.0 if cached else manifest["wall_s"],
                      "peak_rss_mb": None if cached else manifest.get("peak_rss_mb")}


def cached_plan(cfg: PipelineConfig, precision: str, *, until: str | None = None, verify: str = "fast") -> bool:
    """Whether every stage a run of `cfg` (up to `until`) would walk is complete on disk: such a run only reuses."""
    from flows.plan import describe_plan

    limit = kind_index(until) if until else None
    rows = [r for r in describe_plan(cfg, precision, deep=verify == "deep")
            if limit is None or kind_index(r["kind"]) <= limit]
    return bool(rows) and all(r["cached"] for r in rows)


def run_cached(cfg: PipelineConfig, precision: str, *, until: str | None = None,
               verify: Literal["fast", "deep"] = "fast") -> dict:
    """A run of a plan `cached_plan` found complete, without Prefect: every stage reused, recorded in MLflow
    as a Prefect run records it. A stage found incomplete after all (removed meanwhile) stops the run with
    a clear error; rerun it and it takes the Prefect path."""

    def reuse(node, key, refresh, *_, **__):
        manifest = read_manifest(stage_dir(cfg.workspace, node.name, key))
        if refresh or not verify_manifest(manifest, deep=verify == "deep"):
            raise StageInputError(f"stage {node.name}'s output ({key}) changed while this run started; run again")
        return manifest, True

    run_id = f"cached-{uuid.uuid4()}"
    hooks = RunHooks(run_id=run_id, logger=log, run_stage=reuse, tags={"lmforge.run": "cached, without Prefect"})
    return adapt(cfg, hooks, precision=precision, until=until, verify=verify)
