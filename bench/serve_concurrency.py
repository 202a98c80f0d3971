"""`lmforge serve` under load: 8 concurrent clients against 1, aggregate generated tokens/s.

    python bench/serve_concurrency.py [MODEL] [--config configs/demo-cpu.yaml] [--clients 8] [--max-tokens 64]

MODEL defaults to the demo's registered champion (models:/icd10-coder@champion in the config's workspace); a
model directory works too. Starts `lmforge serve` on a free port (its backend's continuous batching is what
makes concurrent requests share the model's forward passes), sends the same ICD-10 questions one client at a
time and then from `--clients` threads at once, each request greedy with `--max-tokens` new tokens, and writes
bench/results_serve.json (`--out`), which bench/run_bench.py renders into RESULTS.md. Run it on idle cores: the
figure is throughput, and other work on the machine shows in it (the load average is recorded).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

QUESTIONS = [
    "Which ICD-10-CM chapter contains code E11.9?",
    "What does ICD-10-CM code I10 describe?",
    "Is ICD-10-CM code J45 billable?",
    "What is the ICD-10-CM code for: Type 2 diabetes mellitus without complications?",
    "Which ICD-10-CM chapter contains code A00.0?",
    "What does ICD-10-CM code J45.909 describe?",
    "Is ICD-10-CM code E11 billable?",
    "Which ICD-10-CM chapter contains code S72.001A?",
]


def run_load(client, model: str, clients: int, requests_per_client: int, max_tokens: int) -> dict:
    """`clients` threads each sending `requests_per_client` chat requests in turn; tokens/s over the wall time."""
    def one_client(c: int) -> list[tuple[int, float]]:
        out = []
        for r in range(requests_per_client):
            question = QUESTIONS[(c * requests_per_client + r) % len(QUESTIONS)]
            start = time.perf_counter()
            reply = client.chat.completions.create(model=model, messages=[{"role": "user", "content": question}],
                                                   max_tokens=max_tokens, temperature=0)
            out.append((reply.usage.completion_tokens, time.perf_counter() - start))
        return out

    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        done = [r for rows in pool.map(one_client, range(clients)) for r in rows]
    wall = time.perf_counter() - start
    tokens = sum(t for t, _ in done)
    return {"clients": clients, "requests": len(done), "completion_tokens": tokens, "wall_s": round(wall, 3),
            "tokens_per_s": round(tokens / wall, 2), "mean_latency_s": round(sum(s for _, s in done) / len(done), 3)}


def main() -> None:
    import openai

    from tests.servers import free_port

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", nargs="?", default="models:/icd10-coder@champion")
    parser.add_argument("--config", default=str(ROOT / "configs" / "demo-cpu.yaml"))
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests-per-client", type=int, default=2)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--set", action="append", default=[], help="config override, as lmforge's --set")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results_serve.json")
    args = parser.parse_args()

    port = free_port()
    log_path = Path(os.environ.get("TMPDIR", "/tmp")) / f"serve-bench-{port}.log"
    command = [sys.executable, "-m", "flows.cli", "serve", args.model, "--config", args.config, "--port", str(port),
               "--backend", args.backend, "--follow-interval", "0", *[a for s in args.set for a in ("--set", s)]]
    load_before = os.getloadavg()[0]
    with open(log_path, "w") as log:
        server = subprocess.Popen(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=600)
        deadline = time.monotonic() + 600
        while True:
            try:
                model = client.models.list().data[0]
                break
            except openai.APIConnectionError:
                if server.poll() is not None or time.monotonic() > deadline:
                    sys.exit(f"lmforge serve did not come up; its log ({log_path}):\n{log_path.read_text()[-3000:]}")
                time.sleep(1)
        run_load(client, model.id, 1, 1, min(8, args.max_tokens))  # warm-up: first-request costs stay out
        single = run_load(client, model.id, 1, args.requests_per_client, args.max_tokens)
        concurrent = run_load(client, model.id, args.clients, args.requests_per_client, args.max_tokens)
    finally:
        server.terminate()
        server.wait(60)
    result = {
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "model": model.id, "spec": args.model, "version": (model.model_extra or {}).get("lmforge", {}).get("version"),
        "backend": (model.model_extra or {}).get("lmforge", {}).get("backend"), "max_tokens": args.max_tokens,
        "cpu_count": os.cpu_count(), "load_average_before": load_before, "load_average_after": os.getloadavg()[0],
        "single": single, "concurrent": concurrent,
        "speedup": round(concurrent["tokens_per_s"] / single["tokens_per_s"], 2),
    }
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
