"""Keys for the stage table (components/pipeline.py) walked in run order.

Both the flow and `lmforge stages` walk this plan, so what the CLI says is cached is exactly what the
flow will reuse. Keys need upstream manifest digests, so the walk is sequential: a stage whose
upstream is not on disk yet has no key until that upstream runs.
"""

from __future__ import annotations

from components.artifacts import read_manifest, stage_dir, verify_manifest
from components.config import PipelineConfig
from components.data.source_versions import current_source_versions
from components.models.prepare import identify_base
from components.named_code import named_code_digests
from components.pipeline import KeyFacts, PlannedNode, planned_nodes
from tasks.keys import stage_key


def key_facts(cfg: PipelineConfig, precision: str) -> KeyFacts:
    """The facts outside the config that keys depend on: precision, the base model's content, what the
    remote data sources hold now and the source of the code the config names (a name that leads to no module
    is a ConfigError here, before any stage runs)."""
    named = {f: d for node in planned_nodes(cfg) for f, d in node.spec.loads_by_name(cfg).items()}
    code = named_code_digests(named)
    identity = identify_base(cfg.model)
    return KeyFacts(precision=precision, tokenizer_digest=identity.tokenizer_digest, model_digest=identity.model_digest,
                    source_versions=current_source_versions(cfg), named_code=code)


def keyed_digests(node: PlannedNode, manifests: dict[str, dict]) -> dict[str, str]:
    """What the node's key holds of each keyed upstream node: the digest of the files it reads from it
    (StageSpec.reads) or the whole manifest digest."""
    return {u: node.spec.upstream_digest(u, manifests[u]) for u in node.keyed_upstream}


def node_key(node: PlannedNode, cfg: PipelineConfig, facts: KeyFacts, manifests: dict[str, dict]) -> tuple[str, dict]:
    """(cache key, config slice) of a node once its keyed upstream manifests are known. The slice holds the
    source digest of any code the stage loads by a name from the config (StageSpec.loads_by_name)."""
    config = node.spec.keyed_on(cfg, facts)
    named = node.spec.loads_by_name(cfg)
    if named:
        missing = {f: d for f, d in named.items() if f not in facts.named_code}  # facts made without key_facts
        digests = {**facts.named_code, **named_code_digests(missing)}
        config = {**config, "code_loaded_by_name": {f: digests[f] for f in sorted(named)}}
    return stage_key(node.name, config, keyed_digests(node, manifests)), config


class SharedStoreUnreadable(Exception):
    """The shared store could not be read (credentials, network, a missing fsspec backend)."""


def describe_plan(cfg: PipelineConfig, precision: str, deep: bool = False, store=None) -> list[dict]:
    """Each node with its key and whether a valid manifest exists here (`cached`) and, with a shared store
    (components.shared_cache.SharedStageStore), there (`shared`: complete, incomplete, absent; None without a
    key). A node's key needs its upstream's manifests: complete here or, read without downloading a file,
    complete in the store, where a run would download them from; otherwise the node has no key yet."""
    facts = key_facts(cfg, precision)
    manifests: dict[str, dict] = {}
    rows = []
    for node in planned_nodes(cfg):
        row = {"stage": node.name, "kind": node.spec.kind, "summary": node.spec.summary, "shared": None}
        if any(u not in manifests for u in node.upstream):
            rows.append({**row, "key": None, "cached": False, "note": "after its upstream runs"})
            continue
        key, _ = node_key(node, cfg, facts, manifests)
        manifest = read_manifest(stage_dir(cfg.workspace, node.name, key))
        ok = verify_manifest(manifest, deep=deep)
        shared, stored = _stored_entry(store, node.name, key) if store is not None else (None, None)
        if ok:
            manifests[node.name] = manifest
        elif stored is not None:  # the digests a downstream key reads are the same in the stored manifest
            manifests[node.name] = stored
        note = "" if ok else "will download" if stored is not None else "will run"
        rows.append({**row, "key": key, "cached": ok, "shared": shared, "note": note})
    return rows


def _stored_entry(store, stage: str, key: str) -> tuple[str, dict | None]:
    try:
        return store.entry(stage, key)
    except Exception as exc:  # no credentials, no network, no s3fs: the caller decides what the plan is worth
        raise SharedStoreUnreadable(f"{type(exc).__name__}: {exc}") from exc
