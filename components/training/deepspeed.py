"""DeepSpeed ZeRO configs built from a training stage's config and the hardware.

ZeRO (Rajbhandari et al. 2020, "ZeRO: Memory Optimizations Toward Training Trillion Parameter
Models") shards what data parallelism otherwise copies onto every device:
- stage 2 shards the optimizer states and the gradients (each device keeps the weights);
- stage 3 also shards the weights, gathering each layer just before it runs;
- offload moves the sharded optimizer states (and at stage 3 the weights) to CPU RAM, where
  DeepSpeed's vectorised CPU Adam updates them.

Values the Hugging Face Trainer knows (micro-batch, accumulation, clipping, learning rate, the
hidden-size-based bucket sizes) are left as "auto": `TrainingArguments(deepspeed=config)` fills them,
so the DeepSpeed config never disagrees with the TrainConfig. Precision is written from the hardware
(bf16/fp16 are off on CPU), and the Trainer checks it against its own flags.
"""

from __future__ import annotations

from typing import Any

import torch

from components.config import TrainConfig
from components.models.loading import Hardware


def deepspeed_config(train_cfg: TrainConfig, hardware: Hardware, stage: int | None = None,
                     offload: bool | None = None) -> dict[str, Any]:
    """A DeepSpeed config dict for ZeRO stage 2 or 3, with or without CPU offload.

    `stage` and `offload` default to `train_cfg.deepspeed`. Without offload no optimizer section is
    written, so the Trainer builds the optimizer the TrainConfig names; offloading from a GPU uses
    DeepSpeed's own AdamW, whose vectorised CPU kernel is several times faster than torch's there.
    """
    stage = train_cfg.deepspeed.stage if stage is None else stage
    offload = train_cfg.deepspeed.offload if offload is None else offload
    if stage not in (2, 3):
        raise ValueError(f"DeepSpeed ZeRO stage must be 2 or 3 (0 means off, no config), not {stage!r}")
    on_gpu = hardware.device == "cuda"
    to_cpu = {"device": "cpu", "pin_memory": on_gpu}  # pinned host memory speeds copies to a GPU only

    zero: dict[str, Any] = {
        "stage": stage,
        "contiguous_gradients": True,
        "overlap_comm": on_gpu,  # overlaps NCCL reductions with the backward pass; nothing to overlap on CPU
        "reduce_bucket_size": "auto",  # hidden_size^2 (Trainer)
    }
    if stage == 2:
        zero.update(allgather_partitions=True, allgather_bucket_size=int(2e8), reduce_scatter=True)
        if offload:
            zero["offload_optimizer"] = dict(to_cpu)
    else:
        zero.update(
            stage3_prefetch_bucket_size="auto",  # 0.9 x hidden_size^2 (Trainer)
            stage3_param_persistence_threshold="auto",  # 10 x hidden_size: small tensors stay unsharded
            stage3_max_live_parameters=int(1e9),
            stage3_max_reuse_distance=int(1e9),
            # Saving gathers the full 16-bit weights on rank 0, so a checkpoint loads without DeepSpeed.
            stage3_gather_16bit_weights_on_model_save=True,
        )
        if offload:
            zero["offload_optimizer"] = dict(to_cpu)
            zero["offload_param"] = dict(to_cpu)

    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": "auto",
        "train_batch_size": "auto",  # micro-batch x accumulation x world size, known only at launch
        "gradient_clipping": "auto",
        "bf16": {"enabled": hardware.dtype == torch.bfloat16},
        # fp16 needs loss scaling; 0 means dynamic, starting at 2^16.
        "fp16": {"enabled": hardware.dtype == torch.float16, "loss_scale": 0, "initial_scale_power": 16,
                 "loss_scale_window": 1000, "hysteresis": 2, "min_loss_scale": 1},
        "zero_optimization": zero,
        # The Trainer's optimizer (Lion, GaLore, 8-bit Adam, ...) is not on DeepSpeed's tested list.
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,  # lmforge logs its own metrics; DeepSpeed's step log is noise
        "wall_clock_breakdown": False,
    }
    if offload and on_gpu:
        config["optimizer"] = {
            "type": "AdamW",
            "params": {"lr": "auto", "betas": "auto", "eps": "auto", "weight_decay": "auto"},
        }
    elif offload:
        # Without a GPU the optimizer runs on the CPU either way: keep the Trainer's own and skip
        # compiling DeepSpeed's CPU Adam extension (minutes on a small machine).
        config["zero_force_ds_cpu_optimizer"] = False
    return config


def stage_deepspeed_config(train_cfg: TrainConfig, hardware: Hardware) -> dict[str, Any] | None:
    """The stage's DeepSpeed config, or None when `train_cfg.deepspeed.stage` is 0 (DeepSpeed off)."""
    if train_cfg.deepspeed.stage == 0:
        return None
    return deepspeed_config(train_cfg, hardware)


def with_batch_sizes(config: dict[str, Any], train_cfg: TrainConfig, world_size: int) -> dict[str, Any]:
    """A copy of `config` with the batch-size "auto" values filled in for `world_size` ranks.

    The Trainer fills them too, but ZeRO-3 must know them earlier: `from_pretrained` builds the
    model already sharded (deepspeed.zero.Init), and DeepSpeed's config check there rejects "auto".
    """
    filled = {**config}
    micro, accum = train_cfg.batch_size, train_cfg.grad_accum
    for key, value in (("train_micro_batch_size_per_gpu", micro), ("gradient_accumulation_steps", accum),
                       ("train_batch_size", micro * accum * world_size)):
        if filled.get(key) == "auto":
            filled[key] = value
    return filled
