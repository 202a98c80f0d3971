"""End to end on a tiny model: the whole flow, then a fully cached rerun, then a changed SFT learning
rate that recomputes exactly sft and what follows, then lost artifacts that are recomputed."""

from __future__ import annotations

import json
import shutil

import pytest
from mlflow.tracking import MlflowClient

from tests.conftest import tiny_pipeline_config

pytestmark = pytest.mark.e2e


def _status(summary):
    return {row["stage"]: row["cached"] for row in summary["timeline"]}


@pytest.fixture(scope="module")
def first_run(tiny_model_dir, tmp_path_factory, prefect_harness):
    from flows.domain_adaptation import domain_adaptation

    workspace = tmp_path_factory.mktemp("ws")
    cfg = tiny_pipeline_config(tiny_model_dir, workspace)
    return cfg, domain_adaptation(config=cfg)


def test_first_run_runs_every_stage_and_registers(first_run):
    cfg, summary = first_run
    assert not any(_status(summary).values())
    assert list(_status(summary)) == ["fetch", "align", "tokenize", "cpt", "sft", "evaluate-base",
                                      "evaluate-adapted", "quantize", "register"]
    for stage, path in summary["stages"].items():
        manifest = json.loads((__import__("pathlib").Path(path) / "manifest.json").read_text())
        assert manifest["stage"] == stage and manifest["files"]
        assert manifest["peak_rss_mb"] > 100  # the process's own peak while the stage ran (torch alone is more)
    rss = {row["stage"]: row["peak_rss_mb"] for row in summary["timeline"]}
    assert rss["sft"] > rss["fetch"]  # a training stage needs more than copying a file
    assert summary["comparison"]["perplexity_sft_eval"]["adapted"] is not None
    reg = summary["registered"]
    client = MlflowClient(cfg.tracking_uri(), cfg.tracking_uri())
    mv = client.get_model_version_by_alias(cfg.registry.model_name, "challenger")
    assert mv.version == reg["version"]
    for tag in ("lmforge.config_digest", "lmforge.git_commit", "prefect.flow_run_id", "lmforge.data_digest.align"):
        assert mv.tags.get(tag), tag
    # Parent run with nested stage runs; datasets logged with our full sha256.
    runs = client.search_runs([client.get_experiment_by_name(cfg.tracking.experiment).experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 1
    stages = {r.data.tags.get("lmforge.stage") for r in runs}
    assert {"fetch", "align", "tokenize", "cpt", "sft", "quantize", "register"} <= stages
    sft_run = next(r for r in runs if r.data.tags.get("lmforge.stage") == "sft" and r.info.run_name == "sft")
    assert sft_run.data.metrics["stage_peak_rss_mb"] == rss["sft"]
    history = client.get_metric_history(sft_run.info.run_id, "loss")
    assert len(history) >= 2
    inputs = parents[0].inputs.dataset_inputs
    assert inputs and all(len(json.loads(d.dataset.source)["sha256"]) == 64 for d in inputs)


def test_unchanged_rerun_is_fully_cached(first_run):
    from flows.domain_adaptation import domain_adaptation

    cfg, first = first_run
    summary = domain_adaptation(config=cfg)
    assert all(_status(summary).values()), _status(summary)
    assert summary["registered"]["version"] == first["registered"]["version"]


def test_changed_sft_learning_rate_reruns_exactly_sft_and_after(first_run):
    from components.config import load_config
    from flows.domain_adaptation import domain_adaptation

    cfg, _ = first_run
    changed = cfg.model_copy(update={"sft": cfg.sft.model_copy(update={"learning_rate": 2e-3})})
    status = _status(domain_adaptation(config=changed))
    assert status == {"fetch": True, "align": True, "tokenize": True, "cpt": True, "sft": False,
                      "evaluate-base": True, "evaluate-adapted": False, "quantize": False, "register": False}


def test_lost_artifacts_are_recomputed_and_downstream_stays_cached(first_run):
    from pathlib import Path

    from flows.domain_adaptation import domain_adaptation

    cfg, summary = first_run
    tok_dir = Path(summary["stages"]["tokenize"])
    (tok_dir / "sft.parquet").unlink()
    status = _status(domain_adaptation(config=cfg))
    assert status["tokenize"] is False  # recomputed: its files were gone
    # Tokenization is deterministic, so its digest is unchanged and nothing downstream reruns.
    assert all(v for k, v in status.items() if k != "tokenize"), status
    assert (tok_dir / "sft.parquet").is_file()


def test_from_stage_forces_recompute_and_only_runs_one(first_run):
    from flows.domain_adaptation import domain_adaptation

    cfg, _ = first_run
    status = _status(domain_adaptation(config=cfg, from_stage="quantize"))
    assert status["quantize"] is False and status["register"] is False
    assert status["sft"] is True
    only = _status(domain_adaptation(config=cfg, only="evaluate"))
    assert set(only) == {"evaluate-base", "evaluate-adapted"}


def test_crashed_training_resumes_from_last_complete_checkpoint(first_run):
    """kill -9 during sft leaves checkpoints and no manifest: the rerun resumes instead of restarting."""
    from pathlib import Path

    from flows.domain_adaptation import domain_adaptation

    cfg, summary = first_run
    sft_dir = Path(summary["stages"]["sft"])
    (sft_dir / "manifest.json").unlink()
    shutil.rmtree(sft_dir / "adapter")
    shutil.rmtree(sft_dir / "checkpoints" / "checkpoint-4")  # the crash hit before step 4 was saved
    rerun = domain_adaptation(config=cfg)
    assert _status(rerun)["sft"] is False
    manifest = json.loads((sft_dir / "manifest.json").read_text())
    assert manifest["metrics"]["resumed_from_step"] == 2
    assert (sft_dir / "adapter" / "adapter_model.safetensors").is_file()


def _config_file(cfg, tmp_path):
    from components.config import save_config

    path = tmp_path / "config.yaml"
    save_config(cfg, path)
    return path


def test_cli_stages_lists_keys_and_cache_state(first_run, tmp_path):
    from typer.testing import CliRunner

    from flows.cli import app

    cfg, _ = first_run
    result = CliRunner().invoke(app, ["stages", str(_config_file(cfg, tmp_path))], terminal_width=200)
    assert result.exit_code == 0, result.output
    for stage in ("fetch", "tokenize", "sft", "register"):
        assert stage in result.output
    changed = CliRunner().invoke(app, ["stages", str(_config_file(cfg, tmp_path)), "--set", "sft.max_steps=5"],
                                 terminal_width=200)
    assert "will run" in changed.output


def test_cli_rejects_bad_config_naming_the_field(tmp_path):
    from typer.testing import CliRunner

    from flows.cli import app

    bad = tmp_path / "bad.yaml"
    bad.write_text("sft:\n  lr: 0.1\n")
    result = CliRunner().invoke(app, ["run", str(bad)], terminal_width=200)
    assert result.exit_code == 2
    assert "sft.lr" in result.output and "unknown key" in result.output


def test_cli_chat_streams_from_a_stage_dir_and_a_registry_alias(first_run, tmp_path):
    from typer.testing import CliRunner

    from flows.cli import app

    cfg, summary = first_run
    config = str(_config_file(cfg, tmp_path))
    for model in (summary["stages"]["sft"], f"models:/{cfg.registry.model_name}@challenger"):
        result = CliRunner().invoke(app, ["chat", model, "--config", config, "--max-new-tokens", "4"],
                                    input="Is ICD-10-CM code A00.1 billable?\n\n", terminal_width=200)
        assert result.exit_code == 0, result.output
        assert "model>" in result.output


def test_base_model_conversion_is_not_counted_as_orchestration(capsys):
    """The embedded model's first-use conversion (~25 s) happens inside the flow but is neither a
    stage nor orchestration: it is reported on its own, and only when it took a while."""
    from flows.cli import _print_summary
    from flows.domain_adaptation import _summary

    timeline = [{"stage": "cpt", "key": "k", "cached": False, "task_s": 10.2, "stage_s": 10.0, "peak_rss_mb": 900.0}]
    summary = _summary({}, timeline, flow_s=40.0, prepare_s=25.0)
    assert summary["metrics"]["base_prepare_s"] == 25.0
    assert summary["metrics"]["orchestration_overhead_s"] == pytest.approx(5.0)
    _print_summary(summary)
    printed = " ".join(capsys.readouterr().out.split())  # rich wraps at the terminal width
    assert "base model conversion (first use only) 25.0 s, orchestration + tracking 5.0 s" in printed
    _print_summary(_summary({}, timeline, flow_s=15.2, prepare_s=0.01))
    assert "conversion" not in capsys.readouterr().out
