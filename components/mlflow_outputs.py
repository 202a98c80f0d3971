"""Stage outputs as MLflow artifacts, each content once, so a person browsing MLflow finds everything a model
version was made from.

The run that computes a stage uploads the files of its manifest under `outputs/` (adapters, the merged model,
tokenized data, reports, plots; a training stage's final weights, never its intermediate `checkpoints/`, which
no manifest lists) and `outputs_index.json`, which names where each file lives. Uploads happen once:
- a stage whose whole output (its manifest digest) a run of the experiment already holds uploads nothing: its
  run is tagged with that holder (`lmforge.outputs_run`, `lmforge.outputs_uri`); so does a cached stage;
- a file of LARGE bytes or more that another run already holds (tag `lmforge.blob.<sha256>` on that run) is
  not uploaded again: the index points at the other run's copy.
The registered model version carries `lmforge.outputs.<stage>` for every stage it was made from.

`LMFORGE_UPLOAD_OUTPUTS=0` (or `tracking.upload_outputs: false`) turns uploads off: the runs then hold the
manifest and reports only, as before.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from mlflow.entities import RunTag
from mlflow.tracking import MlflowClient

log = logging.getLogger(__name__)

OUTPUTS = "outputs"
INDEX = "outputs_index.json"
DIGEST_TAG = "lmforge.outputs_digest"  # on the run holding a stage's outputs: the manifest digest they make up
HOLDER_TAG = "lmforge.outputs_run"  # on every stage run: the run that holds its outputs
URI_TAG = "lmforge.outputs_uri"
BLOB_TAG = "lmforge.blob."  # + sha256, on the run holding that file: its artifact path
LARGE = 1 << 20
ENV = "LMFORGE_UPLOAD_OUTPUTS"


def uploads_on(configured: bool) -> bool:
    """Whether stage outputs go to MLflow: LMFORGE_UPLOAD_OUTPUTS (0/false/off or 1/true/on) over the config."""
    env = os.environ.get(ENV, "").strip().lower()
    if env in ("0", "false", "off", "no"):
        return False
    if env in ("1", "true", "on", "yes"):
        return True
    return configured


def holder_of(client: MlflowClient, exp_id: str, digest: str) -> str | None:
    """The run of the experiment that holds a stage output with this manifest digest, if any."""
    runs = client.search_runs([exp_id], f"tags.`{DIGEST_TAG}` = '{digest}'", max_results=1)
    return runs[0].info.run_id if runs else None


def _blob_holder(client: MlflowClient, exp_id: str, sha256: str) -> str | None:
    """`runs:/<run>/<path>` of a run's copy of the file with this content, if any."""
    tag = BLOB_TAG + sha256
    runs = client.search_runs([exp_id], f"tags.`{tag}` LIKE '{OUTPUTS}/%'", max_results=1)
    return f"runs:/{runs[0].info.run_id}/{runs[0].data.tags[tag]}" if runs else None


def pointer_tags(holder: str) -> dict[str, str]:
    """The tags that point a stage run at the run holding its outputs."""
    return {HOLDER_TAG: holder, URI_TAG: f"runs:/{holder}/{OUTPUTS}"}


def upload_outputs(client: MlflowClient, run_id: str, exp_id: str, manifest: dict, *,
                   holder_known_absent: bool = False) -> dict:
    """Put the stage's output files in run `run_id` unless a run holds them already (module docstring; the
    caller may have looked that up: `holder_known_absent`). Returns {"holder": run id, "uploaded_bytes": n,
    "referenced_bytes": m}."""
    holder = None if holder_known_absent else holder_of(client, exp_id, manifest["digest"])
    if holder is not None:
        client.log_batch(run_id, tags=[RunTag(k, v) for k, v in pointer_tags(holder).items()])
        return {"holder": holder, "uploaded_bytes": 0, "referenced_bytes": 0}
    root, index, tags = Path(manifest["dir"]), {}, []
    sent = referenced = 0
    for rel, meta in sorted(manifest["files"].items()):
        elsewhere = _blob_holder(client, exp_id, meta["sha256"]) if meta["bytes"] >= LARGE else None
        if elsewhere is None:
            sub = "/".join(p for p in (OUTPUTS, os.path.dirname(rel)) if p)
            client.log_artifact(run_id, str(root / rel), artifact_path=sub)
            elsewhere = f"runs:/{run_id}/{OUTPUTS}/{rel}"
            sent += meta["bytes"]
            if meta["bytes"] >= LARGE:
                tags.append(RunTag(BLOB_TAG + meta["sha256"], f"{OUTPUTS}/{rel}"))
        else:
            referenced += meta["bytes"]
        index[rel] = {"sha256": meta["sha256"], "bytes": meta["bytes"], "uri": elsewhere}
    client.log_text(run_id, json.dumps(index, indent=2, sort_keys=True), INDEX)
    # The digest tag after every file: a run interrupted mid-upload is never taken for a holder.
    tags += [RunTag(k, v) for k, v in pointer_tags(run_id).items()] + [RunTag(DIGEST_TAG, manifest["digest"])]
    client.log_batch(run_id, tags=tags)
    log.info("%s: %.1f MB of outputs uploaded to MLflow run %s (%.1f MB held by earlier runs)",
             manifest["stage"], sent / 1e6, run_id, referenced / 1e6)
    return {"holder": run_id, "uploaded_bytes": sent, "referenced_bytes": referenced}


def tag_version_lineage(client: MlflowClient, exp_id: str, name: str, version: str, manifests: dict[str, dict],
                        *, uploads: bool) -> int:
    """Tags on a registered version naming, for each stage it was made from, the run that produced it
    (`lmforge.stage_run.<stage>`) and where its outputs are (`lmforge.outputs.<stage>`, when `uploads`).
    A version that has them all already (a rerun that reuses the register stage) costs one lookup. Returns the
    number of tags set."""
    have = client.get_model_version(name, version).tags
    wanted = {f"lmforge.stage_run.{s}": m["mlflow_run_id"] for s, m in manifests.items() if m.get("mlflow_run_id")}
    missing = [s for s in manifests if uploads and f"lmforge.outputs.{s}" not in have]
    for stage in missing:
        holder = holder_of(client, exp_id, manifests[stage]["digest"])
        if holder is not None:
            wanted[f"lmforge.outputs.{stage}"] = f"runs:/{holder}/{OUTPUTS}"
    changed = {k: v for k, v in wanted.items() if have.get(k) != v}
    for key, value in changed.items():
        client.set_model_version_tag(name, version, key, value)
    return len(changed)
