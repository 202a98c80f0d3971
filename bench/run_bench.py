"""Run the demo pipeline and the side-by-side benchmarks; write bench/RESULTS.md.

    python bench/run_bench.py [--config configs/demo-cpu.yaml] [--only demo,sft,data,memory] [--data-rows 1000000]

Raw results of each part are kept in bench/results.json; `--only` reruns some parts and keeps the
others' last figures, so RESULTS.md always shows every part.

Measures, in one run on this machine:
- per-stage wall time of a fresh demo run (own workspace), training tokens/s, peak RSS;
- orchestration + tracking overhead: flow wall time minus the time spent inside stage functions;
- an unchanged rerun of the whole demo through the CLI (process start to exit);
- LoRA SFT tokens/s of lmforge vs a plain TRL SFTTrainer (bench/sft_throughput.py);
- alignment + tokenization rows/s (bench/data_throughput.py, when present);
- the demo's CPT stage with and without gradient checkpointing: its peak RSS and tokens/s.
Also rendered, from their own runs: the training methods side by side (bench/methods.py ->
bench/results_methods.json) and the hand-measured parts (bench/cpt_learning.md, bench/alignment.md).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _json_line(output: str) -> dict:
    for line in reversed(output.strip().splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    raise RuntimeError(f"no JSON result in output:\n{output[-2000:]}")


def run_demo(config: str, workspace: Path) -> dict:
    os.environ["LMFORGE_NO_PROGRESS"] = "1"
    from components.config import load_config
    from flows.domain_adaptation import domain_adaptation

    cfg = load_config(config, [f"workspace={workspace}"])
    t0 = time.perf_counter()
    summary = domain_adaptation(config=cfg)
    summary["total_s"] = time.perf_counter() - t0
    # Each stage resets the kernel's resident high-water mark (components/resources.py), which
    # ru_maxrss reads too: the process's peak is the largest stage peak, or the mark since the last reset.
    stage_peaks = [r["peak_rss_mb"] for r in summary["timeline"] if r.get("peak_rss_mb") is not None]
    summary["peak_rss_mb"] = max([resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, *stage_peaks])
    manifests = {k: json.loads((Path(v) / "manifest.json").read_text()) for k, v in summary["stages"].items()}
    summary["train"] = {s: manifests[s]["metrics"] for s in ("cpt", "sft") if s in manifests}
    return summary


def _run(cmd: list[str], env: dict) -> str:
    """stdout of a child process; its stderr tail in the error when it fails."""
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed with exit code {done.returncode}:\n{done.stderr[-6000:]}")
    return done.stdout


def timed_cli(args: list[str], env: dict) -> float:
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "flows.cli", *args], cwd=ROOT, env=env, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - t0


def checkpointing_memory(config: str, root: Path, env: dict, steps: int = 6) -> dict:
    """The demo's CPT stage alone (`--until cpt`, fresh workspace each), with and without
    gradient checkpointing: the stage's peak RSS (from its manifest) and training tokens/s."""
    out = {"steps": steps}
    for on in (False, True):
        workspace = root / f"checkpointing-{str(on).lower()}"
        shutil.rmtree(workspace, ignore_errors=True)
        _run([sys.executable, "-m", "flows.cli", "run", config, "--until", "cpt", "--set", f"workspace={workspace}",
              "--set", f"cpt.max_steps={steps}", "--set", f"cpt.save_steps={steps}",
              "--set", f"cpt.gradient_checkpointing={str(on).lower()}"], env)
        (manifest,) = (workspace / "artifacts" / "cpt").glob("*/manifest.json")
        cpt = json.loads(manifest.read_text())
        out["on" if on else "off"] = {"peak_rss_mb": cpt["peak_rss_mb"],
                                      "train_tokens_per_s": cpt["metrics"]["train_tokens_per_s"]}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/demo-cpu.yaml")
    parser.add_argument("--only", default="demo,sft,data,memory", help="comma-separated parts to (re)run")
    parser.add_argument("--data-rows", type=int, default=1_000_000)
    parser.add_argument("--out", default=str(ROOT / "bench" / "RESULTS.md"))
    args = parser.parse_args()

    parts = set(filter(None, args.only.split(",")))  # --only "" re-renders RESULTS.md from results.json
    unknown = parts - {"demo", "sft", "data", "memory"}
    if unknown:
        parser.error(f"unknown part(s) {', '.join(sorted(unknown))}; known: demo, sft, data, memory")
    raw_path = ROOT / "bench" / "results.json"
    raw = json.loads(raw_path.read_text()) if raw_path.is_file() else {}
    workspace = ROOT / "bench" / "out" / "workspace"
    # No network here: Prefect's temporary server would log a telemetry error per run.
    env = {"PREFECT_SERVER_ANALYTICS_ENABLED": "false", **os.environ,
           "PREFECT_HOME": str(ROOT / "bench" / "out" / "prefect"), "LMFORGE_NO_PROGRESS": "1"}
    os.environ.update(env)
    Path(env["PREFECT_HOME"]).mkdir(parents=True, exist_ok=True)  # Prefect does not create a missing parent

    def save() -> None:
        raw_path.write_text(json.dumps(raw, indent=1, default=str) + "\n")

    if "demo" in parts:
        shutil.rmtree(workspace, ignore_errors=True)
        # The demo runs in a child process so its peak RSS is its own, then an unchanged rerun is timed.
        raw["demo"] = _json_line(_run([sys.executable, __file__, "--_demo", args.config, str(workspace)], env))
        raw["rerun_s"] = timed_cli(["run", args.config, "--set", f"workspace={workspace}"], env)
        raw["config"] = args.config
        save()
    if "sft" in parts:
        raw["sft"] = _json_line(_run([sys.executable, "bench/sft_throughput.py"], env))
        save()
    if "data" in parts:
        raw["data"] = _json_line(_run([sys.executable, "bench/data_throughput.py", "--rows", str(args.data_rows)], env))
        save()
    if "memory" in parts:
        raw["memory"] = checkpointing_memory(args.config, ROOT / "bench" / "out", env)
        save()
    if "demo" not in raw:
        parser.error("no demo figures yet: run with --only demo first")
    # demo_notes: what a reader needs to judge the demo figures (measured by hand, kept in results.json).
    Path(args.out).write_text(render(raw["demo"], raw["rerun_s"], raw.get("sft"), raw.get("data"), raw["config"],
                                     raw.get("memory"), raw.get("demo_notes", [])))
    print(Path(args.out).read_text())


def _mb(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}"


def _json_sections() -> list[str]:
    """The sections of the benchmarks that write a JSON of their own, each where its JSON exists."""
    from grpo_memory import markdown_section as grpo_memory_section  # bench/grpo_memory.py renders its own JSON
    from serve_concurrency import markdown_section as serve_section  # as does bench/serve_concurrency.py

    sections = [("results_methods.json", methods_section), ("results_generation.json", generation_section),
                ("results_serve.json", serve_section), ("results_gguf_quality.json", gguf_quality_section),
                ("results_load.json", load_section), ("results_speculative.json", speculative_section),
                ("results_grpo_memory.json", grpo_memory_section)]
    lines: list[str] = []
    for name, section in sections:
        path = ROOT / "bench" / name
        if path.is_file():
            lines += section(json.loads(path.read_text()))
    return lines


def _sft_section(sft: dict) -> list[str]:
    """LoRA SFT throughput: lmforge against plain TRL (bench/sft_throughput.py)."""
    o, t = sft["lmforge"], sft["trl"]
    return [
        "## LoRA SFT throughput: lmforge vs plain TRL SFTTrainer",
        "",
        f"Same tokenized ICD-10 SFT rows (completion-only labels), SmolLM2-135M fp32, LoRA r={sft['args']['rank']} "
        f"all-linear, batch {sft['args']['batch']}, max length {sft['args']['max_length']}, "
        f"{sft['args']['steps']} steps, {sft['torch_threads']} threads. TRL without gradient checkpointing "
        "(its fastest plain CPU setting). Tokens are real (non-pad) tokens; TRL's count includes one "
        "batch its dataloader prefetches, which flatters TRL slightly.",
        "",
        "| trainer | tokens | seconds | tokens/s |",
        "|---|---|---|---|",
        f"| lmforge | {o['tokens']:.0f} | {o['seconds']:.1f} | {o['tokens_per_s']:.0f} |",
        f"| TRL SFTTrainer | {t['tokens']:.0f} | {t['seconds']:.1f} | {t['tokens_per_s']:.0f} |",
        "",
        f"**Ratio: {sft['ratio']:.2f}x** (goal >= 1.3x).",
        "",
    ]


def _data_section(data: dict) -> list[str]:
    """Alignment + tokenization throughput (bench/data_throughput.py)."""
    n, small = data["runs"]["n"], data["runs"]["n_over_10"]
    return [
        "## Alignment + tokenization throughput",
        "",
        f"{data['rows']:,} synthetic short alpaca rows (mean {data['mean_tokens']} tokens after the chat template), "
        "SmolLM2 fast tokenizer, default tokenize config; conversation files over 32 MB are encoded by one "
        f"worker process per core ({data['cpu_count']} here). Per core = rows/s over the two stages / cores.",
        "",
        "| stage | wall s | CPU s | rows/s |",
        "|---|---|---|---|",
        f"| align | {n['align_s']:.1f} | {n['align_cpu_s']:.1f} | {data['align_rows_per_s']:,} |",
        f"| tokenize | {n['tokenize_s']:.1f} | {n['tokenize_cpu_s']:.1f} | {data['tokenize_rows_per_s']:,} |",
        f"| **both** | {n['align_s'] + n['tokenize_s']:.1f} | {n['align_cpu_s'] + n['tokenize_cpu_s']:.1f} "
        f"| {data['align_tokenize_rows_per_s']:,} |",
        "",
        f"**{data['align_tokenize_rows_per_s_per_core']:,} rows/s per core** "
        f"({data['align_tokenize_rows_per_cpu_s']:,} rows per CPU second; goal >= 20,000 rows/s per core). "
        f"Fast-path share {data['fast_path_share']:.0%}.",
        f"Peak RSS {n['peak_rss_mb']:.0f} MB at {n['rows']:,} rows vs {small['peak_rss_mb']:.0f} MB at "
        f"{small['rows']:,} (the smaller file is tokenized in-process, the larger by workers, each worker "
        f"peaking at {n.get('worker_peak_rss_mb', 0):.0f} MB): flat in the rows.",
        "",
        "<details><summary>raw figures</summary>",
        "",
        "```json",
        json.dumps(data, indent=1),
        "```",
        "",
        "</details>",
        "",
    ]


def _memory_section(memory: dict) -> list[str]:
    """CPT's peak memory with and without gradient checkpointing."""
    off, on = memory["off"], memory["on"]
    return [
        "## Gradient checkpointing",
        "",
        f"The demo's CPT stage alone ({memory['steps']} steps, `lmforge run --until cpt`), peak RSS of the stage "
        "from its manifest:",
        "",
        "| cpt.gradient_checkpointing | peak RSS MB | tokens/s |",
        "|---|---|---|",
        f"| false | {off['peak_rss_mb']:.0f} | {off['train_tokens_per_s']:.0f} |",
        f"| true | {on['peak_rss_mb']:.0f} | {on['train_tokens_per_s']:.0f} |",
        "",
    ]


def render(demo: dict, rerun_s: float, sft: dict | None, data: dict | None, config: str,
           memory: dict | None = None, notes: list[str] = ()) -> str:
    m = demo["metrics"]
    overhead_pct = 100 * m["orchestration_overhead_s"] / m["flow_wall_s"]
    lines = [
        "# Benchmark results",
        "",
        f"Machine: {platform.machine()}, {os.cpu_count()} cores, no GPU, Python {platform.python_version()}. "
        f"Recorded {time.strftime('%Y-%m-%d')} by `python bench/run_bench.py` (config `{config}`).",
        "",
        "## Demo pipeline (fresh workspace)",
        "",
        "| stage | wall s | peak RSS MB |",
        "|---|---|---|",
        *[f"| {r['stage']} | {r['stage_s']:.1f} | {_mb(r.get('peak_rss_mb'))} |" for r in demo["timeline"]],
        f"| **flow total** | **{m['flow_wall_s']:.1f}** | |",
        "",
        f"- Peak RSS of the demo process: {demo['peak_rss_mb']:.0f} MB",
        *[f"- {s} training: {t['train_tokens_per_s']:.0f} tokens/s ({t['train_tokens']:.0f} tokens in "
          f"{t['train_seconds']:.1f} s), loss {t['train_loss_first']:.3f} -> {t['train_loss_last']:.3f}"
          for s, t in demo["train"].items()],
        f"- Orchestration + tracking (flow wall minus time inside stage functions): "
        f"{m['orchestration_overhead_s']:.1f} s = {overhead_pct:.2f}% of the flow (goal <= 1%)",
        f"- Unchanged rerun of the whole demo, `lmforge run` process start to exit: {rerun_s:.1f} s (goal <= 10 s)",
        *[f"- {note}" for note in notes],
        "",
        "Held-out evaluation, " + " vs ".join(demo["columns"]) + " (what each stage contributed):",
        "",
        "| metric | " + " | ".join(demo["columns"]) + " |",
        "|---|" + "---|" * len(demo["columns"]),
        *["| " + k + " | " + " | ".join("" if v[c] is None else f"{v[c]:.4f}" for c in demo["columns"]) + " |"
          for k, v in demo["comparison"].items()],
        "",
    ]
    if sft:
        lines += _sft_section(sft)
    if data:
        lines += _data_section(data)
    if memory:
        lines += _memory_section(memory)
    lines += _json_sections()
    # The learning-rate sweep of bench/cpt_learning.py is measured by hand (several CPT runs); kept as written.
    # So are the alignment figures (bench/alignment.md: the demo's reward + RAFT run, bench/ppo_memory.py)
    # and the quality preset's run (bench/quality.md), and the unchanged rerun's A/B (bench/rerun_time.py).
    for name in ("demo.md", "cpt_learning.md", "alignment.md", "quality.md", "rerun_time.md"):
        part = ROOT / "bench" / name
        if part.is_file():
            lines += [part.read_text().rstrip(), ""]
    from gpu_check import markdown_section  # bench/gpu_check.py's JSON (bench/results_gpu_check.json), its own run

    lines += markdown_section()
    return "\n".join(lines)


def methods_section(result: dict) -> list[str]:
    """bench/methods.py's figures (its own run, kept in bench/results_methods.json) as a table."""
    # Before the run the load is other work; after it, this benchmark's own processes account for up to one per core.
    # `cores_shared`, written by hand, overrides the guess (a job that ended just before still shows in the average).
    busy = result.get("cores_shared", result["load_average_before"] > 0.5
                      or result["load_average_after"] > result["cpu_count"] + 0.5)
    lines = [
        "## Training methods side by side (CPU)",
        "",
        f"`python bench/methods.py`, {result['created_at'][:10]}: the demo model (SmolLM2-135M-Instruct, fp32), "
        f"{result['steps']} timed SFT steps after {result['warmup']} untimed ones, batch {result['batch']} of ICD-10 "
        f"rows all {result['sequence_length']} tokens long ({result['tokens_per_step']} tokens per step), each method "
        f"in its own process through lmforge's training path, {result.get('threads') or 'default'} torch thread(s). "
        "Peak RSS is the process's high-water mark while training (reset once the model is loaded), above its RSS "
        "after imports: the fp32 model alone is ~540 MB of it, ~170 MB in NF4. The full-weight rows train at lr "
        "1e-5 (Lion 3.3e-6), the LoRA rows (r8, all linear layers) at 3e-4, on the same few rows again and again: "
        "the losses only show that each method trains.",
        "",
        f"Load average {result['load_average_before']:.2f} before, {result['load_average_after']:.2f} after "
        f"on {result['cpu_count']} cores."
        + (" Another job shared the cores during the measurement: read the figures relative to each other "
           "(to the `lora` row), not as absolute speeds." if busy else ""),
        "",
        "| method | finetuning | optimizer | trainable params | s/step | tokens/s | peak RSS above imports MB | loss first -> last |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, r in result["methods"].items():
        if "error" in r:
            lines.append(f"| {name} | | | | failed: {r['error']} | | | |")
            continue
        c = r["config"]
        lines.append(f"| {name} | {c['finetuning']} | {c['optimizer']} | {r['trainable_params'] / 1e6:.2f}M "
                     f"({100 * r['trainable_params'] / r['total_params']:.1f}%) | {r['s_per_step']:.2f} | "
                     f"{r['tokens_per_s']:.0f} | {r['peak_above_imports_mb']:.0f} | "
                     f"{r['loss_first']:.2f} -> {r['loss_last']:.2f} |")
    # notes: what a reader needs to judge the figures, written by hand into results_methods.json.
    notes = [f"- {note}" for note in result.get("notes", [])]
    return [*lines, "", *notes, *([""] if notes else [])]


def generation_section(result: dict) -> list[str]:
    """bench/generation_speed.py's figures (its own run, bench/results_generation.json): the one generation path
    (components/models/generation.py) against transformers' generate, same prompts and settings."""
    lines = [
        "## Generation: the one path against `model.generate`",
        "",
        f"`python bench/generation_speed.py`, {result['created_at'][:10]}: the demo's SFT model on its held-out prompts "
        f"({result['threads']} threads, load average {result['load_average']:.2f} on {result['cpu_count']} cores; best "
        f"of {result['repeats']}). The path encodes a batch's shared prompt prefix once and drops rows that stopped.",
        "",
        "| call | prompts | generate s | one path s | speed-up | new tokens (generate / one path) |",
        "|---|---|---|---|---|---|",
    ]
    for name, r in result["rows"].items():
        lines.append(f"| {name} | {r['prompts']} | {r['generate_s']:.1f} | {r['decode_s']:.1f} | {r['speedup']:.2f}x | "
                     f"{r['generate_tokens']} / {r['decode_tokens']} |")
    greedy = result["rows"].get("evaluation (greedy)")
    if greedy:
        lines += ["", f"Greedy answers identical on {greedy['identical_answers']} of {greedy['prompts']} prompts."]
    return [*lines, ""]


def speculative_section(result: dict) -> list[str]:
    """bench/speculative.py's figures (its own run, bench/results_speculative.json): prompt-lookup decoding against
    plain greedy decoding, same prompts, answers compared token for token."""
    lines = [
        "## Speculative decoding: prompt lookup on CPU",
        "",
        f"`python bench/speculative.py --model {result['model']}`, {result['created_at'][:10]}: up to "
        f"{result['lookahead']} tokens proposed per row ({result['threads']} threads, load average "
        f"{result['load_average'][0]:.2f} on {result['cpu_count']} cores; best of the repeats). The rows decode "
        "through components/models/generation.py's batched decoder"
        + (", except the last: transformers' own `generate` (`prompt_lookup_num_tokens`), one row at a time, for "
           "reference." if "extraction_transformers_generate" in result["results"] else "."),
        *([result["note"]] if result.get("note") else []),
        "",
        "| workload | plain s | prompt lookup s | speed-up | forward passes (plain / lookup) | accepted / proposed | same answers |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, r in result["results"].items():
        plain, fast = r["plain"], r["lookup"]
        passes = (f"{plain['forward_passes']} / {fast['forward_passes']}" if "forward_passes" in plain else "-")
        accepted = f"{fast['accepted']} / {fast['proposed']}" if "accepted" in fast else "-"
        lines.append(f"| {name.replace('_', ' ')} | {plain['seconds']:.1f} | {fast['seconds']:.1f} | "
                     f"{r['speedup']:.2f}x | {passes} | {accepted} | {'yes' if r['same_answers'] else 'NO'} |")
    return [*lines, ""]


def load_section(result: dict) -> list[str]:
    """bench/load_test.py's figures (its own run, bench/results_load.json): flow runs at once on several workers."""
    configs = ", ".join(f"{name} x{n}" for name, n in result["configs"].items())
    return [
        "## Load: flow runs at once on the production setup",
        "",
        f"`python bench/load_test.py`, {result['created_at'][:10]}: PostgreSQL, `mlflow server` on it with proxied "
        f"artifacts, `prefect server` on it, {result['workers']} process workers (at most {result['limit_per_worker']} "
        f"run each at once) polling one pool; {result['runs']} flow runs of the tiny random model triggered together "
        f"({configs}), sharing one workspace. Load average {result['load_average_before']:.1f} before, "
        f"{result['load_average_after']:.1f} after on {result['cpu_count']} cores.",
        "",
        "| runs | completed | wall s | distinct stages | stages computed | duplicates | MLflow runs RUNNING | "
        "registry versions | lineage errors |",
        "|---|---|---|---|---|---|---|---|---|",
        f"| {result['runs']} | {result['completed']} | {result['wall_s']:.0f} | {result['distinct_stages']} | "
        f"{result['stages_computed']} | {result['duplicates']} | {result['mlflow_runs_running']} | "
        f"{result['registry_versions']} (of {result['distinct_configs']} configs) | {len(result['lineage_errors'])} |",
        "",
        f"{result['workers_used']} of {result['workers']} workers ran flow runs; {result['stage_runs']} stage runs were "
        f"recorded in MLflow (computed or cached), artifact URIs `{'`, `'.join(result['artifact_uri_schemes'])}:`.",
        "",
    ]


def gguf_quality_section(result: dict) -> list[str]:
    """bench/gguf_quality.py's figures (its own run, bench/results_gguf_quality.json): each GGUF type against the
    checkpoint it was exported from, in llama.cpp and reloaded by transformers, on the demo's held-out questions."""
    ref = result["reference"]
    lines = [
        "## GGUF: quality change of F16, Q8_0 and Q4_0",
        "",
        f"`python bench/gguf_quality.py`, {result['created_at'][:10]}: "
        f"{result.get('model_note') or result['model'] + ' (not trained: the base the demo starts from)'}, {ref['questions']} held-out questions ({result['per_task']} of each of "
        f"{', '.join(result['tasks'])}), greedy, up to {result['max_new_tokens']} new tokens, compared with the "
        f"checkpoint's own answers in transformers fp32 (exact match {ref['exact_match']:.2f}). llama.cpp: "
        f"llama-cpp-python {result['llama_cpp'] or 'not installed'}; transformers: the file reloaded with "
        f"`gguf_file=` (weights dequantized), what the quantize stage scores. Load average "
        f"{result['load_average_before']:.1f} before, {result['load_average_after']:.1f} after on "
        f"{result['cpu_count']} cores.",
        "",
        "| type | file MB | runtime | identical answers | tokens before the first difference | exact match | "
        "answer contains the reference |",
        "|---|---|---|---|---|---|---|",
        f"| (fp32 checkpoint) | | transformers | {ref['questions']}/{ref['questions']} | all | {ref['exact_match']:.2f} | "
        f"{ref['answer_contains_reference']:.2f} |",
    ]
    for kind, entry in result["variants"].items():
        for runtime, label in (("llama_cpp", "llama.cpp"), ("transformers_dequantized", "transformers (dequantized)")):
            if runtime in entry:
                r = entry[runtime]
                lines.append(f"| {kind.upper()} | {entry['file_mb']:.0f} | {label} | {r['identical_answers']}/{r['questions']} "
                             f"| {r['tokens_before_first_difference']}/{r['reference_tokens']} | {r['exact_match']:.2f} | "
                             f"{r['answer_contains_reference']:.2f} |")
    return [*lines, "", *[f"- {note}" for note in result.get("notes", [])], ""]


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--_demo":
        print(json.dumps(run_demo(sys.argv[2], Path(sys.argv[3])), default=str))
    else:
        main()
