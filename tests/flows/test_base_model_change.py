"""Cache keys know the base model's content: new weights in the same directory retrain every model
stage and reuse everything above tokenize; a new tokenizer re-tokenizes too."""

from __future__ import annotations

import shutil

import pytest

from tests.conftest import tiny_pipeline_config

pytestmark = pytest.mark.e2e


def _ran(summary) -> set[str]:
    return {row["stage"] for row in summary["timeline"] if not row["cached"]}


def test_replaced_weights_rerun_the_model_stages_only(tiny_model_dir, tmp_path, prefect_harness):
    from flows.domain_adaptation import domain_adaptation
    from tests.tiny_model import build_tiny_model

    base = tmp_path / "base"
    shutil.copytree(tiny_model_dir, base)
    cfg = tiny_pipeline_config(base, tmp_path / "ws", **{"quantize.enabled": "false", "data.max_samples": "16",
                                                         "cpt.max_steps": "2", "sft.max_steps": "2"})
    domain_adaptation(config=cfg)
    assert _ran(domain_adaptation(config=cfg)) == set()

    other = build_tiny_model(tmp_path / "other", seed=1)
    shutil.copy(other / "model.safetensors", base / "model.safetensors")  # same path, same tokenizer
    assert _ran(domain_adaptation(config=cfg)) == {"prepare", "cpt", "sft", "evaluate-base", "evaluate-cpt",
                                                   "evaluate-adapted"}

    config = base / "tokenizer_config.json"
    config.write_text(config.read_text() + "\n")  # any tokenizer change re-tokenizes
    assert "tokenize" in _ran(domain_adaptation(config=cfg))
