"""The measurements of bench/gpu_check.py, one function each: `measure(plan, work) -> figures`.

Every model is built from a published shape with random weights (no hub on the GPU machine; memory and
speed do not depend on the values) and saved once as a local checkpoint, so lmforge loads it the way it
loads any local base model. Every row of the data is `seq_len` tokens long with the first
(1 - answer_share) of them masked from the loss, like an SFT prompt: each step trains batch x seq_len
tokens in every framework, with no padding, so tokens/s compare like with like.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

GIB = 2**30

# Shapes from the models' published config.json files (meta-llama/Llama-3.1-8B, Qwen/Qwen2.5-0.5B).
LLAMA_31_8B = dict(
    model_type="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
    num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=131072, rms_norm_eps=1e-5,
    tie_word_embeddings=False, rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                                "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                "original_max_position_embeddings": 8192})
QWEN25_05B = dict(
    model_type="qwen2", vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
    num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=32768, rms_norm_eps=1e-6,
    tie_word_embeddings=True, rope_parameters={"rope_type": "default", "rope_theta": 1000000.0})
# The dry run's stand-ins: tests/tiny_model.py's shape, once as Llama and once as Qwen2.
_TINY = dict(vocab_size=384, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True)
TINY_LLAMA = dict(model_type="llama", **_TINY)
TINY_QWEN2 = dict(model_type="qwen2", **_TINY)

TOKENIZER_WORDS = 256  # the tokenizer's own vocabulary; the models' embeddings are larger, as Qwen's are


class Skip(Exception):
    """A measurement that cannot run here; the message says why (recorded, not an error)."""


# ---------------------------------------------------------------- models and data


def build_tokenizer(out_dir: Path):
    """A word-level tokenizer ("w0".."w255" + ChatML specials) with a ChatML template, saved in `out_dir`:
    the data is made of token ids directly, so only loading it and its pad id matter."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(["<|endoftext|>", "<|im_start|>", "<|im_end|>",
                                         *(f"w{i}" for i in range(TOKENIZER_WORDS))])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<|endoftext|>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   unk_token="<|endoftext|>")
    fast.chat_template = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + ' ' + m['content'] + '<|im_end|>' }}"
                          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant ' }}{% endif %}")
    fast.save_pretrained(out_dir)
    return fast


def random_checkpoint(shape: dict, out_dir: Path, device: str, dtype_name: str) -> Path:
    """A model of `shape` with random weights, built on `device` (a GPU builds 8B in seconds) and saved
    as safetensors with a tokenizer; reused when already complete."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    out_dir = Path(out_dir)
    if (out_dir / "gpu-check-complete").is_file():
        return out_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(out_dir)
    fields = {k: v for k, v in shape.items() if k != "model_type"}
    config = AutoConfig.for_model(shape["model_type"], **fields, pad_token_id=tokenizer.pad_token_id,
                                  eos_token_id=tokenizer.eos_token_id, bos_token_id=None)
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype_name))
    model.save_pretrained(out_dir, safe_serialization=True)
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    (out_dir / "gpu-check-complete").write_text("1")
    return out_dir


def token_rows(plan: dict, n_rows: int) -> dict[str, list]:
    """`n_rows` rows of plan["seq_len"] random token ids, the first (1 - answer_share) masked from the loss."""
    import random

    rng = random.Random(0)
    seq, first_label = plan["seq_len"], int(plan["seq_len"] * (1 - plan["answer_share"]))
    ids = [[rng.randrange(3, 3 + TOKENIZER_WORDS) for _ in range(seq)] for _ in range(n_rows)]
    return {"input_ids": ids, "attention_mask": [[1] * seq for _ in ids],
            "labels": [[-100] * first_label + row[first_label:] for row in ids]}


def steps_of(plan: dict, key: str = "lora") -> tuple[int, int]:
    """(untimed warm-up steps, timed steps) of a measurement."""
    return plan["warmup"], plan["steps"] if key == "lora" else plan["qlora_steps"]


def train_config(plan: dict, max_steps: int, **fields):
    """lmforge's TrainConfig of every measurement: LoRA r16 on all linear layers, constant lr, a log per
    step (the step times come from the log) and no checkpoint inside the run."""
    from components.config import LoraSettings, TrainConfig

    base = dict(max_steps=max_steps, batch_size=plan["batch"], learning_rate=2e-4, lr_scheduler="constant",
                warmup_ratio=0.0, logging_steps=1, save_steps=10**6, gradient_checkpointing=False,
                lora=LoraSettings(r=plan["lora_r"], alpha=2 * plan["lora_r"], target_modules="all-linear"))
    return TrainConfig(**{**base, **fields})


# ---------------------------------------------------------------- an older transformers on the GPU machine

COMPAT_NOTE = ("transformers {version} has no TrainingArguments.activation_checkpointing (lmforge's lora.py passes "
               "it; transformers 5.25 has both names): passed on as gradient_checkpointing(_kwargs), the same setting")


def transformers_compat(arguments_class=None) -> list[str]:
    """Let lmforge's training path run on the GPU machine's transformers (5.17), which predates the name
    lora.py uses for checkpointing: TrainingArguments takes the new keywords and hands them on under the old
    ones, which mean the same. Nothing is changed where transformers has the new name. Returns what it adapted,
    which the JSON records. (Fixed for good in components by passing the names both versions accept.)
    `arguments_class`: the class to adapt (tests); transformers.TrainingArguments by default."""
    import transformers

    TrainingArguments = arguments_class or transformers.TrainingArguments  # noqa: N806 (a class)
    if "activation_checkpointing" in TrainingArguments.__dataclass_fields__:
        return []
    if not getattr(TrainingArguments.__init__, "gpu_check_compat", False):
        original = TrainingArguments.__init__

        def init(self, *args, activation_checkpointing=None, activation_checkpointing_kwargs=None, **kwargs):
            if activation_checkpointing is not None:
                kwargs.setdefault("gradient_checkpointing", activation_checkpointing)
            if activation_checkpointing_kwargs is not None:
                kwargs.setdefault("gradient_checkpointing_kwargs", activation_checkpointing_kwargs)
            original(self, *args, **kwargs)

        init.gpu_check_compat = True
        TrainingArguments.__init__ = init
    return [COMPAT_NOTE.format(version=transformers.__version__)]


def compat_site(work: Path) -> Path:
    """A folder whose sitecustomize applies transformers_compat in processes gpu_check does not run itself
    (the ranks of the `deepspeed` launcher): put it on their PYTHONPATH."""
    folder = work / "compat-site"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "sitecustomize.py").write_text(
        f"import sys\nsys.path.insert(0, {str(Path(__file__).resolve().parent)!r})\n"
        "from gpu_measurements import transformers_compat\ntransformers_compat()\n")
    return folder


# ---------------------------------------------------------------- figures


class StepClock:
    """Times the steps after the warm-up: the metrics sink of run_lora_training (or a Trainer callback)
    calls `mark(step)` after each logged step."""

    def __init__(self, warmup: int, tokens_per_step: int):
        self.warmup, self.tokens_per_step, self.times = warmup, tokens_per_step, {}

    def mark(self, step: int, *_):
        self.times.setdefault(step, time.perf_counter())  # a run's final summary logs the last step again

    def figures(self) -> dict:
        last = max(self.times, default=0)
        if self.warmup not in self.times or last <= self.warmup:
            raise RuntimeError(f"steps {sorted(self.times)} were logged; the timing needs step {self.warmup} "
                               "(the end of the warm-up) and at least one after it")
        seconds, timed = self.times[last] - self.times[self.warmup], last - self.warmup
        return {"timed_steps": timed, "s_per_step": seconds / timed,
                "tokens_per_s": self.tokens_per_step * timed / seconds}


def memory_figures(peak, device: str, model_bytes: int | None = None) -> dict:
    """Peak memory of the training (components.resources.PeakMemory): torch's CUDA allocations on a GPU,
    the process's resident peak on a CPU (a dry run), in GiB."""
    import torch

    out: dict = {}
    if device == "cuda":
        out["peak_memory_gib"] = peak.gpu_mb * 2**20 / GIB
        out["peak_reserved_gib"] = torch.cuda.max_memory_reserved() / GIB
        out["memory_measure"] = "torch.cuda.max_memory_allocated while training (weights included)"
    else:
        out["peak_memory_gib"] = (peak.rss_mb or float("nan")) * 2**20 / GIB
        out["memory_measure"] = "process resident peak (VmHWM) while training, CPU"
    if model_bytes is not None:
        out["model_memory_gib"] = model_bytes / GIB
    return out


def weight_gib_by_dtype(model) -> dict[str, float]:
    """GiB of the model's weights per storage dtype after training set-up (QLoRA's 4-bit weights are packed
    uint8; peft's prepare_model_for_kbit_training casts the other bf16 weights, embeddings included, to fp32)."""
    sizes: dict[str, float] = {}
    for param in model.parameters():
        key = str(param.dtype).removeprefix("torch.")
        sizes[key] = sizes.get(key, 0.0) + param.numel() * param.element_size() / GIB
    return sizes


def _model_bytes(hardware) -> int | None:
    import torch

    return torch.cuda.memory_allocated() if hardware.device == "cuda" else None


def _lmforge_lora(plan: dict, work: Path, model_dir: Path, cfg, clock: StepClock, *, quantized: bool = False,
                  sdpa_backend: str | None = None) -> dict:
    """Load `model_dir` and train it through lmforge's own path (load_model, run_lora_training); figures."""
    import contextlib

    from datasets import Dataset

    from components.models.loading import load_model, load_tokenizer, select_hardware
    from components.resources import PeakMemory, release_free_memory
    from components.training.lora import run_lora_training
    from components.training.methods import qlora_quantization

    hardware = select_hardware("auto", "auto")
    quantization = qlora_quantization(cfg.qlora, hardware) if quantized else None
    model = load_model(str(model_dir), hardware, quantization_config=quantization)
    tokenizer = load_tokenizer(str(model_dir))
    data = Dataset.from_dict(token_rows(plan, plan["batch"] * cfg.max_steps))
    release_free_memory()
    model_bytes = _model_bytes(hardware)
    context = contextlib.nullcontext()
    if sdpa_backend is not None:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        context = sdpa_kernel([getattr(SDPBackend, sdpa_backend)])
    out = work / f"out-{time.monotonic_ns()}"
    compat = transformers_compat()
    with context, PeakMemory() as peak:
        result = run_lora_training(model, tokenizer, data, cfg, hardware, out, metrics_sink=clock.mark)
    m = result.metrics
    return {**clock.figures(), **memory_figures(peak, hardware.device, model_bytes),
            "weights_gib_by_dtype": weight_gib_by_dtype(model),  # the model as trained (adapters injected in place)
            "precision": hardware.precision, "trainable_params": m["trainable_params"],
            "loss_first": m["train_loss_first"], "loss_last": m["train_loss_last"],
            "tokens_counted_by_lmforge": m["train_tokens"], **({"compat": compat} if compat else {})}


def small_model(plan: dict, work: Path) -> Path:
    """The LoRA comparison's model (Qwen2.5-0.5B-shaped), built once per work folder."""
    from components.models.loading import select_hardware

    hardware = select_hardware("auto", "auto")
    return random_checkpoint(plan["small"], work / "small-model", hardware.device,
                             {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}[hardware.precision])


# ---------------------------------------------------------------- the measurements


def measure_hardware(plan: dict, work: Path) -> dict:
    """What lmforge picks on this machine (select_hardware auto/auto) and what the machine is."""
    import torch

    from components.models.loading import select_hardware

    hardware = select_hardware("auto", "auto")
    cuda = torch.cuda.is_available()
    return {"device": hardware.device, "precision": hardware.precision,
            "device_name": torch.cuda.get_device_name(0) if cuda else "cpu",
            "bf16_supported": bool(cuda and torch.cuda.is_bf16_supported()),
            "gpu_memory_gib": torch.cuda.get_device_properties(0).total_memory / GIB if cuda else None,
            "cuda": torch.version.cuda, "cpu_count": os.cpu_count()}


def measure_qlora_8b(plan: dict, work: Path) -> dict:
    """QLoRA of the big shape (Llama-3.1-8B on a GPU) at batch x seq_len: NF4 base (double quantization) loaded
    by lmforge, LoRA on all linear layers, gradient checkpointing. The peak memory is the figure."""
    import torch

    from components.models.loading import select_hardware

    hardware = select_hardware("auto", "auto")
    # The random bf16 checkpoint is written where it is cheapest to read back (RAM on a GPU machine).
    scratch = Path(plan.get("scratch") or work)
    model_dir = random_checkpoint(plan["big"], scratch / "big-model", hardware.device,
                                  "bfloat16" if hardware.device == "cuda" else "float32")
    if hardware.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    warmup, steps = steps_of(plan, "qlora")
    # No Liger here: lmforge's loss projects only the trained positions itself (Liger's fused loss is not on its
    # path), and the memory figure must not hang on a second package; the `liger` measurement times it.
    cfg = train_config(plan, warmup + steps, finetuning="qlora", gradient_checkpointing=True)
    clock = StepClock(warmup, plan["batch"] * plan["seq_len"])
    figures = _lmforge_lora(plan, work, model_dir, cfg, clock, quantized=True)
    return {**figures, "gradient_checkpointing": True, "liger": False}


def measure_lora_lmforge(plan: dict, work: Path) -> dict:
    """LoRA of the small shape through lmforge, default attention (SDPA picks its kernel), no Liger."""
    warmup, steps = steps_of(plan)
    clock = StepClock(warmup, plan["batch"] * plan["seq_len"])
    return _lmforge_lora(plan, work, small_model(plan, work), train_config(plan, warmup + steps), clock)


def _sdpa(backend: str):
    def measure(plan: dict, work: Path) -> dict:
        warmup, steps = steps_of(plan)
        clock = StepClock(warmup, plan["batch"] * plan["seq_len"])
        return {**_lmforge_lora(plan, work, small_model(plan, work), train_config(plan, warmup + steps), clock,
                                sdpa_backend=backend), "sdpa_backend": backend}

    measure.__doc__ = f"LoRA of the small shape through lmforge with SDPA held to its {backend} kernel."
    return measure


measure_sdpa_flash = _sdpa("FLASH_ATTENTION")
measure_sdpa_math = _sdpa("MATH")


def measure_liger(plan: dict, work: Path) -> dict:
    """LoRA of the small shape through lmforge with train.use_liger (Liger's Triton kernels: CUDA only)."""
    import importlib.util

    from components.models.loading import select_hardware

    if select_hardware("auto", "auto").device != "cuda":
        raise Skip("Liger's kernels are Triton GPU kernels and lmforge refuses use_liger without CUDA")
    if importlib.util.find_spec("liger_kernel") is None:
        raise Skip("the liger-kernel package is not installed (bench/fetch_gpu_wheels.py fetches it)")
    warmup, steps = steps_of(plan)
    clock = StepClock(warmup, plan["batch"] * plan["seq_len"])
    cfg = train_config(plan, warmup + steps, use_liger=True)
    return {**_lmforge_lora(plan, work, small_model(plan, work), cfg, clock), "liger": True}


def measure_zero2(plan: dict, work: Path) -> dict:
    """LoRA of the small shape under DeepSpeed ZeRO-2 on one device, through lmforge's launch path (the
    `deepspeed` launcher, one rank). Its tokens/s includes the warm-up steps (the rank reports the whole run)."""
    import importlib.util
    import math

    from datasets import Dataset

    from components.models.loading import select_hardware
    from components.training.deepspeed import deepspeed_config
    from components.training.launch import TrainingJob, launch_training

    if importlib.util.find_spec("deepspeed") is None:
        raise Skip("the deepspeed package is not installed (bench/fetch_gpu_wheels.py builds its wheel)")
    hardware = select_hardware("auto", "auto")
    warmup, steps = steps_of(plan)
    cfg = train_config(plan, warmup + steps)
    train_file = work / "zero2-train.parquet"
    Dataset.from_dict(token_rows(plan, plan["batch"] * cfg.max_steps)).to_parquet(str(train_file))
    job = TrainingJob(base_model=str(small_model(plan, work)), train_file=str(train_file),
                      train_config=cfg.model_dump(mode="json"), out_dir=str(work / "zero2-out"),
                      device=hardware.device, precision=hardware.precision,
                      deepspeed=deepspeed_config(cfg, hardware, stage=2, offload=False))
    compat = transformers_compat()  # here only to learn whether the ranks need it
    env = {"PYTHONPATH": os.pathsep.join(filter(None, [str(compat_site(work)), os.environ.get("PYTHONPATH")]))}
    result = launch_training(job, num_gpus=1, timeout_s=plan["limits"]["zero2"], env=env if compat else None)
    m = result.metrics
    return {"tokens_per_s_with_warmup": m["train_tokens_per_s"], "train_seconds": m["train_seconds"],
            "loss_first": m["train_loss_first"], "loss_last": m["train_loss_last"],
            "finite_loss": math.isfinite(m["train_loss_last"]), "world_size": result.info["world_size"],
            "precision": hardware.precision, **({"compat": compat} if compat else {})}


def measure_lora_llamafactory(plan: dict, work: Path) -> dict:
    """The same LoRA run (model, rows, batch, rank, targets, lr, precision, attention, no checkpointing)
    through LlamaFactory 0.9.5's own SFT workflow (run_exp), reading the same token rows from disk."""
    import importlib.util

    if importlib.util.find_spec("llamafactory") is None:  # missing: a skip; broken (a dependency): a failure
        raise Skip("llamafactory is not installed here; bench/fetch_gpu_wheels.py fetches it with what it needs")
    os.environ.setdefault("DISABLE_VERSION_CHECK", "1")  # its pins predate transformers 5.17 and peft 0.21
    import llamafactory
    from llamafactory.train.tuner import run_exp
    from datasets import Dataset
    from transformers import TrainerCallback

    from components.models.loading import select_hardware
    from components.resources import PeakMemory

    hardware = select_hardware("auto", "auto")
    warmup, steps = steps_of(plan)
    tokenized = work / "llamafactory-rows"
    if not tokenized.is_dir():
        Dataset.from_dict(token_rows(plan, plan["batch"] * (warmup + steps))).save_to_disk(str(tokenized))
    clock = StepClock(warmup, plan["batch"] * plan["seq_len"])

    class Clock(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            clock.mark(state.global_step)

    args = dict(
        stage="sft", do_train=True, model_name_or_path=str(small_model(plan, work)), tokenized_path=str(tokenized),
        dataset="gpu_check_rows",  # required by its parser; the tokenized rows above are what it reads
        template="empty", cutoff_len=plan["seq_len"], finetuning_type="lora", lora_rank=plan["lora_r"],
        lora_alpha=2 * plan["lora_r"], lora_dropout=0.0, lora_target="all", output_dir=str(work / "llamafactory-out"),
        overwrite_output_dir=True, per_device_train_batch_size=plan["batch"], gradient_accumulation_steps=1,
        learning_rate=2e-4, lr_scheduler_type="constant", max_steps=warmup + steps, logging_steps=1,
        save_strategy="no", report_to="none", plot_loss=False, bf16=hardware.precision == "bf16",
        fp16=hardware.precision == "fp16", flash_attn="sdpa", disable_gradient_checkpointing=True,
        enable_liger_kernel=False, dataloader_num_workers=0, seed=42,
        **({"use_cpu": True} if hardware.device == "cpu" else {}))
    with PeakMemory() as peak:
        run_exp(args=args, callbacks=[Clock()])
    results = json.loads((work / "llamafactory-out" / "all_results.json").read_text()) \
        if (work / "llamafactory-out" / "all_results.json").is_file() else {}
    return {**clock.figures(), **memory_figures(peak, hardware.device), "precision": hardware.precision,
            "llamafactory_version": llamafactory.__version__, "train_loss": results.get("train_loss")}


MEASUREMENTS = {
    "hardware": measure_hardware,
    "lora_lmforge": measure_lora_lmforge,
    "lora_llamafactory": measure_lora_llamafactory,
    "qlora_8b": measure_qlora_8b,
    "sdpa_flash": measure_sdpa_flash,
    "sdpa_math": measure_sdpa_math,
    "liger": measure_liger,
    "zero2": measure_zero2,
}
