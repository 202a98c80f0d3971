"""Stage keys follow the code a stage loads by a name from the config: editing a reward rule's module (or a
rule baseline's feature) gives new keys to exactly the stages that call it, and a name that leads to no
module is a config error naming the field."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from components.config import ConfigError, load_config
from components.pipeline import KeyFacts, planned_nodes
from flows.plan import node_key

DEMO = Path(__file__).resolve().parents[2] / "configs/demo-cpu.yaml"
# The demo samples for RAFT; a pair method samples nothing and refuses sampling settings away from their defaults.
PAIR_METHOD = ["alignment.temperature=1.0", "alignment.max_new_tokens=24"]
FACTS = KeyFacts(precision="fp32", tokenizer_digest="tok", model_digest="model")
RULE = "def score(prompts, completions, **columns):\n    return [float(len(c) < 20) for c in completions]\n"
FEATURE = "def first_word(question):\n    return question.split()[0]\n"


def _keys(cfg) -> dict[str, str]:
    """Every planned node's key over the same upstream manifests, so only the node's own inputs differ."""
    manifests: dict[str, dict] = {}
    keys = {}
    for node in planned_nodes(cfg):
        keys[node.name], _ = node_key(node, cfg, FACTS, manifests)
        manifests[node.name] = {"stage": node.name, "digest": f"digest-of-{node.name}", "files": {}}
    return keys


@pytest.fixture
def user_code(tmp_path, monkeypatch):
    """A user's rule module and a package holding a rule baseline feature, on sys.path, never imported."""
    (tmp_path / "my_rules.py").write_text(RULE)
    (tmp_path / "my_features").mkdir()
    (tmp_path / "my_features" / "__init__.py").write_text("")
    (tmp_path / "my_features" / "shape.py").write_text(FEATURE)
    monkeypatch.syspath_prepend(str(tmp_path))
    return tmp_path


def _config(method: str = "raft"):
    return load_config(DEMO, [f"alignment.method={method}", "alignment.reward.rule=my_rules:score",
                              "reward.enabled=true", "data.rule_baselines={billable: 'my_features.shape:first_word'}",
                              *(PAIR_METHOD if method == "dpo" else [])])


def _changed(before: dict[str, str], after: dict[str, str]) -> set[str]:
    assert before.keys() == after.keys()
    return {n for n in before if before[n] != after[n]}


def test_editing_the_reward_rule_rekeys_exactly_the_stages_that_score_with_it(user_code):
    cfg = _config()
    before = _keys(cfg)
    assert {"fetch", "align", "tokenize", "cpt", "sft", "reward", "quantize", "register", "promote"} <= before.keys()
    (user_code / "my_rules.py").write_text(RULE.replace("< 20", "< 30"))
    after_rule = _keys(cfg)
    assert _changed(before, after_rule) == {"alignment", "evaluate-base", "evaluate-cpt", "evaluate-adapted",
                                            "evaluate-aligned"}
    (user_code / "my_features" / "shape.py").write_text(FEATURE.replace("[0]", "[-1]"))
    assert _changed(after_rule, _keys(cfg)) == {"align"}  # the align stage fits and applies the feature
    assert "my_rules" not in sys.modules and "my_features" not in sys.modules  # found, not imported


def test_a_pair_method_does_not_call_the_rule_and_keeps_its_alignment_key(user_code):
    cfg = _config("dpo")
    before = _keys(cfg)
    (user_code / "my_rules.py").write_text(RULE + "# edited\n")
    assert "alignment" not in _changed(before, _keys(cfg))  # DPO trains on pairs; only the evaluations score
    assert "evaluate-aligned" in _changed(before, _keys(cfg))


@pytest.mark.parametrize(("field", "override"), [
    ("alignment.reward.rule", "alignment.reward.rule=no_such_rules:score"),
    ("data.rule_baselines.billable", "data.rule_baselines={billable: 'components.no_such:shape'}"),
])
def test_a_name_that_leads_to_no_module_is_a_config_error_naming_the_field(field, override):
    cfg = load_config(DEMO, ["alignment.method=raft", override])
    with pytest.raises(ConfigError, match=rf"{field}: '.*(no_such_rules|components.no_such).*' names module"):
        _keys(cfg)


def test_editing_a_local_harness_task_rekeys_the_evaluations_alone(tmp_path, monkeypatch):
    from components.evaluation import harness

    shipped = harness.HARNESS_TASK_DIR / "icd10_chapter_mc.yaml"
    (tmp_path / "icd10_chapter_mc.yaml").write_text(shipped.read_text())
    monkeypatch.setattr(harness, "HARNESS_TASK_DIR", tmp_path)
    cfg = load_config(DEMO, ["alignment.method=dpo", "evaluate.harness_tasks=[icd10_chapter_mc]", *PAIR_METHOD])
    before = _keys(cfg)
    (tmp_path / "icd10_chapter_mc.yaml").write_text(shipped.read_text() + "# edited\n")
    assert _changed(before, _keys(cfg)) == {"evaluate-base", "evaluate-cpt", "evaluate-adapted", "evaluate-aligned"}
