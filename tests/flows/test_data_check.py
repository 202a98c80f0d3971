"""`lmforge data check` through the real CLI (typer's CliRunner) on the tiny model and the shipped data."""

from __future__ import annotations

import json
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
    # cutoff 256: the tiny tokenizer needs ~90 tokens for the system prompt and a short question, and more
    # for a "which chapter does <long description> belong to" one; the sample must keep its answer whole.
    save_config(tiny_pipeline_config(tiny_model_dir, workspace, **{"tokenize.cutoff_len": 256}), config)
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
    system = "<|im_start|>system\n<|im_end|>\n<|im_start|>user\n"  # the demo's empty system turn
    assert sample.startswith(system)
    assert "<|im_start|>assistant\n⟦" in sample and "<|im_end|>⟧" in sample
    # Nothing was trained: the flow stopped after tokenize.
    assert not (workspace / "artifacts" / "cpt").exists() and not (workspace / "artifacts" / "sft").exists()

    # A second check is served from the cache and prints the same.
    again = CliRunner().invoke(app, ["data", "check", str(config), "--set", "data.max_samples=12"])
    assert again.exit_code == 0, again.output
    assert again.stdout == out


def test_every_fixture_format_goes_through_data_check_and_training(tiny_model_dir, tmp_path, prefect_harness):
    """The fixture of every format, described by one LLaMA-Factory dataset_info.json, through
    `lmforge data check` and `lmforge run --until sft`; every trained span is an assistant answer."""
    import pyarrow.parquet as pq
    from transformers import AutoTokenizer

    from components.data.align import iter_records
    from components.data.tokenize import IGNORE
    from tests.components.data.conftest import FIXTURE_GROUPS, write_formats

    formats = write_formats(tmp_path / "formats")
    groups: dict[str, list[str]] = {}
    for name, group in FIXTURE_GROUPS.items():
        groups.setdefault(group, []).append(name)
    sets = {f"data.{group}": "[" + ", ".join(names) + "]" for group, names in groups.items()}
    sets.setdefault("data.preference_eval", "[]")  # the preset's held-out pairs are not among the fixtures
    sets.update({"data.sft_task_weights": "{}", "data.rule_baselines": "{}"})  # the fixtures hold no task column
    workspace = tmp_path / "ws"
    config = tmp_path / "formats.yaml"
    save_config(tiny_pipeline_config(tiny_model_dir, workspace, **sets, **{
        "data.dataset_info": formats / "dataset_info.json", "data.max_samples": "null",
        "tokenize.cutoff_len": 1024, "sft.batch_size": 2}), config)

    checked = CliRunner().invoke(app, ["data", "check", str(config)])
    assert checked.exit_code == 0, checked.output
    for name in FIXTURE_GROUPS:
        assert name in checked.stdout
    ran = CliRunner().invoke(app, ["run", str(config), "--until", "sft"])
    assert ran.exit_code == 0, ran.output
    artifacts = workspace / "artifacts"
    assert [p.name for p in sorted(artifacts.iterdir())] == ["align", "cpt", "fetch", "prepare", "sft", "tokenize"]
    for stage in ("cpt", "sft"):
        (out,) = [p for p in (artifacts / stage).iterdir() if p.is_dir()]  # beside it: the stage's lock file
        assert (out / "manifest.json").is_file() and (out / "adapter" / "adapter_model.safetensors").is_file()

    # Masks: each row's trained tokens are its assistant answers (with their end-of-turn token), nothing else.
    (align,) = [p for p in (artifacts / "align").iterdir() if p.is_dir()]
    (tokenized,) = [p for p in (artifacts / "tokenize").iterdir() if p.is_dir()]
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    records = list(iter_records(align / "sft.jsonl"))
    table = pq.read_table(tokenized / "sft.parquet").to_pylist()
    stats = json.loads((tokenized / "stats.json").read_text())["sft"]
    assert len(table) == len(records) == stats["rows"] and stats["truncated"] == 0
    assert 0 < stats["fast_path_rows"] < len(records)  # tool-call rows take the exact path, the rest the fast one
    for record, row in zip(records, table):
        trained = tok.decode([t for t in row["labels"] if t != IGNORE])
        answers = [m["content"] for m in record["messages"]
                   if m["role"] == "assistant" and m.get("content") and m.get("train", True)]  # "loss": false: context
        prompts = [m["content"] for m in record["messages"] if m["role"] != "assistant" and m.get("content")]
        assert trained.endswith("<|im_end|>") and all(answer in trained for answer in answers), (record, trained)
        assert not any(prompt in trained for prompt in prompts if len(prompt) > 3), (record, trained)
