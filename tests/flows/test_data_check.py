"""`lmforge data check` through the real CLI (typer's CliRunner) on the tiny model and the shipped data."""

from __future__ import annotations

import re

import pytest
from typer.testing import CliRunner

from components.config import save_config
from flows.cli import app
from tests.conftest import tiny_pipeline_config

pytestmark = pytest.mark.e2e


def test_data_check_prints_the_report_and_a_marked_sample(tiny_model_dir, tmp_path, prefect_harness):
    workspace = tmp_path / "ws"
    config = tmp_path / "tiny.yaml"
    # cutoff 128: the tiny tokenizer needs ~90 tokens for the system prompt and a question.
    save_config(tiny_pipeline_config(tiny_model_dir, workspace, **{"tokenize.cutoff_len": 128}), config)
    result = CliRunner().invoke(app, ["data", "check", str(config), "--set", "data.max_samples=12"])
    assert result.exit_code == 0, result.output

    out = result.stdout  # Prefect and MLflow log to stderr
    # The alignment report: one line per dataset of every group.
    assert "group" in out and "drop reasons" in out
    for name in ("icd10_corpus", "icd10_instructions", "icd10_instructions_heldout", "icd10_preferences"):
        assert name in out
    assert "drop reasons" in out.splitlines()[0]  # printed verbatim, not wrapped at the terminal width
    assert "tokenization:" in out and re.search(r"^  sft: .*kind=conversation.*trained_tokens=\d+", out, re.M)
    # A decoded sample whose trained tokens (the answer and its end-of-turn token) are marked.
    assert "===== sft" in out and "--- sample 1" in out
    sample = out[out.index("===== sft"):].split("--- sample 1\n", 1)[1].split("\n--- sample 2")[0]
    system = "<|im_start|>system\nYou are a medical coding assistant. Answer with the ICD-10-CM fact asked for, " \
             "nothing else.<|im_end|>\n<|im_start|>user\n"
    assert sample.startswith(system)
    assert "<|im_start|>assistant\n⟦" in sample and "<|im_end|>⟧" in sample
    # Nothing was trained: the flow stopped after tokenize.
    assert not (workspace / "artifacts" / "cpt").exists() and not (workspace / "artifacts" / "sft").exists()

    # A second check is served from the cache and prints the same.
    again = CliRunner().invoke(app, ["data", "check", str(config), "--set", "data.max_samples=12"])
    assert again.exit_code == 0, again.output
    assert again.stdout == out
