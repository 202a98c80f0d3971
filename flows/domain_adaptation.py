"""The domain-adaptation flow: the stage table (components/pipeline.py) walked in order.

prepare -> fetch -> align -> tokenize -> cpt -> sft -> evaluate (base, +cpt, adapted) -> quantize -> register.
Wiring only. Each node runs as one cached Prefect task (tasks/stages.py); the flow computes each
node's content key from its config slice and upstream manifests, asks Prefect for a fresh run only
where the artifacts on disk are missing or changed (or the user forced it), and records the run in MLflow.
"""

from __future__ import annotations

import json
import logging
import subprocess
import time
from pathlib import Path
from typing import Literal

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact
from prefect.context import get_run_context

from components import tracking
from components.artifacts import read_manifest, reset_dir, stage_dir, verify_manifest
from components.config import PipelineConfig, save_config
from components.data.data_changes import change_lines, compare_with_last_run
from components.data.jsonl import iter_records
from components.errors import StageInputError
from components.evaluation.compare import paired_change
from components.evaluation.per_task import per_task_table
from components.models.loading import select_hardware
from components.pipeline import STAGE_KINDS, RunInfo, kind_index, planned_nodes
from flows.console_log import logs_to_flow_run
from flows.deployment_config import config_for_run
from flows.plan import key_facts, keyed_digests, node_key
from tasks import stages as t

log = logging.getLogger("lmforge.flow")


def git_commit() -> str:
    try:
        return subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True, timeout=5,
            cwd=Path(__file__).resolve().parent,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


StageName = Literal[STAGE_KINDS]  # type: ignore[valid-type]  # the Prefect form shows a dropdown


@flow(name="domain_adaptation", log_prints=True)
def domain_adaptation(
    config: PipelineConfig = PipelineConfig(),
    from_stage: StageName | None = None,
    only: StageName | None = None,
    until: StageName | None = None,
    verify: Literal["fast", "deep"] = "fast",
) -> dict:
    """Adapt a base model to the domain data in `config`; returns the summary (metrics, versions, timings).

    from_stage: recompute this stage and everything after it, even when cached.
    only: run just this stage on cached upstream outputs (they must exist).
    until: stop after this stage (e.g. `tokenize` to check data without training).
    verify: how a cached output is checked before reuse: `fast` (sizes and mtimes; a file whose
    mtime moved is rehashed) or `deep` (every file rehashed against its manifest digest).
    """
    with logs_to_flow_run():
        return _adapt(config, from_stage, only, until, verify)


def _adapt(config: PipelineConfig, from_stage: StageName | None, only: StageName | None,
           until: StageName | None, verify: Literal["fast", "deep"]) -> dict:
    for name in (from_stage, only, until):
        if name is not None:
            kind_index(name)
    t_flow = time.perf_counter()
    logger = get_run_logger()
    cfg = config_for_run(config)  # in a deployment run: the fields given, over the deployment's preset
    workspace = Path(cfg.workspace)
    workspace.mkdir(parents=True, exist_ok=True)
    flow_run_id = str(get_run_context().flow_run.id)
    hardware = select_hardware(cfg.compute.device, cfg.compute.precision)
    deep = verify == "deep"

    client = tracking.client_for(cfg.tracking_uri())
    exp_id = tracking.experiment_id(client, cfg.tracking.experiment, workspace / "mlartifacts")
    tracking.mark_dead_runs_killed(client, exp_id)  # runs left RUNNING by processes killed earlier (kill -9)
    commit = git_commit()
    parent = tracking.start_run(
        client, exp_id, f"domain_adaptation-{flow_run_id[:8]}",
        tags={"prefect.flow_run_id": flow_run_id, "lmforge.config_digest": cfg.digest(), "lmforge.git_commit": commit},
    )
    run = RunInfo(cfg.tracking_uri(), exp_id, parent, flow_run_id, cfg.digest(), commit)
    run_dir = workspace / "runs" / flow_run_id

    manifests: dict[str, dict] = {}
    timeline: list[dict] = []
    status = "FAILED"
    try:  # from here on, whatever fails ends the parent run FAILED (or KILLED), never leaves it RUNNING
        save_config(cfg, run_dir / "config.yaml", masked=True)
        client.log_artifact(parent, str(run_dir / "config.yaml"))
        tracking.log_params(client, parent, cfg.model_dump(mode="json"))
        facts = key_facts(cfg, hardware.precision)
        for node in planned_nodes(cfg):
            kind = kind_index(node.spec.kind)
            if (until and kind > kind_index(until)) or (only and kind > kind_index(only)):
                continue
            key, sc = node_key(node, cfg, facts, manifests)
            out = stage_dir(cfg.workspace, node.name, key)
            if only and node.spec.kind != only:
                # Upstream of --only: must be on disk already.
                manifest = read_manifest(out)
                if not verify_manifest(manifest, deep=deep):
                    raise StageInputError(
                        f"--only {only}: upstream stage {node.name} has no complete output for this config "
                        f"(expected {out}); run without --only first"
                    )
                manifests[node.name] = manifest
                continue
            force = from_stage is not None and kind >= kind_index(from_stage)
            if force:
                reset_dir(out)
            refresh = force or not verify_manifest(read_manifest(out), deep=deep)
            if refresh and not force:
                # A stale or tampered output is never reused (nor adopted by run_stage): its manifest goes.
                # A resumable stage keeps its checkpoints; a non-resumable one is emptied by run_stage, under
                # the stage lock.
                (out / "manifest.json").unlink(missing_ok=True)
            upstream = {u: manifests[u] for u in node.upstream}
            started = time.perf_counter()
            state = t.stage_task(node.spec).with_options(refresh_cache=refresh)(
                key, node.name, run, cfg, sc, upstream, keyed_digests(node, manifests),
                return_state=True,
            )
            manifest = state.result()
            elapsed = time.perf_counter() - started
            # The disk is the source of truth (Prefect's record may come from another workspace).
            manifest = read_manifest(out) or manifest
            cached = state.name == "Cached" or manifest.get("flow_run_id") != flow_run_id
            if cached:
                t.record_cached(run, manifest)
            manifests[node.name] = manifest
            timeline.append({"stage": node.name, "key": key, "cached": cached, "task_s": round(elapsed, 3),
                             "stage_s": 0.0 if cached else manifest["wall_s"],
                             "peak_rss_mb": None if cached else manifest.get("peak_rss_mb")})
            logger.info("%-18s %s %s", node.name, "cached " if cached else "ran    ", key)
        status = "FINISHED"
    except BaseException as exc:
        status = tracking.end_status(exc)  # Ctrl-C or SIGTERM (Prefect raises it in the flow): KILLED
        raise
    finally:
        flow_s = time.perf_counter() - t_flow
        summary = _summary(manifests, timeline, flow_s)
        summary["data_changes"] = _data_changes(cfg, manifests, flow_run_id, logger)
        tracking.log_metrics(client, parent, {k: v for k, v in summary["metrics"].items()})
        _pictures(summary, manifests, run_dir, client, parent)
        tracking.end_run(client, parent, status)
    _publish(summary)
    return summary


# Evaluation nodes in the order the comparison shows them: what each stage contributed.
EVALUATIONS = {"evaluate-base": "base", "evaluate-cpt": "+cpt", "evaluate-adapted": "adapted",
               "evaluate-aligned": "aligned"}


def _alignment_summary(manifests: dict[str, dict]) -> dict:
    """The alignment method, how far the reward model can be trusted, and a reward-hacking flag: the
    reward model's score rising while the verifiable reward falls, from the SFT model to the aligned one."""
    out: dict = {}
    if "reward" in manifests:
        m = manifests["reward"]["metrics"]
        out["reward_model"] = {"accuracy": m.get("reward_accuracy"), "margin": m.get("reward_margin"),
                               "warnings": manifests["reward"]["info"].get("warnings", [])}
    if "alignment" in manifests:
        out["method"] = manifests["alignment"]["info"]["method"]
        before = manifests.get("evaluate-adapted", {}).get("metrics", {})
        after = manifests.get("evaluate-aligned", {}).get("metrics", {})
        flags = []
        rm = (before.get("reward_model_mean"), after.get("reward_model_mean"))
        rule = (before.get("verifiable_reward"), after.get("verifiable_reward"))
        if None not in rm + rule and rm[1] > rm[0] and rule[1] < rule[0]:
            flags.append(f"possible reward hacking: the reward model's mean score rose {rm[0]:.3f} -> {rm[1]:.3f} "
                         f"while the verifiable reward fell {rule[0]:.3f} -> {rule[1]:.3f}")
        out["flags"] = flags
        out["kl_to_sft"] = after.get("kl_to_sft")
        out["kl_to_sft_per_answer"] = after.get("kl_to_sft_per_answer")
        if "evaluate-adapted" in manifests and "evaluate-aligned" in manifests:
            sft, aligned = _samples(manifests["evaluate-adapted"]), _samples(manifests["evaluate-aligned"])
            for metric in ("verifiable_reward", "sampled_verifiable_reward"):
                out[f"{metric}_change"] = paired_change(sft, aligned, metric)
    return out


def _samples(manifest: dict) -> list[dict]:
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


def _summary(manifests: dict[str, dict], timeline: list[dict], flow_s: float) -> dict:
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
    alignment = _alignment_summary(manifests)
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


def _data_changes(cfg: PipelineConfig, manifests: dict[str, dict], flow_run_id: str, logger) -> list[str]:
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


def _pictures(summary: dict, manifests: dict[str, dict], run_dir: Path, client, parent: str) -> None:
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


def _publish(summary: dict) -> None:
    """A markdown table in the Prefect UI: every held-out metric for the base and after each stage."""
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
    try:
        create_markdown_artifact("\n".join(lines), key="evaluation", description="Held-out evaluation")
    except Exception as exc:  # an artifact is a convenience; never fail a finished run for it
        log.warning("could not publish the evaluation artifact: %s", exc)
