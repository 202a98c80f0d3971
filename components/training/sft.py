"""Continued pretraining and supervised fine-tuning stages: LoRA on tokenized, packed data.

CPT trains a LoRA adapter on plain-text blocks (every token labeled). SFT merges the CPT adapter
(if any) into the base and trains a fresh adapter on conversations with the loss on completions only
(the labels written by the tokenize stage). Both write `adapter/` and a training curve.
"""

from __future__ import annotations

import logging
from pathlib import Path

from components.artifacts import StageResult
from components.config import ModelConfig, TrainConfig
from components.data.tokenize import load_tokenized
from components.models.loading import Hardware, load_tokenizer, load_with_adapters
from components.training.lora import MetricsSink, run_lora_training

log = logging.getLogger(__name__)


def run_adapter_stage(
    model_cfg: ModelConfig,
    base_source: str,
    below: list[Path],
    train_file: Path,
    cfg: TrainConfig,
    hardware: Hardware,
    out_dir: Path,
    *,
    metrics_sink: MetricsSink | None = None,
) -> StageResult:
    """Train one LoRA adapter on `train_file` over the base with the adapters in `below` merged in."""
    if not train_file.is_file():
        raise FileNotFoundError(f"tokenized training data {train_file} is missing; rerun the tokenize stage")
    dataset = load_tokenized(train_file)
    if len(dataset) == 0:
        raise ValueError(f"tokenized training data {train_file} has no rows; check the alignment report")
    tokenizer = load_tokenizer(base_source, revision=model_cfg.revision, trust_remote_code=model_cfg.trust_remote_code)
    model = load_with_adapters(
        base_source,
        below,
        hardware,
        revision=model_cfg.revision,
        trust_remote_code=model_cfg.trust_remote_code,
        attn_implementation=model_cfg.attn_implementation,
    )
    log.info("training on %d rows from %s", len(dataset), train_file.name)
    result = run_lora_training(model, tokenizer, dataset, cfg, hardware, out_dir, metrics_sink=metrics_sink)
    result.metrics["train_rows"] = float(len(dataset))
    return result
