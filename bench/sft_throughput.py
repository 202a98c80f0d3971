"""LoRA SFT tokens/s: lmforge's trainer vs a plain TRL SFTTrainer, side by side, same data.

    python bench/sft_throughput.py [--steps 20] [--batch 8] [--rank 8] [--max-length 256] [--rows 2000]

Both train the embedded SmolLM2-135M-Instruct in fp32 with LoRA r=rank on all linear layers, on the
same tokenized ICD-10 SFT rows (same input_ids and completion-only labels, from lmforge's tokenize
stage), same batch size, max length, steps and learning rate. TRL gets its fastest plain settings on
CPU (no gradient checkpointing, fp32). tokens/s counts real (non-pad) tokens of the examples consumed.
Prints one JSON line; bench/run_bench.py writes it into bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def tokenized_sft(rows: int, max_length: int, work: Path):
    from components.config import TokenizeConfig
    from components.data.align import run_align
    from components.data.fetch import run_fetch
    from components.data.tokenize import load_tokenized, run_tokenize
    from components.models.loading import convert_embedded, load_tokenizer

    source = str(convert_embedded("smollm2-135m-instruct"))
    tokenizer = load_tokenizer(source)
    run_fetch(ROOT / "data/icd10/dataset_info.json", ["icd10_instructions"], work / "fetch")
    run_align(work / "fetch", {"sft": ["icd10_instructions"]}, work / "align", max_samples=rows)
    cfg = TokenizeConfig(cutoff_len=max_length)
    run_tokenize(work / "align", tokenizer, cfg, work / "tok", groups={"sft": "conversation"})
    return source, tokenizer, load_tokenized(work / "tok" / "sft.parquet")


def run_lmforge(source, tokenizer, data, args, out: Path) -> dict:
    from components.config import LoraSettings, TrainConfig
    from components.models.loading import load_model, select_hardware
    from components.training.lora import run_lora_training

    hw = select_hardware("cpu", "fp32")
    cfg = TrainConfig(max_steps=args.steps, batch_size=args.batch, learning_rate=2e-4, logging_steps=5,
                      save_steps=10_000, lora=LoraSettings(r=args.rank, alpha=2 * args.rank))
    result = run_lora_training(load_model(source, hw), tokenizer, data, cfg, hw, out)
    m = result.metrics
    return {"tokens": m["train_tokens"], "seconds": m["train_seconds"], "tokens_per_s": m["train_tokens_per_s"],
            "loss_last": m["train_loss_last"]}


def run_trl(source, tokenizer, data, args, out: Path) -> dict:
    import torch
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM
    from trl import SFTConfig, SFTTrainer

    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    config = SFTConfig(
        output_dir=str(out), max_steps=args.steps, per_device_train_batch_size=args.batch, learning_rate=2e-4,
        logging_steps=5, save_strategy="no", report_to="none", use_cpu=True, bf16=False, fp16=False,
        gradient_checkpointing=False, max_length=args.max_length, dataloader_num_workers=0,
    )
    lora = LoraConfig(r=args.rank, lora_alpha=2 * args.rank, target_modules="all-linear", task_type="CAUSAL_LM")
    trainer = SFTTrainer(model=model, args=config, train_dataset=data.select_columns(["input_ids", "labels"]),
                         processing_class=tokenizer, peft_config=lora)
    counted = {"tokens": 0}
    collate = trainer.data_collator

    def counting(examples):
        batch = collate(examples)
        counted["tokens"] += int(batch["attention_mask"].sum()) if "attention_mask" in batch else int(batch["input_ids"].numel())
        return batch

    trainer.data_collator = counting
    trainer.train_dataset = trainer.train_dataset
    t0 = time.perf_counter()
    output = trainer.train()
    seconds = time.perf_counter() - t0
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return {"tokens": counted["tokens"], "seconds": seconds, "tokens_per_s": counted["tokens"] / seconds,
            "loss_last": losses[-1] if losses else output.training_loss}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--rows", type=int, default=2000)
    args = parser.parse_args()
    os.environ.setdefault("LMFORGE_NO_PROGRESS", "1")
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        source, tokenizer, data = tokenized_sft(args.rows, args.max_length, work)
        ours = run_lmforge(source, tokenizer, data, args, work / "ours")
        trl = run_trl(source, tokenizer, data, args, work / "trl")
    print(json.dumps({"args": vars(args), "lmforge": ours, "trl": trl,
                      "ratio": ours["tokens_per_s"] / trl["tokens_per_s"], "cpu_count": os.cpu_count(),
                      "torch_threads": torch.get_num_threads()}))


if __name__ == "__main__":
    main()
