"""Eval-gated promotion: alias `champion` moves to a registered version only for a real gain.

Three tests, all of which the challenger must pass:

1. **The majority baseline.** On every gated task (`promotion.baseline_tasks`; default every held-out task
   whose majority baseline is below 1) the low end of the 95% interval of its score must lie above the
   task's majority baseline: the score of always giving the commonest answer. A model that learned only
   the answer format scores exactly that, and beating a base model that never saw the format proves nothing.
2. **The base model**, on every rule (metric, direction, margin) of `promotion.rules`.
3. **The current champion, on the same questions.** Every version records a digest of the held-out
   questions it was scored on and its per-question answers (an artifact of its model run). The paired
   per-question change of `promotion.champion_metric` must clear `champion_margin`: its interval's low end
   (`champion_rule: interval`, so a noise-level gain is rejected) or its mean (`point`); and the rules must
   pass against the champion's figures. A champion scored on other questions is rescored on the
   challenger's (or the gate refuses, `on_other_questions: refuse`): figures from different question sets
   are never compared.

A rule passes when the challenger is better by at least `margin` (in the metric's units; a negative margin
tolerates that much regression); against a reference the challenger must pass every rule and be strictly
better on at least one, so a retrained copy with the same scores does not churn the alias. The first version
in an empty registry becomes champion by passing 1 and 2.

Every decision, promoted or not, is written to the version as tags (`lmforge.promotion.*`: outcome,
reason, rules, the metrics of all three sides, the champion it replaced) and as a JSON artifact of its
run, so `rollback` can move the alias back to the champion a promotion replaced.
"""

from __future__ import annotations

import json
import logging
import math
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from components import tracking
from components.artifacts import StageResult, atomic_write_json
from components.data.jsonl import iter_records
from components.evaluation.compare import heldout_digest, paired_change, question_key, with_scores
from components.evaluation.per_task import metric_key_part
from components.pipeline import EVALUATION_NODES
from components.registry import HELDOUT_DIGEST_TAG, SAMPLES_ARTIFACT, registered_evaluation

if TYPE_CHECKING:
    from collections.abc import Callable

    from components.config import PipelineConfig, PromotionConfig, PromotionRule
    from components.stage_contract import StageInputs

log = logging.getLogger(__name__)

CHAMPION = "champion"
TAG = "lmforge.promotion."
PREVIOUS_CHAMPION = TAG + "previous_champion"
# Prefixes under which the register stage logs the metrics of the registered model and of the base.
CHALLENGER_PREFIX, BASE_PREFIX = "eval_", "base_"


class PromotionError(ValueError):
    """A promotion or rollback that cannot be decided as asked; the message says why and what to do."""


@dataclass
class RuleCheck:
    """One rule applied to the challenger against one reference."""

    metric: str
    direction: str
    margin: float
    challenger: float | None
    reference: float | None
    passed: bool
    improved: bool  # strictly better than the reference
    note: str = ""  # the interval behind the figure, where there is one


@dataclass
class Comparison:
    """The challenger against one reference: the base or the current champion."""

    against: str  # "majority baseline", "base" or "champion"
    version: str | None  # the champion's version; None otherwise
    checks: list[RuleCheck]
    wins: bool
    reason: str


@dataclass
class Decision:
    """What the gate decided for one version, with everything needed to see why."""

    model_name: str
    version: str
    outcome: str  # promoted | rejected | forced | kept (already champion)
    reason: str
    previous_champion: str | None
    comparisons: list[Comparison] = field(default_factory=list)
    rules: list[dict] = field(default_factory=list)
    metrics: dict[str, dict[str, float]] = field(default_factory=dict)  # challenger / base / champion
    paired: dict | None = None  # the per-question change against the champion (compare.paired_change)
    heldout_digest: str | None = None  # the questions the challenger was scored on
    decided_at: str = field(default_factory=lambda: time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))

    @property
    def promoted(self) -> bool:
        return self.outcome in ("promoted", "forced")

    def as_dict(self) -> dict:
        return {**asdict(self), "promoted": self.promoted}


def _better_by(direction: str, challenger: float, reference: float) -> float:
    return challenger - reference if direction == "higher" else reference - challenger


def _finite(x: float | None) -> bool:
    return x is not None and math.isfinite(x)


def compare(challenger: dict[str, float], reference: dict[str, float], rules: list[PromotionRule], *,
            against: str, version: str | None = None) -> Comparison:
    """Apply every rule to `challenger` against `reference` (both: metric name -> value)."""
    checks, failures = [], []
    for rule in rules:
        c, r = challenger.get(rule.metric), reference.get(rule.metric)
        if not (_finite(c) and _finite(r)):
            # Not comparable: never a pass, so a missing or broken figure cannot let a model through.
            checks.append(RuleCheck(rule.metric, rule.direction, rule.margin, c, r, False, False))
            side = against if _finite(c) else "challenger"
            failures.append(f"{rule.metric}: no finite value for the {side}")
            continue
        delta = _better_by(rule.direction, c, r)
        passed = delta >= rule.margin
        checks.append(RuleCheck(rule.metric, rule.direction, rule.margin, c, r, passed, delta > 0))
        if not passed:
            need = f"better by at least {rule.margin:g}" if rule.margin > 0 else (
                f"no worse than {-rule.margin:g}" if rule.margin < 0 else "at least as good")
            failures.append(f"{rule.metric} {c:.6g} vs {r:.6g} ({rule.direction} is better; needs {need})")
    name = against if version is None else f"{against} (version {version})"
    if failures:
        return Comparison(against, version, checks, False, f"does not beat the {name}: " + "; ".join(failures))
    if not any(ch.improved for ch in checks):
        return Comparison(against, version, checks, False, f"ties the {name} on every rule: nothing improved")
    better = ", ".join(f"{ch.metric} {ch.challenger:.6g} vs {ch.reference:.6g}" for ch in checks if ch.improved)
    return Comparison(against, version, checks, True, f"beats the {name}: {better}")


def run_metrics(client: MlflowClient, version, prefix: str) -> dict[str, float]:
    """Metrics the register stage logged for a version's model run under `prefix` (eval_ or base_), with
    the prefix removed; falls back to the version's tags (same names, 6 significant digits)."""
    metrics: dict[str, float] = {}
    if version.run_id:
        try:
            metrics = dict(client.get_run(version.run_id).data.metrics)
        except MlflowException:
            metrics = {}
    if not any(k.startswith(prefix) for k in metrics):
        metrics = {}
        for k, v in (version.tags or {}).items():
            try:
                metrics[k] = float(v)
            except ValueError:
                continue
    return {k[len(prefix):]: float(v) for k, v in metrics.items() if k.startswith(prefix)}


def current_champion(client: MlflowClient, name: str):
    """The version holding alias `champion`, or None when no version does."""
    try:
        return client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException as exc:
        if "RESOURCE_DOES_NOT_EXIST" in str(exc.error_code) or "INVALID_PARAMETER_VALUE" in str(exc.error_code):
            return None
        raise


def _model_version(client: MlflowClient, name: str, version: str):
    try:
        return client.get_model_version(name, str(version))
    except MlflowException as exc:
        raise PromotionError(f"registered model {name!r} has no version {version} ({exc.message})") from None


def _check_rule_metrics(challenger: dict[str, float], rules: list[PromotionRule], where: str) -> None:
    missing = [r.metric for r in rules if r.metric not in challenger]
    if missing:
        raise PromotionError(
            f"promotion rules name metrics {missing} that {where} does not have; it has: "
            f"{', '.join(sorted(challenger)) or 'none'}. Fix promotion.rules in the config."
        )


def baseline_comparison(challenger: dict[str, float], tasks: list[str] | None, metric: str) -> Comparison:
    """Test 1 of the module docstring on the challenger's flat metrics (`task/<task>/<metric>_ci_low`,
    `task/<task>/majority_baseline`, as components/evaluation/per_task.py writes them)."""
    suffix = "/majority_baseline"
    baselines = {k[len("task/"):-len(suffix)]: v for k, v in challenger.items()
                 if k.startswith("task/") and k.endswith(suffix)}
    wanted = [metric_key_part(t) for t in tasks] if tasks is not None else [t for t, b in baselines.items() if b < 1]
    checks, failures, passes = [], [], []
    if not wanted:
        failures.append("its evaluation records no held-out task with a majority baseline below 1 (no held-out "
                        "questions with short answers?); set promotion.baseline_tasks: [] to gate on the rules alone")
    for task in wanted:
        value, low = challenger.get(f"task/{task}/{metric}"), challenger.get(f"task/{task}/{metric}_ci_low")
        high, baseline = challenger.get(f"task/{task}/{metric}_ci_high"), baselines.get(task)
        if not (_finite(value) and _finite(low) and _finite(baseline)):
            checks.append(RuleCheck(f"task/{task}/{metric}", "higher", 0.0, value, baseline, False, False))
            failures.append(f"task {task}: no {metric} with an interval and a majority baseline recorded "
                            f"(scored tasks: {', '.join(sorted(baselines)) or 'none'}; fix promotion.baseline_tasks "
                            "or promotion.baseline_metric)")
            continue
        interval = f"[{low:.3f}, {high:.3f}]" if _finite(high) else f"[{low:.3f}, ?]"
        passed = low > baseline
        checks.append(RuleCheck(f"task/{task}/{metric}", "higher", 0.0, value, baseline, passed, passed,
                                note=f"95% interval {interval}"))
        shown = f"{task} {metric} {value:.3f} {interval} vs majority baseline {baseline:.3f}"
        (passes if passed else failures).append(shown)
    if failures:
        return Comparison("majority baseline", None, checks, False,
                          "does not beat the majority baseline (the low end of the 95% interval must lie above it): "
                          + "; ".join(failures))
    return Comparison("majority baseline", None, checks, True, "beats the majority baseline on " + "; ".join(passes))


def paired_check(challenger: list[dict], champion: list[dict], gate: PromotionConfig) -> tuple[RuleCheck, dict | None]:
    """Test 3's paired part: the per-question change of `gate.champion_metric` from the champion's answers to
    the challenger's on the questions both were scored on, judged by `gate.champion_rule` and margin."""
    metric = gate.champion_metric
    change = paired_change(with_scores(champion, metric), with_scores(challenger, metric), metric, key=question_key)
    name = f"{metric} paired change"
    if change is None:
        return RuleCheck(name, "higher", gate.champion_margin, None, None, False, False,
                         note="no question scored by both"), None
    c = change["change"]
    figure = c["ci_low"] if gate.champion_rule == "interval" else c["value"]
    passed = _finite(figure) and figure > gate.champion_margin
    note = (f"{change['before']:.3f} -> {change['after']:.3f} on {change['n']} questions, "
            f"{c['value']:+.3f} [{c['ci_low']:+.3f}, {c['ci_high']:+.3f}]")
    return RuleCheck(name, "higher", gate.champion_margin, figure, gate.champion_margin, passed, passed, note), change


def _with_paired(comparison: Comparison, check: RuleCheck, rule: str) -> Comparison:
    """The champion comparison with the paired check added: it wins only when both the rules and the check do."""
    what = "its 95% interval's low end" if rule == "interval" else "its mean"
    line = f"{check.metric} {check.note}: {what} must exceed {check.margin:g}"
    checks = [*comparison.checks, check]
    if check.passed and comparison.wins:
        return Comparison(comparison.against, comparison.version, checks, True,
                          f"{comparison.reason}; {check.metric} {check.note}")
    if check.passed:
        return Comparison(comparison.against, comparison.version, checks, False, comparison.reason)
    name = f"{comparison.against} (version {comparison.version})"
    reason = f"does not beat the {name}: {line}" if comparison.wins else f"{comparison.reason}; {line}"
    return Comparison(comparison.against, comparison.version, checks, False, reason)


def registered_samples(client: MlflowClient, mv) -> list[dict] | None:
    """The per-question answers a version was scored on (the register stage logs them), or None for a
    version registered without them."""
    if not mv.run_id:
        return None
    with tempfile.TemporaryDirectory(prefix="lmforge-samples-") as tmp:
        try:
            path = Path(client.download_artifacts(mv.run_id, SAMPLES_ARTIFACT, tmp))
        except (MlflowException, OSError):
            return None
        if not path.is_file():
            return None
        return list(iter_records(path))


def promote_if_better(
    client: MlflowClient,
    name: str,
    version: str,
    gate: PromotionConfig,
    *,
    challenger_metrics: dict[str, float] | None = None,
    base_metrics: dict[str, float] | None = None,
    samples: list[dict] | None = None,
    rescore: Callable[[object, list[dict]], list[dict]] | None = None,
    force: bool = False,
    out_dir: Path | None = None,
) -> Decision:
    """Decide whether `name` version `version` becomes champion (the module docstring's three tests), move
    the alias if so, record the decision.

    Metrics and per-question `samples` not given are read from the version's model run (what the register
    stage logged: its held-out metrics under `eval_`, the base's under `base_`, its answers as an artifact).
    `rescore(champion_version, samples)` returns the champion's answers to the challenger's questions, for a
    champion scored on other ones. `force` moves the alias whatever the tests say (recorded as `forced`).
    """
    version = str(version)
    mv = _model_version(client, name, version)
    challenger = challenger_metrics if challenger_metrics is not None else run_metrics(client, mv, CHALLENGER_PREFIX)
    base = base_metrics if base_metrics is not None else run_metrics(client, mv, BASE_PREFIX)
    _check_rule_metrics(challenger, gate.rules, f"{name} version {version}")
    if samples is None:
        samples = registered_samples(client, mv) or []
    digest = heldout_digest(samples) if samples else None
    champion = current_champion(client, name)
    previous = str(champion.version) if champion is not None else None  # MLflow gives ints or strings
    comparisons = []
    if gate.baseline_tasks != []:
        comparisons.append(baseline_comparison(challenger, gate.baseline_tasks, gate.baseline_metric))
    comparisons.append(compare(challenger, base, gate.rules, against="base"))
    champion_metrics: dict[str, float] = {}
    paired = None
    if previous is not None and previous != version:
        against, paired = _against_champion(client, champion, challenger, samples, digest, gate, rescore)
        comparisons.append(against)
        if paired is not None and paired.get("same_questions"):
            champion_metrics = run_metrics(client, champion, CHALLENGER_PREFIX)

    if previous == version:
        outcome, reason = "kept", f"version {version} already is @{CHAMPION}"
    elif all(c.wins for c in comparisons):
        outcome = "promoted"
        reason = "; ".join(c.reason for c in comparisons) + ("" if champion else "; first champion of this model")
    elif force:
        outcome = "forced"
        reason = "moved by hand (--force) although it " + "; ".join(c.reason for c in comparisons if not c.wins)
    else:
        outcome, reason = "rejected", "; ".join(c.reason for c in comparisons if not c.wins)

    shown = [r.metric for r in gate.rules]
    decision = Decision(
        model_name=name, version=version, outcome=outcome, reason=reason, previous_champion=previous,
        comparisons=comparisons, rules=[r.model_dump(mode="json") for r in gate.rules],
        metrics={"challenger": {k: challenger[k] for k in shown if k in challenger},
                 "base": {k: base[k] for k in shown if k in base},
                 "champion": {k: champion_metrics[k] for k in shown if k in champion_metrics}},
        paired=paired, heldout_digest=digest,
    )
    if decision.promoted:
        client.set_registered_model_alias(name, CHAMPION, version)
        client.set_model_version_tag(name, version, PREVIOUS_CHAMPION, previous or "")
    _record(client, mv, decision, out_dir)
    log.info("%s version %s: %s (%s)", name, version, outcome, reason)
    return decision


def _against_champion(client: MlflowClient, champion, challenger: dict[str, float], samples: list[dict],
                      digest: str | None, gate: PromotionConfig, rescore) -> tuple[Comparison, dict | None]:
    """Test 3: the rules on the champion's figures and the paired change, on the same questions only."""
    version = str(champion.version)
    if not samples:
        return Comparison("champion", version, [], False,
                          f"cannot be compared with the champion (version {version}): the challenger records no "
                          "per-question answers; re-register it with this lmforge"), None
    champion_samples = registered_samples(client, champion)
    same = champion_samples is not None and (champion.tags or {}).get(HELDOUT_DIGEST_TAG) == digest
    if same:
        comparison = compare(challenger, run_metrics(client, champion, CHALLENGER_PREFIX), gate.rules,
                             against="champion", version=version)
    else:
        why = ("records no per-question answers" if champion_samples is None
               else f"was scored on other held-out questions (digest {str((champion.tags or {}).get(HELDOUT_DIGEST_TAG))[:12]} "
                    f"vs {digest[:12]})")
        if gate.on_other_questions == "refuse" or rescore is None or gate.champion_metric != "exact_match":
            how = ("promotion.on_other_questions is refuse" if gate.on_other_questions == "refuse" else
                   "only exact_match can be rescored" if gate.champion_metric != "exact_match" else
                   "no rescoring here")
            return Comparison("champion", version, [], False,
                              f"cannot be compared with the champion (version {version}): it {why}, and figures from "
                              f"different question sets are never compared ({how}); rescore it through the flow's "
                              "promote stage, or move the alias by hand: lmforge promote NAME VERSION --force"), None
        log.info("champion version %s %s: rescoring it on the challenger's %d questions", version, why, len(samples))
        champion_samples = rescore(champion, samples)
        # The rules' figures of the champion were measured on other questions: only the paired change decides.
        comparison = Comparison("champion", version, [], True, f"champion (version {version}) {why}, rescored on "
                                f"the challenger's {len(samples)} questions")
    check, change = paired_check(samples, champion_samples, gate)
    comparison = _with_paired(comparison, check, gate.champion_rule)
    if change is not None:
        change = {**change, "metric": gate.champion_metric, "rule": gate.champion_rule,
                  "margin": gate.champion_margin, "same_questions": same, "rescored": not same}
    return comparison, change


def rollback(client: MlflowClient, name: str, out_dir: Path | None = None) -> Decision:
    """Move `champion` back to the version the current champion replaced (its recorded previous champion)."""
    champion = current_champion(client, name)
    if champion is None:
        raise PromotionError(f"registered model {name!r} has no @{CHAMPION} to roll back")
    previous = (champion.tags or {}).get(PREVIOUS_CHAMPION)
    if not previous:
        raise PromotionError(
            f"{name} version {champion.version} is @{CHAMPION} but records no previous champion (it was the first); "
            f"promote another version by hand instead: lmforge promote {name} VERSION --force"
        )
    target = _model_version(client, name, previous)
    client.set_registered_model_alias(name, CHAMPION, previous)
    decision = Decision(
        model_name=name, version=previous, outcome="rolled_back",
        reason=f"rolled back from version {champion.version} to the champion it replaced",
        previous_champion=str(champion.version),
    )
    client.set_model_version_tag(name, champion.version, TAG + "rolled_back_to", previous)
    _record(client, target, decision, out_dir)
    log.info("%s: @%s moved back from version %s to %s", name, CHAMPION, champion.version, previous)
    return decision


def _record(client: MlflowClient, mv, decision: Decision, out_dir: Path | None) -> None:
    """The decision as tags on the version and as a JSON artifact of its model run (and in `out_dir`)."""
    if decision.outcome == "kept":  # nothing changed: the tags keep saying why it became champion
        if out_dir is not None:
            atomic_write_json(Path(out_dir) / "promotion.json", decision.as_dict())
        return
    tags = {
        "decision": decision.outcome,
        "reason": decision.reason,
        "decided_at": decision.decided_at,
        "compared_with": (decision.comparisons[-1].version or "base") if decision.comparisons else "",
        "rules": json.dumps(decision.rules),
        "metrics": json.dumps(decision.metrics),
    }
    for k, v in tags.items():
        client.set_model_version_tag(decision.model_name, mv.version, TAG + k, v[:5000])
    stamp = decision.decided_at.replace(":", "").replace("-", "")

    def write(directory: Path) -> None:
        path = directory / "promotion.json"
        atomic_write_json(path, decision.as_dict())
        if mv.run_id:
            client.log_artifact(mv.run_id, str(path), artifact_path=f"promotion/{stamp}-{decision.outcome}")

    if out_dir is not None:
        write(Path(out_dir))
    else:
        with tempfile.TemporaryDirectory(prefix="lmforge-promotion-") as tmp:
            write(Path(tmp))


def champion_rescorer(client: MlflowClient, cfg: PipelineConfig, cache_dir: Path):
    """`rescore` for promote_if_better: the champion's greedy answers to the challenger's questions, each
    rendered as the challenger's evaluation rendered it (its `rendered_prompt`), with the same token budget."""

    def rescore(champion, samples: list[dict]) -> list[dict]:
        from components.evaluation.evaluate import generate
        from components.models.loading import load_model, load_tokenizer, select_hardware
        from components.registry import resolve_registry_uri

        model_dir = resolve_registry_uri(client, f"models:/{champion.name}/{champion.version}", cache_dir)
        hardware = select_hardware(cfg.compute.device, cfg.compute.precision)
        model, tokenizer = load_model(str(model_dir), hardware), load_tokenizer(str(model_dir))
        answers = generate(model, tokenizer, [s["rendered_prompt"] for s in samples],
                           max_new_tokens=cfg.evaluate.max_new_tokens, batch_size=cfg.evaluate.batch_size,
                           template=cfg.tokenize.template)
        keep = ("task", "prompt", "rendered_prompt", "reference")
        return [{**{k: s[k] for k in keep if k in s}, "prediction": a} for s, a in zip(samples, answers, strict=True)]

    return rescore


def promote_stage(cfg: PipelineConfig, inputs: StageInputs, out_dir: Path) -> StageResult:
    """Stage entry point (see components.pipeline): the gate for the version the register stage made, on
    the held-out metrics and answers of its evaluation (evaluate-aligned or evaluate-adapted) and the
    metrics of evaluate-base."""
    if inputs.run is None:
        raise ValueError("promote needs the flow run's tracking context (StageInputs.run)")
    registered = inputs.upstream["register"]["info"]
    client = tracking.client_for(inputs.run.tracking_uri)
    evaluation = registered_evaluation(inputs)
    answers = Path(evaluation["dir"]) / "samples.jsonl" if evaluation.get("dir") else None
    samples = list(iter_records(answers)) if answers is not None and answers.is_file() else None
    decision = promote_if_better(
        client, registered["name"], registered["version"], cfg.promotion,
        challenger_metrics=evaluation["metrics"], base_metrics=inputs.upstream[EVALUATION_NODES["base"]]["metrics"],
        samples=samples, rescore=champion_rescorer(client, cfg, Path(cfg.workspace) / "registry-cache"),
        out_dir=Path(out_dir),
    )
    champion = decision.version if decision.promoted or decision.outcome == "kept" else decision.previous_champion
    return StageResult(
        files=["promotion.json"], reports=["promotion.json"], metrics={"promoted": float(decision.promoted)},
        info={"name": decision.model_name, "version": decision.version, "outcome": decision.outcome,
              "reason": decision.reason, "champion": champion},
    )
