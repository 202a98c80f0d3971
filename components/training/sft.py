"""Continued pretraining and supervised fine-tuning stages: LoRA on tokenized, packed data.

CPT trains a LoRA adapter on plain-text blocks (every token labeled). SFT merges the CPT adapter
(if any) into the base and trains a fresh adapter on conversations with the loss on completions only
(the labels written by the tokenize stage). Both write `adapter/` and a training curve.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import TYPE_CHECKING

from components.artifacts import StageResult
from components.config import ConfigError, ModelConfig, TrainConfig
from components.data.tokenize import load_tokenized
from components.errors import StageInputError
from components.models.loading import Hardware, load_tokenizer, load_with_adapters, select_hardware
from components.stage_contract import BaseModelRef
from components.training.lora import MetricsSink, run_lora_training

if TYPE_CHECKING:
    from components.config import PipelineConfig
    from components.stage_contract import StageInputs

log = logging.getLogger(__name__)


def run_adapter_stage(
    model_cfg: ModelConfig,
    base: BaseModelRef,
    below: list[Path],
    train_file: Path,
    cfg: TrainConfig,
    hardware: Hardware,
    out_dir: Path,
    *,
    metrics_sink: MetricsSink | None = None,
    ordered: bool = False,
) -> StageResult:
    """Train one LoRA adapter on `train_file` over the base with the adapters in `below` merged in;
    `ordered` reads the rows in file order (a curriculum) instead of shuffled."""
    if not train_file.is_file():
        raise FileNotFoundError(f"tokenized training data {train_file} is missing; rerun the tokenize stage")
    dataset = load_tokenized(train_file)
    if len(dataset) == 0:
        raise ValueError(f"tokenized training data {train_file} has no rows; check the alignment report")
    tokenizer = load_tokenizer(base.source, **base.load_kwargs())
    model = load_with_adapters(base.source, below, hardware, **base.load_kwargs(),
                               attn_implementation=model_cfg.attn_implementation)
    log.info("training on %d rows from %s", len(dataset), train_file.name)
    result = run_lora_training(model, tokenizer, dataset, cfg, hardware, out_dir, metrics_sink=metrics_sink,
                               ordered=ordered)
    result.metrics["train_rows"] = float(len(dataset))
    return result


# The tokenized group each training kind learns from.
TRAIN_GROUP = {"cpt": "cpt", "sft": "sft"}
GROUP_WHAT = {"cpt": "plain-text", "sft": "instruction or conversation"}


def train_stage(cfg: PipelineConfig, inputs: StageInputs, out_dir: Path) -> StageResult:
    """Stage entry point for cpt and sft (see components.pipeline): one adapter over the stack below.

    A rerun after a crash resumes from the last complete checkpoint in `out_dir`.
    """
    group = TRAIN_GROUP[inputs.kind]
    if not getattr(cfg.data, group):  # the data groups start empty: a stage left on needs its own datasets
        raise StageInputError(f"{inputs.kind} is enabled but data.{group} names no dataset: list your "
                              f"{GROUP_WHAT[group]} datasets under data.{group}, or set {inputs.kind}.enabled: false")
    base = inputs.base_model
    below = inputs.adapter_stack()
    hardware = select_hardware(cfg.compute.device, cfg.compute.precision)
    train_cfg: TrainConfig = getattr(cfg, inputs.kind)
    train_file = inputs.file("tokenize", f"{group}.parquet")
    # A curriculum lives in the order of sft.parquet's rows, which its digest (this stage's key) covers.
    ordered = inputs.kind == "sft" and bool(cfg.data.sft_phases)
    launcher = stage_launcher(cfg, train_cfg)
    if ordered:
        check_curriculum_steps(_row_count(train_file), train_cfg, launched_ranks(cfg) if launcher else 1)
    if launcher:
        result = _launch(launcher, cfg, inputs, base, below, train_file, train_cfg, hardware, Path(out_dir),
                         ordered=ordered)
    else:
        result = run_adapter_stage(cfg.model, base, below, train_file, train_cfg, hardware, Path(out_dir),
                                   metrics_sink=inputs.metrics, ordered=ordered)
    # Enough for `lmforge chat <stage dir>` and later stages to rebuild the model: base plus adapters.
    result.info.update(base_source=base.source, base_revision=base.revision,
                       adapter_stack=[*map(str, below), str(Path(out_dir).resolve() / "adapter")])
    return result


def check_curriculum_steps(rows: int, cfg: TrainConfig, ranks: int = 1) -> None:
    """A curriculum (data.sft_phases) is one pass over rows in order: fewer steps would never reach the
    last phase's rows, more would start again at the first phase. Fail before training, with the number."""
    per_step = cfg.batch_size * cfg.grad_accum * ranks
    needed = math.ceil(rows / per_step)
    if cfg.max_steps != needed:
        what = ("stops before the last phase's rows" if cfg.max_steps < needed
                else "would start over at the first phase after the last")
        raise ConfigError(f"data.sft_phases trains sft.parquet's {rows} rows once, in order, at {per_step} rows a "
                          f"step (batch_size x grad_accum{' x GPUs' if ranks > 1 else ''}); sft.max_steps="
                          f"{cfg.max_steps} {what}. Set sft.max_steps={needed}, or change the phases' weights")


def _row_count(path: Path) -> int:
    import pyarrow.parquet as pq

    return pq.ParquetFile(path).metadata.num_rows


def _visible_gpus() -> int:
    import torch

    return max(torch.cuda.device_count(), 1)


def stage_launcher(cfg: PipelineConfig, train_cfg: TrainConfig) -> str | None:
    """The launcher a cpt/sft stage trains under: deepspeed (ZeRO-2/3), torchrun (compute.distributed ddp)
    or None (in this process)."""
    if train_cfg.deepspeed.stage > 0:
        return "deepspeed"
    return "torchrun" if cfg.compute.distributed == "ddp" else None


def launched_ranks(cfg: PipelineConfig) -> int:
    """Ranks of a launched stage: compute.num_gpus (every visible GPU, or 1 on CPU, when null) per node."""
    return (cfg.compute.num_gpus or _visible_gpus()) * (cfg.compute.num_nodes or 1)


def _launch(launcher: str, cfg: PipelineConfig, inputs: StageInputs, base: BaseModelRef, below: list[Path],
            train_file: Path, train_cfg: TrainConfig, hardware: Hardware, out_dir: Path,
            *, ordered: bool = False) -> StageResult:
    """The same training as ranks under a launcher, in its own process group: DeepSpeed (ZeRO-2/3 on one GPU,
    several, or several nodes: compute.num_gpus / num_nodes / hostfile) or torchrun (DDP on this node)."""
    import os

    from components.training.deepspeed import stage_deepspeed_config
    from components.training.launch import TrainingJob, launch_training

    job = TrainingJob(
        base_model=base.source, revision=base.revision, trust_remote_code=base.trust_remote_code,
        attn_implementation=cfg.model.attn_implementation, adapters_below=[str(p) for p in below],
        train_file=str(train_file), train_config=train_cfg.model_dump(mode="json"), out_dir=str(out_dir),
        device=cfg.compute.device, precision=cfg.compute.precision, ordered=ordered,
        deepspeed=stage_deepspeed_config(train_cfg, hardware) if launcher == "deepspeed" else None,
    )
    threads = cfg.compute.threads
    if hardware.device == "cpu" and threads is None:  # the ranks share this node's cores
        threads = max(1, (os.cpu_count() or 1) // (cfg.compute.num_gpus or 1))
    run = inputs.run
    return launch_training(job, launcher=launcher, num_gpus=cfg.compute.num_gpus, num_nodes=cfg.compute.num_nodes,
                           hostfile=Path(cfg.compute.hostfile) if cfg.compute.hostfile else None,
                           mlflow_run_id=inputs.stage_run_id, tracking_uri=run.tracking_uri if run else None,
                           threads_per_rank=threads)
