"""End to end on a tiny model: the whole flow, then a fully cached rerun, then a changed SFT learning
rate that recomputes exactly sft and what follows, then lost artifacts that are recomputed.

Each test starts from a settled workspace (`settled`: one more run, which recomputes whatever an
earlier test disturbed), so the tests pass in any order."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

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


@pytest.fixture
def settled(first_run):
    from flows.domain_adaptation import domain_adaptation

    cfg, first = first_run
    return cfg, domain_adaptation(config=cfg), first


def test_first_run_runs_every_stage_and_registers(first_run):
    cfg, summary = first_run
    assert not any(_status(summary).values())
    assert list(_status(summary)) == ["prepare", "fetch", "align", "tokenize", "cpt", "sft", "evaluate-base",
                                      "evaluate-cpt", "evaluate-adapted", "quantize", "register", "promote"]
    # Each stage's contribution: the base, after cpt alone, after cpt + sft, on the same held-out sets.
    assert summary["columns"] == ["base", "+cpt", "adapted"]
    ppl = summary["comparison"]["perplexity_cpt_eval"]
    assert all(ppl[c] is not None for c in summary["columns"]) and ppl["+cpt"] != ppl["base"]
    for stage, path in summary["stages"].items():
        manifest = json.loads((Path(path) / "manifest.json").read_text())
        assert manifest["stage"] == stage and manifest["files"]
        assert manifest["peak_rss_mb"] > 100  # the process's own peak while the stage ran (torch alone is more)
    rss = {row["stage"]: row["peak_rss_mb"] for row in summary["timeline"]}
    assert rss["sft"] > rss["fetch"]  # a training stage needs more than copying a file
    assert summary["comparison"]["perplexity_sft_eval"]["adapted"] is not None
    reg = summary["registered"]
    client = MlflowClient(cfg.tracking_uri(), cfg.tracking_uri())
    mv = client.get_model_version_by_alias(cfg.registry.model_name, "challenger")
    assert mv.version == reg["version"]
    for tag in ("lmforge.config_digest", "lmforge.git_commit", "prefect.flow_run_id", "lmforge.data_digest.align",
                "lmforge.base_model_digest", "lmforge.stage_key.prepare", "lmforge.stage_key.fetch",
                "lmforge.heldout_digest"):
        assert mv.tags.get(tag), tag
    # What the gate pairs the next challenger with: the answers, and the digest of the questions they answer.
    from components.evaluation.compare import heldout_digest
    from components.promotion import registered_samples

    answers = registered_samples(client, mv)
    assert answers and heldout_digest(answers) == mv.tags["lmforge.heldout_digest"]
    # The variants the preset saves (NF4, GGUF Q8_0 with its Modelfile) travel with the version.
    assert float(mv.tags["lmforge.variant.nf4.size_mb"]) > 0 and "lmforge.variant.nf4.delta.exact_match" in mv.tags
    assert float(mv.tags["lmforge.variant.gguf-q8_0.size_mb"]) > 0
    assert {f.path for f in client.list_artifacts(mv.run_id, "variants/gguf-q8_0")} == {
        "variants/gguf-q8_0/Modelfile", "variants/gguf-q8_0/model-q8_0.gguf"}
    # The random tiny model is at its tasks' majority baselines: the gate keeps it as challenger and says why.
    from components.run_summary import promotion_line

    promotion = summary["promotion"]
    assert promotion["outcome"] == "rejected" and promotion["champion"] is None
    line = promotion_line(promotion)
    assert line.startswith(f"kept {cfg.registry.model_name} version {reg['version']} as @challenger "
                           "(no version is @champion): it does not beat the majority baseline"), line
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
    # Each stage run holds its manifest and exactly the reports its stage declared beside it; weights and data go
    # under outputs/ (tests/flows/test_shared_cache_flow.py checks those), with the index of where each file is.
    reports = {}
    for stage, path in summary["stages"].items():
        manifest = json.loads((Path(path) / "manifest.json").read_text())
        reports[stage] = manifest["reports"]
        logged = {f.path for f in client.list_artifacts(manifest["mlflow_run_id"])} - {"outputs"}
        assert reports[stage] and logged == {"manifest.json", "outputs_index.json", *reports[stage]}, stage
    assert reports["quantize"] == ["quantization_report.json"] and reports["register"] == ["registered.json"]
    assert "per_task.json" in reports["evaluate-adapted"] and reports["promote"] == ["promotion.json"]


def test_the_stages_own_log_lines_reach_the_prefect_flow_run(first_run):
    """What a stage reports (rows aligned, rows trained on) shows in the run's Prefect log, under its task."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    from prefect.logging.handlers import APILogHandler

    cfg, summary = first_run
    manifest = json.loads((Path(summary["stages"]["sft"]) / "manifest.json").read_text())
    APILogHandler().flush()  # the records still queued for the API
    with get_client(sync_client=True) as prefect:
        logs = prefect.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[manifest["flow_run_id"]])))
    ours = {(log.name, log.message.split("\n")[0]): log for log in logs if log.name.split(".")[0] in ("components", "tasks")}
    trained = [log for (name, line), log in ours.items()
               if name == "components.training.sft" and line.startswith("training on ")]
    assert trained and trained[0].task_run_id is not None  # filed under the sft task run, not only the flow
    assert ("components.data.align", "aligned data") in ours
    assert len([log for log in logs if log.name == "components.training.sft"]) == len(trained)  # sent once

def test_unchanged_rerun_is_fully_cached(settled):
    from flows.domain_adaptation import domain_adaptation

    cfg, before, _ = settled
    summary = domain_adaptation(config=cfg)
    assert all(_status(summary).values()), _status(summary)
    assert summary["registered"]["version"] == before["registered"]["version"]


def test_changed_sft_learning_rate_reruns_exactly_sft_and_after(settled):
    from flows.domain_adaptation import domain_adaptation

    cfg, _, _ = settled
    changed = cfg.model_copy(update={"sft": cfg.sft.model_copy(update={"learning_rate": 2e-3})})
    status = _status(domain_adaptation(config=changed))
    assert status == {"prepare": True, "fetch": True, "align": True, "tokenize": True, "cpt": True, "sft": False,
                      "evaluate-base": True, "evaluate-cpt": True, "evaluate-adapted": False, "quantize": False,
                      "register": False, "promote": False}


def test_a_new_prompt_set_reruns_only_the_data_stages_that_read_it(settled):
    """data.prompts is read by the sampling alignment methods alone: with none of them on, the new
    prompts.jsonl reaches fetch and align and nothing else (tokenize, training, evaluation and the
    registered version are reused, since no stage reads that file)."""
    from flows.domain_adaptation import domain_adaptation

    cfg, _, _ = settled
    changed = cfg.model_copy(update={"data": cfg.data.model_copy(update={"prompts": ["icd10_billable"]})})
    summary = domain_adaptation(config=changed)
    assert (Path(summary["stages"]["align"]) / "prompts.jsonl").is_file()
    assert {s for s, cached in _status(summary).items() if not cached} == {"fetch", "align"}


def test_a_new_heldout_set_reruns_evaluation_but_no_training(settled):
    """Only the stages that read the held-out files rerun: tokenize (it tokenizes them), every evaluation
    and quantize (they score them), and register/promote (the scores changed). cpt and sft read their
    own training files, which came out byte for byte the same, so they are reused."""
    from flows.domain_adaptation import domain_adaptation

    cfg, before, _ = settled
    changed = cfg.model_copy(update={"data": cfg.data.model_copy(update={"sft_eval": ["icd10_billable_heldout"]}),
                                     "evaluate": cfg.evaluate.model_copy(update={"tasks": []})})  # its own task
    summary = domain_adaptation(config=changed)
    status = _status(summary)
    assert status == {"prepare": True, "fetch": False, "align": False, "tokenize": False, "cpt": True, "sft": True,
                      "evaluate-base": False, "evaluate-cpt": False, "evaluate-adapted": False, "quantize": False,
                      "register": False, "promote": False}
    assert summary["stages"]["sft"] == before["stages"]["sft"]
    tasks = {json.loads(line)["task"] for line in open(Path(summary["stages"]["evaluate-adapted"]) / "samples.jsonl")}
    assert tasks == {"billable_uniform"}


def test_lost_artifacts_are_recomputed_and_downstream_stays_cached(settled):
    from flows.domain_adaptation import domain_adaptation

    cfg, summary, _ = settled
    tok_dir = Path(summary["stages"]["tokenize"])
    (tok_dir / "sft.parquet").unlink()
    status = _status(domain_adaptation(config=cfg))
    assert status["tokenize"] is False  # recomputed: its files were gone
    # Tokenization is deterministic, so its digest is unchanged and nothing downstream reruns.
    assert all(v for k, v in status.items() if k != "tokenize"), status
    assert (tok_dir / "sft.parquet").is_file()


def test_from_stage_forces_recompute_and_only_runs_one(settled):
    from flows.domain_adaptation import domain_adaptation

    cfg, _, _ = settled
    status = _status(domain_adaptation(config=cfg, from_stage="quantize"))
    assert status["quantize"] is False and status["register"] is False
    assert status["sft"] is True
    only = _status(domain_adaptation(config=cfg, only="evaluate"))
    assert set(only) == {"evaluate-base", "evaluate-cpt", "evaluate-adapted"}
    until = _status(domain_adaptation(config=cfg, until="tokenize"))
    assert list(until) == ["prepare", "fetch", "align", "tokenize"]


def test_a_tampered_output_is_caught_by_deep_verification(settled):
    """Same size, same mtime, other bytes: the fast check trusts it, --verify deep recomputes it."""
    import os
    from flows.domain_adaptation import domain_adaptation

    cfg, summary, _ = settled
    report = Path(summary["stages"]["align"]) / "report.json"
    st = report.stat()
    data = report.read_bytes()
    report.write_bytes(data[:-2] + bytes([data[-2] ^ 1]) + data[-1:])
    os.utime(report, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert _status(domain_adaptation(config=cfg))["align"] is True
    assert _status(domain_adaptation(config=cfg, verify="deep"))["align"] is False


def test_crashed_training_resumes_from_last_complete_checkpoint(settled):
    """kill -9 during sft leaves checkpoints and no manifest: the rerun resumes instead of restarting."""
    from flows.domain_adaptation import domain_adaptation

    cfg, summary, _ = settled
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


def _cached_column(output: str) -> dict[str, str]:
    """stage -> the `cached` cell of `lmforge stages`' table."""
    rows = {}
    for line in output.splitlines():
        cells = [c.strip() for c in line.split("│")]
        if len(cells) > 4 and cells[1] and cells[4] in ("yes", "no"):
            rows[cells[1]] = cells[4]
    return rows


def test_cli_stages_lists_keys_and_cache_state(settled, tmp_path):
    from typer.testing import CliRunner

    from flows.cli import app

    cfg, _, _ = settled
    result = CliRunner().invoke(app, ["stages", str(_config_file(cfg, tmp_path))], terminal_width=250)
    assert result.exit_code == 0, result.output
    cached = _cached_column(result.output)
    assert list(cached) == ["prepare", "fetch", "align", "tokenize", "cpt", "sft", "evaluate-base", "evaluate-cpt",
                            "evaluate-adapted", "quantize", "register", "promote"]
    assert set(cached.values()) == {"yes"}, cached
    changed = CliRunner().invoke(app, ["stages", str(_config_file(cfg, tmp_path)), "--set", "sft.max_steps=5"],
                                 terminal_width=250)
    cached = _cached_column(changed.output)
    assert cached["cpt"] == "yes" and cached["sft"] == "no" and cached["evaluate-adapted"] == "no"
    assert "after its upstream runs" in changed.output


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

    from components.chat import load_chat_model
    from tests.components.test_chat import greedy_reply

    cfg, summary = first_run
    config = str(_config_file(cfg, tmp_path))
    question = "Is ICD-10-CM code A00.1 billable?"
    for model in (summary["stages"]["sft"], f"models:/{cfg.registry.model_name}@challenger"):
        result = CliRunner().invoke(app, ["chat", model, "--config", config, "--max-new-tokens", "4"],
                                    input=f"{question}\n\n", terminal_width=200)
        assert result.exit_code == 0, result.output
        # The printed reply is what greedy generation gives on that model (the adapted one, with the
        # config's system prompt), not just the "model>" label printed before generating.
        model_obj, tokenizer = load_chat_model(model, cfg)
        messages = [{"role": "system", "content": cfg.tokenize.system_prompt}, {"role": "user", "content": question}]
        expected = greedy_reply(model_obj, tokenizer, messages, 4)
        assert expected and question not in expected
        assert f"model> {expected}\n" in result.output


def test_a_curriculum_trains_its_phases_in_order_for_exactly_one_pass(settled):
    """data.sft_phases appends a billable-only phase to sft.jsonl. SFT trains the rows once, in order, so a
    step count that would cut the last phase short fails before training, naming the count that fits;
    with that count the flow runs, and align's report says what each phase holds."""
    import re

    from flows.domain_adaptation import domain_adaptation

    cfg, before, _ = settled
    data = cfg.data.model_copy(update={"sft_phases": [{"billable": 2}]})
    changed = cfg.model_copy(update={"data": data})
    with pytest.raises(Exception, match=r"data\.sft_phases trains sft\.parquet's \d+ rows once") as failed:
        domain_adaptation(config=changed)
    steps = int(re.search(r"Set sft\.max_steps=(\d+)", str(failed.value)).group(1))
    assert steps > cfg.sft.max_steps
    fitted = changed.model_copy(update={"sft": cfg.sft.model_copy(update={"max_steps": steps})})
    summary = domain_adaptation(config=fitted)
    assert _status(summary)["sft"] is False
    align = json.loads((Path(summary["stages"]["align"]) / "manifest.json").read_text())
    phase = align["info"]["mix"]["sft"]["phases"][0]
    billable = phase["tasks"]["billable"]
    assert list(phase["tasks"]) == ["billable"] and billable["rows_out"] == 2 * billable["rows_in"] > 0
    rows = [json.loads(line) for line in open(Path(summary["stages"]["align"]) / "sft.jsonl")]
    assert {r.get("task") for r in rows[-billable["rows_out"]:]} == {"billable"}
    curve = json.loads((Path(summary["stages"]["sft"]) / "training_curve.json").read_text())
    assert max(h["step"] for h in curve) == steps
