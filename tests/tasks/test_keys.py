"""Stage code versions cover every component module a stage can run."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tasks import keys
from tests.conftest import ROOT


@pytest.mark.parametrize("stage", sorted(keys.STAGE_ENTRY))
def test_code_version_covers_every_component_module_the_stage_imports(stage: str) -> None:
    """Import the stage's entry module in a fresh interpreter: every components.* module that got
    loaded is hashed into the stage's code version (or is one of the few that write no output)."""
    probe = (f"import importlib, json, sys; importlib.import_module({keys.STAGE_ENTRY[stage]!r}); "
             "print(json.dumps(sorted(m for m in sys.modules if m.startswith('components.'))))")
    done = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, check=True)
    modules = json.loads(done.stdout.strip().splitlines()[-1])
    loaded = {m for m in modules if keys._module_file(m).name != "__init__.py"}  # packages' __init__ are empty
    assert loaded - keys.NOT_OUTPUT <= set(keys.stage_modules(stage))


def test_evaluation_is_keyed_on_the_loss_and_model_loading_it_uses() -> None:
    """The perplexity loss lives in training/lora.py and models load through models/loading.py:
    editing either must recompute evaluation, not reuse a stale one."""
    for stage in ("evaluate", "quantize"):
        assert {"components.training.lora", "components.models.loading"} <= set(keys.stage_modules(stage))


def test_a_source_edit_changes_the_code_version(monkeypatch: pytest.MonkeyPatch) -> None:
    before = {stage: keys.code_version(stage) for stage in ("evaluate", "register")}
    real = keys._source
    monkeypatch.setattr(keys, "_source", lambda m: real(m) + ("\n# edited" if m == "components.training.lora" else ""))
    keys.code_version.cache_clear()
    try:
        assert keys.code_version("evaluate") != before["evaluate"]
        assert keys.code_version("register") == before["register"]  # the registry does not reach lora.py
    finally:
        keys.code_version.cache_clear()
