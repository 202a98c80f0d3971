"""lm-evaluation-harness integration, offline: the shipped local task on the tiny model, a constructed task
whose accuracy is known whatever the model's weights, and a task whose data cannot be reached skipped with
its reason."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from components.evaluation import harness
from components.evaluation.harness import harness_metrics, local_task_config, local_tasks, run_harness

ROOT = Path(__file__).resolve().parents[3]


# A multiple-choice task whose first choice is the second plus more tokens: a causal LM gives it the second
# one's log-likelihood plus a log-probability < 0 for each extra token, so any model picks the second
# (shorter) choice, and accuracy is the share of rows whose answer is that one: 3 of 4 here.
PREFIX_CHOICES = ["Yes No Yes No", "Yes No"]
PREFIX_ANSWERS = ["Yes No", "Yes No Yes No", "Yes No", "Yes No"]
PREFIX_TASK = {
    "task": "prefix_mc", "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": ["heldout/prefix.jsonl"]}},
    "test_split": "test", "output_type": "multiple_choice", "doc_to_text": "{{question}}",
    "doc_to_target": "{{answer}}", "target_delimiter": "", "doc_to_choice": PREFIX_CHOICES,
    "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}],
}


def _aligned(tmp_path: Path, per_task: int = 2) -> Path:
    """An align-stage folder with a few held-out rows of each shipped ICD-10 task, and the rows of
    PREFIX_TASK (task label "prefix")."""
    rows = [json.loads(line) for line in (ROOT / "data/icd10/sft_heldout.jsonl").read_text().splitlines()]
    picked, seen = [], {}
    for r in rows:
        if seen.get(r["task"], 0) < per_task:
            seen[r["task"]] = seen.get(r["task"], 0) + 1
            picked.append({"messages": [{"role": "user", "content": r["instruction"]},
                                        {"role": "assistant", "content": r["output"]}], "task": r["task"]})
    for i, answer in enumerate(PREFIX_ANSWERS):
        picked.append({"messages": [{"role": "user", "content": f"Is code A0{i} billable?"},
                                    {"role": "assistant", "content": answer}], "task": "prefix"})
    out = tmp_path / "align"
    out.mkdir()
    (out / "sft_eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in picked))
    return out


def test_shipped_chapter_task_lists_the_22_chapters():
    import importlib.util

    spec = importlib.util.spec_from_file_location("build_icd10", ROOT / "data/build_icd10.py")
    build = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(build)
    config = yaml.safe_load(local_tasks()["icd10_chapter_mc"].read_text())
    assert config["doc_to_choice"] == build.CHAPTER_TITLES
    assert {m["metric"] for m in config["metric_list"]} == {"acc", "acc_norm"}  # computed locally, no hub


def test_local_task_data_files_resolve_to_the_tasks_present(tmp_path: Path):
    (tmp_path / "heldout").mkdir()
    (tmp_path / "heldout" / "code_to_chapter.jsonl").write_text("{}\n")
    config, why = local_task_config(local_tasks()["icd10_chapter_mc"], tmp_path)
    assert why is None
    assert config["dataset_kwargs"]["data_files"] == {"test": [str(tmp_path / "heldout/code_to_chapter.jsonl")]}
    (tmp_path / "heldout" / "code_to_chapter.jsonl").unlink()
    config, why = local_task_config(local_tasks()["icd10_chapter_mc"], tmp_path)
    assert config is None and "none of its data files" in why


def test_harness_metrics_carry_wilson_intervals():
    results = {"t": {"alias": "t", "acc,none": 0.8, "acc_stderr,none": 0.1, "acc_norm,none": 0.5, "sample_len": 10}}
    flat = harness_metrics(results, {"t": {"effective": 10, "original": 10}})
    assert flat == pytest.approx({"harness/t/n": 10, "harness/t/acc": 0.8, "harness/t/acc_ci_low": 0.4902,
                                  "harness/t/acc_ci_high": 0.9433, "harness/t/acc_norm": 0.5,
                                  "harness/t/acc_norm_ci_low": 0.2366, "harness/t/acc_norm_ci_high": 0.7634},
                                 abs=1e-4)


def test_local_task_runs_offline_on_the_tiny_model_and_unreachable_data_is_skipped(
        tiny_model_dir, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # A second local task whose data lives on the hub stands in for pubmedqa & co. (offline in tests):
    # the real list of lm-eval's own tasks takes half a minute to index.
    tasks_dir = tmp_path / "harness_tasks"
    tasks_dir.mkdir()
    (tasks_dir / "icd10_chapter_mc.yaml").write_text(local_tasks()["icd10_chapter_mc"].read_text())
    (tasks_dir / "prefix_mc.yaml").write_text(yaml.safe_dump(PREFIX_TASK))
    (tasks_dir / "hub_only.yaml").write_text(yaml.safe_dump({
        "task": "hub_only", "dataset_path": "lmforge-tests/not-on-this-machine", "test_split": "test",
        "output_type": "multiple_choice", "doc_to_text": "{{q}}", "doc_to_target": 0, "doc_to_choice": ["a", "b"],
        "metric_list": [{"metric": "acc"}]}))
    monkeypatch.setattr(harness, "HARNESS_TASK_DIR", tasks_dir)

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    result = run_harness(model, tokenizer, ["icd10_chapter_mc", "prefix_mc", "hub_only"],
                         aligned_dir=_aligned(tmp_path), template_name="auto",
                         system_prompt="You are a medical coding assistant.", batch_size=22, limit=4)
    assert list(result.skipped) == ["hub_only"] and "could not be loaded" in result.skipped["hub_only"]

    expected = sum(a == PREFIX_CHOICES[1] for a in PREFIX_ANSWERS) / len(PREFIX_ANSWERS)
    assert expected == 0.75
    assert result.metrics["harness/prefix_mc/n"] == 4.0
    assert result.metrics["harness/prefix_mc/acc"] == expected
    assert result.metrics["harness/prefix_mc/acc_ci_low"] < expected < result.metrics["harness/prefix_mc/acc_ci_high"]

    assert result.metrics["harness/icd10_chapter_mc/n"] == 4.0  # 2 rows of each of its 2 tasks
    for metric in ("acc", "acc_norm"):
        value = result.metrics[f"harness/icd10_chapter_mc/{metric}"]
        assert value in (0.0, 0.25, 0.5, 0.75, 1.0)
        assert result.metrics[f"harness/icd10_chapter_mc/{metric}_ci_low"] <= value
    assert json.loads(json.dumps(result.as_dict()))["skipped"] == result.skipped
