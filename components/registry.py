"""MLflow model registry: register a merged checkpoint with lineage tags and move aliases.

Stages are deprecated in MLflow; aliases (`challenger`, `champion`) are the promotion mechanism.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from components import tracking
from components.artifacts import StageResult, atomic_write_json
from components.data.jsonl import iter_records
from components.evaluation.compare import heldout_digest
from components.pipeline import EVALUATION_NODES
from components.tracking import log_artifact_files

if TYPE_CHECKING:
    from components.config import PipelineConfig
    from components.stage_contract import StageInputs

log = logging.getLogger(__name__)

# What the promotion gate compares a version on: the questions it was scored on (their digest, a tag) and
# its answer to each (an artifact of its model run).
HELDOUT_DIGEST_TAG = "lmforge.heldout_digest"
SAMPLES_ARTIFACT = "evaluation/samples.jsonl"
VARIANTS_ARTIFACT = "variants"  # quantized copies of the registered model, one folder each


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


def log_heldout_answers(client: MlflowClient, run_id: str, samples_file: Path) -> dict[str, str]:
    """Log an evaluation's per-question answers (samples.jsonl) to a model run, for the promotion gate to pair
    the next challenger's answers with; returns the version tag holding the digest of those questions."""
    if not samples_file.is_file():
        return {}
    folder, name = SAMPLES_ARTIFACT.rsplit("/", 1)
    with tempfile.TemporaryDirectory(prefix="lmforge-answers-") as tmp:  # uploaded under the name the gate reads
        shutil.copyfile(samples_file, Path(tmp) / name)
        client.log_artifact(run_id, str(Path(tmp) / name), artifact_path=folder)
    samples = list(iter_records(samples_file))
    return {HELDOUT_DIGEST_TAG: heldout_digest(samples)} if samples else {}


def log_variants(client: MlflowClient, run_id: str, quantize_dir: Path) -> dict[str, str]:
    """Upload each variant the quantize stage saved (NF4, int8, GGUF with its Modelfile) to the model run under
    `variants/<name>/`; return the version tags that describe them: size on disk in MB, and for each overall
    metric quantize scored the variant on, its change against the merged model (`delta.<metric>`)."""
    report = json.loads((Path(quantize_dir) / "quantization_report.json").read_text())
    tags: dict[str, str] = {}
    for name, entry in report.items():
        if name == "merged" or "dir" not in entry:
            continue
        root = Path(quantize_dir) / entry["dir"]
        files = sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())
        log_artifact_files(client, run_id, root, files, artifact_path=f"{VARIANTS_ARTIFACT}/{name}")
        tags[f"lmforge.variant.{name}.size_mb"] = f"{entry['bytes_on_disk'] / 1e6:.1f}"
        for metric, delta in entry.get("delta", {}).items():
            if "/" not in metric:  # overall metrics; the per-task ones stay in the report
                tags[f"lmforge.variant.{name}.delta.{metric}"] = f"{delta:.6g}"
    return tags


def save_mlflow_model(model_dir: Path, dest: Path, *, metadata: dict[str, str]) -> Path:
    """Write the merged checkpoint as an MLflow transformers model (task `llm/v1/chat`, so pyfunc takes and
    returns OpenAI-style chat, and `mlflow models serve` answers `/invocations`), with pinned requirements
    and our lineage in the MLmodel metadata.

    The model is loaded as a pipeline rather than passed as a directory: MLflow 3.17's local-checkpoint path
    reads `check_task(task)[1]["impl"].__name__`, and transformers 5 names that class by a string, so it
    fails. Loading costs one read of the weights, in their saved dtype.
    """
    import mlflow.transformers
    import transformers
    from huggingface_hub import ModelCard

    pipe = transformers.pipeline("text-generation", model=str(model_dir), tokenizer=str(model_dir), dtype="auto")
    lines = "\n".join(f"- `{k}`: {v}" for k, v in sorted(metadata.items()))
    # Our own card: MLflow would otherwise look the local path up on the Hub and warn that it cannot.
    card = ModelCard(f"# Domain-adapted model\n\nTrained by lmforge. Its license is the base model's.\n\n{lines}\n")
    mlflow.transformers.save_model(pipe, path=str(dest), task="llm/v1/chat", pip_requirements=serving_requirements(),
                                   metadata=metadata, model_card=card)
    return Path(dest)


def serving_requirements() -> list[str]:
    """The libraries a served model needs, pinned to the versions that wrote it (local build tags such as
    `+cpu` dropped: indexes do not serve them)."""
    from importlib.metadata import version

    return [f"{pkg}=={version(pkg).split('+')[0]}"
            for pkg in ("mlflow", "torch", "transformers", "tokenizers", "safetensors", "accelerate")]


def resolve_registry_uri(client: MlflowClient, uri: str, dest: Path) -> Path:
    """Download `models:/NAME@alias` or `models:/NAME/VERSION` into `dest` and return a directory that
    transformers loads: an MLflow transformers model is laid out as `model/` (weights) beside
    `components/tokenizer/`, so those two are joined; a plain checkpoint is used as it is."""
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
        # Into a fresh temp dir beside the target, renamed when whole: a crashed download is never used.
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=target.parent, prefix=f".{target.name}.") as tmp:
            downloaded = Path(mlflow.artifacts.download_artifacts(artifact_uri=mv.source, dst_path=tmp,
                                                                  tracking_uri=client.tracking_uri))
            checkpoint = downloaded
            if (downloaded / "MLmodel").is_file():
                checkpoint = downloaded / "model"
                for f in (downloaded / "components" / "tokenizer").glob("*"):
                    shutil.move(str(f), checkpoint / f.name)
            shutil.rmtree(target, ignore_errors=True)
            checkpoint.rename(target)
    return target


def lineage_tags(inputs: StageInputs, base_name: str) -> dict[str, str]:
    """Tags that let anyone walk back from a registered version to the data, config, code and base model."""
    run = inputs.run
    base = inputs.upstream.get("prepare", {}).get("info", {})
    return {
        "lmforge.config_digest": run.config_digest,
        "lmforge.git_commit": run.git_commit,
        "prefect.flow_run_id": run.flow_run_id,
        "lmforge.base_model": base_name,
        "lmforge.base_model_digest": base.get("model_digest", ""),
        "lmforge.base_model_revision": base.get("revision") or "",
        **{f"lmforge.data_digest.{n}": inputs.upstream[n]["digest"] for n in ("align", "tokenize") if n in inputs.upstream},
        **{f"lmforge.stage_key.{n}": m["cache_key"] for n, m in inputs.upstream.items()},
    }


def registered_evaluation(inputs: StageInputs) -> dict:
    """The manifest of the evaluation of the model that is registered: the aligned one when an alignment
    stage ran (it is what quantize merged), else the adapted one."""
    for node in (EVALUATION_NODES["aligned"], EVALUATION_NODES["adapted"]):
        if inputs.has(node):
            return inputs.upstream[node]
    raise KeyError(f"stage {inputs.node} has no evaluation of the registered model among its inputs")


def register_stage(cfg: PipelineConfig, inputs: StageInputs, out_dir: Path) -> StageResult:
    """Stage entry point (see components.pipeline): a model run under the flow's parent run holding the
    merged checkpoint as an MLflow transformers model, its quantized variants and both evaluations, a registered
    version with lineage and variant tags, the alias moved."""
    if inputs.run is None:
        raise ValueError("register needs the flow run's tracking context (StageInputs.run)")
    client = tracking.client_for(inputs.run.tracking_uri)
    merged = inputs.dir("quantize") / "merged"
    run_id = tracking.start_run(client, inputs.run.experiment_id, "model", parent=inputs.run.parent_run_id,
                                tags={"lmforge.stage": "register"})
    metrics = {f"eval_{k}": v for k, v in registered_evaluation(inputs)["metrics"].items()}
    metrics.update({f"base_{k}": v for k, v in inputs.upstream[EVALUATION_NODES["base"]]["metrics"].items()})
    tracking.log_metrics(client, run_id, metrics)
    lineage = lineage_tags(inputs, cfg.model.base)
    tags = {**lineage, **{k: f"{v:.6g}" for k, v in metrics.items()}}
    tags.update(log_heldout_answers(client, run_id, Path(registered_evaluation(inputs)["dir"]) / "samples.jsonl"))
    tags.update(log_variants(client, run_id, inputs.dir("quantize")))
    name, alias = cfg.registry.model_name, cfg.registry.alias
    with tempfile.TemporaryDirectory(dir=out_dir, prefix=".mlflow-model.") as tmp:
        model_dir = save_mlflow_model(merged, Path(tmp) / "model", metadata=lineage)
        files = sorted(str(p.relative_to(model_dir)) for p in model_dir.rglob("*") if p.is_file())
        version = register_model(client, name=name, run_id=run_id, model_dir=model_dir, files=files, tags=tags,
                                 alias=alias)
    tracking.end_run(client, run_id)
    atomic_write_json(Path(out_dir) / "registered.json",
                      {"name": name, "version": version, "alias": alias, "model_run_id": run_id})
    return StageResult(files=["registered.json"], reports=["registered.json"], metrics={"version": float(version)},
                       info={"name": name, "version": version, "alias": alias})
