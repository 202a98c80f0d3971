"""Eval-gated promotion: alias `champion` moves to a registered version only when it beats the base
model and the current champion on the held-out metrics the config names.

A rule is (metric, direction, margin): the challenger passes it against a reference when it is better
by at least `margin` (in the metric's units; a negative margin tolerates that much regression). A
challenger wins against a reference when it passes every rule and is strictly better on at least one,
so a retrained copy with the same scores does not churn the alias. It must win against the base (the
evaluate-base stage, same held-out sets) and against the current champion, if there is one; the first
version in an empty registry becomes champion only by beating the base.

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
from components.registry import registered_evaluation

if TYPE_CHECKING:
    from components.config import PipelineConfig, PromotionRule
    from components.pipeline import StageInputs

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


@dataclass
class Comparison:
    """The challenger against one reference: the base or the current champion."""

    against: str  # "base" or "champion"
    version: str | None  # the champion's version; None for the base
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


def promote_if_better(
    client: MlflowClient,
    name: str,
    version: str,
    rules: list[PromotionRule],
    *,
    challenger_metrics: dict[str, float] | None = None,
    base_metrics: dict[str, float] | None = None,
    force: bool = False,
    out_dir: Path | None = None,
) -> Decision:
    """Decide whether `name` version `version` becomes champion, move the alias if so, record the decision.

    Metrics not given are read from the version's model run (what the register stage logged: its
    held-out metrics under `eval_`, the base's under `base_`). `force` moves the alias whatever the
    rules say (recorded as `forced`, the comparison kept for the record).
    """
    version = str(version)
    mv = _model_version(client, name, version)
    challenger = challenger_metrics if challenger_metrics is not None else run_metrics(client, mv, CHALLENGER_PREFIX)
    base = base_metrics if base_metrics is not None else run_metrics(client, mv, BASE_PREFIX)
    _check_rule_metrics(challenger, rules, f"{name} version {version}")
    champion = current_champion(client, name)
    previous = str(champion.version) if champion is not None else None  # MLflow gives ints or strings
    comparisons = [compare(challenger, base, rules, against="base")]
    champion_metrics: dict[str, float] = {}
    if previous is not None and previous != version:
        champion_metrics = run_metrics(client, champion, CHALLENGER_PREFIX)
        comparisons.append(compare(challenger, champion_metrics, rules, against="champion", version=previous))

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

    shown = [r.metric for r in rules]
    decision = Decision(
        model_name=name, version=version, outcome=outcome, reason=reason, previous_champion=previous,
        comparisons=comparisons, rules=[r.model_dump(mode="json") for r in rules],
        metrics={"challenger": {k: challenger[k] for k in shown if k in challenger},
                 "base": {k: base[k] for k in shown if k in base},
                 "champion": {k: champion_metrics[k] for k in shown if k in champion_metrics}},
    )
    if decision.promoted:
        client.set_registered_model_alias(name, CHAMPION, version)
        client.set_model_version_tag(name, version, PREVIOUS_CHAMPION, previous or "")
    _record(client, mv, decision, out_dir)
    log.info("%s version %s: %s (%s)", name, version, outcome, reason)
    return decision


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


def promote_stage(cfg: PipelineConfig, inputs: StageInputs, out_dir: Path) -> StageResult:
    """Stage entry point (see components.pipeline): the gate for the version the register stage made, on
    the held-out metrics of its evaluation (evaluate-aligned or evaluate-adapted) and of evaluate-base."""
    if inputs.run is None:
        raise ValueError("promote needs the flow run's tracking context (StageInputs.run)")
    registered = inputs.upstream["register"]["info"]
    client = tracking.client_for(inputs.run.tracking_uri)
    decision = promote_if_better(
        client, registered["name"], registered["version"], cfg.promotion.rules,
        challenger_metrics=registered_evaluation(inputs)["metrics"],
        base_metrics=inputs.upstream["evaluate-base"]["metrics"],
        out_dir=Path(out_dir),
    )
    champion = decision.version if decision.promoted or decision.outcome == "kept" else decision.previous_champion
    return StageResult(
        files=["promotion.json"], metrics={"promoted": float(decision.promoted)},
        info={"name": decision.model_name, "version": decision.version, "outcome": decision.outcome,
              "reason": decision.reason, "champion": champion},
    )
