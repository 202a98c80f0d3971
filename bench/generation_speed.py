"""The one generation path against transformers' generate, on the demo model and its held-out prompts.

    python bench/generation_speed.py [--workspace .lmforge] [--repeats 2]

Needs a finished demo run in the workspace (its evaluate-adapted samples give the prompts, its sft stage the
model). Times, on the same prompts and settings, back to back:
- evaluation: greedy answers (max 16 new tokens, batches of 32, one task at a time), as evaluation decoded
  them before (left-padded `model.generate`) and now (components.models.generation.decode through
  components.evaluation.evaluate.generate); the answers must be identical;
- sampling (RAFT, PPO rollouts, the evaluation's sampled rewards): 4 answers per prompt at temperature 0.7,
  the full softmax, as `model.generate(num_return_sequences=4)` did (top_k off) and as
  components.alignment.sampling.sample does now.
Writes bench/results_generation.json, which bench/run_bench.py renders into RESULTS.md.
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


def _old_generate(model, tokenizer, prompts, *, max_new_tokens, batch_size, stop, **sampling):
    """What the call sites did before: left-padded batches through model.generate (answers, new tokens)."""
    import torch

    from components.data.encoding import encode_texts
    from components.models.generation import left_pad

    pad = tokenizer.pad_token_id
    encoded = encode_texts(tokenizer, prompts)
    answers, tokens = [], 0
    k = sampling.get("num_return_sequences", 1)
    for i in range(0, len(prompts), max(1, batch_size // k)):
        ids, mask = left_pad(encoded[i : i + max(1, batch_size // k)], pad)
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, pad_token_id=pad,
                                 eos_token_id=stop, **sampling)
        new = out[:, ids.shape[1]:]
        tokens += int((~torch.isin(new, torch.tensor(stop + [pad]))).sum())
        answers += [t.strip() for t in tokenizer.batch_decode(new, skip_special_tokens=True)]
    return answers, tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workspace", default=str(ROOT / ".lmforge"))
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results_generation.json"))
    args = parser.parse_args()
    os.environ.setdefault("LMFORGE_NO_PROGRESS", "1")
    import torch

    from components.alignment.sampling import sample
    from components.evaluation.evaluate import generate
    from components.models.generation import stop_ids
    from components.models.loading import load_tokenizer, load_with_adapters, select_hardware

    workspace = Path(args.workspace)
    evaluation = max((workspace / "artifacts" / "evaluate-adapted").glob("*/manifest.json"), key=os.path.getmtime)
    manifest = json.loads(evaluation.read_text())
    samples = [json.loads(line) for line in (evaluation.parent / "samples.jsonl").open()]
    sft = max((workspace / "artifacts" / "sft").glob("*/manifest.json"), key=os.path.getmtime)
    sft_info = json.loads(sft.read_text())["info"]
    hardware = select_hardware("cpu", "auto")
    model = load_with_adapters(sft_info["base_source"], sft_info["adapter_stack"], hardware).eval()
    tokenizer = load_tokenizer(sft_info["base_source"])
    order = sorted(range(len(samples)), key=lambda i: (samples[i]["task"], len(samples[i]["rendered_prompt"])))
    prompts = [samples[i]["rendered_prompt"] for i in order]
    stop = stop_ids(tokenizer, "auto")

    def timed(fn):
        best, result = None, None
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            result = fn()
            elapsed = time.perf_counter() - t0
            best = elapsed if best is None else min(best, elapsed)
        return best, result

    rows = {}
    old_s, (old_answers, old_tokens) = timed(lambda: _old_generate(
        model, tokenizer, prompts, max_new_tokens=16, batch_size=32, stop=stop, do_sample=False))
    new_s, new_answers = timed(lambda: generate(model, tokenizer, prompts, max_new_tokens=16, batch_size=32))
    new_tokens = sum(len(tokenizer(a, add_special_tokens=False)["input_ids"]) for a in new_answers)
    rows["evaluation (greedy)"] = {
        "prompts": len(prompts), "generate_s": old_s, "decode_s": new_s, "speedup": old_s / new_s,
        "generate_tokens": old_tokens, "decode_tokens": new_tokens,
        "identical_answers": sum(a == b for a, b in zip(old_answers, new_answers)),
    }
    sampled = prompts[::3]
    torch.manual_seed(0)
    old_s, (_, old_tokens) = timed(lambda: _old_generate(
        model, tokenizer, sampled, max_new_tokens=16, batch_size=32, stop=stop, do_sample=True, temperature=0.7,
        top_p=1.0, top_k=0, num_return_sequences=4))
    new_s, (_, new_tokens) = timed(lambda: sample(model, tokenizer, sampled, k=4, temperature=0.7, top_p=1.0,
                                                  max_new_tokens=16, eos=stop, batch_size=32, seed=0))
    rows["sampling (k=4, T=0.7)"] = {"prompts": len(sampled), "generate_s": old_s, "decode_s": new_s,
                                     "speedup": old_s / new_s, "generate_tokens": old_tokens,
                                     "decode_tokens": new_tokens}
    result = {"created_at": time.strftime("%Y-%m-%dT%H:%M:%S"), "model": f"demo sft ({sft.parent.name})",
              "evaluation_manifest": manifest["cache_key"], "threads": torch.get_num_threads(),
              "cpu_count": os.cpu_count(), "load_average": os.getloadavg()[0], "machine": platform.machine(),
              "repeats": args.repeats, "rows": rows}
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
