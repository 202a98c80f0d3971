"""Shared fixtures: an isolated Prefect/MLflow/cache environment and a tiny random model.

Everything runs offline (HF_HUB_OFFLINE=1) on 2-layer models built from configs in seconds.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

_SESSION_TMP = Path(tempfile.mkdtemp(prefix="lmforge-tests-"))
# Set before prefect is imported anywhere: its settings are read at import time.
os.environ.setdefault("PREFECT_HOME", str(_SESSION_TMP / "prefect"))
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["LMFORGE_CACHE"] = str(_SESSION_TMP / "cache")
os.environ["LMFORGE_NO_PROGRESS"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    from tests.tiny_model import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny-model"))


@pytest.fixture(scope="session")
def small_model_dir(tmp_path_factory) -> Path:
    """A 2-layer model over 48 word tokens whose next-token distribution an adapter can move in a few steps."""
    from tests.tiny_model import build_small_vocab_model

    return build_small_vocab_model(tmp_path_factory.mktemp("small-vocab"))


@pytest.fixture(scope="session")
def prefect_harness():
    """One Prefect test API for the whole session (starting many would lock SQLite on 2 cores)."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


def tiny_pipeline_config(tiny_model_dir: Path, workspace: Path, **overrides):
    """The shipped ICD-10 data, sampled small, on the tiny model: the whole flow in well under a minute."""
    from components.config import load_config

    sets = [
        f"workspace={workspace}",
        f"model.base={tiny_model_dir}",
        f"data.dataset_info={ROOT / 'data/icd10/dataset_info.json'}",
        "data.max_samples=48",
        "tokenize.cutoff_len=96",
        "tokenize.cpt_block_size=96",
        "cpt.max_steps=3", "cpt.batch_size=2", "cpt.save_steps=2", "cpt.logging_steps=1",
        "sft.max_steps=4", "sft.batch_size=4", "sft.save_steps=2", "sft.logging_steps=1", "sft.learning_rate=1e-3",
        "evaluate.max_samples=8", "evaluate.max_new_tokens=4", "evaluate.batch_size=8", "evaluate.perplexity_max_samples=8",
        "quantize.eval_samples=4",
        "registry.model_name=tiny-coder",
        # The demo's alignment chain has its own test (tests/flows/test_alignment_flow.py).
        "reward.enabled=false", "alignment.method=none",
        # The demo's task selections name tasks a 48-row sample may lack: the tiny flow takes every task.
        "data.sft_task_weights={}", "data.rule_baselines={}", "evaluate.tasks=[]",
        *[f"{k}={v}" for k, v in overrides.items()],
    ]
    return load_config(ROOT / "configs/demo-cpu.yaml", sets)
