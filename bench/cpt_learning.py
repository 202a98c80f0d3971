"""Does continued pretraining learn? Held-out corpus perplexity of the base, then after the CPT adapter alone.

    python bench/cpt_learning.py [--config configs/demo-cpu.yaml] [--set cpt.learning_rate=1e-3 ...]
                                 [--base-ppl 6.6219]

Takes the base model, block size and `cpt` section from the config (with `--set` overrides, as the CLI
does), packs the demo corpus (data/icd10/cpt_train.jsonl, cpt_heldout.jsonl: plain text) into blocks as
the tokenize stage does, scores every held-out block with the base (fp32, CPU), trains the CPT adapter
with lmforge's trainer on the training blocks, merges it into a freshly loaded base as later stages do,
and scores the held-out blocks again. `--base-ppl` reuses a base figure measured before (it does not
depend on the cpt settings). Prints one JSON line.
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
    parser.add_argument("--config", default="configs/demo-cpu.yaml")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--base-ppl", type=float, default=None, help="held-out perplexity of the base, measured before")
    args = parser.parse_args()

    from datasets import Dataset

    from components.config import load_config
    from components.evaluation.evaluate import perplexity
    from components.models.loading import load_model, load_tokenizer, load_with_adapters, resolve_base, select_hardware
    from components.runtime import configure_threads, quiet_library_warnings
    from components.training.lora import run_lora_training

    config = load_config(ROOT / args.config, args.overrides)
    configure_threads(config.compute.threads)
    quiet_library_warnings()
    hw = select_hardware("cpu", "fp32")
    source = resolve_base(config.model.base)
    tokenizer = load_tokenizer(source)
    block_size = config.tokenize.cpt_block_size
    train = corpus_blocks(tokenizer, ROOT / "data/icd10/cpt_train.jsonl", block_size)
    heldout = corpus_blocks(tokenizer, ROOT / "data/icd10/cpt_heldout.jsonl", block_size)

    t0 = time.perf_counter()
    base_ppl = args.base_ppl or perplexity(load_model(source, hw), heldout, tokenizer.pad_token_id)
    score_s = time.perf_counter() - t0

    cpt = config.cpt
    with tempfile.TemporaryDirectory() as work:
        result = run_lora_training(load_model(source, hw), tokenizer, Dataset.from_list(train), cpt, hw, Path(work))
        adapted = load_with_adapters(source, [Path(work) / "adapter"], hw)
        adapted_ppl = perplexity(adapted, heldout, tokenizer.pad_token_id)

    m = result.metrics
    print(json.dumps({
        "steps": cpt.max_steps, "batch": cpt.batch_size, "lr": cpt.learning_rate, "scheduler": cpt.lr_scheduler,
        "warmup_ratio": cpt.warmup_ratio, "rank": cpt.lora.r, "alpha": cpt.lora.alpha, "targets": cpt.lora.target_modules,
        "block_size": block_size, "train_blocks": len(train), "heldout_blocks": len(heldout),
        "epochs": round(cpt.max_steps * cpt.batch_size * cpt.grad_accum / len(train), 3),
        "base_ppl": round(base_ppl, 4), "adapted_ppl": round(adapted_ppl, 4), "ratio": round(adapted_ppl / base_ppl, 4),
        "train_loss_first": round(m["train_loss_first"], 4), "train_loss_last": round(m["train_loss_last"], 4),
        "train_seconds": round(m["train_seconds"], 1), "tokens_per_s": round(m["train_tokens_per_s"], 1),
        "base_score_seconds": round(score_s, 1),
    }))


if __name__ == "__main__":
    main()
