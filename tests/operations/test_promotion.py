"""The promotion gate on a real MLflow registry (SQLite in tmp): a worse challenger stays out, a better one
becomes champion, the first version must beat the base, every decision is recorded on the version, and
`lmforge promote` / `lmforge rollback` move the alias as the tags say."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from components import tracking
from components.config import PromotionRule, load_config
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
from components.registry import register_model

RULES = load_config(None).promotion.rules  # the defaults: perplexity_sft_eval lower, exact_match higher
BASE = {"perplexity_sft_eval": 20.0, "exact_match": 0.10, "bleu": 0.05}


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
def registry(store, request):
    cfg, client, exp, model_dir = store
    name = request.node.name[:60]

    def register(ppl: float, em: float) -> str:
        """A version as the register stage makes it: eval_/base_ metrics on its model run, alias challenger."""
        run_id = tracking.start_run(client, exp, "model")
        tracking.log_metrics(client, run_id, {"eval_perplexity_sft_eval": ppl, "eval_exact_match": em,
                                              **{f"base_{k}": v for k, v in BASE.items()}})
        version = register_model(client, name=name, run_id=run_id, model_dir=model_dir, files=["config.json"],
                                 tags={}, alias="challenger")
        tracking.end_run(client, run_id)
        return str(version)

    return cfg, client, register, exp, name


def _champion(client, name: str) -> str | None:
    mv = current_champion(client, name)
    return str(mv.version) if mv else None


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
    worse_than_base = register(ppl=25.0, em=0.10)
    decision = promote_if_better(client, name, worse_than_base, RULES)
    assert decision.outcome == "rejected" and "does not beat the base" in decision.reason
    assert _champion(client, name) is None
    better = register(ppl=12.0, em=0.20)
    decision = promote_if_better(client, name, better, RULES)
    assert decision.outcome == "promoted" and "first champion" in decision.reason
    assert _champion(client, name) == better
    tags = client.get_model_version(name, better).tags
    assert tags["lmforge.promotion.decision"] == "promoted" and tags[PREVIOUS_CHAMPION] == ""
    assert json.loads(tags["lmforge.promotion.metrics"]) == {
        "challenger": {"perplexity_sft_eval": 12.0, "exact_match": 0.2},
        "base": {"perplexity_sft_eval": 20.0, "exact_match": 0.1}, "champion": {}}
    assert json.loads(tags["lmforge.promotion.rules"])[0] == {"metric": "perplexity_sft_eval", "direction": "lower",
                                                              "margin": 0.0}


def test_worse_challenger_stays_out_and_a_better_one_replaces_the_champion(registry):
    _, client, register, _, name = registry
    first = register(ppl=12.0, em=0.20)
    assert promote_if_better(client, name, first, RULES).promoted

    worse = register(ppl=11.0, em=0.15)  # beats the base, lower perplexity, but loses exact match to the champion
    decision = promote_if_better(client, name, worse, RULES)
    assert decision.outcome == "rejected"
    assert f"does not beat the champion (version {first})" in decision.reason and "exact_match 0.15 vs 0.2" in decision.reason
    assert _champion(client, name) == first
    tags = client.get_model_version(name, worse).tags
    assert tags["lmforge.promotion.decision"] == "rejected" and tags["lmforge.promotion.compared_with"] == first
    assert json.loads(tags["lmforge.promotion.metrics"])["champion"] == {"perplexity_sft_eval": 12.0, "exact_match": 0.2}
    # The decision is also an artifact of the version's model run.
    arts = [a.path for a in client.list_artifacts(client.get_model_version(name, worse).run_id, "promotion")]
    assert len(arts) == 1 and arts[0].endswith("-rejected")

    better = register(ppl=10.0, em=0.25)
    decision = promote_if_better(client, name, better, RULES)
    assert decision.outcome == "promoted" and decision.previous_champion == first
    assert _champion(client, name) == better
    assert client.get_model_version(name, better).tags[PREVIOUS_CHAMPION] == first
    # Asking again for the champion itself changes nothing.
    again = promote_if_better(client, name, better, RULES)
    assert again.outcome == "kept" and _champion(client, name) == better


def test_rules_naming_an_unknown_metric_fail_with_what_exists(registry):
    _, client, register, _, name = registry
    version = register(ppl=12.0, em=0.20)
    with pytest.raises(PromotionError, match=r"\['task/chapter/accuracy'\].*exact_match, perplexity_sft_eval"):
        promote_if_better(client, name, version, [PromotionRule(metric="task/chapter/accuracy", direction="higher")])
    with pytest.raises(PromotionError, match="no version 99"):
        promote_if_better(client, name, "99", RULES)


def test_rollback_walks_back_the_recorded_champions(registry):
    _, client, register, _, name = registry
    v1, v2, v3 = register(12.0, 0.2), register(10.0, 0.3), register(9.0, 0.4)
    for v in (v1, v2, v3):
        assert promote_if_better(client, name, v, RULES).promoted
    assert rollback(client, name).version == v2 and _champion(client, name) == v2
    assert client.get_model_version(name, v3).tags["lmforge.promotion.rolled_back_to"] == v2
    assert rollback(client, name).version == v1 and _champion(client, name) == v1
    with pytest.raises(PromotionError, match="records no previous champion"):
        rollback(client, name)


def test_promote_stage_reads_the_evaluation_manifests(registry, tmp_path):
    cfg, client, register, exp, name = registry
    version = register(ppl=12.0, em=0.20)
    run = RunInfo(cfg.tracking_uri(), exp, tracking.start_run(client, exp, "parent"), "flow-1", cfg.digest())
    upstream = {
        "register": {"info": {"name": name, "version": version}},
        # The manifests decide, not the run's metrics: here the adapted model loses to the base.
        "evaluate-adapted": {"metrics": {"perplexity_sft_eval": 30.0, "exact_match": 0.0}},
        "evaluate-base": {"metrics": {"perplexity_sft_eval": 20.0, "exact_match": 0.1}},
    }
    out = tmp_path / "promote"
    out.mkdir()
    result = promote_stage(cfg, StageInputs("promote", "promote", upstream, run=run), out)
    assert result.metrics == {"promoted": 0.0} and result.info["outcome"] == "rejected"
    assert result.info["champion"] is None
    saved = json.loads((out / "promotion.json").read_text())
    assert saved["promoted"] is False and saved["metrics"]["challenger"]["perplexity_sft_eval"] == 30.0


def test_cli_promote_and_rollback(registry, tmp_path):
    from flows.cli import app

    cfg, client, register, _, name = registry
    conf = tmp_path / "c.yaml"
    conf.write_text(f"workspace: {cfg.workspace}\n")
    v1, v2 = register(12.0, 0.2), register(15.0, 0.1)
    runner = CliRunner()
    ok = runner.invoke(app, ["promote", name, v1, "--config", str(conf)])
    assert ok.exit_code == 0, ok.output
    assert "promoted" in ok.output and _champion(client, name) == v1
    refused = runner.invoke(app, ["promote", name, v2, "--config", str(conf)])
    assert refused.exit_code == 1 and "rejected" in refused.output and _champion(client, name) == v1
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
    version = register(ppl=12.0, em=0.2)
    by_alias = resolve_registry_uri(client, f"models:/{name}@challenger", tmp_path / "cache")
    assert (by_alias / "config.json").read_text() == "{}"
    stamp = (by_alias / "config.json").stat().st_mtime_ns
    assert resolve_registry_uri(client, f"models:/{name}/{version}", tmp_path / "cache") == by_alias
    assert (by_alias / "config.json").stat().st_mtime_ns == stamp  # downloaded once
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [by_alias.name]  # no temp dirs left


def test_promote_stage_judges_the_aligned_model_when_alignment_ran(registry, tmp_path):
    cfg, client, register, exp, name = registry
    version = register(ppl=12.0, em=0.20)
    run = RunInfo(cfg.tracking_uri(), exp, tracking.start_run(client, exp, "parent"), "flow-2", cfg.digest())
    upstream = {
        "register": {"info": {"name": name, "version": version}},
        "evaluate-adapted": {"metrics": {"perplexity_sft_eval": 30.0, "exact_match": 0.0}},  # loses to the base
        "evaluate-aligned": {"metrics": {"perplexity_sft_eval": 15.0, "exact_match": 0.3}},  # what was registered
        "evaluate-base": {"metrics": {"perplexity_sft_eval": 20.0, "exact_match": 0.1}},
    }
    result = promote_stage(cfg, StageInputs("promote", "promote", upstream, run=run), tmp_path)
    assert result.info["outcome"] == "promoted" and _champion(client, name) == version
