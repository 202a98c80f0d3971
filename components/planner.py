"""`lmforge plan`: which fine-tuning method, batch shape and ZeRO stage fit a model on some hardware.

The estimate follows the memory anatomy of training (Rajbhandari et al. 2020, "ZeRO: Memory
Optimizations Toward Training Trillion Parameter Models", section 3.1): weights + gradients +
optimizer states + activations, each sharded by the ZeRO stage over the data-parallel devices.

- Full fine-tuning with mixed-precision AdamW: 2 bytes of 16-bit weights + 2 of 16-bit gradients +
  12 of fp32 master weights and the two Adam moments = 16 bytes per parameter (ZeRO's 2 + 2 + K with
  K = 12). In plain fp32 (our CPUs): 4 + 4 + 8 = 16 bytes as well.
- LoRA (Hu et al. 2021): the frozen base costs only its weights (2 bytes per parameter in bf16,
  4 in fp32); the adapters (r x (in + out) per adapted linear, kept in fp32 by PEFT) cost 16 bytes
  per adapter parameter: weight, gradient and two moments.
- QLoRA (Dettmers et al. 2023): NF4 stores the frozen linear weights in 4 bits (0.5 byte per
  parameter) plus one fp32 absmax per 64-weight block (0.5 bit per weight), which double quantization
  brings to about 8 bits per 256 weights; embeddings and norms stay 16-bit; adapters as in LoRA.
- Activations (Korthikanti et al. 2022, "Reducing Activation Recomputation in Large Transformer
  Models", section 4.1, which counts the tensors a GPT layer saves for its backward pass: 34 x s x b
  x h bytes without the attention matrix). Counted the same way, tensor by tensor, for a Llama-style
  layer as Hugging Face runs it with a fused attention kernel (no s x s matrix kept), per token:
  the layer input; per RMSNorm its normalized input and its output (2h, twice); q after RoPE and k, v
  repeated to all heads for grouped-query attention (3h); the attention output and the o_proj input
  (2h); the residual (h); and the four SwiGLU tensors (gate, SiLU(gate), up, their product: 4I):
  11h + 4I elements. The backward pass adds one layer's worth of gradients in flight. With gradient
  checkpointing each layer keeps only its input (h per token), plus one layer recomputed at a time.
  The loss adds the logits and their log-softmax in fp32 (8 bytes x vocab per token).

The estimate is what the tensors need; the planner keeps a margin on top of it for the CUDA context,
kernels' workspaces and allocator fragmentation (about 1 GiB plus 10% of the device).
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

log = logging.getLogger(__name__)

GiB = 1 << 30
Method = Literal["full", "lora", "qlora"]


# --- the hardware ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class Gpu:
    name: str
    memory_bytes: int
    compute_capability: tuple[int, int] = (8, 0)

    @property
    def supports_bf16(self) -> bool:
        return self.compute_capability >= (8, 0)  # Ampere and later


@dataclass(frozen=True)
class Inventory:
    """What training can use on one node: its GPUs (none: CPU only) and its RAM; `nodes` alike nodes."""

    gpus: tuple[Gpu, ...] = ()
    host_memory_bytes: int = 0
    nodes: int = 1

    @property
    def devices(self) -> int:
        return max(len(self.gpus), 1) * self.nodes

    @property
    def device_memory_bytes(self) -> int:
        """Memory of the smallest device: every rank holds the same shard."""
        return min(g.memory_bytes for g in self.gpus) if self.gpus else self.host_memory_bytes

    def describe(self) -> str:
        if not self.gpus:
            return f"CPU only, {self.host_memory_bytes / GiB:.0f} GiB RAM"
        names = sorted({g.name for g in self.gpus})
        per_node = f"{len(self.gpus)}x {'/'.join(names)} ({self.device_memory_bytes / GiB:.0f} GiB)"
        return per_node + (f" on each of {self.nodes} nodes" if self.nodes > 1 else "") + \
            f", {self.host_memory_bytes / GiB:.0f} GiB RAM"


def host_memory_bytes() -> int:
    """Total RAM: psutil when installed, else the POSIX page count."""
    try:
        import psutil

        return int(psutil.virtual_memory().total)
    except ImportError:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def detect_inventory() -> Inventory:
    """GPUs through NVML (nvidia-ml-py); no driver, library or GPU: CPU only."""
    gpus: list[Gpu] = []
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            for i in range(pynvml.nvmlDeviceGetCount()):
                handle = pynvml.nvmlDeviceGetHandleByIndex(i)
                name = pynvml.nvmlDeviceGetName(handle)
                gpus.append(Gpu(
                    name=name.decode() if isinstance(name, bytes) else str(name),
                    memory_bytes=int(pynvml.nvmlDeviceGetMemoryInfo(handle).total),
                    compute_capability=tuple(pynvml.nvmlDeviceGetCudaComputeCapability(handle)),
                ))
        finally:
            pynvml.nvmlShutdown()
    except Exception as exc:  # ImportError, NVMLError (no driver / no GPU): plan for the CPU
        log.debug("no GPU through NVML (%s); planning for the CPU", exc)
    return Inventory(gpus=tuple(gpus), host_memory_bytes=host_memory_bytes())


def parse_gpus(spec: str, host_memory_gib: float = 256) -> Inventory:
    """An inventory from text, for planning another server: '8x80' (8 GPUs of 80 GiB), '1x24',
    '2x8x80' (2 nodes of 8), 'cpu'."""
    if spec.strip().lower() == "cpu":
        return Inventory(host_memory_bytes=int(host_memory_gib * GiB))
    parts = spec.lower().replace("gib", "").replace("gb", "").split("x")
    try:
        numbers = [float(p) for p in parts]
    except ValueError:
        raise ValueError(f"--gpus {spec!r}: write COUNTxGIB (8x80), NODESxCOUNTxGIB (2x8x80) or cpu") from None
    if len(numbers) == 2:
        numbers.insert(0, 1)
    if len(numbers) != 3 or min(numbers) <= 0:
        raise ValueError(f"--gpus {spec!r}: write COUNTxGIB (8x80), NODESxCOUNTxGIB (2x8x80) or cpu")
    nodes, count, gib = int(numbers[0]), int(numbers[1]), numbers[2]
    gpu = Gpu(name="GPU", memory_bytes=int(gib * GiB))
    return Inventory(gpus=(gpu,) * count, host_memory_bytes=int(host_memory_gib * GiB), nodes=nodes)


# --- the model ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ModelShape:
    """The few numbers of a decoder-only transformer's config.json that memory depends on."""

    name: str
    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    vocab: int
    tied_embeddings: bool

    @property
    def kv_dim(self) -> int:
        return self.hidden // self.heads * self.kv_heads

    @property
    def linear_params_per_layer(self) -> int:
        h, kv, i = self.hidden, self.kv_dim, self.intermediate
        return h * h * 2 + h * kv * 2 + 3 * h * i  # q, o; k, v; gate, up, down

    @property
    def embedding_params(self) -> int:
        return self.vocab * self.hidden * (1 if self.tied_embeddings else 2)

    @property
    def params(self) -> int:
        norms = self.layers * 2 * self.hidden + self.hidden
        return self.layers * self.linear_params_per_layer + self.embedding_params + norms

    def lora_params(self, r: int) -> int:
        """Adapter parameters with LoRA rank r on every linear layer of the decoder ('all-linear')."""
        h, kv, i = self.hidden, self.kv_dim, self.intermediate
        in_out = [(h, h), (h, kv), (h, kv), (h, h), (h, i), (h, i), (i, h)]
        return self.layers * sum(r * (a + b) for a, b in in_out)


# Published config.json values of common bases, for planning offline or before downloading.
# Keys: the hub id's name, lower case, without the organisation and '-instruct'.
KNOWN_MODELS: dict[str, dict[str, Any]] = {
    # Qwen/Qwen2.5-*: huggingface.co/Qwen/Qwen2.5-{0.5B,1.5B,7B}/blob/main/config.json
    "qwen2.5-0.5b": dict(layers=24, hidden=896, intermediate=4864, heads=14, kv_heads=2, vocab=151936, tied_embeddings=True),
    "qwen2.5-1.5b": dict(layers=28, hidden=1536, intermediate=8960, heads=12, kv_heads=2, vocab=151936, tied_embeddings=True),
    "qwen2.5-7b": dict(layers=28, hidden=3584, intermediate=18944, heads=28, kv_heads=4, vocab=152064, tied_embeddings=False),
    # meta-llama/Llama-3.1-8B
    "llama-3.1-8b": dict(layers=32, hidden=4096, intermediate=14336, heads=32, kv_heads=8, vocab=128256, tied_embeddings=False),
    # mistralai/Mistral-7B-v0.3 (v0.1 has a 32000-token vocabulary)
    "mistral-7b-v0.3": dict(layers=32, hidden=4096, intermediate=14336, heads=32, kv_heads=8, vocab=32768, tied_embeddings=False),
    "mistral-7b-v0.1": dict(layers=32, hidden=4096, intermediate=14336, heads=32, kv_heads=8, vocab=32000, tied_embeddings=False),
    # HuggingFaceTB/SmolLM2-*
    "smollm2-135m": dict(layers=30, hidden=576, intermediate=1536, heads=9, kv_heads=3, vocab=49152, tied_embeddings=True),
    "smollm2-360m": dict(layers=32, hidden=960, intermediate=2560, heads=15, kv_heads=5, vocab=49152, tied_embeddings=True),
    "smollm2-1.7b": dict(layers=24, hidden=2048, intermediate=8192, heads=32, kv_heads=32, vocab=49152, tied_embeddings=True),
}


def _table_key(model: str) -> str:
    name = model.split(":", 1)[-1].rstrip("/").split("/")[-1].lower()
    return name.replace("-instruct", "").replace("meta-llama-", "llama-")


def shape_from_config(name: str, config: dict) -> ModelShape:
    """A ModelShape from a config.json dict (Llama, Qwen2, Mistral and alike naming)."""
    text = config.get("text_config", config)
    try:
        heads = text["num_attention_heads"]
        return ModelShape(
            name=name, layers=text["num_hidden_layers"], hidden=text["hidden_size"],
            intermediate=text.get("intermediate_size", 4 * text["hidden_size"]), heads=heads,
            kv_heads=text.get("num_key_value_heads") or heads, vocab=text["vocab_size"],
            tied_embeddings=bool(config.get("tie_word_embeddings", text.get("tie_word_embeddings", False))),
        )
    except KeyError as exc:
        raise ValueError(f"{name}: config.json has no {exc.args[0]!r}; the planner reads decoder-only "
                         "transformer configs (num_hidden_layers, hidden_size, num_attention_heads, vocab_size)") from None


def model_shape(model: str) -> ModelShape:
    """The shape of `model`: a local directory's config.json, else the built-in table of common bases."""
    path = Path(model)
    if (path / "config.json").is_file():
        return shape_from_config(path.name, json.loads((path / "config.json").read_text()))
    key = _table_key(model)
    if key in KNOWN_MODELS:
        return ModelShape(name=model, **KNOWN_MODELS[key])
    raise ValueError(f"unknown model {model!r}: give a local model directory (with config.json) or one of "
                     + ", ".join(sorted(KNOWN_MODELS)))


# --- the estimate ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes one device holds while training, by part (see the module docstring for the formulas)."""

    weights: float
    gradients: float
    optimizer: float
    activations: float
    offloaded: float = 0.0  # moved to host RAM by ZeRO offload, not in `total`

    @property
    def total(self) -> float:
        return self.weights + self.gradients + self.optimizer + self.activations


def bytes_per_element(precision: str) -> int:
    return 4 if precision == "fp32" else 2


def activation_bytes(shape: ModelShape, seq_len: int, micro_batch: int, precision: str,
                     gradient_checkpointing: bool) -> float:
    """Activations kept for the backward pass of one micro-batch (Korthikanti et al. 2022, counted
    for a Llama-style layer with a fused attention kernel), plus the fp32 logits and log-softmax."""
    tokens = seq_len * micro_batch
    elem = bytes_per_element(precision)
    per_layer_per_token = elem * (11 * shape.hidden + 4 * shape.intermediate)
    backward_in_flight = tokens * per_layer_per_token
    if gradient_checkpointing:
        kept = tokens * (shape.layers * elem * shape.hidden + per_layer_per_token)
    else:
        kept = tokens * shape.layers * per_layer_per_token
    logits = tokens * shape.vocab * 8
    return float(kept + backward_in_flight + logits)


def estimate_memory(shape: ModelShape, method: Method, *, seq_len: int, micro_batch: int, precision: str = "bf16",
                    gradient_checkpointing: bool = False, lora_r: int = 16, zero_stage: int = 0,
                    devices: int = 1, offload: bool = False) -> MemoryEstimate:
    """Per-device training memory of `method` (full / lora / qlora) under a ZeRO stage over `devices`.

    ZeRO-2 divides gradients and optimizer states by the device count, ZeRO-3 also the weights;
    offload moves the optimizer states (and at stage 3 the weights) to host RAM.
    """
    elem = bytes_per_element(precision)
    n = shape.params
    if method == "full":
        weights, trained = elem * n, n
        grads = elem * trained
        # Mixed precision keeps an fp32 master copy (4 bytes) beside Adam's two fp32 moments (8 bytes).
        optim = (8 + (4 if elem == 2 else 0)) * trained
    else:
        adapters = shape.lora_params(lora_r)
        if method == "lora":
            frozen = elem * n
        else:  # qlora: 4-bit linear weights + double-quantized block constants; the rest stays 16-bit
            linear = shape.layers * shape.linear_params_per_layer
            frozen = linear * (0.5 + 1 / 256) + max(elem, 2) * (n - linear)
        weights = frozen + 4 * adapters
        grads, optim = 4 * adapters, 8 * adapters
    shard = max(devices, 1)
    if zero_stage >= 2:
        grads, optim = grads / shard, optim / shard
    if zero_stage >= 3:
        weights = weights / shard
    offloaded = 0.0
    if offload and zero_stage >= 2:
        offloaded += optim
        optim = 0.0
        if zero_stage >= 3:
            offloaded += weights
            weights = 0.0
    acts = activation_bytes(shape, seq_len, micro_batch, precision, gradient_checkpointing)
    return MemoryEstimate(weights=float(weights), gradients=float(grads), optimizer=float(optim),
                          activations=acts, offloaded=float(offloaded))


# --- the plan -------------------------------------------------------------------------------------

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


# --- writing it out -------------------------------------------------------------------------------

LEARNING_RATE = {"full": 1e-5, "lora": 2e-4, "qlora": 2e-4}  # full fine-tuning moves every weight: 10-20x lower


def plan_config(plan: Plan, workspace: str = ".lmforge") -> dict:
    """The plan as a pipeline config dict (validates as components.config.PipelineConfig)."""
    from components.config import TrainConfig

    r = plan.request
    train: dict[str, Any] = {
        "max_steps": r.max_steps,
        "batch_size": plan.micro_batch,
        "grad_accum": plan.grad_accum,
        "learning_rate": LEARNING_RATE[plan.method],
        "gradient_checkpointing": plan.gradient_checkpointing,
        "save_steps": max(1, min(500, r.max_steps // 5)),
        "lora": {"r": plan.lora_r, "alpha": 2 * plan.lora_r, "target_modules": "all-linear"},
        "deepspeed": {"stage": plan.zero_stage, "offload": plan.offload},
    }
    if "finetuning" in TrainConfig.model_fields:
        train["finetuning"] = plan.method
    cpt = {**copy.deepcopy(train), "max_steps": max(1, r.max_steps // 3)}
    cpt["save_steps"] = max(1, min(500, cpt["max_steps"] // 5))
    return {
        "workspace": workspace,
        "model": {"base": r.model},
        "tokenize": {"cutoff_len": r.context_length, "cpt_block_size": r.context_length},
        "cpt": cpt,
        "sft": train,
        "compute": {"device": "cuda" if plan.inventory.gpus else "cpu", "precision": plan.precision},
    }


def plan_rows(plan: Plan) -> list[tuple[str, str]]:
    """(setting, value) rows of the plan for a table."""
    est = plan.estimate
    rows = [
        ("model", f"{plan.shape.name} ({plan.shape.params / 1e9:.2f}B parameters)"),
        ("hardware", plan.inventory.describe()),
        ("method", plan.method + ("" if plan.method == "full" else f" (r={plan.lora_r}, all linear layers)")),
        ("precision", plan.precision),
        ("ZeRO", "off" if plan.zero_stage == 0 else f"stage {plan.zero_stage}" + (" + CPU offload" if plan.offload else "")),
        ("micro-batch x accumulation x devices",
         f"{plan.micro_batch} x {plan.grad_accum} x {plan.inventory.devices}"),
        ("tokens per step", f"{plan.tokens_per_step:,} (target {plan.request.tokens_per_step:,}, "
                            f"{plan.request.context_length} per sequence)"),
        ("gradient checkpointing", "on" if plan.gradient_checkpointing else "off"),
        ("memory per device (est.)", f"{est.total / GiB:.1f} GiB of {plan.budget_bytes / GiB:.1f} GiB usable"),
        ("  weights / grads / optimizer", f"{est.weights / GiB:.2f} / {est.gradients / GiB:.2f} / {est.optimizer / GiB:.2f} GiB"),
        ("  activations + logits", f"{est.activations / GiB:.2f} GiB"),
    ]
    if est.offloaded:
        rows.append(("  offloaded to host RAM", f"{est.offloaded / GiB:.1f} GiB per device"))
    for alt in plan.alternatives:
        if alt["method"] != plan.method:
            rows.append((f"alternative: {alt['method']}",
                         f"micro-batch {alt['micro_batch']}, {alt['gib_per_device']:.1f} GiB/device" if alt["fits"]
                         else "does not fit"))
    return rows


def run_readme(plan: Plan, config_name: str) -> str:
    """A short README for running the planned config on the server it was planned for."""
    nodes = plan.inventory.nodes
    launch = (f"Each stage runs under the `deepspeed` launcher (ZeRO-{plan.zero_stage}"
              f"{' with CPU offload' if plan.offload else ''}) on all {plan.inventory.devices} devices."
              if plan.zero_stage else "Training runs in one process on one device.")
    lines = [
        f"# Fine-tuning {plan.shape.name}: {plan.method}", "",
        f"Planned by `lmforge plan` for {plan.inventory.describe()}.", "",
        "```bash",
        "python3 -m venv .venv && . .venv/bin/activate",
        "pip install torch  # the CUDA build that matches the server's driver" if plan.inventory.gpus
        else "pip install torch==2.13.0  # CPU wheel",
        "pip install -e \".[deepspeed]\"" if plan.zero_stage else "pip install -e .",
        f"lmforge data check {config_name}   # the data and its trained tokens, before any training",
        f"lmforge run {config_name}",
        "```", "",
        "The config trains on the shipped ICD-10 example data: point `data.dataset_info` and the `data` "
        "dataset lists at your own (docs/data_formats.md) first.", "",
        launch,
        f"Micro-batch {plan.micro_batch} x accumulation {plan.grad_accum} x {plan.inventory.devices} devices "
        f"= {plan.tokens_per_step:,} tokens per optimizer step at {plan.request.context_length} tokens per sequence.",
        f"Estimated memory per device: {plan.estimate.total / GiB:.1f} GiB "
        f"(usable {plan.budget_bytes / GiB:.1f} GiB).",
    ]
    if nodes > 1:
        lines += ["", f"Several nodes ({nodes}): list them in a DeepSpeed hostfile (`host slots=N` per line), "
                  "with passwordless ssh and pdsh between them, and the same checkout and data on each."]
    if plan.notes:
        lines += ["", *(f"- {n}" for n in plan.notes)]
    lines += ["", "If a stage runs out of memory, halve `batch_size` and double `grad_accum` (same tokens per step), "
              "or turn on `gradient_checkpointing`.", ""]
    return "\n".join(lines)


def write_plan(plan: Plan, out_dir: Path, name: str = "plan.yaml") -> tuple[Path, Path]:
    """Write the config YAML (starting with the command that runs it) and RUN.md into `out_dir`."""
    import yaml

    from components.artifacts import atomic_write_text
    from components.config import PipelineConfig

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    data = plan_config(plan)
    PipelineConfig.model_validate(data)  # never write a config that would not load
    config_path = out_dir / name
    header = (f"# lmforge run {config_path}\n# Planned by `lmforge plan` for {plan.inventory.describe()}: "
              f"{plan.method}, ZeRO {plan.zero_stage or 'off'}{' + offload' if plan.offload else ''}, "
              f"~{plan.estimate.total / GiB:.1f} GiB per device.\n")
    atomic_write_text(config_path, header + yaml.safe_dump(data, sort_keys=False))
    readme = out_dir / "RUN.md"
    atomic_write_text(readme, run_readme(plan, str(config_path)))
    return config_path, readme


# --- natural-language mode ------------------------------------------------------------------------

API_KEY_ENV = "LMFORGE_LLM_API_KEY"


def ask_llm(sentence: str, base_url: str, model: str, *, timeout_s: float = 60.0) -> PlanRequest:
    """Fill a PlanRequest from a sentence through an OpenAI-compatible chat endpoint.

    The answer is constrained by the request's JSON schema (response_format json_schema); the key
    comes from LMFORGE_LLM_API_KEY and is only ever sent in the Authorization header.
    """
    import requests

    schema = PlanRequest.model_json_schema()
    headers = {"Content-Type": "application/json"}
    key = os.environ.get(API_KEY_ENV)
    if key:
        headers["Authorization"] = f"Bearer {key}"
    body = {
        "model": model,
        "temperature": 0,
        "messages": [
            {"role": "system", "content": "You turn a request to fine-tune a language model into the JSON "
             "settings of the lmforge planner. Use the schema's defaults for anything the user does not say. "
             "Hub ids look like Qwen/Qwen2.5-7B-Instruct."},
            {"role": "user", "content": sentence},
        ],
        "response_format": {"type": "json_schema",
                            "json_schema": {"name": "lmforge_plan_request", "schema": schema, "strict": False}},
    }
    url = base_url.rstrip("/") + "/chat/completions"
    try:
        resp = requests.post(url, json=body, headers=headers, timeout=timeout_s)
    except requests.RequestException as exc:
        raise ValueError(f"LLM endpoint {url} did not answer: {type(exc).__name__}") from None
    if resp.status_code != 200:
        raise ValueError(f"LLM endpoint {url} answered HTTP {resp.status_code}: {resp.text[:200]}")
    try:
        content = resp.json()["choices"][0]["message"]["content"]
        answer = json.loads(content) if isinstance(content, str) else content
        return PlanRequest.model_validate(answer)
    except (KeyError, IndexError, TypeError, ValueError) as exc:
        raise ValueError(f"LLM endpoint {url} gave no usable plan settings ({exc}); answer: {resp.text[:300]}") from None
