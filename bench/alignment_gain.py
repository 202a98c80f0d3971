"""Does alignment raise the verifiable reward on held-out questions over the SFT model?

Runs the demo pipeline (configs/demo-cpu.yaml) once per sampling method (RAFT, PPO, GRPO) on one
workspace, so prepare .. sft, the reward model and the base/+cpt/SFT evaluations run once and are
reused; each method then trains its alignment adapter on the SFT model and is evaluated on the same
held-out questions (categories no training stage saw). Reported per method: the held-out verifiable
reward of SFT and aligned with the paired change and its 95% bootstrap interval (overall and per
task), the KL of the aligned model to SFT on its own held-out answers, the training-time reward and
KL the method logged, and the stage's wall time.

    python bench/alignment_gain.py                      # all three, ~45 minutes on 2 cores
    python bench/alignment_gain.py --methods raft,ppo   # a subset (upstream reused from the workspace)
    python bench/alignment_gain.py --heldout seen       # new questions about the train categories instead
    python bench/alignment_gain.py --sft quality        # align from configs/icd10-quality.yaml's SFT (~40 min more)

Writes bench/results_alignment_gain.json; bench/alignment.md quotes it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# What every run shares: 40 held-out questions per task (of 60) instead of 10, so a change of a few
# hundredths is visible, each also answered 4 times by sampling (evaluate.sample_k); the rule reward alone,
# so the reward optimised is the one measured (the reward model still scores every column).
COMMON = ["evaluate.max_samples=40", "evaluate.sample_k=4",
          "alignment.reward.rule=components.alignment.icd10:icd10_reward", "alignment.reward.model_weight=0"]
# Which SFT model alignment starts from: `demo` (demo-cpu.yaml with a longer SFT) or `quality`
# (configs/icd10-quality.yaml as shipped: 700 SFT steps on the reweighted task mix, which answers code -> chapter
# and description -> chapter on held-out categories; its reward model trained as the demo trains it, so the
# evaluations carry the same columns).
SFT = {
    # 320 SFT steps at 1e-3 instead of the demo's 80 at 3e-4: the demo's SFT model learns the answer format and
    # little else (one chapter title to every chapter question, "Yes" to 37 of 40 billable ones), so its
    # samples hardly ever differ in reward and a sampling method has nothing to rank.
    "demo": ("demo-cpu.yaml", ["sft.max_steps=320", "sft.learning_rate=1e-3"]),
    "quality": ("icd10-quality.yaml", ["reward.enabled=true", "reward.max_steps=12", "reward.batch_size=8",
                                       "reward.learning_rate=1e-3", "reward.max_length=128", "reward.save_steps=6"]),
}
# Per method: sized to take a few minutes each on 2 cores.
METHODS = {
    "raft": ["alignment.method=raft", "alignment.learning_rate=3e-4", "alignment.raft.iterations=3",
             "alignment.raft.prompts_per_iteration=64", "alignment.raft.steps_per_iteration=16",
             "alignment.raft.reward_threshold=0"],
    # RAFT on contested prompts only (raft.contested_only): twice the prompts per round, since most are dropped.
    "raft_contested": ["alignment.method=raft", "alignment.learning_rate=3e-4", "alignment.raft.iterations=3",
                       "alignment.raft.prompts_per_iteration=128", "alignment.raft.steps_per_iteration=8",
                       "alignment.raft.reward_threshold=0", "alignment.raft.contested_only=true"],
    "ppo": ["alignment.method=ppo", "alignment.learning_rate=2e-4", "alignment.max_steps=24",
            "alignment.batch_size=16", "alignment.ppo.mini_batch_size=8"],
    "grpo": ["alignment.method=grpo", "alignment.learning_rate=5e-4", "alignment.max_steps=24",
             "alignment.batch_size=4", "alignment.beta=0.04"],
}
# What the alignment stage logged while it trained, where the method logs it.
TRAIN_KEYS = ("raft_reward_first", "raft_reward_last", "raft_kept", "raft_contested_prompts", "reward_first",
              "reward_last", "reward_mean_first", "reward_mean_last", "kl_first", "kl_last", "kl_coef_last",
              "ppo_seconds", "train_seconds")


# Which held-out questions the evaluations score: `unseen` (data.sft_eval's default: categories no stage saw)
# or `seen` (sft_seen_heldout.jsonl: questions no train file asks, about the train categories, where the
# alignment prompts come from; the usual held-out set for RL).
HELDOUT = {"unseen": [], "seen": ["data.sft_eval=[icd10_instructions_seen]"]}


def run(method: str, workspace: Path, sft: str, extra: list[str]) -> dict:
    from components.config import load_config
    from flows.domain_adaptation import domain_adaptation

    config, sft_settings = SFT[sft]
    cfg = load_config(str(ROOT / "configs" / config), [f"workspace={workspace}", *sft_settings, *COMMON,
                                                       *METHODS[method], *extra])
    t0 = time.perf_counter()
    summary = domain_adaptation(config=cfg, until="evaluate")
    manifests = {node: json.loads((Path(summary["stages"][node]) / "manifest.json").read_text())
                 for node in ("alignment", "evaluate-aligned")}
    return {
        "settings": sft_settings + METHODS[method] + extra,
        "flow_s": time.perf_counter() - t0,
        # The stages' own wall times: a stage reused from an earlier run shows what it cost then.
        "alignment_s": manifests["alignment"].get("wall_s"),
        "evaluate_aligned_s": manifests["evaluate-aligned"].get("wall_s"),
        "held_out": summary["alignment"].get("verifiable_reward_change"),
        "held_out_sampled": summary["alignment"].get("sampled_verifiable_reward_change"),
        "kl_to_sft": summary["alignment"].get("kl_to_sft"),
        "kl_to_sft_per_answer": summary["alignment"].get("kl_to_sft_per_answer"),
        "training": {k: v for k, v in manifests["alignment"]["metrics"].items() if k in TRAIN_KEYS},
        "exact_match": {c: summary["comparison"].get("exact_match", {}).get(c) for c in ("adapted", "aligned")},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", default="raft,ppo,grpo")
    parser.add_argument("--workspace", default=None, help="default: .lmforge-bench-alignment[-quality]")
    parser.add_argument("--set", dest="extra", action="append", default=[], help="extra override for every run")
    parser.add_argument("--heldout", choices=sorted(HELDOUT), default="unseen", help="which held-out questions")
    parser.add_argument("--sft", choices=sorted(SFT), default="demo", help="which SFT model alignment starts from")
    parser.add_argument("--out", default=None, help="default: bench/results_alignment_gain[_quality][_seen].json")
    args = parser.parse_args()
    suffix = ("" if args.sft == "demo" else f"_{args.sft}") + ("" if args.heldout == "unseen" else f"_{args.heldout}")
    args.out = args.out or str(ROOT / "bench" / f"results_alignment_gain{suffix}.json")
    args.extra = HELDOUT[args.heldout] + args.extra
    if args.workspace is None:
        args.workspace = str(ROOT / (".lmforge-bench-alignment" + ("" if args.sft == "demo" else f"-{args.sft}")))
    os.environ.setdefault("LMFORGE_NO_PROGRESS", "1")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")  # no network here: no telemetry errors
    from flows.domain_adaptation import alignment_line

    out = Path(args.out)
    results = json.loads(out.read_text()) if out.is_file() else {}
    for method in filter(None, args.methods.split(",")):
        results[method] = run(method, Path(args.workspace), args.sft, args.extra)
        out.write_text(json.dumps(results, indent=1) + "\n")  # after each method: a crash keeps the others
        print(f"{method}: " + alignment_line({"method": method, **{k: results[method][v] for k, v in (
            ("verifiable_reward_change", "held_out"), ("sampled_verifiable_reward_change", "held_out_sampled"),
            ("kl_to_sft", "kl_to_sft"), ("kl_to_sft_per_answer", "kl_to_sft_per_answer"))}}), flush=True)


if __name__ == "__main__":
    main()
