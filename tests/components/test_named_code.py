"""The module a dotted config name leads to is found where Python would import it from, without importing it."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from components.config import ConfigError
from components.named_code import module_of, module_source, named_code_digests

ROOT = Path(__file__).resolve().parents[2]


def test_the_shipped_rule_and_a_package_are_found_in_their_files():
    assert module_source("components.alignment.icd10:icd10_reward", "f") == ROOT / "components/alignment/icd10.py"
    assert module_source("components.alignment:reward", "f") == ROOT / "components/alignment/__init__.py"
    assert module_of("components.alignment.icd10.icd10_reward") == "components.alignment.icd10"  # module.function


def test_a_package_wins_over_a_module_of_the_same_name_and_namespace_portions_are_walked(tmp_path, monkeypatch):
    (tmp_path / "lm_pkg" / "rules").mkdir(parents=True)  # lm_pkg: a namespace package (no __init__.py)
    (tmp_path / "lm_pkg" / "rules" / "__init__.py").write_text("def score(p, c, **k): return [0.0] * len(c)\n")
    (tmp_path / "lm_pkg" / "rules.py").write_text("shadowed by the package\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert module_source("lm_pkg.rules:score", "f") == tmp_path / "lm_pkg" / "rules" / "__init__.py"
    digest = named_code_digests({"alignment.reward.rule": "lm_pkg.rules:score"})["alignment.reward.rule"]
    assert digest["name"] == "lm_pkg.rules:score" and len(digest["sha256"]) == 64
    assert "lm_pkg" not in sys.modules and "lm_pkg.rules" not in sys.modules


@pytest.mark.parametrize("name", ["no_such_module:f", "components.alignment.no_such:f", "components.alignment.icd10"
                                  ".icd10_reward.x:f", "nofunction"])
def test_a_name_that_leads_nowhere_is_a_config_error_naming_the_field(name):
    with pytest.raises(ConfigError, match=r"^alignment\.reward\.rule: "):
        module_source(name, "alignment.reward.rule")
