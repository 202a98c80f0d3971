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
