"""Where an evaluate node's time goes: one node of a finished run, rerun outside the flow, phase by phase.

    python bench/eval_profile.py configs/demo-cpu.yaml [--node evaluate-adapted] [--set k=v ...] [--profile]

Needs a workspace where the node's upstream stages are complete (run the config first). Runs the node's
stage function on those manifests into a temporary directory (the cached output is not touched) and
prints the wall time of each phase (model load, perplexity, generation, constrained choice, KL to the
reference, reward scoring) and, with --profile, the 25 functions with the most cumulative time. The
figures go to bench/results_eval_profile.json, which RESULTS.md renders.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import pstats
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def upstream_manifests(cfg, node_name: str) -> dict[str, dict]:
    """The complete manifests of the nodes `node_name` reads, found by walking the plan as the flow does."""
    from components.artifacts import read_manifest, stage_dir, verify_manifest
    from components.models.loading import select_hardware
    from components.pipeline import planned_nodes
    from flows.plan import key_facts, node_key

    facts = key_facts(cfg, select_hardware(cfg.compute.device, cfg.compute.precision).precision)
    manifests: dict[str, dict] = {}
    for node in planned_nodes(cfg):
        if node.name == node_name:
            missing = [u for u in node.upstream if u not in manifests]
            if missing:
                raise SystemExit(f"{node_name}: upstream {missing} not complete in {cfg.workspace}; run the config first")
            return {u: manifests[u] for u in node.upstream}
        if all(u in manifests for u in node.upstream):
            key, _ = node_key(node, cfg, facts, manifests)
            manifest = read_manifest(stage_dir(cfg.workspace, node.name, key))
            if verify_manifest(manifest):
                manifests[node.name] = manifest
    raise SystemExit(f"no node {node_name!r} in this config's plan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config")
    parser.add_argument("--node", default="evaluate-adapted")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--profile", action="store_true", help="also print the top functions by cumulative time")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results_eval_profile.json"))
    args = parser.parse_args()
    os.environ.setdefault("LMFORGE_NO_PROGRESS", "1")

    from components.config import load_config
    from components.pipeline import STAGES_BY_NAME, StageInputs
    from components.runtime import configure_threads, quiet_library_warnings

    cfg = load_config(Path(args.config), args.overrides)
    configure_threads(cfg.compute.threads)
    quiet_library_warnings()
    spec = STAGES_BY_NAME[args.node]
    inputs = StageInputs(node=args.node, kind=spec.kind, upstream=upstream_manifests(cfg, args.node), reads=spec.reads)
    profiler = cProfile.Profile() if args.profile else None
    with tempfile.TemporaryDirectory(prefix="lmforge-evalprof-") as tmp:
        start = time.perf_counter()
        if profiler:
            profiler.enable()
        result = spec.function()(cfg, inputs, Path(tmp))
        if profiler:
            profiler.disable()
        wall = time.perf_counter() - start
    phases = result.info.get("phase_s", {})
    n = int(result.metrics.get("n", 0))
    record = {"config": args.config, "overrides": args.overrides, "node": args.node, "questions": n,
              "wall_s": round(wall, 2), "phase_s": {k: round(v, 2) for k, v in phases.items()},
              "other_s": round(wall - sum(phases.values()), 2), "cpu_count": os.cpu_count(),
              "load_avg_1m": round(os.getloadavg()[0], 2)}
    print(json.dumps(record, indent=2))
    if profiler:
        text = io.StringIO()
        pstats.Stats(profiler, stream=text).sort_stats("cumulative").print_stats(25)
        print(text.getvalue())
    out = Path(args.out)
    runs = json.loads(out.read_text()) if out.is_file() else []
    runs.append({**record, "measured_at": time.strftime("%Y-%m-%d %H:%M")})
    out.write_text(json.dumps(runs, indent=2) + "\n")


if __name__ == "__main__":
    main()
