"""An unchanged rerun through the CLI loads no ML library: torch, transformers, peft, trl and datasets (seconds
of imports) and the training code are loaded only when a stage runs. A local one, every stage cached, runs
without Prefect (flows/run_core.py) and records the same in MLflow."""

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
print(json.dumps({"ml": sorted(m for m in sys.modules if m.split(".")[0] in libraries or m.startswith(ours)),
                  "prefect": "prefect" in sys.modules}))
"""


def _run(args: list[str], env: dict) -> tuple[dict[str, str], dict]:
    """(stage -> ran/cached from the summary table, {"ml": the ML modules the run loaded, "prefect": imported?})."""
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
    assert stages["tokenize"] == "ran" and "torch" in loaded["ml"] and "transformers" in loaded["ml"]  # the probe sees them
    stages, loaded = _run(args, env)
    assert set(stages.values()) == {"cached"} and len(stages) == 4, stages
    assert loaded["ml"] == [] and loaded["prefect"]  # a configured server: the run goes through Prefect

    # Without a configured server, a run that would only reuse does not start Prefect at all; MLflow gets
    # the same parent run with one nested run per stage, each pointing at the run that produced it.
    local = {k: v for k, v in env.items() if k != "PREFECT_API_URL"}
    done = subprocess.run([sys.executable, "-c", PROBE, *args], cwd=ROOT, env=local, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "every stage is cached: reused without starting Prefect" in done.stdout
    assert json.loads(done.stdout.strip().splitlines()[-1]) == {"ml": [], "prefect": False}
    assert set(re.findall(r"^[│|]\s*[\w-]+\s*[│|]\s*(cached|ran)\s*[│|]", done.stdout, re.M)) == {"cached"}

    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path / 'ws' / 'mlflow.db'}")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()], order_by=["start_time DESC"])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 3 and parents[0].data.tags.get("lmforge.run") == "cached, without Prefect"
    assert parents[0].info.status == "FINISHED" and "prefect.flow_run_id" not in parents[0].data.tags
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    assert sorted(r.data.tags["lmforge.stage"] for r in children) == sorted(stages)
    assert all(r.data.tags["lmforge.cached"] == "true" and r.data.tags["lmforge.produced_by_run"] for r in children)

    # A stage missing: the run goes through Prefect again (its temporary local API) and recomputes it.
    for manifest in (tmp_path / "ws" / "artifacts" / "tokenize").glob("*/manifest.json"):
        manifest.unlink()
    stages, loaded = _run(args, local)
    assert stages["tokenize"] == "ran" and stages["align"] == "cached" and loaded["prefect"]

