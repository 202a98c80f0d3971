"""`lmforge serve` under load: 8 concurrent clients against 1, aggregate generated tokens/s.

    python bench/serve_concurrency.py [MODEL] [--config configs/demo-cpu.yaml] [--clients 8] [--max-tokens 64]

MODEL defaults to the demo's registered champion (models:/icd10-coder@champion in the config's workspace); a
model directory works too. Starts `lmforge serve` on a free port (its backend's continuous batching is what
makes concurrent requests share the model's forward passes), sends the same ICD-10 questions one client at a
time and then from `--clients` threads at once, each request greedy with `--max-tokens` new tokens, and writes
bench/results_serve.json (`--out`), which bench/run_bench.py renders into RESULTS.md. Run it on idle cores: the
figure is throughput, and other work on the machine shows in it (the load average is recorded). The one client
sends every request the concurrent clients send, in turn; each phase runs on a freshly started server, so the
concurrent clients do not find the one client's prompts in the prefix cache (an earlier version reused one
server: 2.81-2.87x, against 2.1-2.8x on fresh servers). After the servers stop, `batching_ceiling` times the same
work as bare forward passes in this process: what the best batching server could gain on this CPU.
"""

from __future__ import annotations

import argparse
import contextlib
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

# Every request asks something new (32 questions, each once per run), so a server's prefix cache shares the
# chat template and the question stems, never a whole prompt asked before.
CODES = [("E11.9", "Type 2 diabetes mellitus without complications"), ("I10", "Essential (primary) hypertension"),
         ("J45.909", "Unspecified asthma, uncomplicated"), ("A00.0", "Cholera due to Vibrio cholerae 01, biovar cholerae"),
         ("M54.50", "Low back pain, unspecified"), ("F32.9", "Major depressive disorder, single episode, unspecified"),
         ("K21.9", "Gastro-esophageal reflux disease without esophagitis"),
         ("N39.0", "Urinary tract infection, site not specified")]
QUESTIONS = [question.format(code=code, description=description)
             for question in ("Which ICD-10-CM chapter contains code {code}?", "What does ICD-10-CM code {code} describe?",
                              "Is ICD-10-CM code {code} billable?", "What is the ICD-10-CM code for: {description}?")
             for code, description in CODES]


def run_load(client, model: str, clients: int, requests_per_client: int, max_tokens: int) -> dict:
    """`clients` threads each sending `requests_per_client` chat requests in turn; tokens/s over the wall time."""
    asked = _asked(clients, requests_per_client)

    def one_client(c: int) -> list[tuple[int, float]]:
        out = []
        for question in asked[c * requests_per_client:(c + 1) * requests_per_client]:
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
            "tokens_per_s": round(tokens / wall, 2), "mean_latency_s": round(sum(s for _, s in done) / len(done), 3),
            "tokens_by_question": {q: t for q, (t, _) in zip(asked, done)}}


def _asked(clients: int, requests_per_client: int) -> list[str]:
    """The questions run_load sends, in the order of its results (all different up to len(QUESTIONS) requests)."""
    return [QUESTIONS[(c * requests_per_client + r) % len(QUESTIONS)]
            for c in range(clients) for r in range(requests_per_client)]


def batching_ceiling(model_dir: str, tokens: dict[str, int], clients: int, requests_per_client: int) -> dict:
    """About the most a batching server could gain on this CPU for the same requests, from timed forward passes
    in this process (the server stopped): the prompts' shared chat-template prefix computed once (a prefix
    cache), then one client = each question's own prefill + its answer's decode steps at batch 1, and
    `clients` at once = one prefill per wave of `clients` questions + every answer token decoded in full
    batches of `clients` (perfect packing). A server that also shares question stems saves a little more
    prefill on both sides."""
    import copy

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    ids = {q: list(tokenizer.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                                 tokenize=True, return_dict=True)["input_ids"]) for q in QUESTIONS}
    rows = list(ids.values())
    shared = next(i for i in range(min(map(len, rows))) if len({r[i] for r in rows}) > 1)

    def best_of(fn, n: int = 3) -> float:
        times = []
        for _ in range(n):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return min(times)

    with torch.inference_mode():
        prefix = model(torch.tensor([rows[0][:shared]]), use_cache=True).past_key_values

        def prefill(questions: list[str]):
            width = max(len(ids[q]) - shared for q in questions)
            batch = torch.tensor([(ids[q][shared:] + [0] * width)[:width] for q in questions])
            cache = copy.deepcopy(prefix)
            if len(questions) > 1:
                cache.batch_repeat_interleave(len(questions))
            return model(batch, past_key_values=cache, use_cache=True).past_key_values

        def step_s(questions: list[str]) -> float:
            cache, token = prefill(questions), torch.zeros((len(questions), 1), dtype=torch.long)

            def steps():
                grown = copy.deepcopy(cache)
                for _ in range(8):
                    model(token, past_key_values=grown, use_cache=True)
            return best_of(steps) / 8

        asked = _asked(clients, requests_per_client)
        waves = [[asked[c * requests_per_client + r] for c in range(clients)] for r in range(requests_per_client)]
        prefill_one = {q: best_of(lambda q=q: prefill([q])) for q in QUESTIONS}
        step_one = {q: step_s([q]) for q in QUESTIONS}
        prefill_wave = [best_of(lambda w=w: prefill(w)) for w in waves]
        step_wave = step_s(waves[0])
    one = sum(prefill_one[q] + tokens[q] * step_one[q] for q in asked)
    many = sum(prefill_wave) + sum(tokens[q] for q in asked) / clients * step_wave
    return {"template_prefix_tokens": shared, "one_client_s": round(one, 3), "concurrent_s": round(many, 3),
            "speedup": round(one / many, 2),
            "prefill_ms": {"one": round(1000 * sum(prefill_one.values()) / len(QUESTIONS), 1),
                           "wave": round(1000 * sum(prefill_wave) / len(waves), 1)},
            "decode_step_ms": {"one": round(1000 * sum(step_one.values()) / len(QUESTIONS), 1),
                               "wave": round(1000 * step_wave, 1)}}


def _median_run(rows: list[dict]) -> dict:
    """The run of median wall time (the lower middle one of an even count)."""
    return sorted(rows, key=lambda r: r["wall_s"])[(len(rows) - 1) // 2]


def _speedup_range(runs: dict[str, list[dict]]) -> list[float]:
    """The lowest and highest ratio any concurrent run makes with any single-client run."""
    rates = {phase: [r["tokens_per_s"] for r in rows] for phase, rows in runs.items()}
    return [round(min(rates["concurrent"]) / max(rates["single"]), 2),
            round(max(rates["concurrent"]) / min(rates["single"]), 2)]


def served_directory(spec: str, config: str, sets: list[str]) -> str:
    """The checkpoint `lmforge serve` ran for `spec` (the merged copy it made of an adapter stack)."""
    from components.config import load_config
    from components.serving.resolve import merged_directory, resolve_served_model

    cfg = load_config(config, sets)
    return str(merged_directory(resolve_served_model(spec, cfg), Path(cfg.workspace) / "serve-cache"))


@contextlib.contextmanager
def serving(args):
    """A freshly started `lmforge serve` (so no phase finds another's prompts in its prefix cache), warmed by one
    request: yields the openai client, the served model's card, and a callable giving the server's processes'
    peak resident memory in MB (the front, the backend server and, for transformers serve, its engine)."""
    import openai
    import psutil

    from tests.servers import free_port

    port = free_port()
    log_path = Path(os.environ.get("TMPDIR", "/tmp")) / f"serve-bench-{port}.log"
    command = [sys.executable, "-m", "flows.cli", "serve", args.model, "--config", args.config, "--port", str(port),
               "--backend", args.backend, "--follow-interval", "0",
               *(["--backend-args", args.backend_args] if args.backend_args else []), *[a for s in args.set for a in ("--set", s)]]
    with open(log_path, "w") as log:
        server = subprocess.Popen(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    def peak_mb() -> dict[str, float]:
        peaks = {}
        for proc in [psutil.Process(server.pid), *psutil.Process(server.pid).children(recursive=True)]:
            with contextlib.suppress(OSError, psutil.Error):
                command = " ".join(proc.cmdline())
                if "resource_tracker" in command:
                    continue
                role = ("front" if proc.pid == server.pid else "engine" if "multiprocessing" in command
                        else "backend" if "serve" in command else f"pid {proc.pid}")
                status = Path(f"/proc/{proc.pid}/status").read_text()
                hwm = next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmHWM"))
                peaks[role] = round(hwm / 1024, 1)
        return peaks

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
        yield client, model, peak_mb
    finally:
        server.terminate()
        server.wait(60)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", nargs="?", default="models:/icd10-coder@champion")
    parser.add_argument("--config", default=str(ROOT / "configs" / "demo-cpu.yaml"))
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests-per-client", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--backend-args", default="", help="lmforge serve's --backend-args, e.g. '--cb-block-size 16'")
    parser.add_argument("--set", action="append", default=[], help="config override, as lmforge's --set")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each phase, each on a fresh server")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results_serve.json")
    args = parser.parse_args()

    load_before = os.getloadavg()[0]
    # One client sends every request the concurrent clients send, in turn: the same questions and tokens. Each
    # phase gets its own server: the second would otherwise find every prompt of the first in the prefix cache.
    # Phases alternate, --repeats times, and each reports its median run (8-client runs differ by up to 25% here).
    runs: dict[str, list[dict]] = {"single": [], "concurrent": []}
    memory: dict[str, float] = {}
    for _ in range(args.repeats):
        with serving(args) as (client, model, _):
            runs["single"].append(run_load(client, model.id, 1, args.clients * args.requests_per_client, args.max_tokens))
        with serving(args) as (client, model, peak_mb):
            runs["concurrent"].append(run_load(client, model.id, args.clients, args.requests_per_client, args.max_tokens))
            memory = peak_mb()
    single, concurrent = (_median_run(runs[phase]) for phase in ("single", "concurrent"))
    model_dir = served_directory(args.model, args.config, args.set)
    ceiling = batching_ceiling(model_dir, single["tokens_by_question"], args.clients, args.requests_per_client)
    result = {
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "model": model.id, "spec": args.model, "version": (model.model_extra or {}).get("lmforge", {}).get("version"),
        "backend": (model.model_extra or {}).get("lmforge", {}).get("backend"), "max_tokens": args.max_tokens,
        "backend_args": args.backend_args, "server_peak_rss_mb": memory,
        "cpu_count": os.cpu_count(), "load_average_before": load_before, "load_average_after": os.getloadavg()[0],
        "single": single, "concurrent": concurrent,
        "speedup": round(concurrent["tokens_per_s"] / single["tokens_per_s"], 2),
        "speedup_range": _speedup_range(runs),
        "wall_s_by_run": {phase: [r["wall_s"] for r in rows] for phase, rows in runs.items()}, "ceiling": ceiling,
    }
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


def markdown_section(result: dict) -> list[str]:
    """bench/results_serve.json as a RESULTS.md section (bench/run_bench.py renders it): 1 client against N."""
    one, many = result["single"], result["concurrent"]
    version = f" version {result['version']}" if result.get("version") else ""
    return [
        "## Serving: concurrent clients",
        "",
        f"`python bench/serve_concurrency.py {result['spec']}`, {result['created_at'][:10]}: `lmforge serve` "
        f"({result['backend']} backend{', continuous batching' if result['backend'] == 'transformers' else ''}) "
        f"serving {result['model']}{version}, greedy chat answers of up to {result['max_tokens']} tokens. "
        f"Load average {result['load_average_before']:.2f} before, {result['load_average_after']:.2f} after on "
        f"{result['cpu_count']} cores.",
        "",
        "| clients | requests | generated tokens | wall s | tokens/s (all clients) | mean latency s |",
        "|---|---|---|---|---|---|",
        *[f"| {r['clients']} | {r['requests']} | {r['completion_tokens']} | {r['wall_s']:.1f} | {r['tokens_per_s']:.1f} | "
          f"{r['mean_latency_s']:.2f} |" for r in (one, many)],
        "",
        f"{many['clients']} clients get {result['speedup']:.2f}x the tokens/s of one{_spread(result)}.{_memory(result)}",
        "",
        *_ceiling_lines(result),
    ]


def _spread(result: dict) -> str:
    if "wall_s_by_run" not in result:
        return ""
    low, high = result["speedup_range"]
    runs = len(result["wall_s_by_run"]["concurrent"])
    return (f" (median of {runs} runs of each, every run on a freshly started server; any run against any other: "
            f"{low:.2f}x to {high:.2f}x)")


def _memory(result: dict) -> str:
    peaks = result.get("server_peak_rss_mb")
    if not peaks:
        return ""
    engine = peaks.get("engine") or peaks.get("backend") or max(peaks.values())
    return (f" The server's processes peaked at {sum(peaks.values()) / 1024:.1f} GB resident in all "
            f"({engine / 1024:.1f} GB the model's).")


def _ceiling_lines(result: dict) -> list[str]:
    """What batching could gain at most on this CPU (bench/serve_concurrency.py's batching_ceiling), where measured."""
    ceiling = result.get("ceiling")
    if not ceiling:
        return []
    share = result["speedup"] / ceiling["speedup"]
    return [f"The same requests as bare forward passes in one process (the {ceiling['template_prefix_tokens']}-token "
            f"template prefix computed once, every answer token decoded in full batches): one client "
            f"{ceiling['one_client_s']:.2f} s, {result['concurrent']['clients']} at once {ceiling['concurrent_s']:.2f} s, "
            f"a gain of **{ceiling['speedup']:.2f}x**, about the most batching can get here; the server reaches "
            f"{share:.0%} of it{_ceiling_costs(ceiling, result['concurrent']['clients'])}. "
            f"{result.get('note', '')}".rstrip(), ""]


def _ceiling_costs(ceiling: dict, clients: int) -> str:
    if "prefill_ms" not in ceiling:
        return ""
    prefill, step = ceiling["prefill_ms"], ceiling["decode_step_ms"]
    return (f" (prefill of one question {prefill['one']:.0f} ms, of {clients} at once {prefill['wave']:.0f} ms; a "
            f"decoding step of one row {step['one']:.0f} ms, of {clients} rows {step['wave']:.0f} ms)")


if __name__ == "__main__":
    main()
