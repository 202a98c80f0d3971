"""MLflow tracking through an explicit client and run ids (no global active run), so a stage can log
from any process or thread it runs in: the parent run id travels with the call.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import socket
import time
from pathlib import Path
from typing import Any

import psutil
from filelock import FileLock
from mlflow.entities import Dataset, DatasetInput, InputTag, Metric, Param
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from components import mlflow_outputs
from components.redact import mask_secrets
from components.runtime import route_library_notices

log = logging.getLogger(__name__)

_MAX_PARAM = 6000
_MAX_KEY = 250  # MLflow's longest param or metric key


# SQLite URIs whose tracking and registry stores this process has opened. MLflow keeps one store per URI
# per process, so the schema checks run once; a stage calling client_for again skips the lock and query.
_OPENED: set[str] = set()


def client_for(uri: str) -> MlflowClient:
    """A client for tracking and registry at `uri`. A SQLite database is created (or migrated) under a
    file lock: two processes creating one database at once otherwise race in MLflow's schema migration
    (`table _alembic_tmp_experiments already exists`). MLflow's notices that it is creating the tables
    go to the run's log file (components.runtime), not the terminal."""
    if not uri.startswith("sqlite:///"):
        return MlflowClient(tracking_uri=uri, registry_uri=uri)
    db = Path(uri[len("sqlite:///") :])
    if uri in _OPENED and db.is_file():
        return MlflowClient(tracking_uri=uri, registry_uri=uri)
    route_library_notices()
    db.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(db) + ".lock"):
        client = MlflowClient(tracking_uri=uri, registry_uri=uri)  # opens the tracking store (migrates)
        client.search_registered_models(max_results=1)  # opens the registry store (its own schema check)
    _OPENED.add(uri)
    return client


def experiment_id(client: MlflowClient, name: str, artifact_root: Path | None = None) -> str:
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    location = artifact_root.resolve().as_uri() if artifact_root else None
    try:
        return client.create_experiment(name, artifact_location=location)
    except MlflowException as exc:  # another process created it since the lookup
        if "RESOURCE_ALREADY_EXISTS" not in str(exc.error_code):
            raise
        return client.get_experiment_by_name(name).experiment_id


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def safe_params(config: dict) -> list[Param]:
    """`config` flattened to MLflow params; keys made valid and kept distinct (see mlflow_key)."""
    params = []
    taken: set[str] = set()
    for k, v in flatten(mask_secrets(config)).items():
        key = mlflow_key(k)
        if key in taken:  # two names that differ only in refused characters: tell them apart by a digest
            key = mlflow_key(f"{key[:_MAX_KEY - 9]}-{hashlib.sha256(k.encode()).hexdigest()[:8]}")
        taken.add(key)
        value = json.dumps(v) if isinstance(v, (list, dict)) else str(v)
        params.append(Param(key, value[:_MAX_PARAM]))
    return params


def mlflow_key(name: str) -> str:
    """`name` as a valid MLflow param or metric key, whatever a user called a dataset, task or file in it.

    MLflow takes ASCII letters, digits and `_ - . space /`, at most 250 characters, and a key that is a
    normalised relative path (no empty, `.` or `..` segment, no leading `/` or `..`): anything else fails
    the whole batch. Those characters become `_`; a key that had to be shortened ends in a digest of
    the full name, so two long names stay apart.
    """
    key = re.sub(r"[^A-Za-z0-9_\-. /]", "_", name)
    key = "/".join("_" if part in ("", ".", "..") else part for part in key.split("/"))
    if key.startswith(".."):
        key = "_" + key
    if len(key) > _MAX_KEY:
        key = f"{key[:_MAX_KEY - 9]}-{hashlib.sha256(name.encode()).hexdigest()[:8]}"
    return key


# Run tags naming the process that owns a run, so a later sweep can tell a live run from one whose
# process died (SIGKILL, power loss) and left it RUNNING forever.
PID_TAG, PID_STARTED_TAG, HOST_TAG = "lmforge.pid", "lmforge.pid_started", "lmforge.host"


def _owner_tags() -> dict[str, str]:
    me = psutil.Process()
    return {PID_TAG: str(me.pid), PID_STARTED_TAG: f"{me.create_time():.2f}", HOST_TAG: socket.gethostname()}


def start_run(client: MlflowClient, exp_id: str, name: str, *, parent: str | None = None, tags: dict | None = None) -> str:
    """Create a run (nested under `parent` if given), tagged with the process that owns it."""
    all_tags = {"mlflow.runName": name, **({"mlflow.parentRunId": parent} if parent else {}), **_owner_tags(),
                **(tags or {})}
    run = client.create_run(exp_id, run_name=name, tags={k: str(v) for k, v in all_tags.items()})
    return run.info.run_id


def log_params(client: MlflowClient, run_id: str, config: dict) -> None:
    params = safe_params(config)
    for i in range(0, len(params), 100):
        client.log_batch(run_id, params=params[i : i + 100])


def metric_name(name: str) -> str:
    """`name` as a valid MLflow metric key (mlflow_key): a reward named `rule+model`, logged by TRL as
    `rewards/rule+model/mean`, or a held-out task called `a/../b`, would fail the whole batch."""
    return mlflow_key(name)


def log_metrics(client: MlflowClient, run_id: str, metrics: dict[str, float], step: int = 0) -> None:
    ts = int(time.time() * 1000)
    items = [Metric(metric_name(k), float(v), ts, step) for k, v in metrics.items()
             if isinstance(v, (int, float)) and v == v]
    for i in range(0, len(items), 500):
        client.log_batch(run_id, metrics=items[i : i + 500])


class BatchedMetrics:
    """Buffers per-step training metrics and writes them in one call every `every` points
    (one log_metric call per point costs ~9 ms on SQLite; a batch costs ~1.4 ms per point)."""

    def __init__(self, client: MlflowClient, run_id: str, every: int = 50):
        self.client, self.run_id, self.every = client, run_id, every
        self.buffer: list[Metric] = []

    def __call__(self, step: int, metrics: dict[str, float]) -> None:
        ts = int(time.time() * 1000)
        self.buffer.extend(Metric(metric_name(k), float(v), ts, step) for k, v in metrics.items() if v == v)
        if len(self.buffer) >= self.every:
            self.flush()

    def flush(self) -> None:
        if self.buffer:
            self.client.log_batch(self.run_id, metrics=self.buffer)
            self.buffer = []


def log_dataset(client: MlflowClient, run_id: str, *, name: str, path: Path, sha256: str, rows: int | None, context: str) -> None:
    """Log a dataset as a run input with our own full-content sha256.

    MLflow's digest column holds 36 characters, so it gets the first 32 hex digits; the full
    digest travels in the source and profile.
    """
    source = json.dumps({"uri": Path(path).resolve().as_uri(), "sha256": sha256})
    profile = json.dumps({"num_rows": rows, "sha256": sha256})
    dataset = Dataset(name=name, digest=sha256[:32], source_type="local", source=source, profile=profile)
    client.log_inputs(run_id, datasets=[DatasetInput(dataset, tags=[InputTag("mlflow.data.context", context)])])


def log_artifact_files(client: MlflowClient, run_id: str, root: Path, files: list[str], artifact_path: str | None = None) -> None:
    for rel in files:
        sub = os.path.dirname(rel)
        dest = "/".join(p for p in (artifact_path, sub) if p) or None
        client.log_artifact(run_id, str(Path(root) / rel), artifact_path=dest)


def end_run(client: MlflowClient, run_id: str, status: str = "FINISHED") -> None:
    client.set_terminated(run_id, status=status)


def end_status(exc: BaseException) -> str:
    """The MLflow status for a run that `exc` ended: KILLED when the process was interrupted (Ctrl-C,
    SIGTERM, which Prefect raises as a BaseException, sys.exit), FAILED for an error."""
    return "FAILED" if isinstance(exc, Exception) else "KILLED"


def _owner_alive(tags: dict[str, str]) -> bool:
    """Whether the process named in a run's owner tags still runs (the same process: a recycled pid
    has another start time)."""
    try:
        proc = psutil.Process(int(tags[PID_TAG]))
        return abs(proc.create_time() - float(tags[PID_STARTED_TAG])) < 1.0
    except psutil.AccessDenied:  # it exists and belongs to someone else: not ours to call dead
        return True
    except (psutil.NoSuchProcess, KeyError, ValueError):
        return False


def mark_dead_runs_killed(client: MlflowClient, exp_id: str) -> list[str]:
    """Mark KILLED the runs of `exp_id` left RUNNING by processes of this host that no longer exist
    (a SIGKILL or a power cut leaves no chance to end them). Runs owned by other hosts, or without
    owner tags, are left alone: their owner cannot be checked from here. Returns the run ids marked."""
    host, killed = socket.gethostname(), []
    for run in client.search_runs([exp_id], "attributes.status = 'RUNNING'", max_results=1000):
        tags = run.data.tags
        if tags.get(HOST_TAG) != host or PID_TAG not in tags or _owner_alive(tags):
            continue
        client.set_tag(run.info.run_id, "lmforge.killed_reason", f"process {tags[PID_TAG]} on {host} died")
        client.set_terminated(run.info.run_id, status="KILLED")
        killed.append(run.info.run_id)
    if killed:
        log.warning("marked %d run(s) KILLED whose process had died: %s", len(killed), ", ".join(killed))
    return killed


def record_cached_stage(run, manifest: dict, *, upload: bool = False) -> None:
    """A cached stage still gets a (cheap) nested run under `run` (components.pipeline.RunInfo) that points at
    the run that produced it and at the run holding its outputs; where no run of this tracking server holds
    them yet (made with uploads off, or downloaded from a shared store) and `upload` is on, it uploads them."""
    client = client_for(run.tracking_uri)
    holder = mlflow_outputs.holder_of(client, run.experiment_id, manifest["digest"]) if "digest" in manifest else None
    run_id = start_run(
        client, run.experiment_id, manifest["stage"], parent=run.parent_run_id,
        tags={"lmforge.stage": manifest["stage"], "lmforge.stage_kind": manifest.get("kind", manifest["stage"]),
              "lmforge.cache_key": manifest["cache_key"], "lmforge.cached": "true",
              "lmforge.produced_by_run": manifest.get("mlflow_run_id", ""),
              "lmforge.produced_by_flow_run": manifest.get("flow_run_id", ""),
              **(mlflow_outputs.pointer_tags(holder) if holder else {})},
    )
    try:
        log_metrics(client, run_id, manifest.get("metrics", {}))
        if holder is None and upload and "digest" in manifest:
            try:
                mlflow_outputs.upload_outputs(client, run_id, run.experiment_id, manifest, holder_known_absent=True)
            except Exception as exc:  # an unreachable artifact store: the stage is reused all the same
                log.warning("%s: outputs not uploaded to MLflow (%s: %s); the next run tries again",
                            manifest["stage"], type(exc).__name__, exc)
    except BaseException as exc:
        end_run(client, run_id, end_status(exc))
        raise
    end_run(client, run_id)
