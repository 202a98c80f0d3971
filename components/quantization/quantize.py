"""Merge the adapters into the base, save merged safetensors, score and save bitsandbytes NF4 / int8 loads,
and export GGUF files for llama.cpp and Ollama.

The merged checkpoint is what gets registered as the model; every other variant is saved in its own folder of
the stage (`nf4/`, `int8/`, `gguf-q8_0/`, ...) and registered beside it. Each bitsandbytes load and each GGUF file
(reloaded by transformers, see GGUF_SCORING) is scored on the same held-out rows as the merged model, so the report
shows size and quality change side by side.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from components.artifacts import StageResult, atomic_dir, atomic_write_json
from components.config import EvaluateConfig, QuantizeConfig
from components.evaluation.evaluate import evaluate_model
from components.models.loading import Hardware, load_model, load_tokenizer, load_with_adapters, select_hardware
from components.pipeline import HELDOUT_READS, BaseModelRef
from components.quantization.gguf_export import check_exportable, export_gguf_variant, load_gguf_model

if TYPE_CHECKING:
    from components.config import PipelineConfig
    from components.pipeline import StageInputs

log = logging.getLogger(__name__)

# How a GGUF variant's quality change is measured here: llama.cpp is an optional source build, so the stage reloads
# the file in transformers. That keeps the weights' Q8_0/Q4_0 rounding but not llama.cpp's quantized activations
# (bench/gguf_quality.py measures llama.cpp itself where it is installed).
GGUF_SCORING = "transformers, GGUF weights dequantized to float"


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def merge_and_save(base: BaseModelRef, adapters: list[Path], hardware: Hardware, out: Path) -> Path:
    """Merge `adapters` into the base and save a standalone safetensors checkpoint with its tokenizer."""
    model = load_with_adapters(base.source, adapters, hardware, **base.load_kwargs())
    tokenizer = load_tokenizer(base.source, **base.load_kwargs())
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
    return out


def save_quantized(model, tokenizer, out: Path) -> Path:
    """Save a bitsandbytes-loaded model with its tokenizer: it reloads quantized, with no quantization config."""
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
    return out


def bnb_config(method: str):
    from transformers import BitsAndBytesConfig

    if method == "nf4":
        return BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.float32
        )
    if method == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    raise ValueError(f"unknown quantization method {method!r}; known: nf4, int8")


def metric_deltas(metrics: dict[str, float], reference: dict[str, float]) -> dict[str, float]:
    """Quantized minus merged, for the metrics a difference means something for: not the interval bounds
    (a difference of two bounds is no bound of the difference) and not the row counts or majority baselines."""

    def comparable(key: str) -> bool:
        name = key.rsplit("/", 1)[-1]
        return not name.endswith(("_ci_low", "_ci_high")) and name not in ("n", "majority_baseline")

    return {k: metrics[k] - reference[k] for k in metrics if k in reference and comparable(k)}


def run_quantize(
    base: BaseModelRef,
    adapters: list[Path],
    cfg: QuantizeConfig,
    eval_cfg: EvaluateConfig,
    hardware: Hardware,
    out_dir: Path,
    *,
    tokenized_dir: Path,
    aligned_dir: Path,
    template_name: str,
    system_prompt: str | None,
    model_name: str | None = None,
) -> StageResult:
    """Merge, score the merged model and each bitsandbytes load, save every variant, export GGUF (see module doc).
    `model_name` names the model inside the GGUF files."""
    out_dir = Path(out_dir)
    merged = merge_and_save(base, adapters, hardware, out_dir / "merged")
    if cfg.gguf:
        check_exportable(merged)  # before the scoring, which takes minutes
    tokenizer = load_tokenizer(str(merged))
    eval_kwargs = dict(
        tokenized_dir=tokenized_dir,
        aligned_dir=aligned_dir,
        cfg=eval_cfg,
        template_name=template_name,
        system_prompt=system_prompt,
        max_samples=cfg.eval_samples,
    )
    report: dict[str, dict] = {}
    model = load_model(str(merged), hardware)
    ref_metrics, _ = evaluate_model(model, tokenizer, **eval_kwargs)
    report["merged"] = {"bytes_on_disk": dir_bytes(merged), "memory_bytes": model.get_memory_footprint(), **ref_metrics}
    del model
    for method in cfg.methods:
        log.info("loading merged model in bitsandbytes %s", method)
        qmodel = load_model(str(merged), hardware, quantization_config=bnb_config(method))
        metrics, _ = evaluate_model(qmodel, tokenizer, **eval_kwargs)
        saved = save_quantized(qmodel, tokenizer, out_dir / method)
        report[method] = {"dir": method, "bytes_on_disk": dir_bytes(saved), "memory_bytes": qmodel.get_memory_footprint(),
                          **metrics, "delta": metric_deltas(metrics, ref_metrics)}
        del qmodel
    for kind in cfg.gguf:
        log.info("exporting GGUF %s and scoring it", kind)
        folder = f"gguf-{kind}"
        gguf_file, _ = export_gguf_variant(merged, out_dir / folder, kind, template=template_name,
                                           system_prompt=system_prompt, name=model_name)
        gmodel, _ = load_gguf_model(gguf_file, hardware)
        metrics, _ = evaluate_model(gmodel, tokenizer, **eval_kwargs)  # the merged tokenizer: only weights differ
        report[folder] = {"dir": folder, "bytes_on_disk": dir_bytes(out_dir / folder), "scored_with": GGUF_SCORING,
                          **metrics, "delta": metric_deltas(metrics, ref_metrics)}
        del gmodel
    atomic_write_json(out_dir / "quantization_report.json", report)

    flat: dict[str, float] = {}
    for variant, entry in report.items():
        # Overall metrics only: the per-task ones (task/<name>/...) stay in quantization_report.json.
        for k, v in entry.items():
            if isinstance(v, (int, float)) and "/" not in k:
                flat[f"{variant}_{k}"] = float(v)
        for k, v in entry.get("delta", {}).items():
            if "/" not in k:
                flat[f"{variant}_delta_{k}"] = float(v)
    variants = {name: {"dir": e["dir"], "bytes_on_disk": e["bytes_on_disk"]} for name, e in report.items()
                if name != "merged"}
    files = [str(p.relative_to(out_dir)) for d in ("merged", *(v["dir"] for v in variants.values()))
             for p in (out_dir / d).rglob("*") if p.is_file()]
    files.append("quantization_report.json")
    return StageResult(files=files, reports=["quantization_report.json"], metrics=flat, info={"merged_dir": "merged", "variants": variants})


def quantize_stage(cfg: PipelineConfig, inputs: StageInputs, out_dir: Path) -> StageResult:
    """Stage entry point (see components.pipeline)."""
    stack = inputs.adapter_stack()
    result = run_quantize(
        inputs.base_model, stack, cfg.quantize, cfg.evaluate,
        select_hardware(cfg.compute.device, cfg.compute.precision), out_dir,
        tokenized_dir=inputs.dir("tokenize", reading=HELDOUT_READS["tokenize"]),
        aligned_dir=inputs.dir("align", reading=HELDOUT_READS["align"]),
        template_name=cfg.tokenize.template, system_prompt=cfg.tokenize.system_prompt,
        model_name=f"{cfg.model.base.rsplit('/', 1)[-1].rsplit(':', 1)[-1]} (lmforge)",
    )
    result.info["merged_adapters"] = [str(p) for p in stack]  # lineage: what the merged model is made of
    return result
