"""DeepSpeed ZeRO configs validate the way the Trainer and DeepSpeed read them, and the launch path
trains the tiny model under the real `deepspeed` launcher on CPU (its CPU accelerator, gloo)."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from components.config import TrainConfig, load_config
from components.models.loading import Hardware
from components.training import launch as launch_module
from components.training.deepspeed import deepspeed_config, stage_deepspeed_config, with_batch_sizes
from components.training.launch import LaunchError, TrainingJob, launch_training, launcher_command

pytest.importorskip("deepspeed", reason="install the `deepspeed` extra: pip install -e '.[deepspeed]'")

CPU = Hardware(device="cpu", precision="fp32")
GPU_BF16 = Hardware(device="cuda", precision="bf16")
GPU_FP16 = Hardware(device="cuda", precision="fp16")


def _trainer_args(cfg: TrainConfig, hardware: Hardware, world_size: int):
    """The TrainingArguments fields HfTrainerDeepSpeedConfig reads, as lora.py sets them.

    (Real TrainingArguments would start torch.distributed, which needs a launcher.)"""
    return SimpleNamespace(
        world_size=world_size, per_device_train_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.grad_accum, max_grad_norm=cfg.max_grad_norm,
        learning_rate=cfg.learning_rate, adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8,
        weight_decay=cfg.weight_decay, save_on_each_node=False,
        fp16=hardware.dtype == torch.float16, fp16_full_eval=False,
        bf16=hardware.dtype == torch.bfloat16, bf16_full_eval=False,
        get_warmup_steps=lambda steps: 2,
    )


def _no_auto_left(node, path=""):
    if isinstance(node, dict):
        for k, v in node.items():
            _no_auto_left(v, f"{path}.{k}")
    else:
        assert node != "auto", f"{path} still 'auto' after the Trainer filled the config"


@pytest.mark.parametrize("hardware", [CPU, GPU_BF16, GPU_FP16], ids=["cpu-fp32", "gpu-bf16", "gpu-fp16"])
@pytest.mark.parametrize(("stage", "offload"), [(2, False), (2, True), (3, False), (3, True)])
def test_config_is_filled_by_the_trainer_and_accepted_by_deepspeed(stage, offload, hardware):
    from deepspeed.runtime.config import DeepSpeedConfig
    from transformers.integrations import HfTrainerDeepSpeedConfig

    cfg = TrainConfig(batch_size=4, grad_accum=2, learning_rate=1e-4, max_steps=10)
    ds = deepspeed_config(cfg, hardware, stage=stage, offload=offload)
    json.dumps(ds)  # it travels to the ranks as JSON
    filled = {}
    for world_size in (8, 1):
        hf = HfTrainerDeepSpeedConfig(ds)
        args = _trainer_args(cfg, hardware, world_size)
        hf.trainer_config_process(args)
        hf.trainer_config_finalize(args, SimpleNamespace(config=SimpleNamespace(hidden_size=64)), 10)
        assert hf.dtype() == hardware.dtype
        _no_auto_left(hf.config)
        filled[world_size] = hf.config
    assert filled[8]["train_batch_size"] == 4 * 2 * 8
    # DeepSpeed's own parser (one process here: world size 1): typed sections that forbid unknown
    # keys, and the batch-size arithmetic.
    parsed = DeepSpeedConfig(filled[1])
    assert parsed.zero_optimization_stage == stage
    assert parsed.bfloat16_config.enabled == (hardware.dtype == torch.bfloat16)
    assert parsed.float16_config.enabled == (hardware.dtype == torch.float16)
    zero = parsed.zero_config
    assert (zero.offload_optimizer is not None) == offload
    assert (zero.offload_param is not None) == (offload and stage == 3)
    if offload:
        # Offloading from a GPU uses DeepSpeed's CPU Adam; on a CPU-only host the Trainer's optimizer stays.
        assert ("optimizer" in ds) == (hardware.device == "cuda")


def test_cpu_config_disables_half_precision_and_gpu_only_features():
    ds = deepspeed_config(TrainConfig(), CPU, stage=2, offload=True)
    assert ds["bf16"]["enabled"] is False and ds["fp16"]["enabled"] is False
    assert ds["zero_optimization"]["overlap_comm"] is False
    assert ds["zero_optimization"]["offload_optimizer"] == {"device": "cpu", "pin_memory": False}


def test_stage_settings_come_from_the_train_config():
    cfg = load_config(None, ["sft.deepspeed.stage=3", "sft.deepspeed.offload=true"]).sft
    ds = stage_deepspeed_config(cfg, CPU)
    assert ds["zero_optimization"]["stage"] == 3 and "offload_param" in ds["zero_optimization"]
    assert stage_deepspeed_config(TrainConfig(), CPU) is None  # stage 0: off
    with pytest.raises(ValueError, match="stage must be 2 or 3"):
        deepspeed_config(TrainConfig(), CPU, stage=1, offload=False)


def test_batch_sizes_are_filled_for_zero3_model_init():
    ds = with_batch_sizes(deepspeed_config(TrainConfig(), CPU, 3, False), TrainConfig(batch_size=2, grad_accum=3), 4)
    assert (ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"], ds["train_batch_size"]) == (2, 3, 24)


def test_launcher_command_covers_one_node_and_many():
    one = launcher_command(Path("job.json"), num_gpus=2, master_port=29600)
    assert one[1:3] == ["-m", "deepspeed.launcher.runner"]
    assert ["--num_gpus", "2"] == one[one.index("--num_gpus"):one.index("--num_gpus") + 2]
    assert one[-4:] == ["--no_local_rank", "--module", "components.training.launch", "job.json"]
    many = launcher_command(Path("job.json"), num_nodes=4, num_gpus=8, hostfile=Path("hosts"), master_addr="10.0.0.1")
    assert many[many.index("--hostfile") + 1] == "hosts" and many[many.index("--num_nodes") + 1] == "4"
    assert many[many.index("--master_addr") + 1] == "10.0.0.1"


def test_timeout_kills_the_whole_process_group(tmp_path, monkeypatch):
    """A launcher whose rank hangs: the timeout kills launcher and rank alike. (That the stage's MLflow run
    reaches rank 0 is shown by its curve in the stage run: tests/flows/test_stage_runs.py.)"""
    pid_file = tmp_path / "rank.pid"
    rank = "import os, time; open(%r, 'w').write(str(os.getpid())); time.sleep(600)"
    launcher = f"import subprocess, sys; subprocess.Popen([sys.executable, '-c', {rank % str(pid_file)!r}]).wait()"
    monkeypatch.setattr(launch_module, "launcher_command", lambda *a, **k: [sys.executable, "-c", launcher])
    job = TrainingJob(base_model="unused", train_file="unused", train_config={}, out_dir=str(tmp_path / "out"))
    t0 = time.monotonic()
    with pytest.raises(LaunchError, match="ran past 3 s"):
        launch_training(job, timeout_s=3)
    assert time.monotonic() - t0 < 30
    rank_pid = int(pid_file.read_text())
    deadline = time.monotonic() + 10  # SIGKILL is sent; a loaded machine may take a moment to finish the exit
    while _alive(rank_pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(rank_pid)  # the grandchild is gone too, not orphaned


def _alive(pid: int) -> bool:
    """Running, not a zombie waiting to be reaped by whatever adopted it."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


def test_zero2_with_cpu_offload_trains_the_tiny_model_through_the_launcher(tiny_model_dir, tmp_path):
    """The real path: `deepspeed` launcher -> `python -m components.training.launch JOB` -> Trainer + ZeRO-2.

    The first run on a machine also compiles DeepSpeed's shared-memory comm op (cached afterwards)."""
    from datasets import Dataset

    g = torch.Generator().manual_seed(0)
    rows = []
    for _ in range(16):
        ids = torch.randint(5, 300, (12,), generator=g).tolist()
        rows.append({"input_ids": ids, "labels": [-100] * 6 + ids[6:]})
    Dataset.from_list(rows).to_parquet(str(tmp_path / "train.parquet"))
    cfg = TrainConfig(max_steps=3, batch_size=4, logging_steps=1, save_steps=10, learning_rate=5e-3)
    job = TrainingJob(
        base_model=str(tiny_model_dir), train_file=str(tmp_path / "train.parquet"),
        train_config=cfg.model_dump(mode="json"), out_dir=str(tmp_path / "out"), device="cpu", precision="fp32",
        deepspeed=deepspeed_config(cfg, CPU, stage=2, offload=True),
    )
    result = launch_training(job, num_gpus=1, timeout_s=600)
    out = tmp_path / "out"
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    assert "adapter/adapter_model.safetensors" in result.files
    assert result.info["world_size"] == 1 and result.metrics["train_rows"] == 16
    assert [h["step"] for h in json.loads((out / "training_curve.json").read_text()) if "loss" in h] == [1, 2, 3]
    from safetensors.torch import load_file

    lora_b = [v for k, v in load_file(out / "adapter" / "adapter_model.safetensors").items() if "lora_B" in k]
    assert lora_b and all(v.abs().sum() > 0 for v in lora_b)  # trained (B starts at zero)
