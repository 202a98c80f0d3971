"""Two ranks on CPU (gloo) train the tiny model as one rank does with the same global batch, under torchrun
(DDP) and under the DeepSpeed launcher (ZeRO-2, ZeRO-3); a kill -9 of the launcher leaves no rank behind,
and a rerun resumes from the last complete checkpoint and ends where an uninterrupted run ends.

The one-rank reference is batch 2 x accumulation 2 in this process (the stage's own path); the two-rank
runs are batch 2 x 2 ranks. Both see the same four rows per step: the length-grouped sampler orders the
rows in batches of 2 either way, and the ranks take alternate batches.

Tolerances, relative: losses within 1e-5 under DDP and 1e-4 under ZeRO, gradient norms within 1e-4 and
1e-3. In fp32 the only difference is the order of a few additions (two micro-batches' gradients summed in
one process against an all-reduce of two ranks' gradients; ZeRO also reduces in flattened buckets and, at
stage 3, gathers sharded weights), about 1e-7 per step here; the margins leave room for that to grow over
the steps. A real bug (gradients not averaged, or averaged twice, a rank reading other rows) moves the
loss or halves the gradient norm: far outside them.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import psutil
import pytest
import torch

from components.config import TrainConfig
from components.models.loading import Hardware
from components.training.launch import LaunchError, TrainingJob, launch_training, run_job

CPU = Hardware(device="cpu", precision="fp32")
STEPS = 48  # checkpoints every 4: a kill after checkpoint-4 lands with 44 steps to go, even on fast cores
RANKS = 2


def _config(ranks: int) -> TrainConfig:
    # Global batch 4 either way: 2 rows x 2 ranks, or 2 rows x 2 accumulated micro-batches on one rank.
    return TrainConfig(max_steps=STEPS, batch_size=2, grad_accum=RANKS // ranks, logging_steps=1, save_steps=4,
                       learning_rate=5e-3, warmup_ratio=0.0)


@pytest.fixture(scope="module")
def train_file(tmp_path_factory) -> Path:
    """32 rows of 6-13 tokens, the first 3 unlabeled (a prompt): lengths vary, so length grouping matters."""
    from datasets import Dataset

    g = torch.Generator().manual_seed(0)
    rows = []
    for _ in range(32):
        ids = torch.randint(5, 300, (int(torch.randint(6, 14, (1,), generator=g)),), generator=g).tolist()
        rows.append({"input_ids": ids, "labels": [-100] * 3 + ids[3:]})
    path = tmp_path_factory.mktemp("distributed") / "train.parquet"
    Dataset.from_list(rows).to_parquet(str(path))
    return path


def _job(model_dir: Path, train_file: Path, out_dir: Path, ranks: int, zero: int = 0) -> TrainingJob:
    from components.training.deepspeed import deepspeed_config

    cfg = _config(ranks)
    return TrainingJob(base_model=str(model_dir), train_file=str(train_file), train_config=cfg.model_dump(mode="json"),
                       out_dir=str(out_dir), device="cpu", precision="fp32",
                       deepspeed=deepspeed_config(cfg, CPU, stage=zero, offload=False) if zero else None)


def _launch(job: TrainingJob, launcher: str):
    # One thread per rank: the machine's cores are shared (OMP_NUM_THREADS=1 in each rank).
    return launch_training(job, launcher=launcher, num_gpus=RANKS, threads_per_rank=1, timeout_s=600)


def _curve(out_dir: Path) -> dict[int, tuple[float, float]]:
    history = json.loads((Path(out_dir) / "training_curve.json").read_text())
    return {h["step"]: (h["loss"], h["grad_norm"]) for h in history if "loss" in h}


@pytest.fixture(scope="module")
def one_rank(tiny_model_dir, train_file, tmp_path_factory) -> dict[int, tuple[float, float]]:
    """The reference: one rank, in this process, as a stage without a launcher trains."""
    out = tmp_path_factory.mktemp("one-rank")
    result = run_job(_job(tiny_model_dir, train_file, out, ranks=1))
    assert result.info["world_size"] == 1
    return _curve(out)


@pytest.fixture(scope="module")
def ddp_run(tiny_model_dir, train_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    return _launch(_job(tiny_model_dir, train_file, out, ranks=RANKS), "torchrun"), out


def _assert_same_curve(curve, reference, loss_rtol: float, grad_rtol: float) -> None:
    assert sorted(curve) == sorted(reference) == list(range(1, STEPS + 1))
    for step, (loss, grad) in reference.items():
        assert curve[step][0] == pytest.approx(loss, rel=loss_rtol), f"loss at step {step}"
        assert curve[step][1] == pytest.approx(grad, rel=grad_rtol), f"gradient norm at step {step}"
    assert len({loss for loss, _ in reference.values()}) > 1  # the steps saw different rows


def _adapter(out_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(Path(out_dir) / "adapter" / "adapter_model.safetensors")


def test_ddp_two_ranks_match_one_rank(ddp_run, one_rank):
    result, out = ddp_run
    assert result.info["world_size"] == RANKS and result.info["distributed"] == "ddp"
    assert "adapter/adapter_model.safetensors" in result.files
    _assert_same_curve(_curve(out), one_rank, loss_rtol=1e-5, grad_rtol=1e-4)


@pytest.mark.parametrize("zero", [2, 3])
def test_deepspeed_zero_two_ranks_match_one_rank(zero, tiny_model_dir, train_file, tmp_path, one_rank, ddp_run):
    pytest.importorskip("deepspeed", reason="install the `deepspeed` extra: pip install -e '.[deepspeed]'")
    result = _launch(_job(tiny_model_dir, train_file, tmp_path, ranks=RANKS, zero=zero), "deepspeed")
    assert result.info["world_size"] == RANKS and result.info["distributed"] == f"deepspeed-zero{zero}"
    _assert_same_curve(_curve(tmp_path), one_rank, loss_rtol=1e-4, grad_rtol=1e-3)
    # Rank 0 saved the whole adapter (at ZeRO-3 gathered from both ranks' shards), as DDP's rank 0 did.
    ddp_adapter, adapter = _adapter(ddp_run[1]), _adapter(tmp_path)
    assert adapter.keys() == ddp_adapter.keys()
    # ZeRO-3 sums each gradient over its partitions in another order than DDP's all-reduce, and Adam turns the
    # last-bit differences of elements whose gradient is near 0 into update differences: up to 1.8e-5 on
    # weights of 0.1-0.2 after these steps (measured), so the floor is 1e-4, 0.05% of the weights' scale.
    for name, weight in ddp_adapter.items():
        torch.testing.assert_close(adapter[name], weight, rtol=1e-3, atol=1e-4, msg=lambda m, name=name: f"{name}: {m}")


def test_torchrun_command_and_the_ranks_environment():
    from components.training.launch import STAGE_PID_ENV, launcher_command, rank_environment

    cmd = launcher_command(Path("job.json"), launcher="torchrun", num_gpus=2)
    assert cmd[1:5] == ["-m", "torch.distributed.run", "--standalone", "--nnodes"]
    assert cmd[cmd.index("--nproc-per-node") + 1] == "2"
    assert cmd[-3:] == ["-m", "components.training.launch", "job.json"]
    with pytest.raises(ValueError, match="this node only"):
        launcher_command(Path("job.json"), launcher="torchrun", num_nodes=2, hostfile=Path("hosts"))
    with pytest.raises(ValueError, match="unknown launcher"):
        launcher_command(Path("job.json"), launcher="mpirun")
    env = rank_environment(mlflow_run_id="abc", tracking_uri="sqlite:///x.db", threads_per_rank=1)
    assert (env["OMP_NUM_THREADS"], env["MLFLOW_RUN_ID"], env[STAGE_PID_ENV]) == ("1", "abc", str(os.getpid()))


def test_the_ranks_a_stage_trains_with_are_in_its_key():
    """Two ranks train twice the rows per step: a cached one-rank adapter must not stand in for it."""
    from components.config import load_config
    from components.pipeline import STAGES_BY_NAME, KeyFacts

    facts = KeyFacts(precision="fp32", tokenizer_digest="tok", model_digest="model")

    def key(*sets):
        return STAGES_BY_NAME["sft"].keyed_on(load_config(None, list(sets)), facts)

    assert "ranks" not in key() and "ranks" not in key("compute.num_gpus=2")  # in-process: one rank either way
    assert key("compute.distributed=ddp", "compute.num_gpus=2")["ranks"] == 2
    assert key("sft.deepspeed.stage=3", "compute.num_gpus=4", "compute.num_nodes=2")["ranks"] == 8
    assert "ranks" not in key("compute.distributed=ddp", "compute.num_gpus=1")


def _ranks_of(launcher: psutil.Process) -> list[psutil.Process]:
    """The rank processes (`python -m components.training.launch JOB`) under a launcher; DeepSpeed's per-node
    launch process names the module too, as `--module components.training.launch`, and is not one."""
    def is_rank(cmd: list[str]) -> bool:
        return any(a == "-m" and b == "components.training.launch" for a, b in zip(cmd, cmd[1:]))

    return [p for p in launcher.children(recursive=True) if is_rank(p.cmdline())]


# (launcher, ZeRO stage, the launcher's process, relative tolerance against the uninterrupted run)
KILLED = {"ddp": ("torchrun", 0, "torch.distributed.run", 1e-5),
          "zero2": ("deepspeed", 2, "deepspeed.launcher.runner", 1e-4)}


@pytest.mark.parametrize("engine", sorted(KILLED))
def test_kill_9_of_the_launcher_ends_the_ranks_and_a_rerun_resumes(engine, tiny_model_dir, train_file, tmp_path,
                                                                   ddp_run, one_rank):
    """Wherever the kill lands (after checkpoint 4, often later), the rerun resumes from the newest complete
    checkpoint and ends as the uninterrupted run: the same rows in the same order after a resume in the middle
    of a later epoch too (tests/components/training/test_lora.py checks each checkpoint in-process)."""
    launcher_name, zero, launcher_module, rtol = KILLED[engine]
    if zero:
        pytest.importorskip("deepspeed", reason="install the `deepspeed` extra: pip install -e '.[deepspeed]'")
    job = _job(tiny_model_dir, train_file, tmp_path, ranks=RANKS, zero=zero)
    failure: list[BaseException] = []

    def first_attempt():
        try:
            _launch(job, launcher_name)
        except BaseException as e:  # noqa: BLE001 - handed to the test below
            failure.append(e)

    attempt = threading.Thread(target=first_attempt)
    attempt.start()
    marker = tmp_path / "checkpoints" / "checkpoint-4" / "lmforge-complete"
    deadline = time.monotonic() + 300
    while not marker.exists() and attempt.is_alive() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert marker.exists(), "the first attempt wrote no complete checkpoint"
    launcher = next(p for p in psutil.Process().children() if launcher_module in " ".join(p.cmdline()))
    ranks = _ranks_of(launcher)
    assert len(ranks) == RANKS
    os.kill(launcher.pid, signal.SIGKILL)
    attempt.join(timeout=60)
    assert failure and isinstance(failure[0], LaunchError) and "rc -9" in str(failure[0])
    assert not (tmp_path / "adapter").exists()  # killed mid-training
    _, alive = psutil.wait_procs(ranks, timeout=30)  # each rank sees its launcher gone and exits
    assert not alive, f"ranks {[p.pid for p in alive]} outlived their launcher"

    result = _launch(job, launcher_name)
    assert result.metrics["resumed_from_step"] >= 4
    uninterrupted = _curve(ddp_run[1]) if not zero else one_rank
    resumed = _curve(tmp_path)
    assert sorted(resumed) == sorted(uninterrupted)
    for step in range(int(result.metrics["resumed_from_step"]) + 1, STEPS + 1):
        assert resumed[step][0] == pytest.approx(uninterrupted[step][0], rel=rtol), f"loss at step {step}"
    for name, weight in _adapter(ddp_run[1]).items():
        torch.testing.assert_close(_adapter(tmp_path)[name], weight, rtol=rtol * 10, atol=rtol / 10, msg=name)
