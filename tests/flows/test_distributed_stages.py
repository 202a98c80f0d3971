"""The flow trains cpt as two DDP ranks under torchrun and sft as two ZeRO-3 ranks under the DeepSpeed
launcher, on CPU (gloo): each stage launches its ranks, rank 0 writes the adapter and the result the
stage's manifest is made from, and logs the curve into the stage's own MLflow run. (That the curves match
one rank, and that a killed launch resumes, is tests/components/training/test_distributed.py.)"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from tests.conftest import tiny_pipeline_config

pytestmark = pytest.mark.e2e


def test_cpt_ddp_and_sft_zero3_train_as_two_ranks_in_the_flow(tiny_model_dir, tmp_path, prefect_harness,
                                                              monkeypatch):
    pytest.importorskip("deepspeed", reason="install the `deepspeed` extra: pip install -e '.[deepspeed]'")
    from flows.domain_adaptation import domain_adaptation

    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    cfg = tiny_pipeline_config(tiny_model_dir, tmp_path / "ws", **{
        "compute.device": "cpu", "compute.distributed": "ddp", "compute.num_gpus": 2, "compute.threads": 1,
        "sft.deepspeed.stage": 3})
    summary = domain_adaptation(config=cfg, until="sft")

    client = MlflowClient(cfg.tracking_uri())
    for stage, distributed, steps in (("cpt", "ddp", cfg.cpt.max_steps), ("sft", "deepspeed-zero3", cfg.sft.max_steps)):
        out = Path(summary["stages"][stage])
        manifest = json.loads((out / "manifest.json").read_text())
        assert manifest["info"]["world_size"] == 2 and manifest["info"]["distributed"] == distributed, stage
        assert "adapter/adapter_model.safetensors" in manifest["files"], stage
        history = client.get_metric_history(manifest["mlflow_run_id"], "loss")
        assert [m.step for m in history] == list(range(1, steps + 1)), stage  # rank 0's curve, logged once
        curve = [h["loss"] for h in json.loads((out / "training_curve.json").read_text()) if "loss" in h]
        assert [m.value for m in history] == pytest.approx(curve), stage
