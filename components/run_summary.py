"""What a finished run says: the summary the CLI prints and MLflow records (metrics, the stage-by-stage
comparison, the per-task table, alignment and promotion lines, data changes, pictures).

Plain functions of the run's manifests, shared by the Prefect flow (flows/domain_adaptation.py) and the
run without Prefect that an entirely cached rerun takes (flows/run_core.py).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING

from components.data.data_changes import change_lines, compare_with_last_run
from components.data.jsonl import iter_records
from components.evaluation.compare import paired_change
from components.evaluation.per_task import per_task_table
from components.pipeline import EVALUATION_NODES

if TYPE_CHECKING:
    from components.config import PipelineConfig

log = logging.getLogger("lmforge.flow")

# Evaluation nodes in the order the comparison shows them (the stage table's): what each stage contributed.
EVALUATIONS = {node: {"cpt": "+cpt"}.get(model, model) for model, node in EVALUATION_NODES.items()}
ADAPTED, ALIGNED = EVALUATION_NODES["adapted"], EVALUATION_NODES["aligned"]


def alignment_summary(manifests: dict[str, dict]) -> dict:
    """The alignment method, how far the reward model can be trusted, and a reward-hacking flag: the
    reward model's score rising while the verifiable reward falls, from the SFT model to the aligned one."""
    out: dict = {}
    if "reward" in manifests:
        m = manifests["reward"]["metrics"]
        out["reward_model"] = {"accuracy": m.get("reward_accuracy"), "margin": m.get("reward_margin"),
                               "warnings": manifests["reward"]["info"].get("warnings", [])}
    if "alignment" in manifests:
        out["method"] = manifests["alignment"]["info"]["method"]
        before = manifests.get(ADAPTED, {}).get("metrics", {})
        after = manifests.get(ALIGNED, {}).get("metrics", {})
        out["flags"] = reward_hacking_flags(before, after)
        out["kl_to_sft"] = after.get("kl_to_sft")
        out["kl_to_sft_per_answer"] = after.get("kl_to_sft_per_answer")
        if ADAPTED in manifests and ALIGNED in manifests:
            sft, aligned = run_samples(manifests[ADAPTED]), run_samples(manifests[ALIGNED])
            for metric in ("verifiable_reward", "sampled_verifiable_reward"):
                out[f"{metric}_change"] = paired_change(sft, aligned, metric)
    return out


def run_samples(manifest: dict) -> list[dict]:
    path = Path(manifest["dir"]) / "samples.jsonl"
    return list(iter_records(path)) if path.is_file() else []


def alignment_line(alignment: dict) -> str:
    """What alignment did on the held-out questions, paired against the SFT model's answers to the same ones."""
    text = f"alignment ({alignment['method']})"
    parts = []
    for metric, what in (("verifiable_reward", "verifiable reward"),
                         ("sampled_verifiable_reward", "sampled answers' verifiable reward")):
        change = alignment.get(f"{metric}_change")
        if change:
            c = change["change"]
            per_task = ", ".join(f"{task} {t['change']['value']:+.3f}" for task, t in change["tasks"].items())
            parts.append(f"{what} {change['before']:.3f} -> {change['after']:.3f} on {change['n']} held-out questions, "
                         f"paired change {c['value']:+.3f} [{c['ci_low']:+.3f}, {c['ci_high']:+.3f}]"
                         + (f" ({per_task})" if len(change["tasks"]) > 1 else ""))
    if alignment.get("kl_to_sft") is not None:
        parts.append(f"KL to the SFT model {alignment['kl_to_sft']:.4f} per answer token "
                     f"({alignment['kl_to_sft_per_answer']:.3f} per answer)")
    return text + (": " + "; ".join(parts) if parts else "")


def promotion_line(promotion: dict) -> str:
    """The gate's decision in one sentence: promoted to @champion, or kept as @challenger and why."""
    name, version, outcome = promotion.get("name"), promotion.get("version"), promotion.get("outcome")
    if outcome == "promoted":
        return f"promoted {name} version {version} to @champion: {promotion.get('reason')}"
    if outcome == "kept":
        return f"{name} version {version} already is @champion"
    champion = promotion.get("champion")
    stays = f"@champion stays version {champion}" if champion else "no version is @champion"
    return f"kept {name} version {version} as @challenger ({stays}): it {promotion.get('reason')}"


def run_summary(manifests: dict[str, dict], timeline: list[dict], flow_s: float) -> dict:
    """Metrics, the stage-by-stage comparison and the timings of a run."""
    stage_s = sum(r["stage_s"] for r in timeline)
    metrics: dict[str, float] = {"flow_wall_s": flow_s, "stage_compute_s": stage_s,
                                 "orchestration_overhead_s": flow_s - stage_s}
    columns = [label for node, label in EVALUATIONS.items() if node in manifests]
    comparison: dict[str, dict] = {}
    per_task: dict[str, dict] = {}
    for node, label in EVALUATIONS.items():
        if node not in manifests:
            continue
        for k, v in manifests[node].get("metrics", {}).items():
            if "/" in k:  # task/<name>/...: in the per-task table, not in the overall comparison
                continue
            comparison.setdefault(k, dict.fromkeys(columns))[label] = v
            metrics[f"{label.lstrip('+')}_{k}"] = v
        report = Path(manifests[node]["dir"]) / "per_task.json"
        if report.is_file():
            per_task[label] = json.loads(report.read_text())
    comparison = dict(sorted(comparison.items()))
    alignment = alignment_summary(manifests)
    for metric in ("verifiable_reward", "sampled_verifiable_reward"):
        change = alignment.get(f"{metric}_change")
        if change:  # the paired aligned - SFT change: MLflow plots it across runs
            metrics.update({f"aligned_{metric}_change{suffix}": change["change"][field]
                            for suffix, field in (("", "value"), ("_ci_low", "ci_low"), ("_ci_high", "ci_high"))})
    registered = manifests.get("register", {}).get("info", {})
    promotion = manifests.get("promote", {}).get("info", {})
    quant = manifests.get("quantize", {}).get("metrics", {})
    return {"metrics": metrics, "columns": columns, "comparison": comparison, "registered": registered,
            "promotion": promotion,
            "alignment": alignment, "per_task": per_task,
            "per_task_table": per_task_table(per_task) if per_task else "",
            "quantization": quant, "timeline": timeline, "stages": {k: v["dir"] for k, v in manifests.items()}}


def data_change_lines(cfg: PipelineConfig, manifests: dict[str, dict], flow_run_id: str, logger) -> list[str]:
    """Which sources changed since the last run of this data config (components.data.data_changes), logged
    and returned as the summary's lines. A convenience: never fail a run for it."""
    if "fetch" not in manifests:
        return []
    try:
        changes = compare_with_last_run(cfg, manifests["fetch"], manifests.get("align"), flow_run_id)
    except Exception as exc:
        log.warning("could not compare the data with the last run: %s", exc)
        return []
    lines = change_lines(changes)
    for line in lines:
        logger.info(line)
    return lines


def draw_pictures(summary: dict, manifests: dict[str, dict], run_dir: Path, client, parent: str) -> None:
    """Training curves of every training stage and the per-task comparison, as PNGs in the run
    directory and the run's MLflow artifacts (plots/). A picture is a convenience: never fail a run for it,
    and one that cannot be drawn does not keep the others from being drawn."""
    from components.evaluation.plots import plot_per_task, plot_training_curves

    out = run_dir / "plots"
    drawings = []
    for node, manifest in manifests.items():
        curve = Path(manifest["dir"]) / "training_curve.json"
        if curve.is_file():
            drawings.append((f"{node} training curves", lambda c=curve, n=node: plot_training_curves(
                c, out / f"{n}-training.png", title=n)))
    if summary["per_task"]:
        drawings.append(("per-task comparison", lambda: plot_per_task(summary["per_task"],
                                                                      out / "per-task-exact-match.png")))
    pngs = []
    for what, draw in drawings:
        try:
            png = draw()
            client.log_artifact(parent, str(png), "plots")
            pngs.append(png)
        except Exception as exc:
            log.warning("could not draw the %s: %s", what, exc)
    summary["plots"] = [str(p) for p in pngs]


def reward_hacking_flags(before: dict, after: dict) -> list[str]:
    """A warning when, from the SFT model's metrics to the aligned model's, the reward model's mean score rose
    while the verifiable reward fell: the policy learned what the reward model likes, not the task."""
    rm = (before.get("reward_model_mean"), after.get("reward_model_mean"))
    rule = (before.get("verifiable_reward"), after.get("verifiable_reward"))
    if None not in rm + rule and rm[1] > rm[0] and rule[1] < rule[0]:
        return [f"possible reward hacking: the reward model's mean score rose {rm[0]:.3f} -> {rm[1]:.3f} "
                f"while the verifiable reward fell {rule[0]:.3f} -> {rule[1]:.3f}"]
    return []


def summary_markdown(summary: dict) -> str:
    """The summary as markdown (the Prefect UI's evaluation artifact): every held-out metric for the base and
    after each stage, the per-task table, alignment, data changes, registration and promotion."""
    columns = summary["columns"]
    lines = ["| metric | " + " | ".join(columns) + " |", "|---|" + "---|" * len(columns)]
    for k, row in summary["comparison"].items():
        lines.append(f"| {k} | " + " | ".join("" if row[c] is None else f"{row[c]:.4f}" for c in columns) + " |")
    if summary.get("per_task_table"):
        lines += ["", "### Per task (95% intervals; majority baseline = always the most common answer)", "",
                  summary["per_task_table"]]
    if (summary.get("alignment") or {}).get("method"):
        lines += ["", alignment_line(summary["alignment"]) + "."]
    if summary.get("data_changes"):
        lines += ["", *summary["data_changes"]]
    reg = summary.get("registered") or {}
    if reg:
        lines.append(f"\nRegistered **{reg.get('name')}** version {reg.get('version')} as @{reg.get('alias')}.")
    if summary.get("promotion"):
        lines.append(f"\n{promotion_line(summary['promotion'])}.")
    return "\n".join(lines)
