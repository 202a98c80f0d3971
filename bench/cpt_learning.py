"""Does continued pretraining learn? Held-out corpus perplexity of the base, then after one CPT adapter.

    python bench/cpt_learning.py [--base embedded:smollm2-135m-instruct] [--steps 24] [--batch 4] [--lr 3e-4] [--rank 8] [--alpha 16]
                                 [--targets all-linear] [--scheduler cosine] [--warmup 0.05] [--block-size 256]

Tokenizes the demo corpus (data/icd10/cpt_train.jsonl, cpt_heldout.jsonl: plain text) into packed blocks
as the tokenize stage does, scores every held-out block with the embedded SmolLM2-135M-Instruct (fp32,
CPU), trains a LoRA adapter with lmforge's trainer on the training blocks, merges it into a freshly
loaded base as later stages do, and scores the held-out blocks again. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def corpus_blocks(tokenizer, path: Path, block_size: int) -> list[dict]:
    from components.data.packing import tokenize_text_corpus

    with open(path, encoding="utf-8") as f:
        texts = [json.loads(line)["text"] for line in f if line.strip()]
    return list(tokenize_text_corpus(tokenizer, texts, block_size))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--alpha", type=int, default=16)
    parser.add_argument("--targets", default="all-linear", help="'all-linear' or comma-separated module names")
    parser.add_argument("--scheduler", default="cosine")
    parser.add_argument("--warmup", type=float, default=0.05, help="warmup ratio")
    parser.add_argument("--block-size", type=int, default=256)
    parser.add_argument("--base", default="embedded:smollm2-135m-instruct", help="base model (as model.base in a config)")
    parser.add_argument("--skip-base", type=float, default=None, help="base perplexity measured before: skip scoring the base")
    args = parser.parse_args()

    import torch
    from datasets import Dataset

    from components.config import LoraSettings, TrainConfig
    from components.evaluation.evaluate import perplexity
    from components.models.loading import load_model, load_tokenizer, load_with_adapters, resolve_base, select_hardware
    from components.training.lora import run_lora_training

    torch.set_num_threads(2)
    hw = select_hardware("cpu", "fp32")
    source = resolve_base(args.base)
    tokenizer = load_tokenizer(source)
    train = corpus_blocks(tokenizer, ROOT / "data/icd10/cpt_train.jsonl", args.block_size)
    heldout = corpus_blocks(tokenizer, ROOT / "data/icd10/cpt_heldout.jsonl", args.block_size)

    t0 = time.perf_counter()
    base_ppl = args.skip_base or perplexity(load_model(source, hw), heldout, tokenizer.pad_token_id)
    score_s = time.perf_counter() - t0

    targets = args.targets if args.targets == "all-linear" else args.targets.split(",")
    cfg = TrainConfig(max_steps=args.steps, batch_size=args.batch, learning_rate=args.lr, lr_scheduler=args.scheduler,
                      warmup_ratio=args.warmup, logging_steps=max(1, args.steps // 8), save_steps=10**6,
                      lora=LoraSettings(r=args.rank, alpha=args.alpha, target_modules=targets))
    with tempfile.TemporaryDirectory() as work:
        result = run_lora_training(load_model(source, hw), tokenizer, Dataset.from_list(train), cfg, hw, Path(work))
        adapted = load_with_adapters(source, [Path(work) / "adapter"], hw)
        adapted_ppl = perplexity(adapted, heldout, tokenizer.pad_token_id)

    m = result.metrics
    print(json.dumps({
        "steps": args.steps, "batch": args.batch, "lr": args.lr, "rank": args.rank, "alpha": args.alpha,
        "targets": args.targets, "scheduler": args.scheduler, "warmup": args.warmup,
        "train_blocks": len(train), "heldout_blocks": len(heldout),
        "epochs": round(args.steps * args.batch / len(train), 3),
        "base_ppl": round(base_ppl, 4), "adapted_ppl": round(adapted_ppl, 4), "ratio": round(adapted_ppl / base_ppl, 4),
        "train_loss_first": round(m["train_loss_first"], 4), "train_loss_last": round(m["train_loss_last"], 4),
        "train_seconds": round(m["train_seconds"], 1), "tokens_per_s": round(m["train_tokens_per_s"], 1),
        "score_seconds": round(score_s, 1),
    }))


if __name__ == "__main__":
    main()
