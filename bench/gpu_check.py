"""The GPU check: what lmforge does on one GPU, measured in one command of a few minutes.

    python bench/gpu_check.py [--out bench/results_gpu_check.json] [--only qlora_8b,...] [--budget-s 420]
    python bench/gpu_check.py --dry-run [--out FILE]      # CPU, tiny models, seconds (tests/bench/test_gpu_check.py)

On one GPU (the lent H100: bench/gpu_check.md gives the device command and the wheels it carries) it measures
- `hardware`: the precision lmforge picks (select_hardware auto): bf16 where the GPU has it;
- `qlora_8b`: QLoRA of a random-weight Llama-3.1-8B-shaped model at batch 2 x 2048 through lmforge's own
  training path (NF4 base, LoRA r16 on all linear layers, gradient checkpointing):
  peak GPU memory, goal <= 7.4 GiB;
- `lora_lmforge` and `lora_llamafactory`: LoRA tokens/s on a random-weight Qwen2.5-0.5B-shaped model, same
  rows, batch, rank, targets, lr, precision and attention, no checkpointing: lmforge against LlamaFactory
  0.9.5's SFT workflow, goal >= 1.2x;
- `sdpa_flash`, `sdpa_math`: the lmforge run with SDPA held to its flash kernel, then to the plain math one;
- `liger`: the lmforge run with train.use_liger;
- `zero2`: the lmforge run under DeepSpeed ZeRO-2 on one GPU through its `deepspeed` launcher path.
Each measurement runs in its own process with its own time limit (a crash or a hang loses only that one),
inside one time budget for the whole check; the JSON is rewritten after each, so a check cut short keeps
what it measured. It records the device, the package versions, every figure, and each goal with pass/fail.

`--dry-run` runs the same measurements on CPU on tests/tiny_model.py's shape, 32-token rows and 1+2 steps,
in this one process (each in its own try and time limit): seconds instead of minutes, so a test keeps the
check from rotting before a GPU comes. Only what needs CUDA is skipped, with the reason (Liger's Triton
kernels); the goals, set for the GPU, are not judged on a dry run's figures.
bench/run_bench.py renders the GPU run's JSON into bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

from gpu_measurements import LLAMA_31_8B, MEASUREMENTS, QWEN25_05B, TINY_LLAMA, TINY_QWEN2, Skip

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DEFAULT_OUT = ROOT / "bench" / "results_gpu_check.json"
DRY_RUN_OUT = ROOT / "bench" / "out" / "results_gpu_check_dry_run.json"
RESULT_TAG = "GPU_CHECK_RESULT "
QLORA_GOAL_GIB, SPEEDUP_GOAL = 7.4, 1.2
PACKAGES = ("torch", "transformers", "peft", "accelerate", "datasets", "bitsandbytes", "deepspeed",
            "liger-kernel", "llamafactory", "trl", "triton", "pyarrow", "huggingface-hub")

# Seconds each measurement may take on the GPU (the 8B checkpoint is written and read back inside qlora_8b).
GPU_LIMITS = {"hardware": 60, "lora_lmforge": 100, "lora_llamafactory": 120, "qlora_8b": 240, "liger": 80,
              "sdpa_flash": 80, "sdpa_math": 80, "zero2": 120}
PLANS = {
    "gpu": dict(big=LLAMA_31_8B, small=QWEN25_05B, batch=2, seq_len=2048, answer_share=0.5, lora_r=16,
                warmup=2, steps=10, qlora_steps=3, limits=GPU_LIMITS),
    "dry": dict(big=TINY_LLAMA, small=TINY_QWEN2, batch=2, seq_len=32, answer_share=0.5, lora_r=8,
                # ZeRO-2's first run on a machine compiles DeepSpeed's CPU comm op (minutes on 2 busy cores): killed
                # mid-build it would leave torch's build lock behind, on which every later DeepSpeed run waits.
                warmup=1, steps=2, qlora_steps=2, limits={**{name: 180 for name in GPU_LIMITS}, "zero2": 600}),
}


def versions() -> dict[str, str | None]:
    found = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = None
    return found


def _record(status: str, seconds: float, **fields) -> dict:
    return {"status": status, "seconds": round(seconds, 2), **fields}


def _tail(text: str, chars: int = 3000) -> str:
    return text[-chars:]


class _TimeLimit(Exception):
    pass


def run_in_process(name: str, plan: dict, work: Path, limit_s: float) -> dict:
    """One measurement in this process: its own try, and SIGALRM as its time limit (checked between
    Python bytecodes: enough for the dry run's tiny models, which is what this mode is for)."""

    def expire(*_):
        raise _TimeLimit

    t0 = time.perf_counter()
    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(max(int(limit_s), 1))
    try:
        figures = MEASUREMENTS[name](plan, work)
        return _record("ok", time.perf_counter() - t0, figures=figures)
    except Skip as e:
        return _record("skipped", time.perf_counter() - t0, reason=str(e))
    except _TimeLimit:
        return _record("timeout", time.perf_counter() - t0, error=f"ran past its limit of {limit_s:.0f} s")
    except Exception as e:  # one failure must not lose the others: recorded with its traceback
        return _record("failed", time.perf_counter() - t0, error=f"{type(e).__name__}: {e}",
                       traceback=_tail(traceback.format_exc()))
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def run_in_child(name: str, plan_file: Path, work: Path, limit_s: float) -> dict:
    """One measurement in a child process of its own (its own CUDA context and memory peak), killed with its
    process group when it runs past `limit_s`. Its output goes to WORK/NAME.log; a failure keeps the tail."""
    log_path = work / f"{name}.log"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--_child", name, "--plan", str(plan_file),
           "--work", str(work)]
    t0 = time.perf_counter()
    with open(log_path, "w") as log_file:
        proc = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True)
        try:
            proc.wait(timeout=limit_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            return _record("timeout", time.perf_counter() - t0, error=f"ran past its limit of {limit_s:.0f} s",
                           log_tail=_tail(log_path.read_text(errors="replace")))
    output = log_path.read_text(errors="replace")
    for line in reversed(output.splitlines()):
        if line.startswith(RESULT_TAG):
            record = json.loads(line[len(RESULT_TAG):])
            record["seconds"] = round(time.perf_counter() - t0, 2)  # the whole process: imports and loading too
            return record
    return _record("failed", time.perf_counter() - t0, error=f"the child exited with code {proc.returncode} "
                   "without a result", log_tail=_tail(output))


def child_main(name: str, plan_file: Path, work: Path) -> None:
    plan = json.loads(plan_file.read_text())
    record = run_in_process(name, plan, work, plan["limits"][name] * 10)  # the parent holds the real limit
    print(RESULT_TAG + json.dumps(record, default=str), flush=True)


def _figure(result: dict, name: str, key: str):
    return result["measurements"].get(name, {}).get("figures", {}).get(key)


def goals(result: dict) -> list[dict]:
    """Each goal of the check with the figure it reads and whether it is met (None: not judged, with why)."""
    dry = result["dry_run"]
    not_judged = "not judged on a dry run (CPU, tiny model)"
    rows = []
    precision, bf16 = _figure(result, "hardware", "precision"), _figure(result, "hardware", "bf16_supported")
    device = _figure(result, "hardware", "device")
    expected = "bf16" if bf16 else ("fp16" if device == "cuda" else "fp32")
    rows.append({"name": "precision chosen from the hardware", "value": precision,
                 "goal": f"{expected} ({'GPU with bf16' if bf16 else device or 'unknown device'})",
                 "pass": None if precision is None else precision == expected})
    peak = _figure(result, "qlora_8b", "peak_memory_gib")
    rows.append({"name": "QLoRA Llama-3.1-8B, batch 2 x 2048: peak GPU memory (GiB)", "value": peak,
                 "goal": f"<= {QLORA_GOAL_GIB}",
                 "pass": None if dry or peak is None else peak <= QLORA_GOAL_GIB, **({"note": not_judged} if dry else {})})
    ours, theirs = _figure(result, "lora_lmforge", "tokens_per_s"), _figure(result, "lora_llamafactory", "tokens_per_s")
    ratio = ours / theirs if ours and theirs else None
    rows.append({"name": "LoRA tokens/s, lmforge / LlamaFactory 0.9.5 (Qwen2.5-0.5B shape)", "value": ratio,
                 "goal": f">= {SPEEDUP_GOAL}",
                 "pass": None if dry or ratio is None else ratio >= SPEEDUP_GOAL, **({"note": not_judged} if dry else {})})
    finite = _figure(result, "zero2", "finite_loss")
    rows.append({"name": "DeepSpeed ZeRO-2 on one device trains (finite loss)", "value": finite, "goal": "true",
                 "pass": finite})
    for name in ("sdpa_flash", "sdpa_math", "liger"):  # no goal: each beside the default run
        speed = _figure(result, name, "tokens_per_s")
        rows.append({"name": f"{name} tokens/s relative to lora_lmforge", "value": speed / ours if speed and ours else None,
                     "goal": None, "pass": None})
    return rows


def write(result: dict, out: Path) -> None:
    result["goals"] = goals(result)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=1, default=str) + "\n")
    tmp.replace(out)


def run_check(plan: dict, names: list[str], work: Path, out: Path, *, dry_run: bool, isolate: bool,
              budget_s: float) -> dict:
    """Run `names` in order within `budget_s`, rewriting `out` after each; returns the result."""
    result = {"schema": 1, "dry_run": dry_run, "created_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
              "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]), "device": None, "versions": versions(),
              "settings": {k: v for k, v in plan.items() if k not in ("big", "small")},
              "models": {"qlora": plan["big"], "lora": plan["small"]}, "measurements": {}}
    plan_file = work / "plan.json"
    plan_file.write_text(json.dumps(plan))
    t0 = time.perf_counter()
    for name in names:
        left = budget_s - (time.perf_counter() - t0)
        if left < 15:
            record = _record("skipped", 0.0, reason=f"the check's time budget of {budget_s:.0f} s ran out (--budget-s)")
        else:
            limit = min(plan["limits"][name], left)
            record = (run_in_child(name, plan_file, work, limit) if isolate
                      else run_in_process(name, plan, work, limit))
        result["measurements"][name] = record
        if name == "hardware" and record["status"] == "ok":
            f = record["figures"]
            result["device"] = {k: f[k] for k in ("device_name", "device", "gpu_memory_gib", "cuda", "cpu_count")}
        detail = record.get("reason") or record.get("error") or ""
        print(f"[gpu_check] {name}: {record['status']} in {record['seconds']:.1f} s {detail}".rstrip(), flush=True)
        write(result, out)
    result["total_s"] = round(time.perf_counter() - t0, 1)
    write(result, out)
    return result


def _fmt(value, digits: int = 2) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def markdown_section(path: Path = DEFAULT_OUT) -> list[str]:
    """bench/RESULTS.md's GPU section from the check's JSON: the goals and every measurement, with the device
    named; "not yet run on a GPU" while the file is missing or holds a dry run."""
    head = ["## GPU check", ""]
    how = "bench/gpu_check.md gives the one device call that runs `bench/gpu_check.py` on a lent GPU."
    if not path.is_file():
        return [*head, f"Not yet run on a GPU: no {path.name} yet. {how}", ""]
    result = json.loads(path.read_text())
    if result.get("dry_run"):
        return [*head, f"Not yet run on a GPU: {path.name} holds a dry run ({result['created_at'][:10]}, CPU, tiny "
                       f"model), which shows only that the check runs. {how}", ""]
    device, v, st = result.get("device") or {}, result["versions"], result["settings"]
    lines = [*head,
             f"`python bench/gpu_check.py`, {result['created_at'][:10]}, on **{device.get('device_name', 'unknown')}** "
             f"({_fmt(device.get('gpu_memory_gib'), 0)} GiB, CUDA {device.get('cuda')}); "
             + ", ".join(f"{k} {v[k]}" for k in PACKAGES if v.get(k)) + ". "
             f"Rows of {st['seq_len']} tokens, batch {st['batch']}, the last {st['answer_share']:.0%} of each row "
             f"trained; LoRA r{st['lora_r']} on all linear layers; {st['warmup']} untimed steps, then {st['steps']} "
             f"timed ({st['qlora_steps']} for QLoRA). Random weights in the published shapes "
             "(Llama-3.1-8B for QLoRA, Qwen2.5-0.5B for the rest).",
             "", "| goal | value | target | met |", "|---|---|---|---|"]
    lines += [f"| {g['name']} | {_fmt(g['value'])} | {_fmt(g['goal'])} | {_fmt(g['pass'])} |" for g in result["goals"]]
    lines += ["", "| measurement | status | tokens/s | s/step | peak memory GiB | precision | note |",
              "|---|---|---|---|---|---|---|"]
    for name, r in result["measurements"].items():
        f = r.get("figures", {})
        note = r.get("reason") or r.get("error") or ""
        lines.append(f"| {name} | {r['status']} ({r['seconds']:.0f} s) | {_fmt(f.get('tokens_per_s'), 0)} | "
                     f"{_fmt(f.get('s_per_step'))} | {_fmt(f.get('peak_memory_gib'))} | {_fmt(f.get('precision'))} | "
                     f"{note[:160].replace('|', '/')} |")
    weights = _figure(result, "qlora_8b", "weights_gib_by_dtype")
    if weights:
        lines += ["", "QLoRA's weights as trained, GiB by storage dtype (4-bit weights are packed uint8): "
                  + ", ".join(f"{k} {v:.2f}" for k, v in sorted(weights.items(), key=lambda kv: -kv[1])) + "."]
    return [*lines, ""]


def scratch_dir(work: Path) -> str:
    """Where the 8B checkpoint (16 GB of bf16) is written: RAM (/dev/shm) when it has room, else `work`."""
    shm = Path("/dev/shm")
    if shm.is_dir() and shutil.disk_usage(shm).free > 40 * 2**30:
        return tempfile.mkdtemp(prefix="lmforge-gpu-check-", dir=shm)
    return str(work)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny models, 1+2 steps, one process")
    parser.add_argument("--out", type=Path, help=f"JSON to write (default {DEFAULT_OUT.relative_to(ROOT)}, "
                                                 f"dry run {DRY_RUN_OUT.relative_to(ROOT)})")
    parser.add_argument("--only", default=",".join(MEASUREMENTS), help="comma-separated measurements, in order")
    parser.add_argument("--budget-s", type=float, help="time for the whole check (default 420 on a GPU, 900 dry)")
    parser.add_argument("--isolate", action=argparse.BooleanOptionalAction, default=None,
                        help="each measurement in a child process (default: yes on a GPU, no on a dry run)")
    parser.add_argument("--work", type=Path, help="working folder (default: a temporary one, removed after)")
    parser.add_argument("--_child", help=argparse.SUPPRESS)
    parser.add_argument("--plan", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is downloaded; no machine of the check has the hub
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("LMFORGE_NO_PROGRESS", "1")
    if args._child:
        child_main(args._child, args.plan, args.work)
        return
    names = [n for n in args.only.split(",") if n]
    unknown = [n for n in names if n not in MEASUREMENTS]
    if unknown:
        parser.error(f"unknown measurement(s) {', '.join(unknown)}; known: {', '.join(MEASUREMENTS)}")
    plan = dict(PLANS["dry" if args.dry_run else "gpu"])
    out = args.out or (DRY_RUN_OUT if args.dry_run else DEFAULT_OUT)
    work = args.work or Path(tempfile.mkdtemp(prefix="lmforge-gpu-check-"))
    work.mkdir(parents=True, exist_ok=True)
    plan["scratch"] = None if args.dry_run else scratch_dir(work)
    isolate = (not args.dry_run) if args.isolate is None else args.isolate
    try:
        result = run_check(plan, names, work, out, dry_run=args.dry_run, isolate=isolate,
                           budget_s=args.budget_s or (900 if args.dry_run else 420))
    finally:
        if plan["scratch"] and plan["scratch"] != str(work):
            shutil.rmtree(plan["scratch"], ignore_errors=True)
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(result["goals"], indent=1, default=str))
    print(f"[gpu_check] wrote {out}")


if __name__ == "__main__":
    main()
