"""Training methods side by side on the demo model: tokens/s, s/step, peak RSS and trainable parameters.

    python bench/methods.py [--steps 6] [--warmup 2] [--batch 4] [--threads 0] [--methods lora,full,...]

Every method trains the embedded SmolLM2-135M-Instruct (fp32, CPU) through lmforge's own training path
(components.training.lora.run_lora_training: methods.prepare_trainable, the Trainer, methods.save_trained)
on the same rows of the shipped ICD-10 SFT data (bench/sft_throughput.py tokenizes them). Only rows of one
token length are kept, so every step of every method trains the same number of tokens and s/step compares
like with like. Each method runs in its own child process, which reports its peak RSS while training (VmHWM,
reset once the model is loaded and read at the last step, before the result is saved) above its RSS after
imports, as bench/ppo_memory.py does; the model's own weights are part of it.
The first `--warmup` steps (optimizer state allocation, PiSSA's SVD, lazy kernel set-up) are not timed.
The load average before and after is recorded: other work on the cores slows every method alike, so the
ratios between methods hold better than the absolute figures. `bench/run_bench.py` renders the results
into bench/RESULTS.md; this script re-renders it at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

from ppo_memory import rss_mb  # bench/ is the script's directory, so its siblings import
from sft_throughput import tokenized_sft

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# Method -> TrainConfig fields on top of the common ones (see `train_config`). The optimizer rows train
# every weight, where the optimizer's state is what differs; under LoRA it is a few MB whichever one runs.
LORA_LR, FULL_LR = 3e-4, 1e-5
METHODS: dict[str, dict] = {
    "lora": {},
    "full": {"finetuning": "full", "learning_rate": FULL_LR},
    "freeze": {"finetuning": "freeze", "learning_rate": FULL_LR},
    "lora+rslora": {"lora": {"use_rslora": True}},
    "dora": {"lora": {"use_dora": True}},
    "lora+ (loraplus 16)": {"lora": {"loraplus_lr_ratio": 16.0}},
    "pissa": {"lora": {"init": "pissa"}},
    "qlora (nf4)": {"finetuning": "qlora"},
    "lora + gradient checkpointing": {"gradient_checkpointing": True},
    "full + galore_adamw": {"finetuning": "full", "optimizer": "galore_adamw", "learning_rate": FULL_LR},
    "full + lomo": {"finetuning": "full", "optimizer": "lomo", "learning_rate": FULL_LR},
    "full + adamw_8bit": {"finetuning": "full", "optimizer": "adamw_8bit", "learning_rate": FULL_LR},
    "full + adafactor": {"finetuning": "full", "optimizer": "adafactor", "learning_rate": FULL_LR},
    "full + lion": {"finetuning": "full", "optimizer": "lion", "learning_rate": FULL_LR / 3},
}


def train_config(method: str, steps: int, batch: int):
    from components.config import TrainConfig

    fields = {"max_steps": steps, "batch_size": batch, "learning_rate": LORA_LR, "logging_steps": 1,
              "save_steps": 10_000, "warmup_ratio": 0.0, "lr_scheduler": "constant",
              "lora": {"r": 8, "alpha": 16, "target_modules": "all-linear"}}
    overrides = METHODS[method]
    return TrainConfig.model_validate({**fields, **overrides,
                                       "lora": {**fields["lora"], **overrides.get("lora", {})}})


def one_length_rows(data, needed: int):
    """The rows of the most common token length (at least `needed` of them): equal work per step."""
    length, count = Counter(len(ids) for ids in data["input_ids"]).most_common(1)[0]
    if count < needed:
        raise SystemExit(f"only {count} rows share the most common length {length}; need {needed}: raise --rows")
    return data.filter(lambda row: len(row["input_ids"]) == length).select(range(needed)), length


def child(method: str, source: str, data_path: str, steps: int, warmup: int, batch: int, threads: int) -> dict:
    import importlib

    import peft  # noqa: F401  (libraries are imported before the baseline: they are nobody's training memory)
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from components.data.tokenize import load_tokenized
    from components.models.loading import load_model, load_tokenizer, select_hardware
    from components.resources import PeakMemory, release_free_memory
    from components.training.lora import run_lora_training
    from components.training.methods import qlora_quantization

    for optional in ("bitsandbytes", "galore_torch", "lomo_optim"):
        importlib.import_module(optional)
    AutoModelForCausalLM._model_mapping[type(AutoConfig.from_pretrained(source))]  # the architecture's module
    if threads:
        torch.set_num_threads(threads)
    hardware = select_hardware("cpu", "fp32")
    cfg = train_config(method, warmup + steps, batch)
    tokenizer = load_tokenizer(source)
    data = load_tokenized(Path(data_path))
    after_imports = rss_mb("VmRSS")

    step_times: dict[int, float] = {}
    peak = {"mb": 0.0}

    def sink(step: int, metrics: dict) -> None:
        step_times.setdefault(step, time.perf_counter())  # the end-of-training summary logs the last step again
        peak["mb"] = rss_mb("VmHWM")  # the last step's reading: training, not the final save

    quantization = qlora_quantization(cfg.qlora, hardware) if cfg.finetuning == "qlora" else None
    model = load_model(source, hardware, quantization_config=quantization)
    release_free_memory()  # loading's transient copies are not the method's memory
    # PeakMemory resets the resident high-water mark, so the sink's reading is the training's own peak.
    with tempfile.TemporaryDirectory() as tmp, PeakMemory():
        result = run_lora_training(model, tokenizer, data, cfg, hardware, Path(tmp), metrics_sink=sink)
    m = result.metrics
    s_per_step = (step_times[warmup + steps] - step_times[warmup]) / steps
    tokens_per_step = batch * len(data[0]["input_ids"])
    return {
        "s_per_step": s_per_step,
        "tokens_per_s": tokens_per_step / s_per_step,
        "peak_rss_mb": peak["mb"],
        "rss_after_imports_mb": after_imports,
        "peak_above_imports_mb": peak["mb"] - after_imports,
        "trainable_params": int(m["trainable_params"]),
        "total_params": int(m["total_params"]),
        "loss_first": m["train_loss_first"],
        "loss_last": m["train_loss_last"],
        "config": {k: v for k, v in cfg.model_dump(mode="json").items() if k in ("finetuning", "optimizer",
                                                                                 "learning_rate", "gradient_checkpointing")},
    }


def load_average() -> float:
    return float(Path("/proc/loadavg").read_text().split()[0])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=6, help="timed steps per method")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps before them")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--rows", type=int, default=2000, help="SFT rows tokenized to find rows of one length")
    parser.add_argument("--threads", type=int, default=0, help="torch threads per method (0: torch's default; "
                        "1 when other work shares the cores: threads that wait for each other only add to it)")
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated, from: " + ", ".join(METHODS))
    parser.add_argument("--out", default=str(ROOT / "bench" / "results_methods.json"))
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--source", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.source, args.data, args.steps, args.warmup, args.batch, args.threads)))
        return
    methods = args.methods.split(",")
    unknown = set(methods) - set(METHODS)
    if unknown:
        parser.error(f"unknown method(s) {', '.join(sorted(unknown))}; known: {', '.join(METHODS)}")

    env = {**os.environ, "LMFORGE_NO_PROGRESS": "1", "TOKENIZERS_PARALLELISM": "false"}
    out = {"model": "embedded:smollm2-135m-instruct", "precision": "fp32", "device": "cpu", "steps": args.steps,
           "warmup": args.warmup, "batch": args.batch, "threads": args.threads, "cpu_count": os.cpu_count(),
           "load_average_before": load_average(), "methods": {}}
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        source, _, data = tokenized_sft(args.rows, 256, work)
        rows, length = one_length_rows(data, args.batch * (args.warmup + args.steps))
        rows.to_parquet(str(work / "rows.parquet"))
        out.update(sequence_length=length, tokens_per_step=args.batch * length)
        for method in methods:
            cmd = [sys.executable, __file__, "--child", method, "--source", str(source), "--data",
                   str(work / "rows.parquet"), "--steps", str(args.steps), "--warmup", str(args.warmup),
                   "--batch", str(args.batch), "--threads", str(args.threads)]
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
            if proc.returncode != 0:
                sys.stderr.write(proc.stderr[-4000:])
                last = proc.stderr.strip().splitlines()
                out["methods"][method] = {"error": last[-1] if last else f"exit code {proc.returncode}"}
            else:
                out["methods"][method] = json.loads(proc.stdout.strip().splitlines()[-1])
            print(method, json.dumps(out["methods"][method]), file=sys.stderr, flush=True)
            # Written after every method: a run stopped early keeps what it measured.
            out.update(load_average_after=load_average(), wall_s=time.perf_counter() - t0,
                       created_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
            Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    subprocess.run([sys.executable, str(ROOT / "bench" / "run_bench.py"), "--only", ""], check=True, env=env,
                   cwd=ROOT, stdout=subprocess.DEVNULL)


if __name__ == "__main__":
    main()
