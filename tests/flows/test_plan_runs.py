"""`lmforge plan` writes a config that runs: plan the tiny model for a CPU, then run the written config
through the flow with its training settings untouched (only the data and evaluation are made small)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]


def test_the_planned_config_runs_the_flow_with_the_planned_batch_shape(tiny_model_dir, tmp_path, prefect_harness):
    from components.config import load_config
    from flows.cli import app
    from flows.domain_adaptation import domain_adaptation

    out = tmp_path / "plan"
    result = CliRunner().invoke(app, ["plan", str(tiny_model_dir), "--gpus", "cpu", "--context-length", "64",
                                      "--tokens-per-step", "256", "--max-steps", "3", "--out", str(out)],
                                terminal_width=200)
    assert result.exit_code == 0, result.output
    planned = yaml.safe_load((out / "plan.yaml").read_text())
    assert planned["compute"] == {"device": "cpu", "precision": "fp32"}
    sft = planned["sft"]
    assert sft["batch_size"] * sft["grad_accum"] * 64 >= 256 and sft["max_steps"] == 3

    cfg = load_config(out / "plan.yaml", [
        f"workspace={tmp_path / 'ws'}",
        f"data.dataset_info={ROOT / 'data/icd10/dataset_info.json'}",
        "data.cpt=[icd10_corpus]", "data.cpt_eval=[icd10_corpus_heldout]",  # a plan names no data: the user does
        "data.sft=[icd10_instructions]", "data.sft_eval=[icd10_instructions_heldout]",
        "data.max_samples=48",
        "evaluate.max_samples=4", "evaluate.max_new_tokens=4", "evaluate.perplexity_max_samples=4",
        "quantize.eval_samples=4", "registry.model_name=planned-tiny",
    ])
    assert cfg.sft.model_dump() == load_config(out / "plan.yaml").sft.model_dump()  # training as planned
    summary = domain_adaptation(config=cfg)

    assert not any(row["cached"] for row in summary["timeline"])
    assert summary["registered"]["version"]
    for stage in ("cpt", "sft"):
        states = [json.loads(p.read_text()) for p in Path(summary["stages"][stage]).rglob("trainer_state.json")]
        last = max(states, key=lambda s: s["global_step"])  # the last checkpoint's
        assert last["global_step"] == planned[stage]["max_steps"], [s["global_step"] for s in states]
        assert last["train_batch_size"] == planned[stage]["batch_size"]
