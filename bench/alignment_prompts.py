"""Does alignment on prompts of its own raise held-out billable accuracy over the SFT model?

The quality preset's SFT model (configs/icd10-quality.yaml) is aligned by each sampling method on
`data.prompts: [icd10_billable]`: 2,400 billable questions about codes of the train categories that no
SFT row asks, the ICD rule as the only reward. Then the SFT model and each aligned model answer the
held-out billable questions by constrained choice (Yes or No, whichever the model finds likelier):
`billable_uniform` (300 codes drawn uniformly from categories no stage saw), `billable` (the 60 of the
main held-out set, a third of them 3-character headers) and the 40 of sft_seen_heldout.jsonl (new
questions about train categories). Reported per method and set: accuracy, and the paired change over
SFT with its 95% bootstrap interval.

    python bench/alignment_prompts.py                    # all three, ~75 minutes on 2 cores (SFT ~25)
    python bench/alignment_prompts.py --methods raft     # one (upstream reused from the workspace)

Writes bench/results_alignment_prompts.json (with every question's 1/0, so the figures can be
recomputed); bench/alignment.md quotes it. The script scores three held-out sets in one pass per model;
the flow's own evaluation scores one (data.sft_eval), as in bench/alignment.md's demo-preset runs.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from alignment_gain import COMMON, METHODS, SFT  # noqa: E402  (the same settings as the SFT-prompt runs)

PROMPTS = ["data.prompts=[icd10_billable]", "alignment.max_prompts=1024"]
# RAFT keeps contested prompts only (the quality SFT model answers most SFT prompts right every time).
RUNS = {"raft": METHODS["raft_contested"], "ppo": METHODS["ppo"], "grpo": METHODS["grpo"]}
HELDOUT = {"billable_uniform": "sft_billable_heldout.jsonl", "billable": "sft_heldout.jsonl",
           "billable_seen": "sft_seen_heldout.jsonl"}


def align(method: str, workspace: Path) -> dict:
    from components.config import load_config
    from flows.domain_adaptation import domain_adaptation

    config, sft_settings = SFT["quality"]
    cfg = load_config(str(ROOT / "configs" / config), [f"workspace={workspace}", *sft_settings, *COMMON,
                                                       *RUNS[method], *PROMPTS])
    t0 = time.perf_counter()
    summary = domain_adaptation(config=cfg, until="alignment")
    manifests = {n: json.loads((Path(summary["stages"][n]) / "manifest.json").read_text())
                 for n in ("prepare", "sft", "alignment")}
    return {"flow_s": time.perf_counter() - t0, "manifests": manifests}


def heldout_rows() -> dict[str, list[dict]]:
    data = ROOT / "data" / "icd10"
    rows = {}
    for name, file in HELDOUT.items():
        records = [json.loads(line) for line in open(data / file, encoding="utf-8")]
        rows[name] = [r for r in records if r["task"] in ("billable", "billable_uniform")]
    return rows


def score(source: str, stack: list[str], rows: dict[str, list[dict]]) -> dict[str, list[int]]:
    """1/0 per question: the likelier of Yes and No is the reference."""
    from components.evaluation.choice import choose
    from components.models.loading import load_tokenizer, load_with_adapters, select_hardware

    model = load_with_adapters(source, stack, select_hardware("auto", "auto"))
    model.eval()
    tokenizer = load_tokenizer(source)
    out = {}
    for name, questions in rows.items():
        prompts = [[{"role": "user", "content": r["instruction"]}] for r in questions]
        picks, _ = choose(tokenizer, model, "auto", prompts, ["Yes", "No"], system_prompt=None)
        out[name] = [int(p == r["output"]) for p, r in zip(picks, questions)]
    return out


def paired(before: list[int], after: list[int]) -> dict:
    """Accuracy before and after, and the mean per-question change with its 95% bootstrap interval."""
    from components.evaluation.intervals import bootstrap_mean

    change = bootstrap_mean([b - a for a, b in zip(before, after, strict=True)])
    return {"n": len(before), "before": sum(before) / len(before), "after": sum(after) / len(after),
            "change": change.value, "ci_low": change.low, "ci_high": change.high}


def dump(results: dict) -> str:
    """Indented JSON with each list of per-question 1/0 on one line."""
    text = json.dumps(results, indent=1)
    return re.sub(r"\[\s*((?:[01],\s*)*[01])\s*\]", lambda m: "[" + ",".join(re.findall("[01]", m.group(1))) + "]",
                  text) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", default="raft,ppo,grpo")
    parser.add_argument("--workspace", default=str(ROOT / ".lmforge-bench-alignment-prompts"))
    parser.add_argument("--out", default=str(ROOT / "bench" / "results_alignment_prompts.json"))
    args = parser.parse_args()
    os.environ.setdefault("LMFORGE_NO_PROGRESS", "1")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")  # no network here: no telemetry errors

    rows = heldout_rows()
    out = Path(args.out)
    results = json.loads(out.read_text()) if out.is_file() else {}
    sft_scores = None
    for method in filter(None, args.methods.split(",")):
        run = align(method, Path(args.workspace))
        source = run["manifests"]["prepare"]["info"]["source"]
        if sft_scores is None:
            sft_scores = score(source, run["manifests"]["sft"]["info"]["adapter_stack"], rows)
        aligned = score(source, run["manifests"]["alignment"]["info"]["adapter_stack"], rows)
        results[method] = {
            "settings": RUNS[method] + PROMPTS,
            "alignment_s": run["manifests"]["alignment"].get("wall_s"),
            "training": run["manifests"]["alignment"]["metrics"],
            "held_out": {name: paired(sft_scores[name], aligned[name]) for name in rows},
            "per_question": {"sft": sft_scores, "aligned": aligned},
        }
        out.write_text(dump(results))  # after each method: a crash keeps the others
        print(method, json.dumps({n: {k: round(v, 3) for k, v in r.items()} for n, r in
                                  results[method]["held_out"].items()}), flush=True)


if __name__ == "__main__":
    main()
