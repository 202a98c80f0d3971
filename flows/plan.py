"""The stage graph as data: each stage's key inputs and upstream stages.

Both the flow and `lmforge stages` walk this plan, so what the CLI says is cached is exactly what the
flow will reuse. Keys need upstream manifest digests, so the walk is sequential: a stage whose
upstream is not on disk yet has no key until that upstream runs.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from components.artifacts import read_manifest, stage_dir, verify_manifest
from components.config import STAGES, PipelineConfig
from components.data.records import GROUP_KINDS
from tasks.keys import file_fingerprint, stage_key


@dataclass(frozen=True)
class PlannedStage:
    name: str  # unique node name, e.g. "evaluate-base"
    stage: str  # the stage kind used by --from/--only
    upstream: tuple[str, ...]


def planned_stages(cfg: PipelineConfig) -> list[PlannedStage]:
    adapters = tuple(s for s in ("cpt", "sft") if getattr(cfg, s).enabled)
    nodes = [
        PlannedStage("fetch", "fetch", ()),
        PlannedStage("align", "align", ("fetch",)),
        PlannedStage("tokenize", "tokenize", ("align",)),
    ]
    if cfg.cpt.enabled:
        nodes.append(PlannedStage("cpt", "cpt", ("tokenize",)))
    if cfg.sft.enabled:
        nodes.append(PlannedStage("sft", "sft", ("tokenize", *(("cpt",) if cfg.cpt.enabled else ()))))
    nodes.append(PlannedStage("evaluate-base", "evaluate", ("tokenize", "align")))
    nodes.append(PlannedStage("evaluate-adapted", "evaluate", ("tokenize", "align", *adapters)))
    if cfg.quantize.enabled:
        nodes.append(PlannedStage("quantize", "quantize", ("tokenize", "align", *adapters)))
        nodes.append(PlannedStage("register", "register", ("quantize", "evaluate-adapted", "evaluate-base")))
    return nodes


def _shown(path: Path, base: Path) -> str:
    """A source path as the key records it: relative to the dataset_info.json when below it, else absolute."""
    return str(path.relative_to(base)) if path.is_relative_to(base) else str(path)


def _source_fingerprints(cfg: PipelineConfig) -> dict:
    """What the fetch key depends on: the description file and the content of every local source."""
    from components.data.dataset_info import load_dataset_info

    info_path = Path(cfg.data.dataset_info)
    names = sorted({n for g in GROUP_KINDS for n in getattr(cfg.data, g)})
    specs = load_dataset_info(info_path, names)
    out: dict[str, object] = {"dataset_info": file_fingerprint(info_path)}
    for name, spec in specs.items():
        entry = spec.model_dump(mode="json")
        if spec.load_from == "hf_hub":  # how a hub dataset is saved (parquet, or JSONL when streamed)
            entry["streaming"] = cfg.data.streaming
        if spec.file_name:
            base = info_path.parent / spec.file_name
            paths = sorted(p for p in base.rglob("*") if p.is_file()) if base.is_dir() else [base]
            entry["content"] = {_shown(p, info_path.parent): file_fingerprint(p) for p in paths if p.exists()}
        out[name] = entry
    return out


def stage_config(cfg: PipelineConfig, node: PlannedStage, hardware_precision: str) -> dict:
    """The resolved configuration that determines a stage's output (and so its key)."""
    model = cfg.model.model_dump(mode="json")
    template = {"template": cfg.tokenize.template, "system_prompt": cfg.tokenize.system_prompt}
    if node.stage == "fetch":
        return {"sources": _source_fingerprints(cfg)}
    if node.stage == "align":
        return {"data": cfg.data.model_dump(mode="json", exclude={"dataset_info", "num_proc", "streaming"})}
    if node.stage == "tokenize":
        # num_proc changes how fast, not what: left out so it does not invalidate the data and training.
        return {"tokenize": cfg.tokenize.model_dump(mode="json", exclude={"num_proc"}), "model": model}
    if node.stage in ("cpt", "sft"):
        return {"train": getattr(cfg, node.stage).model_dump(mode="json"), "model": model,
                "precision": hardware_precision}
    if node.stage == "evaluate":
        return {"evaluate": cfg.evaluate.model_dump(mode="json"), "model": model, **template,
                "precision": hardware_precision}
    if node.stage == "quantize":
        return {"quantize": cfg.quantize.model_dump(mode="json"), "evaluate": cfg.evaluate.model_dump(mode="json"),
                "model": model, **template}
    if node.stage == "register":
        return {"registry": cfg.registry.model_dump(mode="json"), "tracking": cfg.tracking.model_dump(mode="json")}
    raise ValueError(f"unknown stage {node.stage}")


def describe_plan(cfg: PipelineConfig, hardware_precision: str) -> list[dict]:
    """Each stage with its key (when its upstream is on disk) and whether a valid manifest exists."""
    digests: dict[str, str] = {}
    rows = []
    for node in planned_stages(cfg):
        if any(u not in digests for u in node.upstream):
            rows.append({"stage": node.name, "key": None, "cached": False, "note": "upstream not computed yet"})
            continue
        key = stage_key(node.name, node.stage, stage_config(cfg, node, hardware_precision), {u: digests[u] for u in node.upstream})
        manifest = read_manifest(stage_dir(cfg.workspace, node.name, key))
        ok = verify_manifest(manifest)
        if ok:
            digests[node.name] = manifest["digest"]
        rows.append({"stage": node.name, "key": key, "cached": ok, "note": "" if ok else "will run"})
    return rows


def validate_stage(name: str | None) -> None:
    if name is not None and name not in STAGES:
        raise ValueError(f"unknown stage {name!r}; stages: {', '.join(STAGES)}")
