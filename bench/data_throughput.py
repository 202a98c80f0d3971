"""Data stages rows/s: align + tokenize on synthetic short alpaca rows, and peak memory at N and N/10.

    python bench/data_throughput.py [--rows 1000000] [--seed 0]

Writes N seeded medical-coding alpaca rows (JSONL) with a dataset_info.json into a temp dir, then
runs the real stages as the flow does: run_fetch -> run_align -> run_tokenize, with the SmolLM2
tokenizer (the embedded SmolLM2-135M-Instruct, converted once) and the default tokenize config
(its system prompt, cutoff 256). Each N runs in a fresh subprocess, so its peak RSS
(ru_maxrss) is its own; memory is flat in N when the peak at N is close to the peak at N/10.
rows/s per core divides by os.cpu_count(); rows per CPU second divides by the CPU time the two
stages used (all threads and worker processes), i.e. what one busy core does. TOKENIZERS_PARALLELISM is left as set,
else "true" (the Rust tokenizer then encodes each batch on every core). Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

_ORGANS = ["kidney", "liver", "lung", "heart", "skin", "thyroid", "colon", "knee", "hip", "eye", "ear", "bladder"]
_KINDS = ["chronic", "acute", "unspecified", "recurrent", "bilateral", "left", "right", "mild", "severe"]
_DISEASES = ["disease", "failure", "infection", "injury", "disorder", "neoplasm", "cyst", "ulcer", "pain"]
_CHAPTERS = ["Diseases of the circulatory system", "Diseases of the respiratory system",
             "Diseases of the digestive system", "Endocrine, nutritional and metabolic diseases",
             "Diseases of the musculoskeletal system and connective tissue", "Mental and behavioral disorders"]


def synthetic_row(rng: random.Random) -> dict:
    """One short alpaca row in the style of data/icd10/sft_train.jsonl."""
    code = f"{rng.choice('ABCDEFGHIJKLMNOPQRSTUVWXYZ')}{rng.randint(0, 99):02d}.{rng.randint(0, 99)}"
    name = f"{rng.choice(_KINDS).capitalize()} {rng.choice(_ORGANS)} {rng.choice(_DISEASES)}"
    task = rng.randrange(4)
    if task == 0:
        return {"instruction": f"What is the ICD-10-CM code for {name.lower()}?", "input": "", "output": code}
    if task == 1:
        return {"instruction": f"What does ICD-10-CM code {code} describe?", "input": "", "output": name}
    if task == 2:
        return {"instruction": f"Is ICD-10-CM code {code} billable?", "input": "", "output": rng.choice(["Yes", "No"])}
    return {"instruction": "Which ICD-10-CM chapter contains this code?", "input": code,
            "output": rng.choice(_CHAPTERS)}


def write_dataset(root: Path, rows: int, seed: int) -> Path:
    """rows.jsonl + dataset_info.json under root, written streaming (the generator holds no rows)."""
    rng = random.Random(seed)
    root.mkdir(parents=True, exist_ok=True)
    with open(root / "rows.jsonl", "w", encoding="utf-8") as f:
        for _ in range(rows):
            f.write(json.dumps(synthetic_row(rng)) + "\n")
    info = {"synthetic": {"file_name": "rows.jsonl", "formatting": "alpaca"}}
    (root / "dataset_info.json").write_text(json.dumps(info))
    return root / "dataset_info.json"


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _cpu_s() -> float:
    """CPU seconds of this process (all threads, the tokenizer's included) and of its finished
    children (the tokenize stage's worker processes)."""
    return sum(u.ru_utime + u.ru_stime for u in (resource.getrusage(resource.RUSAGE_SELF),
                                                  resource.getrusage(resource.RUSAGE_CHILDREN)))


def measure(rows: int, seed: int) -> dict:
    """Run the three stages on `rows` synthetic rows in this process; timings and memory."""
    from components.config import TokenizeConfig
    from components.data.align import run_align
    from components.data.fetch import run_fetch
    from components.data.tokenize import run_tokenize
    from components.models.loading import convert_embedded, load_tokenizer

    tokenizer = load_tokenizer(str(convert_embedded("smollm2-135m-instruct")))
    with tempfile.TemporaryDirectory(prefix="lmforge-bench-data-") as tmp:
        work = Path(tmp)
        info = write_dataset(work / "source", rows, seed)
        rss_before = _peak_rss_mb()
        t0 = time.perf_counter()
        run_fetch(info, ["synthetic"], work / "fetch")
        t1, c1 = time.perf_counter(), _cpu_s()
        aligned = run_align(work / "fetch", {"sft": ["synthetic"]}, work / "align", seed=seed)
        t2, c2 = time.perf_counter(), _cpu_s()
        tokenized = run_tokenize(work / "align", tokenizer, TokenizeConfig(), work / "tok",
                                 groups={"sft": "conversation"})
        t3, c3 = time.perf_counter(), _cpu_s()
    stats = tokenized.info["stats"]["sft"]
    return {
        "rows": rows,
        "rows_aligned": aligned.metrics["rows_kept_sft"],
        "rows_tokenized": stats["rows"],
        "fast_path_rows": stats.get("fast_path_rows"),
        "mean_tokens": stats["mean_len"],
        "fetch_s": round(t1 - t0, 3),
        "align_s": round(t2 - t1, 3),
        "tokenize_s": round(t3 - t2, 3),
        "align_cpu_s": round(c2 - c1, 3),
        "tokenize_cpu_s": round(c3 - c2, 3),
        "rss_before_stages_mb": round(rss_before, 1),
        "peak_rss_mb": round(_peak_rss_mb(), 1),
        # The largest tokenize worker process (0 when the file was tokenized in-process).
        "worker_peak_rss_mb": round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, 1),
    }


def _in_subprocess(rows: int, seed: int) -> dict:
    cmd = [sys.executable, __file__, "--measure", "--rows", str(rows), "--seed", str(seed)]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000, help="N: rows at the large size (N/10 also runs).")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--measure", action="store_true", help=argparse.SUPPRESS)  # one size, in this process
    args = parser.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")
    os.environ.setdefault("LMFORGE_NO_PROGRESS", "1")
    if args.measure:
        print(json.dumps(measure(args.rows, args.seed)))
        return

    cores = os.cpu_count() or 1
    large = _in_subprocess(args.rows, args.seed)
    small = _in_subprocess(max(1, args.rows // 10), args.seed)
    n = large["rows"]
    combined = n / (large["align_s"] + large["tokenize_s"])
    result = {
        "bench": "data_throughput",
        "rows": n,
        "cpu_count": cores,
        "tokenizers_parallelism": os.environ["TOKENIZERS_PARALLELISM"],
        "align_rows_per_s": round(n / large["align_s"]),
        "tokenize_rows_per_s": round(n / large["tokenize_s"]),
        "align_tokenize_rows_per_s": round(combined),
        "align_tokenize_rows_per_s_per_core": round(combined / cores),
        # Rows per second of CPU time (all threads): what one fully busy core would do.
        "align_tokenize_rows_per_cpu_s": round(n / (large["align_cpu_s"] + large["tokenize_cpu_s"])),
        "fast_path_share": round((large["fast_path_rows"] or 0) / large["rows_aligned"], 4),
        "mean_tokens": large["mean_tokens"],
        "peak_rss_mb": {str(n): large["peak_rss_mb"], str(small["rows"]): small["peak_rss_mb"]},
        # Growth over the process's size after imports and the tokenizer: what the stages themselves add.
        "stage_rss_growth_mb": {str(n): round(large["peak_rss_mb"] - large["rss_before_stages_mb"], 1),
                                str(small["rows"]): round(small["peak_rss_mb"] - small["rss_before_stages_mb"], 1)},
        "peak_rss_ratio_n_vs_n_over_10": round(large["peak_rss_mb"] / small["peak_rss_mb"], 3),
        "runs": {"n": large, "n_over_10": small},
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
