"""An unchanged rerun through the CLI loads no ML library: torch, transformers, peft, trl and datasets (seconds
of imports) and the training code are loaded only when a stage runs."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

# `lmforge run ...` in this process, then the ML modules it loaded, as the last line.
PROBE = """
import json, sys
from flows.cli import app
try:
    app()
except SystemExit as exc:
    if exc.code:
        raise
libraries = {"torch", "transformers", "peft", "trl", "datasets", "accelerate", "bitsandbytes", "deepspeed",
             "tokenizers", "matplotlib"}
ours = ("components.training", "components.data.tokenize")  # the stages' own ML code
print(json.dumps(sorted(m for m in sys.modules if m.split(".")[0] in libraries or m.startswith(ours))))
"""


def _run(args: list[str], env: dict) -> tuple[dict[str, str], list[str]]:
    """(stage -> ran/cached from the summary table, the ML modules the run loaded)."""
    done = subprocess.run([sys.executable, "-c", PROBE, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    stages = dict(re.findall(r"^[│|]\s*([\w-]+)\s*[│|]\s*(cached|ran)\s*[│|]", done.stdout, re.M))
    return stages, json.loads(done.stdout.strip().splitlines()[-1])


def test_an_unchanged_rerun_loads_no_ml_library(tiny_model_dir, tmp_path, prefect_harness):
    from prefect.settings import get_current_settings

    env = {**os.environ, "PREFECT_API_URL": get_current_settings().api.url, "COLUMNS": "200"}
    args = ["run", "configs/demo-cpu.yaml", "--until", "tokenize", "--set", f"workspace={tmp_path / 'ws'}",
            "--set", f"model.base={tiny_model_dir}", "--set", "data.max_samples=12"]
    stages, loaded = _run(args, env)
    assert stages["tokenize"] == "ran" and "torch" in loaded and "transformers" in loaded  # the probe sees them
    stages, loaded = _run(args, env)
    assert set(stages.values()) == {"cached"} and len(stages) == 4, stages
    assert loaded == []
