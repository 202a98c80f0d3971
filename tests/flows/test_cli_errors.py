"""A failing run prints a few clean lines naming the cause; the traceback goes to the run's log file;
a failure that a retry cannot fix runs once."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from components.config import save_config
from flows.cli import app
from tests.conftest import tiny_pipeline_config

pytestmark = pytest.mark.e2e


def test_a_missing_data_file_fails_once_in_a_few_lines(tiny_model_dir, tmp_path, prefect_harness):
    from mlflow.tracking import MlflowClient

    info = tmp_path / "data" / "dataset_info.json"
    info.parent.mkdir()
    info.write_text(json.dumps({"notes": {"file_name": "notes.jsonl", "columns": {"prompt": "q", "response": "a"}}}))
    workspace = tmp_path / "ws"
    cfg = tiny_pipeline_config(tiny_model_dir, workspace, **{
        "data.dataset_info": str(info), "data.cpt": "[]", "data.cpt_eval": "[]", "data.sft": "[notes]",
        "data.sft_eval": "[]", "data.preference": "[]", "data.preference_eval": "[]"})
    config = tmp_path / "run.yaml"
    save_config(cfg, config)

    result = CliRunner().invoke(app, ["run", str(config)], terminal_width=200)
    assert result.exit_code == 1
    out = result.stdout
    assert "error: dataset 'notes': file_name 'notes.jsonl' not found" in out
    assert "Traceback" not in result.output and len(out.strip().splitlines()) <= 6, out
    log_path = out.split("full traceback: ", 1)[1].split()[0]
    assert "Traceback (most recent call last)" in open(log_path, encoding="utf-8").read()

    client = MlflowClient(cfg.tracking_uri(), cfg.tracking_uri())
    exp = client.get_experiment_by_name(cfg.tracking.experiment)
    fetch_runs = client.search_runs([exp.experiment_id], "tags.`lmforge.stage` = 'fetch'")
    assert len(fetch_runs) == 1 and fetch_runs[0].info.status == "FAILED"  # not retried


def _only_sft(tiny_model_dir, tmp_path, info, **overrides):
    cfg = tiny_pipeline_config(tiny_model_dir, tmp_path / "ws", **{
        "data.dataset_info": str(info), "data.cpt": "[]", "data.cpt_eval": "[]", "data.sft": "[notes]",
        "data.sft_eval": "[]", "data.preference": "[]", "data.preference_eval": "[]", **overrides})
    config = tmp_path / "run.yaml"
    save_config(cfg, config)
    return cfg, config


def _statuses(cfg) -> list[str]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(cfg.tracking_uri(), cfg.tracking_uri())
    exp = client.get_experiment_by_name(cfg.tracking.experiment)
    return [r.info.status for r in client.search_runs([exp.experiment_id])]


def test_a_data_file_outside_the_dataset_info_directory_is_refused_in_a_few_lines(tiny_model_dir, tmp_path,
                                                                                  prefect_harness):
    (tmp_path / "secret.jsonl").write_text('{"q": "not", "a": "data"}\n')
    info = tmp_path / "data" / "dataset_info.json"
    info.parent.mkdir()
    info.write_text(json.dumps({"notes": {"file_name": "../secret.jsonl", "columns": {"prompt": "q", "response": "a"}}}))
    cfg, config = _only_sft(tiny_model_dir, tmp_path, info)

    result = CliRunner().invoke(app, ["run", str(config)], terminal_width=200)
    assert result.exit_code == 1
    out = result.stdout
    assert (f"error: {info}: dataset 'notes': file_name '../secret.jsonl' leads outside {info.parent} (to "
            f"{tmp_path / 'secret.jsonl'})") in out and "data.allow_outside_paths: true" in out
    assert "Traceback" not in result.output and len(out.strip().splitlines()) <= 6, out
    assert _statuses(cfg) == ["FAILED"]  # the parent run, ended; no stage ran


def test_a_refused_parameter_ends_the_parent_run_failed(tiny_model_dir, tmp_path, prefect_harness, monkeypatch):
    from mlflow.exceptions import MlflowException

    from components import tracking

    def refused(*_args):
        raise MlflowException("Invalid value for parameter 'key' supplied")

    monkeypatch.setattr(tracking, "log_params", refused)
    info = tmp_path / "data" / "dataset_info.json"
    info.parent.mkdir()
    info.write_text(json.dumps({"notes": {"file_name": "notes.jsonl", "columns": {"prompt": "q", "response": "a"}}}))
    cfg, config = _only_sft(tiny_model_dir, tmp_path, info)

    result = CliRunner().invoke(app, ["run", str(config)], terminal_width=200)
    assert result.exit_code == 1
    assert "error: MlflowException: Invalid value for parameter 'key' supplied" in result.stdout
    assert _statuses(cfg) == ["FAILED"]  # never left RUNNING


def test_an_unknown_template_fails_with_the_config_before_anything_runs(tmp_path):
    result = CliRunner().invoke(app, ["run", "--set", "tokenize.template=chatml-typo",
                                      "--set", f"workspace={tmp_path / 'ws'}"], terminal_width=200)
    assert result.exit_code == 2
    assert "tokenize.template" in result.output and "unknown chat template 'chatml-typo'" in result.output
    assert not (tmp_path / "ws").exists()


def test_data_check_refuses_a_config_with_yaml_aliases_naming_file_and_line(tmp_path):
    from tests.components.test_config import BILLION_LAUGHS

    config = tmp_path / "laughs.yaml"
    config.write_text(f"workspace: {tmp_path / 'ws'}\n" + BILLION_LAUGHS)
    result = CliRunner().invoke(app, ["data", "check", str(config)], terminal_width=200)
    assert result.exit_code == 2
    assert f"config file {config}, line 2: anchor '&a'" in result.output and "write the values out" in result.output
    assert len(result.output.strip().splitlines()) <= 3 and not (tmp_path / "ws").exists()


def test_summary_folds_interval_rows_into_their_metric():
    from flows.cli import comparison_rows

    comparison = {"exact_match": {"base": 0.0, "adapted": 0.327}, "exact_match_ci_low": {"base": 0.0, "adapted": 0.276},
                  "exact_match_ci_high": {"base": 0.0126, "adapted": 0.3816}, "perplexity_cpt_eval": {"base": 7.38,
                                                                                                       "adapted": None}}
    assert comparison_rows(comparison, ["base", "adapted"]) == [
        ["exact_match", "0.0000 [0.000, 0.013]", "0.3270 [0.276, 0.382]"],
        ["perplexity_cpt_eval", "7.3800", ""],
    ]
