"""GGUF F16, Q8_0 and Q4_0 against the checkpoint they were exported from, on the demo's held-out questions.

    python bench/gguf_quality.py [--model embedded:smollm2-135m-instruct] [--per-task 10] [--max-new-tokens 16]

MODEL is any checkpoint lmforge loads (default: the demo's base model, SmolLM2-135M-Instruct, untrained: a demo
run takes ~18 minutes on 2 idle cores; pass its quantize stage's `merged/` directory to measure the champion).
The questions are the first --per-task rows of each task the demo evaluates (data/icd10/sft_heldout.jsonl),
prompted with the model's chat template and the demo's empty system prompt. Each file is exported by
components.quantization.gguf_export, then answered greedily from the same prompt tokens (up to --max-new-tokens,
stopping at end of turn) by llama.cpp itself (llama-cpp-python, when installed; the argmax of its logits) and by
transformers reloading the file (`gguf_file=`, weights dequantized to fp32: what the quantize stage scores;
decoded by components.models.generation.decode, as evaluation decodes). Each run is compared with the
checkpoint's own greedy answers in transformers fp32: answers identical token for token, tokens up to the first
difference, exact match against the reference answers (and whether the answer contains them). Writes
bench/results_gguf_quality.json, which bench/run_bench.py renders into RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DEMO_TASKS = ("code_to_chapter", "description_to_chapter", "billable")  # what configs/demo-cpu.yaml scores
KINDS = ("f16", "q8_0", "q4_0")


def heldout_questions(per_task: int) -> list[dict]:
    rows = [json.loads(line) for line in (ROOT / "data" / "icd10" / "sft_heldout.jsonl").open()]
    return [row for task in DEMO_TASKS for row in [r for r in rows if r["task"] == task][:per_task]]


def greedy_transformers(model, prompts: list[list[int]], new_tokens: int, stop: list[int]) -> tuple[list, float]:
    """Greedy answers through the project's generation path (what evaluation and the quantize stage decode
    with: batched, stopping at end of turn); (answers' token ids through the stop token, seconds)."""
    from components.models.generation import decode

    start = time.perf_counter()
    done = decode(model, prompts, max_new_tokens=new_tokens, stop=stop, pad_id=stop[0], batch_size=16)
    return [c.ids for c in done], time.perf_counter() - start


def greedy_llama_cpp(gguf_file: Path, prompts: list[list[int]], new_tokens: int, stop: list[int]) -> tuple[list, float]:
    """The same prompt token ids through llama.cpp, the argmax of its logits each step (no sampler in between)."""
    import numpy as np
    from llama_cpp import Llama

    llm = Llama(model_path=str(gguf_file), n_ctx=512, n_batch=512, n_threads=os.cpu_count(), logits_all=True,
                verbose=False)
    answers, start = [], time.perf_counter()
    for ids in prompts:
        llm.reset()
        llm.eval(ids)
        out: list[int] = []
        while len(out) < new_tokens and (not out or out[-1] not in stop):
            out.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
            if out[-1] not in stop:
                llm.eval([out[-1]])
        answers.append(out)
    return answers, time.perf_counter() - start


def llama_cpp_tokenizes_alike(gguf_file: Path, texts: list[str], prompts: list[list[int]]) -> int:
    """How many prompts llama.cpp's own tokenizer splits into other ids than transformers does."""
    from llama_cpp import Llama

    llm = Llama(model_path=str(gguf_file), n_ctx=64, vocab_only=True, verbose=False)
    return sum(llm.tokenize(t.encode(), add_bos=False, special=True) != ids for t, ids in zip(texts, prompts))


def compare(answers: list[list[int]], reference: list[list[int]], tokenizer, rows: list[dict], seconds: float) -> dict:
    from components.evaluation.metrics import exact_hits, normalize_answer

    texts = [tokenizer.decode(a, skip_special_tokens=True).strip() for a in answers]
    hits = exact_hits(texts, [r["output"] for r in rows])
    # The untrained model answers in sentences ("Yes, the code ... is billable"): exact match is 0 for it, so
    # also whether the reference answer appears in the (cut) answer at all.
    contains = [normalize_answer(r["output"]) in normalize_answer(t) for t, r in zip(texts, rows)]
    prefix = sum(next((i for i, (x, y) in enumerate(zip(a, r)) if x != y), min(len(a), len(r)))
                 for a, r in zip(answers, reference))
    tokens = sum(len(a) for a in answers)
    return {"identical_answers": sum(a == r for a, r in zip(answers, reference)), "questions": len(rows),
            "tokens_before_first_difference": prefix, "reference_tokens": sum(len(r) for r in reference),
            "exact_match": sum(hits) / len(hits), "answer_contains_reference": sum(contains) / len(contains),
            "exact_match_by_task": {t: sum(h for h, r in zip(hits, rows) if r["task"] == t) /
                                    sum(r["task"] == t for r in rows) for t in DEMO_TASKS},
            "generated_tokens": tokens, "seconds": round(seconds, 2), "tokens_per_s": round(tokens / seconds, 1),
            "sample_answers": texts[:: max(1, len(texts) // 3)][:3]}


def measure_variant(kind: str, source: Path, folder: Path, runtimes: set[str], reference: list, questions: dict) -> dict:
    """Export `kind`, answer the questions with each runtime asked for, compare with the reference answers."""
    from components.models.loading import select_hardware
    from components.quantization.gguf_export import export_gguf_variant, load_gguf_model

    rows, texts, prompts, stop, new_tokens, tokenizer = (questions[k] for k in (
        "rows", "texts", "prompts", "stop", "new_tokens", "tokenizer"))
    gguf_file, _ = export_gguf_variant(source, folder, kind, template="auto", system_prompt="")
    entry: dict = {"file_mb": round(gguf_file.stat().st_size / 1e6, 1)}
    if "transformers" in runtimes:
        model, _ = load_gguf_model(gguf_file, select_hardware("cpu", "fp32"))
        answers, secs = greedy_transformers(model, prompts, new_tokens, stop)
        entry["transformers_dequantized"] = compare(answers, reference, tokenizer, rows, secs)
    if "llama_cpp" in runtimes:
        answers, secs = greedy_llama_cpp(gguf_file, prompts, new_tokens, stop)
        entry["llama_cpp"] = compare(answers, reference, tokenizer, rows, secs)
        entry["llama_cpp"]["prompts_tokenized_differently"] = llama_cpp_tokenizes_alike(gguf_file, texts, prompts)
    return entry


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="embedded:smollm2-135m-instruct")
    parser.add_argument("--per-task", type=int, default=10)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--runtimes", default="llama_cpp,transformers",
                        help="which runtimes run the files; the figures of one not run are kept from --out when it "
                             "was measured there with the same model and settings")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results_gguf_quality.json"))
    args = parser.parse_args()
    os.environ.setdefault("LMFORGE_NO_PROGRESS", "1")
    import importlib.util

    import torch

    from components.data.chat_render import render_prompt
    from components.models.generation import stop_ids
    from components.models.loading import load_model, load_tokenizer, resolve_base, select_hardware

    runtimes = set(args.runtimes.split(","))
    if importlib.util.find_spec("llama_cpp") is None and "llama_cpp" in runtimes:
        print("llama-cpp-python is not installed: measuring transformers only", flush=True)
        runtimes.discard("llama_cpp")
    source = resolve_base(args.model)
    tokenizer = load_tokenizer(source)
    rows = heldout_questions(args.per_task)
    texts = [render_prompt(tokenizer, "auto", [{"role": "user", "content": r["instruction"]}], "") for r in rows]
    questions = {"rows": rows, "texts": texts, "prompts": [tokenizer(t, add_special_tokens=False).input_ids for t in texts],
                 "stop": stop_ids(tokenizer, "auto"), "new_tokens": args.max_new_tokens, "tokenizer": tokenizer}
    load_before = os.getloadavg()[0]
    reference, seconds = greedy_transformers(load_model(source, select_hardware("cpu", "fp32")).eval(),
                                             questions["prompts"], args.max_new_tokens, questions["stop"])
    settings = {"model": args.model, "questions_file": "data/icd10/sft_heldout.jsonl", "tasks": list(DEMO_TASKS),
                "per_task": args.per_task, "max_new_tokens": args.max_new_tokens, "system_prompt": ""}
    previous = json.loads(Path(args.out).read_text()) if Path(args.out).is_file() else {}
    kept = previous.get("variants", {}) if all(previous.get(k) == v for k, v in settings.items()) else {}
    result = {**settings, "reference": compare(reference, reference, tokenizer, rows, seconds), "variants": {}}
    with tempfile.TemporaryDirectory(prefix="gguf-quality-") as tmp:
        for kind in KINDS:
            entry = measure_variant(kind, Path(source), Path(tmp) / kind, runtimes, reference, questions)
            result["variants"][kind] = {**kept.get(kind, {}), **entry}
            print(kind, json.dumps(entry)[:400], flush=True)
    result.update(llama_cpp=_llama_cpp_version() if "llama_cpp" in runtimes else previous.get("llama_cpp"),
                  torch_threads=torch.get_num_threads(), cpu_count=os.cpu_count(),
                  machine=platform.processor() or platform.machine(), load_average_before=load_before,
                  load_average_after=os.getloadavg()[0], notes=previous.get("notes", []),
                  created_at=datetime.now(timezone.utc).isoformat(timespec="seconds"))
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


def _llama_cpp_version() -> str:
    from importlib.metadata import version

    return version("llama-cpp-python")


if __name__ == "__main__":
    main()
