"""Training methods as config switches: what trains (`TrainConfig.finetuning`) and with which optimizer.

- full: every weight; freeze: the last `freeze.trainable_layers` decoder layers and the modules named in
  `freeze.trainable_modules`; both save the whole model (safetensors).
- lora: a PEFT adapter (rsLoRA, DoRA, PiSSA init, LoRA+ learning rates as knobs) on the frozen base;
  qlora: the same adapter on a bitsandbytes 4-bit base. Both save the adapter only.
- The optimizer is one of transformers' own (`optim=`), so GaLore, LOMO/AdaLomo, 8-bit and paged AdamW,
  Lion and Adafactor need no code here beyond the name, their knobs and a check that they can run.

Every stage that trains (cpt, sft, the reward model, alignment) calls `prepare_trainable` on a loaded
model and `save_trained` on the result, so one config switch means the same thing everywhere.
"""

from __future__ import annotations

import importlib.util
import logging
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from components.artifacts import atomic_dir
from components.config import LoraSettings, QLoraSettings, TrainConfig
from components.models.loading import Hardware, added_token_ids, count_parameters, load_model

log = logging.getLogger(__name__)

# TrainConfig.optimizer -> transformers' TrainingArguments.optim.
OPTIMIZERS = {
    "adamw": "adamw_torch",
    "adamw_8bit": "adamw_bnb_8bit",
    "paged_adamw_8bit": "paged_adamw_8bit",
    "lion": "lion_32bit",
    "adafactor": "adafactor",
    "galore_adamw": "galore_adamw",
    "galore_adafactor": "galore_adafactor",
    "lomo": "lomo",
    "adalomo": "adalomo",
}
# Packages an optimizer needs beyond lmforge's own dependencies: (module, pip name).
_OPTIMIZER_PACKAGES = {
    "adamw_8bit": ("bitsandbytes", "bitsandbytes"),
    "paged_adamw_8bit": ("bitsandbytes", "bitsandbytes"),
    "lion": ("bitsandbytes", "bitsandbytes"),
    "galore_adamw": ("galore_torch", "galore-torch"),
    "galore_adafactor": ("galore_torch", "galore-torch"),
    "lomo": ("lomo_optim", "lomo-optim"),
    "adalomo": ("lomo_optim", "lomo-optim"),
}


class MethodUnavailable(RuntimeError):
    """The configured method or optimizer cannot run on this machine; the message says what to install or change."""


def check_available(cfg: TrainConfig, hardware: Hardware) -> None:
    """Fail at stage start, before any training, when a package or device the config needs is missing."""
    needed = []
    if cfg.optimizer in _OPTIMIZER_PACKAGES:
        needed.append((f"optimizer {cfg.optimizer}", *_OPTIMIZER_PACKAGES[cfg.optimizer]))
    if cfg.finetuning == "qlora":
        needed.append(("finetuning qlora", "bitsandbytes", "bitsandbytes"))
    if cfg.use_liger:
        needed.append(("use_liger", "liger_kernel", "liger-kernel"))
    for what, module, pip_name in needed:
        if importlib.util.find_spec(module) is None:
            raise MethodUnavailable(f"{what} needs the {pip_name} package: pip install {pip_name}")
    if cfg.optimizer == "adalomo" and hardware.device != "cuda":
        # lomo-optim 0.1.1 allocates AdaLomo's state with .cuda(); plain lomo runs anywhere.
        raise MethodUnavailable(f"optimizer adalomo needs a CUDA GPU (device is {hardware.device}); use lomo, "
                                "or adafactor for a factored second moment")
    if cfg.use_liger and hardware.device != "cuda":
        raise MethodUnavailable(f"use_liger runs Triton kernels, which need a CUDA GPU (device is {hardware.device}); "
                                "set use_liger false")


def qlora_quantization(settings: QLoraSettings, hardware: Hardware):
    """The bitsandbytes 4-bit config of finetuning qlora: pass it to load_model to load the base in 4 bits."""
    from transformers import BitsAndBytesConfig

    compute = hardware.dtype if settings.compute_dtype == "auto" else {
        "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[settings.compute_dtype]
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=settings.quant_type,
                              bnb_4bit_use_double_quant=settings.double_quant, bnb_4bit_compute_dtype=compute)


def _in_4bit(model) -> bool:
    return bool(getattr(model, "is_loaded_in_4bit", False))


def _requantized(model, cfg: TrainConfig, hardware: Hardware):
    """`model` reloaded with 4-bit weights (through a temporary checkpoint: transformers quantizes at load)."""
    log.info("finetuning qlora: quantizing the loaded model to 4 bits (load it with "
             "methods.qlora_quantization(...) as quantization_config to skip this copy)")
    with tempfile.TemporaryDirectory(prefix="lmforge-qlora-") as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        attn = getattr(model.config, "_attn_implementation", None) or "sdpa"
        return load_model(tmp, hardware, attn_implementation=attn,
                          quantization_config=qlora_quantization(cfg.qlora, hardware))


def _decoder_layers(model) -> tuple[str, torch.nn.ModuleList]:
    """The decoder's stack of layers: the longest ModuleList named like one (layers, h, blocks)."""
    stacks = [(name, m) for name, m in model.named_modules()
              if isinstance(m, torch.nn.ModuleList) and name.split(".")[-1] in ("layers", "h", "blocks")]
    if not stacks:
        raise MethodUnavailable(f"finetuning freeze: no decoder layer list (layers, h, blocks) in {type(model).__name__}; "
                                "name the modules to train in freeze.trainable_modules and set trainable_layers 0")
    return max(stacks, key=lambda item: len(item[1]))


def _freeze(model, cfg: TrainConfig) -> None:
    """Train the last N decoder layers and the named modules; nothing else."""
    settings = cfg.freeze
    prefixes = []
    name, layers = _decoder_layers(model) if settings.trainable_layers else ("", [])
    if settings.trainable_layers > len(layers):
        raise MethodUnavailable(f"freeze.trainable_layers is {settings.trainable_layers} but the model has "
                                f"{len(layers)} decoder layers")
    prefixes += [f"{name}.{i}." for i in range(len(layers) - settings.trainable_layers, len(layers))]
    modules = [n for n, _ in model.named_modules()]
    for wanted in settings.trainable_modules:
        found = [n for n in modules if n == wanted or n.endswith("." + wanted)]
        if not found:
            raise MethodUnavailable(f"freeze.trainable_modules: no module named {wanted!r} in {type(model).__name__} "
                                    f"(e.g. {', '.join(modules[1:6])}, ...)")
        prefixes += [f"{n}." for n in found]
    if not prefixes:
        raise MethodUnavailable("finetuning freeze trains nothing: set freeze.trainable_layers or trainable_modules")
    for pname, param in model.named_parameters():
        param.requires_grad_(any(pname.startswith(p) for p in prefixes))
    if added_token_ids(model) and not model.get_input_embeddings().weight.requires_grad:
        log.warning("the base has tokens added by model.extra_tokens, but finetuning freeze leaves the embeddings "
                    "frozen: add the embedding module (e.g. embed_tokens) to freeze.trainable_modules to train them")


def lora_config(lora: LoraSettings, task_type: str = "CAUSAL_LM", token_ids: list[int] | None = None):
    """The peft LoraConfig of `lora` (rsLoRA, DoRA, PiSSA init, target modules; with `token_ids`, the rows of
    added tokens train too): the one builder every adapter here comes from (prepare_trainable, the reward
    model's SEQ_CLS adapter, PPO's policy adapter). LoRA+ is an optimizer setting (loraplus_optimizer)."""
    from peft import LoraConfig

    return LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=lora.target_modules,
        use_rslora=lora.use_rslora,
        use_dora=lora.use_dora,
        init_lora_weights=True if lora.init == "default" else lora.init,
        # Only the rows of the added tokens train (tied output embeddings follow); saved with the adapter.
        trainable_token_indices=token_ids or None,
        task_type=task_type,
    )


def _attach_pissa_init(model) -> None:
    """Keep PiSSA's initial adapter: saving converts the trained one against it into a plain LoRA adapter
    for the unchanged base (PiSSA moves the principal components out of the base weights)."""
    init_dir = tempfile.mkdtemp(prefix="lmforge-pissa-init-")
    config = model.peft_config["default"]
    init, config.init_lora_weights = config.init_lora_weights, True  # so loading it does not decompose again
    model.save_pretrained(init_dir)
    config.init_lora_weights = init
    model.lmforge_pissa_init = init_dir


def prepare_trainable(model, cfg: TrainConfig, hardware: Hardware):
    """Make `model` trainable as `cfg.finetuning` says and return it (a PeftModel for lora and qlora).

    qlora quantizes a model loaded in full precision (load it 4-bit with `qlora_quantization` to skip
    that). Under fp16, trainable weights are kept in fp32: the Trainer's loss scaler cannot unscale fp16
    gradients, and fp32 master weights are what mixed precision expects.
    """
    check_available(cfg, hardware)
    method = cfg.finetuning
    if method in ("lora", "qlora"):
        from peft import get_peft_model, prepare_model_for_kbit_training

        if method == "qlora":
            if not _in_4bit(model):
                model = _requantized(model, cfg, hardware)
            # Norms and embeddings in fp32 for stable training; checkpointing is the Trainer's (non-reentrant).
            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
        token_ids = added_token_ids(model) if cfg.lora.train_new_tokens else []
        model = get_peft_model(model, lora_config(cfg.lora, token_ids=token_ids))
        if cfg.lora.init != "default":
            _attach_pissa_init(model)
    elif method == "freeze":
        _freeze(model, cfg)
    else:
        model.requires_grad_(True)
    if hardware.dtype == torch.float16:
        for param in model.parameters():
            if param.requires_grad and param.dtype == torch.float16:
                param.data = param.data.float()
    trainable, total = count_parameters(model)
    log.info("finetuning %s, optimizer %s: %d trainable of %d parameters (%.2f%%)", method, cfg.optimizer,
             trainable, total, 100 * trainable / max(total, 1))
    return model


def optimizer_arguments(cfg: TrainConfig) -> dict[str, Any]:
    """TrainingArguments keywords for the configured optimizer (and Liger kernels)."""
    args: dict[str, Any] = {"optim": OPTIMIZERS[cfg.optimizer], "use_liger_kernel": cfg.use_liger}
    if cfg.optimizer.startswith("galore_"):
        g = cfg.galore
        args.update(optim_target_modules=g.target_modules,
                    optim_args=f"rank={g.rank},update_proj_gap={g.update_proj_gap},scale={g.scale}")
    return args


def loraplus_optimizer(model, cfg: TrainConfig, training_args) -> tuple[type, dict] | None:
    """LoRA+ (`lora.loraplus_lr_ratio`): the configured optimizer with the B matrices (and 1-d adapter
    weights, as peft's create_loraplus_optimizer groups them) at learning_rate x ratio. For the
    Trainer's `optimizer_cls_and_kwargs`; None when LoRA+ is off."""
    ratio = cfg.lora.loraplus_lr_ratio
    if ratio is None or cfg.finetuning not in ("lora", "qlora"):
        return None
    from transformers import Trainer

    optimizer_cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(training_args, model)
    slow, fast = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (fast if "lora_B" in name or param.ndim == 1 else slow).append(param)
    lr = training_args.learning_rate
    groups = [{"params": slow, "lr": lr, "weight_decay": cfg.weight_decay},
              {"params": fast, "lr": lr * ratio, "weight_decay": cfg.weight_decay}]
    log.info("LoRA+: %d B tensors at lr %.3g, %d others at %.3g", len(fast), lr * ratio, len(slow), lr)
    return optimizer_cls, {**kwargs, "params": [g for g in groups if g["params"]]}


def save_trained(model, target: Path, tokenizer=None, state_dict: dict | None = None) -> list[Path]:
    """Write what the method trained into `target` (atomically): a PEFT adapter for lora and qlora, the
    whole model for full and freeze, plus the tokenizer. `loading.load_with_adapters` reads either.
    `state_dict`: the full weights gathered from ZeRO-3 shards (the module's own are empty there).
    Returns the files written."""
    target = Path(target)
    extra = {} if state_dict is None else {"state_dict": state_dict}
    with atomic_dir(target) as tmp:
        pissa_init = getattr(model, "lmforge_pissa_init", None)
        if pissa_init:
            model.save_pretrained(tmp, safe_serialization=True, path_initial_model_for_weight_conversion=pissa_init,
                                  **extra)
        else:
            model.save_pretrained(tmp, safe_serialization=True, **extra)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    if pissa_init:
        shutil.rmtree(pissa_init, ignore_errors=True)
        model.lmforge_pissa_init = None
    return sorted(p for p in target.rglob("*") if p.is_file())
