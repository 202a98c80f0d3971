"""The one Prefect task every stage runs in: content cache key, retries, MLflow stage run, manifest out.

The body is one component call, the stage table's entry function (components/pipeline.py). The key
comes in as an argument (computed by the flow from the config slice, upstream digests and code
version); Prefect persists the JSON manifest under that key, so the UI shows hits as Cached.
Retries happen only for failures a retry can cure (components.errors.is_transient): a missing file
or malformed data fails at once.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from filelock import FileLock, Timeout
from prefect import task

from components import mlflow_outputs, shared_cache, tracking
from components.artifacts import StageResult, read_manifest, reset_dir, sha256_file, stage_dir, verify_manifest, write_manifest
from components.config import PipelineConfig
from components.errors import is_transient
from components.pipeline import STAGES_BY_NAME, RunInfo, StageInputs, StageSpec
from components.resources import PeakMemory, release_free_memory
from components.runtime import configure_threads, quiet_library_warnings

log = logging.getLogger("lmforge.tasks")


def run_stage(
    spec: StageSpec,
    key: str,
    run: RunInfo,
    cfg: PipelineConfig,
    stage_config: dict,
    body: Callable[[Path, Callable], StageResult],
    *,
    upstream: dict[str, str],
    reuse_shared: bool = True,
) -> dict:
    """Run `body(out_dir, metrics_sink)` in the stage's content-addressed dir and write its manifest. The
    sink (tracking.BatchedMetrics) logs into the stage's MLflow run and names it (`sink.run_id`).

    A valid manifest already on disk is returned as is (Prefect's own record may be gone). A
    resumable stage keeps a crashed attempt's checkpoints so training resumes instead of restarting.
    Two runs that compute the same stage at once take turns on a lock next to its directory; the
    second adopts the first one's output instead of computing it again.

    With a shared store (cfg.cache.shared_url, components/shared_cache.py) a stage missing here is downloaded
    from it by key when complete there (unless `reuse_shared` is off: a forced recompute); else this worker
    takes the stage's lease in the store, computes, publishes, and workers elsewhere wait and download.
    """
    out = stage_dir(cfg.workspace, spec.name, key)
    existing = read_manifest(out)
    if verify_manifest(existing):
        log.info("%s: reusing %s", spec.name, out)
        return existing
    store = shared_cache.open_store(cfg.cache.shared_url, cfg.cache.lease_ttl_s)
    with stage_lock(out, spec.name):
        existing = read_manifest(out)
        if verify_manifest(existing):  # another run finished it while this one waited
            log.info("%s: adopting %s, finished by flow run %s", spec.name, out, existing.get("flow_run_id"))
            return existing
        if store is None:
            return _compute(spec, key, run, cfg, stage_config, body, out, upstream)
        with store.claim(spec.name, key, out, reuse=reuse_shared) as fetched:
            if fetched is not None:
                return fetched
            manifest = _compute(spec, key, run, cfg, stage_config, body, out, upstream)
            store.try_publish(manifest)  # under the lease: the workers waiting for it download it next
            return manifest


@contextlib.contextmanager
def stage_lock(out: Path, stage: str) -> Iterator[None]:
    """An exclusive lock on a stage directory (a `.<key>.lock` file beside it), held while computing and
    publishing. The kernel releases it when its process dies, so a killed run never blocks the next."""
    out.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(out.parent / f".{out.name}.lock"))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        log.info("%s: another run is computing %s; waiting for it", stage, out)
        lock.acquire()
    try:
        yield
    finally:
        lock.release()


def _compute(spec: StageSpec, key: str, run: RunInfo, cfg: PipelineConfig, stage_config: dict,
             body: Callable[[Path, Callable], StageResult], out: Path, upstream: dict[str, str]) -> dict:
    if not spec.resumable:
        reset_dir(out)
    out.mkdir(parents=True, exist_ok=True)
    release_free_memory()  # start from what is in use, not from the previous stage's peak

    client = tracking.client_for(run.tracking_uri)
    run_id = tracking.start_run(
        client, run.experiment_id, spec.name, parent=run.parent_run_id,
        tags={"lmforge.stage": spec.name, "lmforge.stage_kind": spec.kind, "lmforge.cache_key": key,
              "lmforge.cached": "false", "prefect.flow_run_id": run.flow_run_id},
    )
    sink = tracking.BatchedMetrics(client, run_id)
    t0, started = time.perf_counter(), time.time()
    try:
        tracking.log_params(client, run_id, stage_config)  # in the try: a refused param ends the run FAILED
        with PeakMemory() as peak:
            result = body(out, sink)
        sink.flush()
        wall = time.perf_counter() - t0
        manifest = write_manifest(
            out, stage=spec.name, key=key, result=result, config=stage_config, upstream=upstream, wall_s=wall,
            extra={"kind": spec.kind, "mlflow_run_id": run_id, "flow_run_id": run.flow_run_id,
                   "started_at_s": round(started, 3), **peak.metrics()},
        )
        tracking.log_metrics(client, run_id, {**result.metrics, "stage_wall_s": wall, **peak.metrics("stage_")})
        # The reports the stage declares (StageResult.reports), not its weights or data.
        tracking.log_artifact_files(client, run_id, out, ["manifest.json", *manifest["reports"]])
        if mlflow_outputs.uploads_on(cfg.tracking.upload_outputs):
            _upload_outputs(client, run_id, run.experiment_id, manifest)
        if spec.logs_datasets:
            _log_datasets(client, run, out, result)
        tracking.end_run(client, run_id)
    except BaseException as exc:
        sink.flush()
        tracking.end_run(client, run_id, tracking.end_status(exc))  # KILLED on Ctrl-C / SIGTERM
        raise
    return manifest


def _upload_outputs(client, run_id: str, exp_id: str, manifest: dict) -> None:
    """The stage's files into its MLflow run (components/mlflow_outputs.py). A failed upload does not fail the
    stage, whose output is complete on disk: the next run that reuses it uploads them."""
    try:
        mlflow_outputs.upload_outputs(client, run_id, exp_id, manifest)
    except Exception as exc:  # an artifact store that refuses or is unreachable
        log.warning("%s: outputs not uploaded to MLflow run %s (%s: %s); the next run that reuses the stage "
                    "tries again", manifest["stage"], run_id, type(exc).__name__, exc)


def _log_datasets(client, run: RunInfo, out: Path, result: StageResult) -> None:
    """Datasets go to the parent run as inputs, with our full-content sha256 (see tracking.log_dataset)."""
    for rel in result.files:
        if rel.endswith((".jsonl", ".parquet")):
            p = out / rel
            tracking.log_dataset(
                client, run.parent_run_id, name=Path(rel).stem, path=p, sha256=sha256_file(p),
                rows=int(result.metrics.get(f"rows_written_{Path(rel).stem}", 0)) or None, context=Path(rel).stem,
            )


def _retry_if_transient(_task, _task_run, state) -> bool:
    """Prefect's retry condition: retry network trouble and timeouts, never bad data or missing files."""
    try:
        exc = state.result(raise_on_failure=False)
    except Exception:  # the failure's payload could not be read back: do not guess
        return False
    retry = isinstance(exc, BaseException) and is_transient(exc)
    if not retry:
        log.info("not retrying: %s is not a transient failure", type(exc).__name__)
    return retry


@task(
    name="stage",
    cache_key_fn=lambda _ctx, params: params["key"],
    persist_result=True,
    result_serializer="json",
    retry_condition_fn=_retry_if_transient,
    # Not the flow's log_prints: Prefect's print patch ignores a redirected sys.stdout, so dill's
    # disassembly (datasets hashes TRL's map functions with it) became ~140 log lines per reward stage
    # and dill found no globals. Stages log through `logging`; library prints go to the console.
    log_prints=False,
)
def run_node(key: str, node: str, run: RunInfo, cfg: PipelineConfig, stage_config: dict,
             upstream: dict[str, dict], keyed_upstream: dict[str, str], reuse_shared: bool = True) -> dict:
    """Run one node of the stage table on its upstream manifests; returns its manifest. `reuse_shared` off
    (`--from`): compute it even when the shared store holds it."""
    spec = STAGES_BY_NAME[node]

    def body(out: Path, sink) -> StageResult:
        configure_threads(cfg.compute.threads)
        quiet_library_warnings()
        inputs = StageInputs(node=node, kind=spec.kind, upstream=upstream, metrics=sink, run=run, reads=spec.reads,
                             stage_run_id=sink.run_id)
        return spec.function()(cfg, inputs, out)

    return run_stage(spec, key, run, cfg, stage_config, body, upstream=keyed_upstream, reuse_shared=reuse_shared)


def stage_task(spec: StageSpec):
    """The task as the flow calls it for `spec`: named after the node, with the node's retry policy."""
    return run_node.with_options(name=spec.name, retries=spec.retries, retry_delay_seconds=list(spec.retry_delay_s))
