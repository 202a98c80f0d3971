"""Metric names MLflow refuses are made safe before logging, on a real SQLite tracking store: a combined
reward's TRL metric `rewards/rule+model/mean` used to fail the whole batch and the GRPO stage with it."""

from __future__ import annotations

from components import tracking


def test_metrics_with_characters_mlflow_refuses_are_logged_under_safe_names(tmp_path):
    client = tracking.client_for(f"sqlite:///{tmp_path / 'mlflow.db'}")
    run_id = tracking.start_run(client, tracking.experiment_id(client, "names", tmp_path / "art"), "grpo")
    tracking.log_metrics(client, run_id, {"rewards/rule+model/mean": 0.5, "loss": 1.0})
    batched = tracking.BatchedMetrics(client, run_id, every=1)
    batched(3, {"rewards/rule+model/std": 0.25})
    logged = client.get_run(run_id).data.metrics
    assert logged == {"rewards/rule_model/mean": 0.5, "loss": 1.0, "rewards/rule_model/std": 0.25}


def test_params_named_after_any_dataset_or_file_are_logged_under_distinct_safe_keys(tmp_path):
    # The fetch stage's params hold dataset names and file paths as keys; a task label is a key of
    # data.sft_task_weights. Each of these once failed the whole batch (a raw MlflowException).
    client = tracking.client_for(f"sqlite:///{tmp_path / 'mlflow.db'}")
    run_id = tracking.start_run(client, tracking.experiment_id(client, "params", tmp_path / "art"), "fetch")
    long_a, long_b = "d" * 300 + "a", "d" * 300 + "b"
    config = {"sources": {
        "notes?v=2": {"content": {"../../etc/passwd": "f1", "/abs/rows.jsonl": "f2", "a//b/./c/": "f3"}, "rows": 1},
        "notes!v=2": {"rows": 2},  # differs from the first only in a refused character
        "Überblick": "y", long_a: 1, long_b: 2,
    }, "weights": {"chapter:1": 2.0}, "/lead": "l", "..up": "u"}
    tracking.log_params(client, run_id, config)
    logged = client.get_run(run_id).data.params
    assert len(logged) == 11  # every param kept, none merged into another
    assert logged["sources.notes_v_2.content.../_/etc/passwd"] == "f1"
    assert logged["sources.notes_v_2.content./abs/rows.jsonl"] == "f2"
    assert logged["sources.notes_v_2.content.a/_/b/_/c/_"] == "f3"
    assert logged["sources.notes_v_2.rows"] == "1"
    assert [v for k, v in logged.items() if k.startswith("sources.notes_v_2.rows-")] == ["2"]
    assert logged["sources._berblick"] == "y" and logged["weights.chapter_1"] == "2.0"
    assert logged["_/lead"] == "l" and logged["_..up"] == "u"
    assert {v for k, v in logged.items() if k.startswith("sources.ddd")} == {"1", "2"}
    assert all(len(k) <= 250 for k in logged)


def test_a_metric_named_after_a_task_path_is_logged(tmp_path):
    client = tracking.client_for(f"sqlite:///{tmp_path / 'mlflow.db'}")
    run_id = tracking.start_run(client, tracking.experiment_id(client, "tasks", tmp_path / "art"), "evaluate")
    tracking.log_metrics(client, run_id, {"task/../x/exact_match": 0.5, "task//y/exact_match": 0.25})
    assert client.get_run(run_id).data.metrics == {"task/_/x/exact_match": 0.5, "task/_/y/exact_match": 0.25}


def test_a_database_is_opened_under_the_lock_once_per_process_and_again_when_it_is_gone(tmp_path, monkeypatch):
    locks = []

    class CountedLock(tracking.FileLock):
        def __enter__(self):
            locks.append(self.lock_file)
            return super().__enter__()

    monkeypatch.setattr(tracking, "FileLock", CountedLock)
    db = tmp_path / "mlflow.db"
    uri = f"sqlite:///{db}"
    tracking.client_for(uri)
    client = tracking.client_for(uri)  # what every stage and cached stage does: no lock, no registry query
    assert locks == [f"{db}.lock"]
    assert client.search_experiments()  # and the client works
    db.unlink()
    tracking.client_for(uri)
    assert len(locks) == 2
