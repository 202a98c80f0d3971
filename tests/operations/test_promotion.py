"""The promotion gate on a real MLflow registry (SQLite in tmp): a challenger at its majority baseline stays
out, a noise-level gain over the champion stays out under the interval rule, a clear gain becomes champion, a
champion scored on other questions is rescored or refused, the first version must beat the base, every
decision is recorded on the version, and `lmforge promote` / `lmforge rollback` move the alias as the tags say."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from components import tracking
from components.config import PromotionConfig, PromotionRule, load_config
from components.evaluation.intervals import proportion
from components.evaluation.metrics import exact_hits
from components.evaluation.per_task import flatten_report, group_by_task, majority_rate, task_entry
from components.evaluation.evaluate import write_samples
from components.pipeline import RunInfo, StageInputs
from components.promotion import (
    CHAMPION,
    PREVIOUS_CHAMPION,
    PromotionError,
    compare,
    current_champion,
    promote_if_better,
    promote_stage,
    rollback,
)
from components.registry import HELDOUT_DIGEST_TAG, log_heldout_answers, register_model

GATE = load_config(None).promotion  # the defaults: baseline on every task, perplexity and exact match, paired interval
RULES = GATE.rules
BASE = {"perplexity_sft_eval": 20.0, "exact_match": 0.0, "bleu": 0.05}
# Two held-out tasks of 40 questions: chapter (4 answers in turn: majority baseline 0.25), billable (0.5).
TASKS = {"chapter": ["Neoplasms", "Injuries", "Pregnancy", "Mental"], "billable": ["Yes", "No"]}
N = 40


def answers(right: dict[str, int], tasks: dict[str, list[str]] = TASKS, offset: int = 0) -> list[dict]:
    """Held-out samples as the evaluate stage writes them: the first right[task] questions of each task answered
    right, the rest wrong. `offset` asks other questions (another held-out set)."""
    rows = []
    for task, options in tasks.items():
        for i in range(N):
            ref = options[i % len(options)]
            q = f"{task} question {i + offset}"
            rows.append({"task": task, "prompt": q, "rendered_prompt": f"<user>{q}</user>", "reference": ref,
                         "prediction": ref if i < right.get(task, 0) else "not sure"})
    return rows


def evaluation_metrics(samples: list[dict]) -> dict[str, float]:
    """The flat per-task metrics the evaluate stage reports for these answers (exact match only)."""
    def entry(rows):
        refs = [r["reference"] for r in rows]
        return task_entry(len(rows), majority_rate(refs),
                          {"exact_match": proportion(exact_hits([r["prediction"] for r in rows], refs))})

    return flatten_report({"overall": entry(samples),
                           "tasks": {t: entry(rows) for t, rows in group_by_task(samples).items()}})


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """One tracking database for the module (creating one costs seconds); each test has its own model name."""
    root = tmp_path_factory.mktemp("registry")
    cfg = load_config(None, [f"workspace={root}"])
    client = tracking.client_for(cfg.tracking_uri())
    exp = tracking.experiment_id(client, "gate", root / "mlartifacts")
    model_dir = root / "model"
    model_dir.mkdir()
    (model_dir / "config.json").write_text("{}")
    return cfg, client, exp, model_dir


@pytest.fixture
def registry(store, request, tmp_path):
    cfg, client, exp, model_dir = store
    name = request.node.name[:60]

    def register(ppl: float, right: dict[str, int], offset: int = 0) -> str:
        """A version as the register stage makes it: eval_/base_ metrics on its model run, its held-out answers
        as an artifact with their digest as a tag, alias challenger."""
        samples = answers(right, offset=offset)
        run_id = tracking.start_run(client, exp, "model")
        tracking.log_metrics(client, run_id, {"eval_perplexity_sft_eval": ppl,
                                              **{f"eval_{k}": v for k, v in evaluation_metrics(samples).items()},
                                              **{f"base_{k}": v for k, v in BASE.items()}})
        path = tmp_path / f"samples-{run_id}.jsonl"
        write_samples(path, samples)
        tags = log_heldout_answers(client, run_id, path)
        version = register_model(client, name=name, run_id=run_id, model_dir=model_dir, files=["config.json"],
                                 tags=tags, alias="challenger")
        tracking.end_run(client, run_id)
        return str(version)

    return cfg, client, register, exp, name


def _champion(client, name: str) -> str | None:
    mv = current_champion(client, name)
    return str(mv.version) if mv else None


GOOD = {"chapter": 30, "billable": 30}  # 0.75 [0.60, 0.86] on both: above 0.25 and 0.5
BETTER = {"chapter": 38, "billable": 38}
def test_compare_needs_every_rule_and_one_strict_improvement():
    rules = [PromotionRule(metric="ppl", direction="lower"), PromotionRule(metric="em", direction="higher", margin=0.05)]
    ref = {"ppl": 10.0, "em": 0.5}
    assert compare({"ppl": 9.0, "em": 0.55}, ref, rules, against="base").wins
    worse = compare({"ppl": 9.0, "em": 0.54}, ref, rules, against="base")  # em improved, but by less than the margin
    assert not worse.wins and "em 0.54 vs 0.5" in worse.reason and "at least 0.05" in worse.reason
    tie = compare(ref, ref, [PromotionRule(metric="ppl", direction="lower")], against="champion", version="3")
    assert not tie.wins and "ties the champion (version 3)" in tie.reason
    tolerant = [PromotionRule(metric="ppl", direction="lower", margin=-0.5), PromotionRule(metric="em", direction="higher")]
    assert compare({"ppl": 10.4, "em": 0.6}, ref, tolerant, against="base").wins  # 0.4 worse, within 0.5
    nan = compare({"ppl": float("nan"), "em": 0.9}, ref, rules, against="base")
    assert not nan.wins and "no finite value for the challenger" in nan.reason
    missing = compare({"ppl": 1.0, "em": 0.9}, {"em": 0.1}, rules, against="champion", version="1")
    assert not missing.wins and "ppl: no finite value for the champion" in missing.reason


def test_first_version_becomes_champion_only_by_beating_the_base(registry):
    _, client, register, _, name = registry
    worse_than_base = register(ppl=25.0, right=GOOD)
    decision = promote_if_better(client, name, worse_than_base, GATE)
    assert decision.outcome == "rejected" and "does not beat the base" in decision.reason
    assert _champion(client, name) is None
    better = register(ppl=12.0, right=GOOD)
    decision = promote_if_better(client, name, better, GATE)
    assert decision.outcome == "promoted" and "first champion" in decision.reason
    assert "beats the majority baseline on chapter exact_match 0.750 [0.598, 0.858] vs majority baseline 0.250" in decision.reason
    assert _champion(client, name) == better
    tags = client.get_model_version(name, better).tags
    assert tags["lmforge.promotion.decision"] == "promoted" and tags[PREVIOUS_CHAMPION] == ""
    assert json.loads(tags["lmforge.promotion.metrics"]) == {
        "challenger": {"perplexity_sft_eval": 12.0, "exact_match": 0.75},
        "base": {"perplexity_sft_eval": 20.0, "exact_match": 0.0}, "champion": {}}
    assert json.loads(tags["lmforge.promotion.rules"])[0] == {"metric": "perplexity_sft_eval", "direction": "lower",
                                                              "margin": 0.0}


def test_a_challenger_at_the_majority_baseline_is_rejected(registry):
    """It beats the base (which never learned the answer format) on every rule, and still stays out: on chapter it
    scores what always answering the commonest chapter scores."""
    _, client, register, _, name = registry
    at_baseline = register(ppl=10.0, right={"chapter": 10, "billable": 34})
    decision = promote_if_better(client, name, at_baseline, GATE)
    assert decision.outcome == "rejected" and _champion(client, name) is None
    assert decision.comparisons[1].wins  # the base comparison alone would have promoted it
    assert ("does not beat the majority baseline (the low end of the 95% interval must lie above it): "
            "chapter exact_match 0.250 [0.142, 0.402] vs majority baseline 0.250") in decision.reason
    assert "billable" not in decision.reason  # 0.85 [0.71, 0.93] clears 0.5
    unknown = promote_if_better(client, name, at_baseline, GATE.model_copy(update={"baseline_tasks": ["coding"]}))
    assert unknown.outcome == "rejected" and "task coding: no exact_match" in unknown.reason
    assert "scored tasks: billable, chapter" in unknown.reason
    # Gating on the tasks the config names: billable alone is beaten.
    decision = promote_if_better(client, name, at_baseline, GATE.model_copy(update={"baseline_tasks": ["billable"]}))
    assert decision.outcome == "promoted"


def test_a_noise_level_gain_over_the_champion_is_rejected_under_the_interval_rule(registry):
    _, client, register, _, name = registry
    first = register(ppl=12.0, right=GOOD)
    assert promote_if_better(client, name, first, GATE).promoted
    noise = register(ppl=11.0, right={"chapter": 31, "billable": 30})  # one more right answer of 80
    decision = promote_if_better(client, name, noise, GATE)
    assert decision.outcome == "rejected" and _champion(client, name) == first
    assert decision.comparisons[-1].against == "champion" and decision.paired["same_questions"]
    assert decision.paired["n"] == 80 and decision.paired["change"]["value"] == pytest.approx(1 / 80)
    assert decision.paired["change"]["ci_low"] <= 0 < decision.paired["change"]["ci_high"]
    assert (f"does not beat the champion (version {first}): exact_match paired change 0.750 -> 0.762 on 80 "
            "questions, +0.013 [+0.000, +0.037]: its 95% interval's low end must exceed 0") in decision.reason
    # The rules alone (lower perplexity, higher exact match) would have let it through.
    assert all(c.passed for c in decision.comparisons[-1].checks[:-1])
    # A point rule takes the same change as a gain; a margin on the interval is held to as well.
    point = GATE.model_copy(update={"champion_rule": "point"})
    assert promote_if_better(client, name, noise, point).outcome == "promoted"


def test_a_clear_gain_replaces_the_champion_and_a_loss_stays_out(registry):
    _, client, register, _, name = registry
    first = register(ppl=12.0, right=GOOD)
    assert promote_if_better(client, name, first, GATE).promoted

    worse = register(ppl=11.0, right={"chapter": 28, "billable": 30})  # lower perplexity, fewer right answers
    decision = promote_if_better(client, name, worse, GATE)
    assert decision.outcome == "rejected"
    assert f"does not beat the champion (version {first})" in decision.reason and "exact_match 0.725 vs 0.75" in decision.reason
    assert _champion(client, name) == first
    tags = client.get_model_version(name, worse).tags
    assert tags["lmforge.promotion.decision"] == "rejected" and tags["lmforge.promotion.compared_with"] == first
    assert json.loads(tags["lmforge.promotion.metrics"])["champion"] == {"perplexity_sft_eval": 12.0, "exact_match": 0.75}
    # The decision is also an artifact of the version's model run.
    arts = [a.path for a in client.list_artifacts(client.get_model_version(name, worse).run_id, "promotion")]
    assert len(arts) == 1 and arts[0].endswith("-rejected")

    better = register(ppl=10.0, right=BETTER)
    decision = promote_if_better(client, name, better, GATE)
    assert decision.outcome == "promoted" and decision.previous_champion == first
    assert decision.paired["change"]["value"] == pytest.approx(16 / 80) and decision.paired["change"]["ci_low"] > 0.1
    assert _champion(client, name) == better
    assert client.get_model_version(name, better).tags[PREVIOUS_CHAMPION] == first
    # Asking again for the champion itself changes nothing.
    again = promote_if_better(client, name, better, GATE)
    assert again.outcome == "kept" and _champion(client, name) == better


def test_a_champion_scored_on_other_questions_is_rescored_or_refused(registry):
    _, client, register, _, name = registry
    first = register(ppl=12.0, right=GOOD)
    assert promote_if_better(client, name, first, GATE).promoted
    other = register(ppl=11.0, right=BETTER, offset=100)  # 0.95 on another held-out set
    assert (client.get_model_version(name, other).tags[HELDOUT_DIGEST_TAG]
            != client.get_model_version(name, first).tags[HELDOUT_DIGEST_TAG])

    refused = promote_if_better(client, name, other, GATE.model_copy(update={"on_other_questions": "refuse"}))
    assert refused.outcome == "rejected" and _champion(client, name) == first
    assert f"cannot be compared with the champion (version {first}): it was scored on other held-out questions" \
        in refused.reason and "never compared" in refused.reason

    asked = []

    def rescore(champion, samples):
        """The champion answering the challenger's questions: right on every other one."""
        asked.append((str(champion.version), len(samples)))
        return [{**s, "prediction": s["reference"] if i % 2 else "no idea"} for i, s in enumerate(samples)]

    level = register(ppl=11.0, right={"chapter": 20, "billable": 20}, offset=100)  # 0.5, as the rescored champion
    decision = promote_if_better(client, name, level, GATE, rescore=rescore)
    assert decision.outcome == "rejected" and decision.paired["rescored"] and asked == [(first, 80)]
    decision = promote_if_better(client, name, other, GATE, rescore=rescore)
    assert decision.outcome == "promoted" and _champion(client, name) == other
    assert decision.paired["before"] == 0.5 and decision.paired["after"] == 0.95
    assert f"champion (version {first}) was scored on other held-out questions" in decision.reason
    assert decision.metrics["champion"] == {}  # its figures from the other questions are not shown as comparable


def test_rules_naming_an_unknown_metric_fail_with_what_exists(registry):
    _, client, register, _, name = registry
    version = register(ppl=12.0, right=GOOD)
    with pytest.raises(PromotionError, match=r"\['task/chapter/accuracy'\].*task/chapter/exact_match"):
        promote_if_better(client, name, version,
                          GATE.model_copy(update={"rules": [PromotionRule(metric="task/chapter/accuracy",
                                                                          direction="higher")]}))
    with pytest.raises(PromotionError, match="no version 99"):
        promote_if_better(client, name, "99", GATE)


def test_rollback_walks_back_the_recorded_champions(registry):
    _, client, register, _, name = registry
    v1, v2 = register(12.0, GOOD), register(10.0, BETTER)
    v3 = register(9.0, {"chapter": 40, "billable": 40})
    for v in (v1, v2, v3):
        assert promote_if_better(client, name, v, GATE).promoted
    assert rollback(client, name).version == v2 and _champion(client, name) == v2
    assert client.get_model_version(name, v3).tags["lmforge.promotion.rolled_back_to"] == v2
    assert rollback(client, name).version == v1 and _champion(client, name) == v1
    with pytest.raises(PromotionError, match="records no previous champion"):
        rollback(client, name)


def _evaluation_dir(tmp_path, node: str, samples: list[dict]) -> str:
    directory = tmp_path / node
    directory.mkdir()
    write_samples(directory / "samples.jsonl", samples)
    return str(directory)


def test_promote_stage_reads_the_evaluation_manifests(registry, tmp_path):
    cfg, client, register, exp, name = registry
    version = register(ppl=12.0, right=GOOD)
    run = RunInfo(cfg.tracking_uri(), exp, tracking.start_run(client, exp, "parent"), "flow-1", cfg.digest())
    samples = answers(GOOD)
    upstream = {
        "register": {"info": {"name": name, "version": version}},
        # The manifests decide, not the run's metrics: here the adapted model loses to the base on perplexity.
        "evaluate-adapted": {"metrics": {"perplexity_sft_eval": 30.0, **evaluation_metrics(samples)},
                             "dir": _evaluation_dir(tmp_path, "adapted", samples)},
        "evaluate-base": {"metrics": {"perplexity_sft_eval": 20.0, "exact_match": 0.1}},
    }
    out = tmp_path / "promote"
    out.mkdir()
    result = promote_stage(cfg, StageInputs("promote", "promote", upstream, run=run), out)
    assert result.metrics == {"promoted": 0.0} and result.info["outcome"] == "rejected"
    assert result.info["champion"] is None and "does not beat the base" in result.info["reason"]
    saved = json.loads((out / "promotion.json").read_text())
    assert saved["promoted"] is False and saved["metrics"]["challenger"]["perplexity_sft_eval"] == 30.0
    assert saved["heldout_digest"] == client.get_model_version(name, version).tags[HELDOUT_DIGEST_TAG]


def test_cli_promote_and_rollback(registry, tmp_path):
    from flows.cli import app

    cfg, client, register, _, name = registry
    conf = tmp_path / "c.yaml"
    conf.write_text(f"workspace: {cfg.workspace}\n")
    v1, v2 = register(12.0, GOOD), register(15.0, {"chapter": 20, "billable": 20})
    runner = CliRunner()
    ok = runner.invoke(app, ["promote", name, v1, "--config", str(conf)])
    assert ok.exit_code == 0, ok.output
    assert "promoted" in ok.output and _champion(client, name) == v1
    refused = runner.invoke(app, ["promote", name, v2, "--config", str(conf)])
    assert refused.exit_code == 1 and "rejected" in refused.output and _champion(client, name) == v1
    assert "paired change" in refused.output  # the table shows the paired check with its interval
    forced = runner.invoke(app, ["promote", name, v2, "--config", str(conf), "--force"])
    assert forced.exit_code == 0 and "forced" in forced.output and _champion(client, name) == v2
    back = runner.invoke(app, ["rollback", name, "--config", str(conf)])
    assert back.exit_code == 0, back.output
    assert _champion(client, name) == v1
    none_left = runner.invoke(app, ["rollback", name, "--config", str(conf)])
    assert none_left.exit_code == 2 and "no previous champion" in " ".join(none_left.output.split())
    assert str(client.get_model_version_by_alias(name, CHAMPION).version) == v1


def test_registered_model_resolves_by_alias_and_by_version(registry, tmp_path):
    from components.registry import resolve_registry_uri

    _, client, register, _, name = registry
    version = register(ppl=12.0, right=GOOD)
    by_alias = resolve_registry_uri(client, f"models:/{name}@challenger", tmp_path / "cache")
    assert (by_alias / "config.json").read_text() == "{}"
    stamp = (by_alias / "config.json").stat().st_mtime_ns
    assert resolve_registry_uri(client, f"models:/{name}/{version}", tmp_path / "cache") == by_alias
    assert (by_alias / "config.json").stat().st_mtime_ns == stamp  # downloaded once
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [by_alias.name]  # no temp dirs left


def test_promote_stage_judges_the_aligned_model_when_alignment_ran(registry, tmp_path):
    cfg, client, register, exp, name = registry
    version = register(ppl=12.0, right=GOOD)
    run = RunInfo(cfg.tracking_uri(), exp, tracking.start_run(client, exp, "parent"), "flow-2", cfg.digest())
    samples = answers(GOOD)
    upstream = {
        "register": {"info": {"name": name, "version": version}},
        "evaluate-adapted": {"metrics": {"perplexity_sft_eval": 30.0, "exact_match": 0.0}},  # loses to the base
        # what was registered
        "evaluate-aligned": {"metrics": {"perplexity_sft_eval": 15.0, **evaluation_metrics(samples)},
                             "dir": _evaluation_dir(tmp_path, "aligned", samples)},
        "evaluate-base": {"metrics": {"perplexity_sft_eval": 20.0, "exact_match": 0.1}},
    }
    result = promote_stage(cfg, StageInputs("promote", "promote", upstream, run=run), tmp_path)
    assert result.info["outcome"] == "promoted" and _champion(client, name) == version


def test_the_gate_rescores_a_registered_champion_with_its_own_weights(store, tiny_model_dir, tmp_path):
    """champion_rescorer downloads the champion from the registry, loads it and answers the challenger's questions
    greedily; the random tiny model answers none of them right, so a challenger at 0.95 wins by a clear margin."""
    from components.promotion import champion_rescorer

    cfg, client, exp, _ = store
    name = "rescored-for-real"
    files = sorted(str(p.relative_to(tiny_model_dir)) for p in tiny_model_dir.rglob("*") if p.is_file())

    def register(samples: list[dict]) -> str:
        run_id = tracking.start_run(client, exp, "model")
        tracking.log_metrics(client, run_id, {"eval_perplexity_sft_eval": 10.0,
                                              **{f"eval_{k}": v for k, v in evaluation_metrics(samples).items()},
                                              **{f"base_{k}": v for k, v in BASE.items()}})
        write_samples(tmp_path / "samples.jsonl", samples)
        version = register_model(client, name=name, run_id=run_id, model_dir=tiny_model_dir, files=files,
                                 tags=log_heldout_answers(client, run_id, tmp_path / "samples.jsonl"), alias="challenger")
        tracking.end_run(client, run_id)
        return str(version)

    first = register(answers(GOOD))
    assert promote_if_better(client, name, first, GATE).promoted
    challenger = answers(BETTER, offset=100)
    second = register(challenger)
    rescore = champion_rescorer(client, cfg.model_copy(update={"evaluate": cfg.evaluate.model_copy(
        update={"max_new_tokens": 3})}), tmp_path / "registry-cache")
    champion_answers = rescore(client.get_model_version(name, first), challenger)
    assert [a["prompt"] for a in champion_answers] == [s["prompt"] for s in challenger]
    assert all(isinstance(a["prediction"], str) and a["prediction"] != a["reference"] for a in champion_answers)
    decision = promote_if_better(client, name, second, GATE, rescore=rescore)
    assert decision.outcome == "promoted" and decision.paired["rescored"] and decision.paired["before"] == 0.0
