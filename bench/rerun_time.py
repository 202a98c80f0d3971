"""An unchanged rerun of `lmforge run`, process start to exit: min and median of N runs.

    python bench/rerun_time.py [--preset demo|tiny] [--runs 5] [--root bench/out/rerun]

Builds (or reuses) a cached workspace, then times N reruns of `lmforge run` as a child process, each
from its start to its exit, and checks that every stage reported `cached`. The command is
`python -m flows.cli run` (the `lmforge` script) run from this file's tree, so a checkout of another
commit times its own code. Presets:
- `demo`: configs/demo-cpu.yaml `--until tokenize` (prepare, fetch, align, tokenize: the demo's own
  model and data without the ~15 minutes of training and evaluation);
- `tiny`: every stage of configs/demo-cpu.yaml (cpt, sft, three evaluations, quantize, register,
  promote) on the 2-layer test model (tests/tiny_model.py) and 48 rows, built in about a minute.
A warm-up run comes first and is repeated until it is fully cached (editing components/ changes
cache keys, so a tree being edited can need one more). Prefect keeps its state under <root>/prefect,
not ~/.prefect. Prints each run's wall time, its CPU time (the CLI and its temporary API server
together: on a machine other jobs keep busy, the figure that does not move with their load) and the
flow body's own time (the summary's `flow X s` line), then one JSON line.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

_STAGE_ROW = re.compile(r"^[│|]\s*([\w-]+)\s*[│|]\s*(cached|ran)\s*[│|]", re.M)
_FLOW_LINE = re.compile(r"^flow ([\d.]+) s, stage compute", re.M)

# The tiny preset: the test suite's tiny-model settings (tests/conftest.py), so every stage runs in seconds.
TINY_SETS = [
    "data.max_samples=48", "tokenize.cutoff_len=96", "tokenize.cpt_block_size=96",
    "cpt.max_steps=3", "cpt.batch_size=2", "cpt.save_steps=2",
    "sft.max_steps=4", "sft.batch_size=4", "sft.save_steps=2",
    "evaluate.max_samples=8", "evaluate.max_new_tokens=4", "evaluate.batch_size=8",
    "evaluate.perplexity_max_samples=8", "quantize.eval_samples=4", "registry.model_name=tiny-coder",
    "reward.enabled=false", "alignment.method=none",
]


def run_args(preset: str, root: Path) -> list[str]:
    workspace = root / f"workspace-{preset}"
    args = ["run", "configs/demo-cpu.yaml", "--set", f"workspace={workspace}"]
    if preset == "demo":
        return [*args, "--until", "tokenize"]
    model = root / "tiny-model"
    if not (model / "config.json").is_file():
        from tests.tiny_model import build_tiny_model

        shutil.rmtree(model, ignore_errors=True)
        build_tiny_model(model)
    return [*args, "--set", f"model.base={model}", *[a for s in TINY_SETS for a in ("--set", s)]]


def timed_run(cmd: list[str], env: dict) -> dict:
    """One run, process start to exit: wall seconds, CPU seconds (the CLI and its local API server), the
    stages it ran, the flow body's seconds."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    stages = dict(_STAGE_ROW.findall(done.stdout))
    if not stages:
        raise SystemExit(f"no stage table in the output of {' '.join(cmd)}:\n{done.stdout[-3000:]}")
    flow = _FLOW_LINE.search(done.stdout)
    return {"wall_s": round(wall, 2), "cpu_s": round(cpu, 2), "stages": len(stages),
            "ran": [s for s, status in stages.items() if status == "ran"],
            "flow_s": float(flow.group(1)) if flow else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=("demo", "tiny"), default="demo")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--root", type=Path, default=ROOT / "bench" / "out" / "rerun")
    args = parser.parse_args()

    root = args.root.resolve()
    (root / "prefect").mkdir(parents=True, exist_ok=True)  # Prefect does not create a missing PREFECT_HOME
    env = {**os.environ, "PREFECT_HOME": str(root / "prefect"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "LMFORGE_NO_PROGRESS": "1", "COLUMNS": "200"}
    env.pop("PREFECT_API_URL", None)  # the default path: the temporary local API
    # `python -m flows.cli` is the `lmforge` script, run from this tree (so a checkout of another commit
    # times its own code).
    cmd = [sys.executable, "-m", "flows.cli", *run_args(args.preset, root)]
    for attempt in range(3):
        warm = timed_run(cmd, env)
        print(f"warm-up {attempt + 1}: {warm['wall_s']:.1f} s, ran {warm['ran'] or 'nothing'}", flush=True)
        if not warm["ran"]:
            break
    else:
        raise SystemExit("the workspace is not fully cached after three runs: is the tree being edited?")
    runs = []
    for i in range(args.runs):
        result = timed_run(cmd, env)
        if result["ran"]:
            raise SystemExit(f"run {i + 1} recomputed {result['ran']}: not an unchanged rerun")
        runs.append(result)
        print(f"run {i + 1}: {result['wall_s']:.2f} s, {result['cpu_s']:.2f} CPU s (flow body {result['flow_s']} s), "
              f"load {os.getloadavg()[0]:.1f}", flush=True)
    walls, cpus = [r["wall_s"] for r in runs], [r["cpu_s"] for r in runs]
    print(f"{args.preset}: {len(runs)} unchanged reruns of {runs[0]['stages']} stages, "
          f"min {min(walls):.2f} s, median {statistics.median(walls):.2f} s, max {max(walls):.2f} s; "
          f"CPU median {statistics.median(cpus):.2f} s", flush=True)
    print(json.dumps({"preset": args.preset, "stages": runs[0]["stages"], "runs": runs, "min_s": min(walls),
                      "median_s": round(statistics.median(walls), 2), "cpu_median_s": round(statistics.median(cpus), 2),
                      "load_average": os.getloadavg(),
                      "cpu_count": os.cpu_count(), "created_at": time.strftime("%Y-%m-%dT%H:%M:%S")}))


if __name__ == "__main__":
    main()
