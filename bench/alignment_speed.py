"""RAFT, PPO and GRPO side by side on the demo model: step time and tokens/s of each, same prompts and budget.

    python bench/alignment_speed.py [--config configs/demo-cpu.yaml] [--out bench/results_alignment_speed.json]

One workspace; upstream stages run once with a token budget (a few CPT/SFT/reward steps: speed, not
quality, is measured) and every method then reruns only its alignment stage on the same SFT model and
reward adapter. Each method gets the same work: `PROMPTS` prompts per optimizer step batch, `K`
completions per prompt of up to `NEW_TOKENS` tokens, `STEPS` optimizer steps (RAFT: one iteration
sampling PROMPTS x K and fine-tuning STEPS steps on the best per prompt). PPO and RAFT score with the
verifiable rule plus the reward model; GRPO with the same. The figures are each stage's own wall time
and the throughput counters it logs (generated tokens/s while sampling; trained tokens/s).
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

PROMPTS, K, NEW_TOKENS, STEPS = 8, 4, 16, 4
UPSTREAM = ["cpt.max_steps=2", "sft.max_steps=4", "reward.enabled=true", "reward.max_steps=4"]
METHODS = {
    "raft": ["alignment.raft.iterations=1", f"alignment.raft.prompts_per_iteration={PROMPTS}",
             f"alignment.raft.steps_per_iteration={STEPS}", f"alignment.batch_size={PROMPTS // 2}"],
    "ppo": [f"alignment.max_steps={STEPS}", f"alignment.batch_size={PROMPTS}", "alignment.ppo.ppo_epochs=1",
            "alignment.save_steps=1000"],
    # x K completions per step
    "grpo": [f"alignment.max_steps={STEPS}", f"alignment.batch_size={PROMPTS}", "alignment.save_steps=1000"],
}
# RAFT checkpoints every iteration and PPO samples one answer per prompt: K stays at its default (4) for PPO.
SHARED = [f"alignment.num_generations={K}", f"alignment.max_new_tokens={NEW_TOKENS}",
          f"alignment.max_prompts={PROMPTS * STEPS}", "alignment.reward.model_weight=0.5"]


def run(config: str, workspace: Path, sets: list[str]) -> dict:
    from components.config import load_config
    from flows.domain_adaptation import domain_adaptation

    cfg = load_config(config, [f"workspace={workspace}", *UPSTREAM, *SHARED, *sets])
    return domain_adaptation(config=cfg, until="alignment")


def measure(summary: dict) -> dict:
    """The alignment stage's own wall time and peak RSS (from its manifest, so a cached rerun reports the
    run that computed it), its metrics, and its report (RAFT's per-iteration sampling/training split)."""
    stage = Path(summary["stages"]["alignment"])
    manifest = json.loads((stage / "manifest.json").read_text())
    report = json.loads((stage / "alignment_report.json").read_text())
    return {"stage_s": manifest["wall_s"], "peak_rss_mb": manifest.get("peak_rss_mb"), "metrics": manifest["metrics"],
            "report": report}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="configs/demo-cpu.yaml")
    ap.add_argument("--workspace", default=str(ROOT / "bench/out/alignment-speed"))
    ap.add_argument("--out", default=str(ROOT / "bench/results_alignment_speed.json"))
    args = ap.parse_args()
    os.environ["LMFORGE_NO_PROGRESS"] = "1"
    load = os.getloadavg()[0]
    t0 = time.perf_counter()
    results = {}
    for method, sets in METHODS.items():
        summary = run(args.config, Path(args.workspace), [f"alignment.method={method}", *sets])
        results[method] = measure(summary)
        print(method, json.dumps(results[method]["stage_s"]), flush=True)
    out = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores", "load_before": load,
           "load_after": os.getloadavg()[0], "work": {"prompts": PROMPTS, "k": K, "new_tokens": NEW_TOKENS,
                                                       "steps": STEPS}, "methods": results,
           "total_s": time.perf_counter() - t0}
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps({m: r["stage_s"] for m, r in results.items()}))


if __name__ == "__main__":
    main()
