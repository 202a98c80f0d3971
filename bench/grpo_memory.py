"""GRPO (TRL) against PPO (our loop): peak memory and seconds per step, same prompts, same generations.

    python bench/grpo_memory.py [--model DIR] [--config configs/demo-cpu.yaml] [--steps 2] [--prompts 8]
                                [--threads 0] [--label after] [--out bench/results_grpo_memory.json]

Both run through lmforge's alignment path (components.alignment.trl_methods.train_grpo and the stage's
_run_ppo) with the preset's alignment settings (learning rate, temperature, max_new_tokens, LoRA, GRPO's
beta, PPO's epochs and mini-batches), on the base model (the demo's embedded SmolLM2-135M-Instruct unless
--model), the ICD-10 rule as the reward. The work is the same: each step samples `num_generations`
completions of the same `--prompts` prompts (GRPO: batch_size prompts x num_generations; PPO, which samples
one completion per prompt: batch_size prompts x num_generations rows, each prompt repeated). Each method runs
in its own subprocess, which reports its peak RSS (VmHWM) above its RSS after imports, and the seconds of each
step by the method's own timer (STEP_TIMER), averaged over the steps after the first. PPO's 2 epochs of
mini-batches over 32 answers dominate the runtime: 7 minutes on 2 nearly idle cores at the defaults.

The JSON keeps one entry per `--label` (a rerun under another label, e.g. before and after a change, keeps
the others); bench/run_bench.py renders it into bench/RESULTS.md (markdown_section).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ppo_memory import rss_mb  # noqa: E402  (bench/ is the script's directory, so its siblings import)

GOAL_PEAK, GOAL_STEP = 1.5, 2.0  # GRPO over PPO (issue 27)


def method_overrides(method: str, args) -> list[str]:
    """The preset's alignment section, set to `method` with `args.prompts` prompts x num_generations per step."""
    from components.config import load_config

    k = load_config(args.config).alignment.num_generations
    common = [f"alignment.method={method.split('_')[0]}", f"alignment.max_steps={args.steps}", "alignment.save_steps=100000"]
    if method.startswith("grpo"):  # batch_size counts prompts; TRL answers each num_generations times
        return [*common, f"alignment.batch_size={args.prompts}", "alignment.logging_steps=1"]
    return [*common, f"alignment.batch_size={args.prompts * k}"]  # one answer per row: each prompt k times


def make_prompts(args, out: Path) -> None:
    """The first `args.prompts` of the sampling methods' prompts (data.sft aligned as the pipeline does)."""
    from components.alignment.data import sampling_prompts
    from components.config import load_config
    from components.data.align import run_align
    from components.models.loading import load_tokenizer

    cfg = load_config(args.config)
    with tempfile.TemporaryDirectory() as tmp:
        data = cfg.data
        run_align((ROOT / data.dataset_info).parent, {"sft": data.sft}, Path(tmp), max_samples=data.max_samples,
                  seed=data.seed, mix_strategy=data.mix_strategy, interleave_probs=data.interleave_probs,
                  sft_task_weights=data.sft_task_weights, sft_phases=data.sft_phases)
        prompts = sampling_prompts(Path(tmp) / "sft.jsonl", load_tokenizer(args.model), cfg.tokenize.template,
                                   cfg.tokenize.system_prompt, limit=cfg.alignment.max_prompts, seed=cfg.alignment.seed)
    out.write_text(json.dumps(prompts[: args.prompts]))


# Each method's own timer of a whole step: TRL's step_time (generation, scoring, reference log-probabilities,
# forward and backward of every micro-batch; not the optimizer step, milliseconds for a LoRA), run_ppo's step_seconds.
STEP_TIMER = {"grpo": "step_time", "ppo": "step_seconds"}
METHODS = ("grpo", "grpo_whole_batch", "ppo")  # grpo_whole_batch: every answer of a step in one backward pass


def step_figures(method: str, logs: list[dict]) -> dict:
    """Wall seconds of every step (the method's own timer) and the process's CPU seconds between step logs;
    their means over the steps after the first (which warms up, and whose CPU time holds the trainer's setup)."""
    key = STEP_TIMER[method.split("_")[0]]
    steps = [log for log in logs if key in log]
    seconds = [log[key] for log in steps]
    cpu = [b["cpu_s"] - a["cpu_s"] for a, b in zip(steps, steps[1:]) if "cpu_s" in a]  # (runs before it was logged)
    timed = seconds[1:] or seconds
    return {"step_s": seconds, "timed_steps": len(timed), "s_per_step": sum(timed) / len(timed),
            "cpu_step_s": cpu, "cpu_s_per_step": sum(cpu) / len(cpu) if cpu else None}


def train(method: str, args, logs: list[dict], work: Path) -> dict:
    """Run `method` through lmforge's alignment path; its per-step metrics are appended to `logs`."""
    from components.alignment import trl_methods
    from components.alignment.rewards import build_reward
    from components.alignment.stage import _run_ppo
    from components.alignment.trl_methods import train_grpo
    from components.config import load_config
    from components.models.generation import stop_ids
    from components.models.loading import load_tokenizer, load_with_adapters, select_hardware

    cfg = load_config(args.config, method_overrides(method, args))
    hardware = select_hardware(cfg.compute.device, cfg.compute.precision)
    tokenizer = load_tokenizer(args.model)
    prompts = json.loads(Path(args.prompts_file).read_text())
    model = load_with_adapters(args.model, [], hardware)
    sink = lambda step, metrics: logs.append({"step": step, "cpu_s": time.process_time(), **metrics})  # noqa: E731
    if method == "grpo_whole_batch":  # the layout before grpo_config split the step into its prompts' groups
        answers = cfg.alignment.batch_size * cfg.alignment.grad_accum * cfg.alignment.num_generations
        trl_methods.grpo_config = functools.partial(trl_methods.grpo_config, answers_per_pass=answers)
    t0 = time.perf_counter()
    if method.startswith("grpo"):
        train_grpo(model, tokenizer, prompts, build_reward(cfg.alignment.reward), cfg.alignment, hardware, work,
                   metrics_sink=sink, stop=stop_ids(tokenizer, cfg.tokenize.template))
    else:
        rows = [p for p in prompts for _ in range(cfg.alignment.num_generations)]
        _run_ppo(model, tokenizer, rows, build_reward(cfg.alignment.reward, without_model=True), None, cfg, work,
                 sink)
    return {"train_s": time.perf_counter() - t0, "settings": cfg.alignment.model_dump(mode="json"),
            "completions_per_step": args.prompts * cfg.alignment.num_generations}


def child(args) -> None:
    import peft  # noqa: F401  (imported before the baseline: library code is nobody's model memory)
    import torch
    import trl  # noqa: F401
    from transformers import AutoConfig, AutoModelForCausalLM

    import components.alignment.stage  # noqa: F401
    import components.alignment.trl_methods  # noqa: F401
    import components.training.ppo  # noqa: F401

    AutoModelForCausalLM._model_mapping[type(AutoConfig.from_pretrained(args.model))]  # the modeling module
    from trl import GRPOTrainer  # noqa: F401

    if args.threads:
        torch.set_num_threads(args.threads)
    after_imports = rss_mb("VmRSS")
    logs: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        result = train(args.child, args, logs, Path(tmp))
    result.update(peak_rss_mb=rss_mb("VmHWM"), rss_after_imports_mb=after_imports, logs=logs,
                  torch_threads=torch.get_num_threads(), **step_figures(args.child, logs))
    result["peak_above_imports_mb"] = result["peak_rss_mb"] - after_imports
    print(json.dumps(result))


def run_children(args, env: dict) -> dict:
    variants = {}
    with tempfile.TemporaryDirectory() as tmp:
        prompts_file = Path(tmp) / "prompts.json"
        make_prompts(args, prompts_file)
        for method in args.methods.split(","):
            cmd = [sys.executable, __file__, "--child", method, "--model", args.model, "--config", args.config,
                   "--steps", str(args.steps), "--prompts", str(args.prompts), "--threads", str(args.threads),
                   "--prompts-file", str(prompts_file)]
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
            if proc.returncode != 0:
                sys.stderr.write(proc.stderr[-6000:])
                raise SystemExit(f"{method} failed (rc {proc.returncode})")
            variants[method] = json.loads(proc.stdout.strip().splitlines()[-1])
            print(method, f"peak above imports {variants[method]['peak_above_imports_mb']:.0f} MB,",
                  f"{variants[method]['s_per_step']:.1f} s/step", flush=True)
    return variants


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="a local causal-LM directory (default: the demo's embedded model)")
    parser.add_argument("--config", default=str(ROOT / "configs" / "demo-cpu.yaml"))
    parser.add_argument("--steps", type=int, default=2, help="steps per method (the first is timed only if alone)")
    parser.add_argument("--prompts", type=int, default=8, help="prompts per step (each sampled num_generations times)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads per method (0: torch's default)")
    parser.add_argument("--label", default="current", help="the entry of the JSON this run writes")
    parser.add_argument("--note", default="", help="what a reader needs to judge this run (kept in the JSON)")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results_grpo_memory.json"))
    parser.add_argument("--methods", default="grpo,ppo", help=f"comma-separated, of {', '.join(METHODS)}")
    parser.add_argument("--child", choices=METHODS, help=argparse.SUPPRESS)
    parser.add_argument("--prompts-file", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.model is None:
        from components.models.loading import resolve_base

        args.model = resolve_base("embedded:smollm2-135m-instruct")
    if args.child:
        child(args)
        return

    env = {**os.environ, "LMFORGE_NO_PROGRESS": "1", "TOKENIZERS_PARALLELISM": "false"}
    load_before, t0 = os.getloadavg(), time.perf_counter()
    variants = with_ratios(run_children(args, env))
    first = next(iter(variants.values()))
    run = {
        "commit": git("rev-parse", "--short", "HEAD").strip(),
        # Code under test that is not in that commit (the checkout is shared: others' edits show here too).
        "local_changes": [line[3:] for line in git("status", "--porcelain", "--", "components").splitlines()],
        "note": args.note, "steps": args.steps, "prompts": args.prompts, "threads": args.threads,
        "completions_per_step": first["completions_per_step"], "max_new_tokens": first["settings"]["max_new_tokens"],
        "variants": variants,
        "load_average_before": load_before[0], "load_average_after": os.getloadavg()[0],
        "cpu_count": os.cpu_count(), "total_s": time.perf_counter() - t0,
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    out = Path(args.out)
    result = json.loads(out.read_text()) if out.is_file() else {}
    result.update(model=args.model, config=str(Path(args.config).resolve().relative_to(ROOT)), precision="fp32")
    result.setdefault("runs", {})[args.label] = run
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({m: {k: v.get(k) for k in ("peak_above_imports_mb", "s_per_step", "cpu_s_per_step", "over_ppo")}
                      for m, v in variants.items()}))


def git(*args: str) -> str:
    return subprocess.run(["git", *args], capture_output=True, text=True, cwd=ROOT).stdout


def with_ratios(variants: dict) -> dict:
    """Each GRPO variant's peak above imports, s/step and CPU s/step over PPO's (where PPO ran)."""
    ppo = variants.get("ppo")
    for method, r in variants.items():
        if ppo is not None and method != "ppo":
            r["over_ppo"] = {"peak": r["peak_above_imports_mb"] / ppo["peak_above_imports_mb"],
                             "s_per_step": r["s_per_step"] / ppo["s_per_step"],
                             "cpu_s_per_step": r["cpu_s_per_step"] / ppo["cpu_s_per_step"]
                             if r.get("cpu_s_per_step") and ppo.get("cpu_s_per_step") else None}
    return variants


def markdown_section(result: dict) -> list[str]:
    """bench/results_grpo_memory.json as a RESULTS.md section: one table row per method and run."""
    lines = [
        "## GRPO (TRL) against PPO (our loop): memory and step time",
        "",
        f"`python bench/grpo_memory.py`: the demo model ({result['precision']}, CPU), `{result['config']}`'s alignment "
        "settings, the ICD-10 rule as the reward; each step samples the same prompts x num_generations answers in "
        "each method (PPO, one answer per prompt, gets each prompt num_generations times). Each method in its own "
        "process through lmforge's alignment path. Peak: RSS high-water mark above the RSS after imports. s/step: "
        "each method's own step timer (TRL's `step_time`, run_ppo's `step_seconds`); CPU s/step: the process's CPU "
        "time between step logs; both over the steps after the first (in brackets: how many). `grpo_whole_batch` is "
        "the layout before `grpo_config` split a step's backward pass into its prompts' groups. Goal: GRPO at most "
        f"{GOAL_PEAK}x PPO's peak and {GOAL_STEP}x its s/step.",
        "",
        "| run | method | answers/step x max new tokens | torch threads | peak above imports MB | s/step | CPU s/step "
        "| over PPO: peak, s/step, CPU s/step | load average before -> after |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    notes = []
    for label, run in result["runs"].items():
        for method, r in run["variants"].items():
            ratio = r.get("over_ppo")
            ratios = ", ".join("-" if ratio[k] is None else f"{ratio[k]:.2f}x" for k in ("peak", "s_per_step",
                                                                                         "cpu_s_per_step")) if ratio else ""
            cpu = "-" if r.get("cpu_s_per_step") is None else f"{r['cpu_s_per_step']:.1f}"
            commit = run["commit"] + ("+local" if run.get("local_changes") else "")
            lines.append(f"| {label} ({run['created_at'][:10]}, {commit}) | {method} | "
                         f"{run['completions_per_step']} x {run['max_new_tokens']} | {r['torch_threads']} | "
                         f"{r['peak_above_imports_mb']:.0f} | {r['s_per_step']:.1f} ({r['timed_steps']}) | {cpu} | "
                         f"{ratios} | {run['load_average_before']:.2f} -> {run['load_average_after']:.2f} "
                         f"on {run['cpu_count']} cores |")
        if run.get("note") or run.get("local_changes"):
            local = f" Not yet committed: {', '.join(run['local_changes'])}." if run.get("local_changes") else ""
            notes.append(f"- {label}: {run.get('note', '').rstrip('.')}.{local}")
    findings = [f"- {note}" for note in result.get("notes", [])]  # written by hand into the JSON
    return [*lines, "", *verdict(result), *notes, *findings, *([""] if notes or findings else [])]


def verdict(result: dict) -> list[str]:
    """The last run's GRPO against the goal, in a line."""
    label, run = list(result["runs"].items())[-1]
    ratio = run["variants"].get("grpo", {}).get("over_ppo")
    if not ratio:
        return []
    met = ratio["peak"] <= GOAL_PEAK and ratio["s_per_step"] <= GOAL_STEP
    return [f"Last run ({label}): GRPO's peak **{ratio['peak']:.2f}x** PPO's and its s/step **{ratio['s_per_step']:.2f}x** "
            f"(goal <= {GOAL_PEAK}x and <= {GOAL_STEP}x): {'met' if met else 'not met'}.", ""]


if __name__ == "__main__":
    main()
