"""The recommendation: the best method, batch shape, checkpointing and ZeRO stage that fit the hardware."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from components.planner.hardware import GiB, Inventory
from components.planner.memory import MemoryEstimate, Method, ModelShape, estimate_memory, model_shape


class PlanRequest(BaseModel):
    """What a plan is for: the answers of `lmforge plan`'s questions (or of the --ask endpoint)."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field("embedded:smollm2-135m-instruct", description="Base model: hub id, local directory or embedded:...")
    context_length: int = Field(2048, ge=64, le=131072, description="Tokens per training sequence.")
    tokens_per_step: int = Field(65536, ge=256, description="Target tokens per optimizer step (global batch).")
    method: Literal["auto", "full", "lora", "qlora"] = Field("auto", description="Fine-tuning method: auto, full, lora or qlora.")
    max_steps: int = Field(1000, ge=1, description="Optimizer steps of supervised fine-tuning.")


@dataclass
class Plan:
    request: PlanRequest
    inventory: Inventory
    shape: ModelShape
    method: Method
    precision: str
    micro_batch: int
    grad_accum: int
    gradient_checkpointing: bool
    zero_stage: int
    offload: bool
    lora_r: int
    estimate: MemoryEstimate
    budget_bytes: float
    alternatives: list[dict] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def tokens_per_step(self) -> int:
        return self.micro_batch * self.grad_accum * self.inventory.devices * self.request.context_length


def memory_budget(inventory: Inventory) -> float:
    """Bytes the tensors of one device may use: the CUDA context, workspaces and fragmentation take
    about 1 GiB plus 10% of a GPU; on CPU, 70% of RAM leaves room for the OS, data and Python."""
    if inventory.gpus:
        return 0.9 * inventory.device_memory_bytes - GiB
    return 0.7 * inventory.host_memory_bytes


def _zero_choice(method: Method, devices: int, allow_offload: bool) -> list[tuple[int, bool]]:
    """ZeRO settings to try, cheapest communication first. One device: none (ZeRO shards nothing
    there); several: stage 2 (every rank a data-parallel worker), then 3 (weights sharded too).
    Offload (slow steps) only when asked for as the last resort. 4-bit weights are not sharded by
    ZeRO-3 here, so QLoRA stays at stage 2."""
    if method == "qlora":
        return [(0, False)] if devices == 1 else [(2, False)]
    if not allow_offload:
        return [(0, False)] if devices == 1 else [(2, False), (3, False)]
    return [(2, True), (3, True)]


def _fit(shape: ModelShape, method: Method, inventory: Inventory, precision: str, seq_len: int, budget: float,
         lora_r: int, max_micro: int, allow_offload: bool = False) -> dict | None:
    """The largest micro-batch (a power of two up to max_micro) that fits, preferring no checkpointing
    while it allows at least a micro-batch of 4 (or max_micro); None when even one sequence does not fit."""
    devices = inventory.devices
    for stage, offload in _zero_choice(method, devices, allow_offload):
        if offload and not inventory.gpus:
            continue
        best = None
        for ckpt in (False, True):
            mb = 0
            m = 1
            while m <= max_micro:
                est = estimate_memory(shape, method, seq_len=seq_len, micro_batch=m, precision=precision,
                                      gradient_checkpointing=ckpt, lora_r=lora_r, zero_stage=stage,
                                      devices=devices, offload=offload)
                if est.total > budget:
                    break
                mb = m
                m *= 2
            if mb and (best is None or mb > best["micro_batch"]):
                best = {"micro_batch": mb, "gradient_checkpointing": ckpt}
            if mb >= min(4, max_micro):
                break  # fits well without recomputation: keep the faster setting
        if best:
            est = estimate_memory(shape, method, seq_len=seq_len, micro_batch=best["micro_batch"], precision=precision,
                                  gradient_checkpointing=best["gradient_checkpointing"], lora_r=lora_r,
                                  zero_stage=stage, devices=devices, offload=offload)
            if offload and est.offloaded / max(inventory.devices // inventory.nodes, 1) > 0.8 * inventory.host_memory_bytes:
                continue  # host RAM too small for what would be offloaded
            return {**best, "zero_stage": stage, "offload": offload, "estimate": est}
    return None


def make_plan(request: PlanRequest, inventory: Inventory, shape: ModelShape | None = None) -> Plan:
    """Pick method, batch shape, checkpointing and ZeRO stage for `request` on `inventory`.

    Methods are tried best quality first: full fine-tuning, LoRA on 16-bit weights, QLoRA on 4-bit
    weights (not on CPU: bitsandbytes' 4-bit kernels are slow there). A method qualifies when it fits
    at least two sequences per device; if none does, the first that fits one.
    """
    shape = shape or model_shape(request.model)
    on_gpu = bool(inventory.gpus)
    precision = ("bf16" if all(g.supports_bf16 for g in inventory.gpus) else "fp16") if on_gpu else "fp32"
    budget = memory_budget(inventory)
    seq = request.context_length
    # Sequences per step across devices; the micro-batch need not exceed this.
    global_seqs = max(1, math.ceil(request.tokens_per_step / seq))
    max_micro = min(64, 1 << max(0, (global_seqs // inventory.devices).bit_length() - 1)) if global_seqs >= inventory.devices else 1
    lora_r = 16
    if request.method != "auto":
        ladder: list[Method] = [request.method]
    elif on_gpu:
        ladder = ["full", "lora", "qlora"]
    else:
        # CPUs are compute-bound: LoRA skips the weight gradients and the optimizer over the whole model.
        ladder = ["lora", "full"]
    fits = {m: _fit(shape, m, inventory, precision, seq, budget, lora_r, max_micro) for m in ladder}
    if not any(fits.values()) and on_gpu:
        # Last resort: ZeRO offload to host RAM (fits, at several times slower steps).
        fits = {m: _fit(shape, m, inventory, precision, seq, budget, lora_r, max_micro, allow_offload=True)
                for m in ladder}
    enough = [m for m in ladder if fits[m] and fits[m]["micro_batch"] >= min(2, max_micro)]
    any_fit = [m for m in ladder if fits[m]]
    if not any_fit:
        need, least = min((estimate_memory(shape, m, seq_len=seq, micro_batch=1, precision=precision,
                                           gradient_checkpointing=True, lora_r=lora_r).total, m) for m in ladder)
        raise ValueError(f"{shape.name} does not fit {inventory.describe()} at {seq} tokens per sequence: "
                         f"{least} alone needs ~{need / GiB:.1f} GiB per device against a budget of "
                         f"{budget / GiB:.1f} GiB. Use a shorter context, more or larger GPUs, or a smaller model.")
    method = (enough or any_fit)[0]
    fit = fits[method]
    grad_accum = max(1, math.ceil(global_seqs / (fit["micro_batch"] * inventory.devices)))
    notes = []
    if not on_gpu:
        notes.append("CPU only: fp32 (CPU bf16 is emulated and far slower); expect ~100-300 tokens/s for a "
                     "135M model on 2 cores, so keep models small.")
        if shape.params > 2e9:
            notes.append(f"{shape.params / 1e9:.1f}B parameters on a CPU would take days per epoch: plan for a GPU server.")
    if fit["offload"]:
        notes.append(f"ZeRO-{fit['zero_stage']} offloads ~{fit['estimate'].offloaded / GiB:.0f} GiB per device to host "
                     "RAM; steps are slower but it fits.")
    if fit["gradient_checkpointing"]:
        notes.append("gradient checkpointing on: activations are recomputed in the backward pass (~1/3 more compute).")
    alternatives = []
    for m in ladder:
        f = fits[m]
        alternatives.append({"method": m, "fits": bool(f), "micro_batch": f["micro_batch"] if f else 0,
                             "zero_stage": f["zero_stage"] if f else None, "offload": f["offload"] if f else None,
                             "gib_per_device": f["estimate"].total / GiB if f else None})
    return Plan(request=request, inventory=inventory, shape=shape, method=method, precision=precision,
                micro_batch=fit["micro_batch"], grad_accum=grad_accum,
                gradient_checkpointing=fit["gradient_checkpointing"], zero_stage=fit["zero_stage"],
                offload=fit["offload"], lora_r=lora_r, estimate=fit["estimate"], budget_bytes=budget,
                alternatives=alternatives, notes=notes)
