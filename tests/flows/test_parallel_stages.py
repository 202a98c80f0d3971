"""compute.parallel_stages: nodes that nothing connects run side by side as Prefect task futures, and the run
comes out as a run one node at a time makes it: the same stages in the same order, the same keys, the same
outputs. Training stages never run beside each other unless compute.parallel_training."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from components.config import load_config
from flows.run_core import _Walk
from tests.conftest import tiny_pipeline_config

pytestmark = pytest.mark.e2e


def test_independent_nodes_run_side_by_side_and_the_run_is_the_sequential_one(tiny_model_dir, tmp_path,
                                                                                 prefect_harness):
    from flows.domain_adaptation import domain_adaptation

    one = domain_adaptation(config=tiny_pipeline_config(tiny_model_dir, tmp_path / "one"))
    three = domain_adaptation(config=tiny_pipeline_config(tiny_model_dir, tmp_path / "three",
                                                          **{"compute.parallel_stages": "3"}))
    span = {stage: _span(path) for stage, path in three["stages"].items()}
    sequential = {stage: _span(path) for stage, path in one["stages"].items()}

    # One node at a time: each stage starts after the one before it ended.
    order = sorted(sequential, key=lambda n: sequential[n][0])
    assert all(sequential[a][1] <= sequential[b][0] + 0.01 for a, b in zip(order, order[1:]))
    # Three at a time: the base model's evaluation (it needs no training) ran while cpt trained, each in a
    # process of its own; the training stages, chained, did not overlap.
    assert span["evaluate-base"][0] < span["cpt"][1] and span["cpt"][0] < span["evaluate-base"][1], span
    assert span["cpt"][1] <= span["sft"][0]
    # The run is the one a sequential run gives: stages in the table's order, the same keys and outputs.
    # A training stage's curve holds its run's timings and an adapter's config its workspace's path, so the
    # keys after cpt follow each run's own digests; up to it they are the same, and the weights, the
    # metrics and the answers are the same files.
    assert [r["stage"] for r in three["timeline"]] == [r["stage"] for r in one["timeline"]]
    keys = [(r["stage"], r["key"]) for r in three["timeline"]]
    assert keys[:5] == [(r["stage"], r["key"]) for r in one["timeline"]][:5] and keys[4][0] == "cpt"
    assert not any(r["cached"] for r in three["timeline"])
    for stage in ("cpt", "sft", "evaluate-base", "evaluate-cpt", "evaluate-adapted"):
        a, b = (_manifest(s["stages"][stage])["files"] for s in (one, three))
        assert a.keys() == b.keys(), stage
        same = [f for f in a if f.endswith((".safetensors", "metrics.json", "per_task.json", "samples.jsonl"))]
        assert same and all(a[f]["sha256"] == b[f]["sha256"] for f in same), stage
    assert three["columns"] == one["columns"]
    assert three["comparison"]["exact_match"] == one["comparison"]["exact_match"]


def _span(path: str) -> tuple[float, float]:
    """When a stage's body ran (wall clock): from its manifest's start and wall time."""
    manifest = _manifest(path)
    return manifest["started_at_s"], manifest["started_at_s"] + manifest["wall_s"]


def _manifest(path: str) -> dict:
    return json.loads((Path(path) / "manifest.json").read_text())


def _node(name: str, upstream: tuple[str, ...] = (), trains: bool = False):
    return SimpleNamespace(name=name, upstream=upstream, spec=SimpleNamespace(trains=trains))


@pytest.mark.parametrize(("parallel_training", "expected"), [(False, False), (True, True)])
def test_a_training_stage_never_starts_beside_another_unless_allowed(parallel_training, expected):
    cfg = load_config(None, ["compute.parallel_stages=4", f"compute.parallel_training={str(parallel_training).lower()}"])
    walk = _Walk(cfg, SimpleNamespace(submit_stage=object()), None, None, None, None, False)
    reward, evaluation, training = _node("reward", trains=True), _node("evaluate-adapted"), _node("x", trains=True)
    pending = {object(): (reward, "k", 0.0)}
    assert walk._may_start(evaluation, {}, pending, 4)
    assert walk._may_start(training, {}, pending, 4) is expected
    assert not walk._may_start(_node("y", upstream=("cpt",)), {}, pending, 4)  # cpt not complete yet
    assert not walk._may_start(evaluation, {}, {object(): (reward, "k", 0.0)} | {object(): (evaluation, "k", 0.0)}, 2)


def test_a_failed_node_fails_the_walk_after_the_others_finish(monkeypatch):
    """Where one node fails, the nodes beside it finish (they hold their stage locks) before the error ends
    the run: no stage is left half-written by the walk."""
    from concurrent.futures import ThreadPoolExecutor

    from flows import run_core

    finished = threading.Event()

    def produce(node, *_args, force=False):
        if node.name == "bad":
            raise ValueError("bad node")
        time.sleep(0.3)
        finished.set()
        return {"stage": node.name}, False

    pool = ThreadPoolExecutor(2)
    hooks = SimpleNamespace(submit_stage=lambda *a, **k: pool.submit(produce, *a, **k), run_stage=produce)
    cfg = load_config(None, ["compute.parallel_stages=2"])
    monkeypatch.setattr(run_core, "node_key", lambda node, *_: ("k-" + node.name, {}))
    monkeypatch.setattr(run_core, "keyed_digests", lambda *_: {})
    monkeypatch.setattr(run_core, "_refresh", lambda *_: True)
    monkeypatch.setattr(run_core, "_recorded", lambda node, key, produced, *_: (produced[0], {"stage": node.name}))
    walk = _Walk(cfg, hooks, None, None, None, None, False)
    with pytest.raises(ValueError, match="bad node"):
        walk.over([_node("slow"), _node("bad")], {}, [])
    assert finished.is_set()
    manifests, timeline = {}, []
    walk.over([_node("a"), _node("b", ("a",)), _node("c")], manifests, timeline)
    assert list(manifests) == ["a", "b", "c"] and [r["stage"] for r in timeline] == ["a", "b", "c"]
