"""What each stage's MLflow run holds after a tiny flow: exactly the reports its stage declared (per_task.json on
the evaluations, reward_report.json, alignment_report.json), and, for a cpt stage trained under the DeepSpeed
launcher, the per-step curve that rank 0 logged into the stage's own run (nobody hands it the run id). Then an
edit of the reward rule's module reruns exactly the stages that score with it."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from tests.conftest import tiny_pipeline_config

pytestmark = pytest.mark.e2e

RULE = "def score(prompts, completions, **columns):\n    return [float(len(c) < 12) for c in completions]\n"
SMALL_ALIGNMENT = {
    "reward.enabled": "true", "reward.max_steps": 2, "reward.batch_size": 4, "reward.logging_steps": 1,
    "reward.max_length": 96, "alignment.method": "raft", "alignment.reward.rule": "tiny_rule:score",
    "alignment.reward.model_weight": 0.5, "alignment.max_prompts": 4, "alignment.num_generations": 2,
    "alignment.max_new_tokens": 4, "alignment.batch_size": 2,
    "alignment.raft.iterations": 1, "alignment.raft.prompts_per_iteration": 4,
    "alignment.raft.steps_per_iteration": 1, "alignment.raft.reward_threshold": "null",
}


def _artifacts(client: MlflowClient, run_id: str, path: str | None = None) -> set[str]:
    found = set()
    for f in client.list_artifacts(run_id, path):
        found |= _artifacts(client, run_id, f.path) if f.is_dir else {f.path}
    return found


def test_stage_runs_hold_reports_a_deepspeed_curve_and_a_rule_edit_reruns_its_callers(tiny_model_dir, tmp_path,
                                                                                       prefect_harness, monkeypatch):
    pytest.importorskip("deepspeed", reason="install the `deepspeed` extra: pip install -e '.[deepspeed]'")
    from flows.domain_adaptation import domain_adaptation

    (tmp_path / "tiny_rule.py").write_text(RULE)  # a user's own reward rule, loaded by name
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    cfg = tiny_pipeline_config(tiny_model_dir, tmp_path / "ws", **SMALL_ALIGNMENT, **{
        "cpt.deepspeed.stage": 2, "cpt.deepspeed.offload": "true", "compute.num_gpus": 1, "compute.device": "cpu"})
    summary = domain_adaptation(config=cfg, until="evaluate")

    client = MlflowClient(cfg.tracking_uri())
    manifests = {stage: json.loads((Path(path) / "manifest.json").read_text())
                 for stage, path in summary["stages"].items()}
    assert {"cpt", "reward", "alignment", "evaluate-base", "evaluate-aligned"} <= manifests.keys()
    for stage, manifest in manifests.items():
        assert manifest["reports"], stage
        logged = _artifacts(client, manifest["mlflow_run_id"])
        beside = {a for a in logged if not a.startswith("outputs/")}  # outputs/: every file, once (mlflow_outputs)
        assert beside == {"manifest.json", "outputs_index.json", *manifest["reports"]}, stage
    for stage in ("evaluate-base", "evaluate-cpt", "evaluate-adapted", "evaluate-aligned"):
        assert {"metrics.json", "samples.jsonl", "per_task.json"} <= set(manifests[stage]["reports"]), stage
    assert "reward_report.json" in manifests["reward"]["reports"]
    assert "alignment_report.json" in manifests["alignment"]["reports"]

    cpt = manifests["cpt"]
    assert cpt["info"]["world_size"] == 1  # trained by the launched rank, not in this process
    steps = [m.step for m in client.get_metric_history(cpt["mlflow_run_id"], "loss")]
    assert steps == [1, 2, 3]  # cpt.max_steps=3, logging every step, into the stage's own run

    # The rule's module edited: a new process would import the new source; this one drops its copy to do the same.
    (tmp_path / "tiny_rule.py").write_text(RULE.replace("< 12", "< 8"))
    monkeypatch.delitem(sys.modules, "tiny_rule", raising=False)
    again = domain_adaptation(config=cfg, until="evaluate")
    rerun = {row["stage"] for row in again["timeline"] if not row["cached"]}
    assert rerun == {"alignment", "evaluate-base", "evaluate-cpt", "evaluate-adapted", "evaluate-aligned"}
