"""What training a model costs in memory, per device: the model's shape and the estimate by part.

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
kernels' workspaces and allocator fragmentation (about 1 GiB plus 10% of the device: recommend.memory_budget).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

Method = Literal["full", "lora", "qlora"]


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
