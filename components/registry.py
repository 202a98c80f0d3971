"""MLflow model registry: register a merged checkpoint with lineage tags and move aliases.

Stages are deprecated in MLflow; aliases (`challenger`, `champion`) are the promotion mechanism.
"""

from __future__ import annotations

import logging
from pathlib import Path

from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from components.tracking import log_artifact_files

log = logging.getLogger(__name__)


def register_model(
    client: MlflowClient,
    *,
    name: str,
    run_id: str,
    model_dir: Path,
    files: list[str],
    tags: dict[str, str],
    alias: str,
    description: str = "",
) -> str:
    """Upload the checkpoint as artifacts of `run_id` under `model/`, create a version, set `alias`."""
    log_artifact_files(client, run_id, model_dir, files, artifact_path="model")
    try:
        client.create_registered_model(name, description="Domain-adapted model produced by lmforge.")
    except MlflowException as exc:
        if "RESOURCE_ALREADY_EXISTS" not in str(exc.error_code):
            raise
    run = client.get_run(run_id)
    source = f"{run.info.artifact_uri}/model"
    version = client.create_model_version(
        name, source=source, run_id=run_id, tags={k: str(v) for k, v in tags.items()}, description=description
    )
    client.set_registered_model_alias(name, alias, version.version)
    log.info("registered %s version %s as @%s", name, version.version, alias)
    return version.version


def resolve_registry_uri(client: MlflowClient, uri: str, dest: Path) -> Path:
    """Download `models:/NAME@alias` or `models:/NAME/VERSION` into `dest` and return the model directory."""
    import mlflow.artifacts

    body = uri[len("models:/") :]
    if "@" in body:
        name, alias = body.split("@", 1)
        mv = client.get_model_version_by_alias(name, alias)
    else:
        name, version = body.split("/", 1)
        mv = client.get_model_version(name, version)
    target = Path(dest) / f"{name}-v{mv.version}"
    if not (target / "config.json").is_file():
        mlflow.artifacts.download_artifacts(artifact_uri=mv.source, dst_path=str(target.parent / f".{target.name}"), tracking_uri=client._tracking_client.tracking_uri)
        downloaded = target.parent / f".{target.name}" / "model"
        downloaded.rename(target)
    return target
