"""Stage code versions cover every component module a stage can run."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from components.pipeline import STAGES_BY_NAME
from tasks import keys
from tests.conftest import ROOT


@pytest.mark.parametrize("stage", sorted(STAGES_BY_NAME))
def test_code_version_covers_every_component_module_the_stage_imports(stage: str) -> None:
    """Import the stage's entry module in a fresh interpreter: every components.* module that got
    loaded is hashed into the stage's code version (or is one of the few that write no output)."""
    probe = (f"import importlib, json, sys; importlib.import_module({STAGES_BY_NAME[stage].module!r}); "
             "print(json.dumps(sorted(m for m in sys.modules if m.startswith('components.'))))")
    done = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, check=True)
    modules = json.loads(done.stdout.strip().splitlines()[-1])
    loaded = {m for m in modules if keys._module_file(m).name != "__init__.py"}  # packages' __init__ are empty
    # What the non-output modules import (the config schema's validators) is theirs, not the stage's.
    support = set().union(*(keys._imported_components(m) for m in keys.NOT_OUTPUT if keys._module_file(m)))
    assert loaded - keys.NOT_OUTPUT - support <= set(keys.stage_modules(stage))


def test_evaluation_is_keyed_on_the_loss_and_model_loading_it_uses() -> None:
    """The perplexity loss lives in models/loss.py and models load through models/loading.py:
    editing either must recompute evaluation, not reuse a stale one."""
    for stage in ("evaluate-base", "evaluate-adapted", "quantize"):
        assert {"components.models.loss", "components.models.loading"} <= set(keys.stage_modules(stage))


def test_a_source_edit_changes_the_code_version(monkeypatch: pytest.MonkeyPatch) -> None:
    before = {stage: keys.code_version(stage) for stage in ("evaluate-base", "register")}
    real = keys._source
    monkeypatch.setattr(keys, "_source", lambda m: real(m) + ("\n# edited" if m == "components.models.loss" else ""))
    keys.code_version.cache_clear()
    try:
        assert keys.code_version("evaluate-base") != before["evaluate-base"]
        assert keys.code_version("register") == before["register"]  # the registry does not reach the loss
    finally:
        keys.code_version.cache_clear()
