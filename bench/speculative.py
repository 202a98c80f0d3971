"""Prompt-lookup decoding against plain greedy decoding, on CPU, same prompts and settings.

    python bench/speculative.py [--model embedded:smollm2-135m-instruct] [--lookahead 4] [--repeats 2]

Two workloads, each decoded greedily through the one generation path (components.models.generation.decode)
without and with `lookahead` (prompt lookup), and the answers compared token for token:
- held-out: the demo's held-out questions (data/icd10/sft_heldout.jsonl, 20 per task), rendered with the
  model's chat template, at the demo's evaluation batch (96) and one at a time (a chat);
- extraction: a clinical note built from held-out rows, and a request to list each condition with its code:
  the answer copies spans of the prompt, the case prompt lookup is for (Saxena 2023).
Also transformers' own prompt lookup (`generate(prompt_lookup_num_tokens=)`, one row at a time) beside its
plain greedy `generate`, as the reference point of what a library gives. A draft model against a larger
target needs two sizes of one family: not on this machine (see bench/gpu_check.md).
Writes bench/results_speculative.json, which bench/run_bench.py renders into RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def heldout_prompts(tokenizer, per_task: int) -> list[list[int]]:
    """The first `per_task` held-out questions of each task, rendered as evaluation renders them."""
    from components.data.chat_render import render_prompt
    from components.data.encoding import encode_texts

    rows = [json.loads(line) for line in (ROOT / "data" / "icd10" / "sft_heldout.jsonl").open()]
    taken: dict[str, list[str]] = {}
    for row in rows:
        bucket = taken.setdefault(row["task"], [])
        if len(bucket) < per_task:
            bucket.append(render_prompt(tokenizer, "auto", [{"role": "user", "content": row["instruction"]}], None))
    return encode_texts(tokenizer, [p for task in sorted(taken) for p in taken[task]])


def extraction_prompts(tokenizer, n: int) -> list[list[int]]:
    """`n` notes of four conditions each (held-out descriptions and codes) with the request to list them."""
    from components.data.chat_render import render_prompt
    from components.data.encoding import encode_texts

    rows = [json.loads(line) for line in (ROOT / "data" / "icd10" / "sft_heldout.jsonl").open()]
    pairs = [(r["instruction"].split(": ", 1)[1].rstrip("?"), r["output"]) for r in rows
             if r["task"] == "description_to_code"]
    prompts = []
    for i in range(n):
        found = pairs[4 * i : 4 * i + 4]
        note = " ".join(f"Assessment {k + 1}: {d} (ICD-10-CM {c})." for k, (d, c) in enumerate(found))
        ask = f"Clinical note: {note}\nList every condition of the note with its ICD-10-CM code, one per line."
        prompts.append(render_prompt(tokenizer, "auto", [{"role": "user", "content": ask}], None))
    return encode_texts(tokenizer, prompts)


def ours(model, prompts, *, stop, pad_id, max_new_tokens, batch_size, lookahead) -> dict:
    from components.models.generation import decode

    stats: dict = {}
    t0 = time.perf_counter()
    out = decode(model, prompts, max_new_tokens=max_new_tokens, stop=stop, pad_id=pad_id, batch_size=batch_size,
                 lookahead=lookahead, stats=stats)
    seconds = time.perf_counter() - t0
    tokens = sum(len(c.ids) for c in out)
    return {"seconds": round(seconds, 3), "tokens": tokens, "tokens_per_s": round(tokens / seconds, 2),
            **stats, "answers": [c.ids for c in out]}


def library(model, prompts, *, stop, pad_id, max_new_tokens, lookahead) -> dict:
    """transformers' greedy generate, one prompt at a time, with its prompt lookup when `lookahead` > 0."""
    import torch

    extra = {"prompt_lookup_num_tokens": lookahead} if lookahead else {}
    answers, t0 = [], time.perf_counter()
    for ids in prompts:
        with torch.no_grad():
            out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                 max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=stop,
                                 pad_token_id=pad_id, **extra)
        new = out[0, len(ids):].tolist()
        cut = next((i + 1 for i, t in enumerate(new) if t in stop), len(new))
        answers.append(new[:cut])
    seconds = time.perf_counter() - t0
    tokens = sum(len(a) for a in answers)
    return {"seconds": round(seconds, 3), "tokens": tokens, "tokens_per_s": round(tokens / seconds, 2),
            "answers": answers}


def compare(name: str, runs: dict, repeats: int, fn) -> dict:
    """Best of `repeats` for plain (0) and prompt lookup (k), the answers checked equal."""
    best = {}
    for label, kwargs in runs.items():
        tries = [fn(**kwargs) for _ in range(repeats)]
        best[label] = min(tries, key=lambda r: r["seconds"])
    plain, fast = best["plain"], best["lookup"]
    same = plain["answers"] == fast["answers"]
    for r in best.values():
        r.pop("answers")
    result = {**best, "same_answers": same, "speedup": round(plain["seconds"] / fast["seconds"], 2)}
    print(f"{name}: plain {plain['seconds']:.2f} s, lookup {fast['seconds']:.2f} s, x{result['speedup']}, "
          f"same answers: {same}", flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="embedded:smollm2-135m-instruct")
    parser.add_argument("--lookahead", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--only", default="", help="comma-separated workloads to run (default: all)")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results_speculative.json"))
    args = parser.parse_args()
    os.environ.setdefault("LMFORGE_NO_PROGRESS", "1")
    import torch

    from components.models.generation import stop_ids
    from components.models.loading import load_model, load_tokenizer, resolve_base, select_hardware

    source = resolve_base(args.model)
    model, tokenizer = load_model(source, select_hardware("cpu", "fp32")).eval(), load_tokenizer(source)
    stop, pad_id = stop_ids(tokenizer, "auto"), tokenizer.pad_token_id
    common = dict(model=model, stop=stop, pad_id=pad_id)
    k = args.lookahead
    heldout, notes = heldout_prompts(tokenizer, 20), extraction_prompts(tokenizer, 8)
    only = {name for name in args.only.split(",") if name}
    results = {}
    for name, prompts, max_new, batch in (("heldout_batch96", heldout, 24, 96), ("heldout_one_at_a_time", heldout[::5], 24, 1),
                                          ("extraction_one_at_a_time", notes, 96, 1), ("extraction_batch8", notes, 96, 8)):
        if only and name not in only:
            continue
        runs = {label: dict(common, prompts=prompts, max_new_tokens=max_new, batch_size=batch, lookahead=look)
                for label, look in (("plain", 0), ("lookup", k))}
        results[name] = compare(name, runs, args.repeats, ours)
    if not only or "extraction_transformers_generate" in only:
        runs = {label: dict(common, prompts=notes, max_new_tokens=96, lookahead=look)
                for label, look in (("plain", 0), ("lookup", k))}
        results["extraction_transformers_generate"] = compare("extraction, transformers generate", runs, args.repeats,
                                                              library)
    record = {"model": args.model, "lookahead": k, "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
              "load_average": os.getloadavg(), "machine": platform.processor() or platform.machine(),
              "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "results": results}
    Path(args.out).write_text(json.dumps(record, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
