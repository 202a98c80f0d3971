"""Run a LoRA training stage under the `deepspeed` launcher, as a subprocess in its own process group.

One GPU, several GPUs on one node and several nodes (a hostfile) use the same path: the parent writes
a JSON job file and runs

    python -m deepspeed.launcher.runner [--num_gpus N] [--num_nodes M --hostfile FILE] \
        --no_local_rank --module components.training.launch JOB.json

which starts one `python -m components.training.launch JOB.json` per device. Each loads the model and
the tokenized data and calls `components.training.lora.run_lora_training` with the job's DeepSpeed
config; rank 0 writes the result next to the adapter. The MLflow run id and tracking URI travel in the
environment (the launcher exports MLFLOW_* variables to other nodes), so rank 0 logs the curve into
the stage's run. A timeout or an interrupt kills the whole process group: no orphaned ranks.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import deque
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from components.artifacts import StageResult, atomic_write_json

log = logging.getLogger(__name__)

RESULT_FILE = "launch_result.json"
JOB_FILE = "launch_job.json"
LOG_FILE = "launch.log"
PROJECT_ROOT = Path(__file__).resolve().parents[2]


class TrainingJob(BaseModel):
    """Everything a launched rank needs to train one adapter; written as JSON, read by each rank."""

    model_config = ConfigDict(extra="forbid")

    base_model: str = Field(description="Local model directory or hub id (`from_pretrained` source).")
    revision: str | None = None
    trust_remote_code: bool = False
    attn_implementation: str = "sdpa"
    adapters_below: list[str] = Field([], description="LoRA adapters merged into the base first, in order.")
    train_file: str = Field(description="Tokenized rows (the tokenize stage's parquet).")
    train_config: dict = Field(description="The stage's TrainConfig as JSON.")
    out_dir: str
    device: str = "auto"
    precision: str = "auto"
    ordered: bool = Field(False, description="Read the rows in file order (a curriculum, data.sft_phases).")
    deepspeed: dict | str | None = Field(None, description="DeepSpeed config dict or path; None trains without it.")


class LaunchError(RuntimeError):
    """The launched training exited badly or ran past its time; the message carries the log's tail."""


def free_port() -> int:
    """A TCP port free right now on this host: the rendezvous port of a single-node launch."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launcher_command(job_file: Path, *, num_gpus: int | None = None, num_nodes: int | None = None,
                     hostfile: Path | None = None, master_addr: str | None = None,
                     master_port: int | None = None) -> list[str]:
    """The `deepspeed` launcher command line that runs `job_file` on the given devices and nodes.

    Without a hostfile the job runs on this node only (num_gpus devices; all when None). With one,
    DeepSpeed starts the ranks on its hosts over pdsh, limited to num_nodes when given.
    """
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner"]
    if hostfile is not None:
        cmd += ["--hostfile", str(hostfile)]
        if num_nodes is not None:
            cmd += ["--num_nodes", str(num_nodes)]
    else:
        # Without this, a missing default hostfile is fine, but a stray /job/hostfile would be used.
        cmd += ["--hostfile", os.devnull]
    if num_gpus is not None:
        cmd += ["--num_gpus", str(num_gpus)]
    if master_addr is not None:
        cmd += ["--master_addr", master_addr]
    cmd += ["--master_port", str(master_port or free_port())]
    cmd += ["--no_local_rank", "--module", "components.training.launch", str(job_file)]
    return cmd


def _kill_group(proc: subprocess.Popen, grace_s: float = 10.0) -> None:
    """SIGTERM the launcher's process group (every rank), then SIGKILL what is left after `grace_s`."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    except ProcessLookupError:
        pass


def launch_training(
    job: TrainingJob,
    *,
    num_gpus: int | None = None,
    num_nodes: int | None = None,
    hostfile: Path | None = None,
    master_addr: str | None = None,
    master_port: int | None = None,
    mlflow_run_id: str | None = None,
    tracking_uri: str | None = None,
    timeout_s: float | None = None,
    env: dict[str, str] | None = None,
) -> StageResult:
    """Run `job` under the DeepSpeed launcher and return rank 0's StageResult.

    The launcher runs in a new session (its own process group); the whole group is killed when
    `timeout_s` passes or this process is interrupted. Output goes to `<out_dir>/launch.log` and to
    the log at DEBUG level; a failure raises LaunchError with the log's last lines.
    """
    out_dir = Path(job.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    job_file = out_dir / JOB_FILE
    atomic_write_json(job_file, job.model_dump(mode="json"))
    (out_dir / RESULT_FILE).unlink(missing_ok=True)

    child_env = {**os.environ, **(env or {})}
    # The ranks import lmforge from this checkout even where it is not installed (PYTHON* is exported to nodes).
    child_env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(PROJECT_ROOT), child_env.get("PYTHONPATH")]))
    if mlflow_run_id:
        child_env["MLFLOW_RUN_ID"] = mlflow_run_id
    if tracking_uri:
        child_env["MLFLOW_TRACKING_URI"] = tracking_uri

    cmd = launcher_command(job_file, num_gpus=num_gpus, num_nodes=num_nodes, hostfile=hostfile,
                           master_addr=master_addr, master_port=master_port)
    log.info("launching: %s", " ".join(cmd))
    tail: deque[str] = deque(maxlen=40)
    t0 = time.perf_counter()
    with open(out_dir / LOG_FILE, "w") as log_file:
        proc = subprocess.Popen(cmd, env=child_env, cwd=PROJECT_ROOT, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, start_new_session=True)

        def pump():
            for line in proc.stdout:
                log_file.write(line)
                tail.append(line.rstrip())
                log.debug("%s", line.rstrip())

        reader = threading.Thread(target=pump, daemon=True)
        reader.start()
        try:
            rc = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            reader.join(timeout=5)
            raise LaunchError(f"training launch ran past {timeout_s:.0f} s and was killed; "
                              f"log {out_dir / LOG_FILE}:\n" + "\n".join(tail)) from None
        except BaseException:
            _kill_group(proc)
            raise
        reader.join(timeout=30)
    log.info("launch finished with rc %d in %.1f s", rc, time.perf_counter() - t0)
    result_file = out_dir / RESULT_FILE
    if rc != 0 or not result_file.is_file():
        raise LaunchError(f"training launch exited with rc {rc}"
                          + ("" if rc else f" without writing {RESULT_FILE}")
                          + f"; log {out_dir / LOG_FILE}:\n" + "\n".join(tail))
    data = json.loads(result_file.read_text())
    return StageResult(files=data["files"], reports=data["reports"], metrics=data["metrics"], info=data["info"])


def _mlflow_sink(rank: int):
    """Rank 0 logs the training curve into the run named by MLFLOW_RUN_ID, batched; other ranks log nothing."""
    run_id, uri = os.environ.get("MLFLOW_RUN_ID"), os.environ.get("MLFLOW_TRACKING_URI")
    if rank != 0 or not run_id or not uri:
        return None
    from components.tracking import BatchedMetrics, client_for

    return BatchedMetrics(client_for(uri), run_id)


def run_job(job: TrainingJob) -> StageResult:
    """One rank's work: load the model (base + adapters below) and data, train, and (rank 0) record the result."""
    import torch

    from components.config import TrainConfig
    from components.data.tokenize import load_tokenized
    from components.models.loading import load_tokenizer, load_with_adapters, select_hardware
    from components.training.deepspeed import with_batch_sizes
    from components.training.lora import run_lora_training

    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    hardware = select_hardware(job.device, job.precision)
    if hardware.device == "cuda":
        torch.cuda.set_device(local_rank)  # "cuda" below then means this rank's own device
    cfg = TrainConfig.model_validate(job.train_config)
    ds_config, keep_alive = job.deepspeed, None
    if isinstance(ds_config, dict):
        ds_config = with_batch_sizes(ds_config, cfg, int(os.environ.get("WORLD_SIZE", "1")))
        if ds_config.get("zero_optimization", {}).get("stage") == 3:
            # Alive while the model loads, this makes from_pretrained build it already sharded (zero.Init).
            from transformers.integrations import HfDeepSpeedConfig

            keep_alive = HfDeepSpeedConfig(ds_config)
    tokenizer = load_tokenizer(job.base_model, revision=job.revision, trust_remote_code=job.trust_remote_code)
    model = load_with_adapters(job.base_model, job.adapters_below, hardware, revision=job.revision,
                               trust_remote_code=job.trust_remote_code,
                               attn_implementation=job.attn_implementation)
    dataset = load_tokenized(Path(job.train_file))
    sink = _mlflow_sink(rank)
    result = run_lora_training(model, tokenizer, dataset, cfg, hardware, Path(job.out_dir),
                               metrics_sink=sink, deepspeed=ds_config, ordered=job.ordered)
    if sink is not None:
        sink.flush()
    result.metrics["train_rows"] = float(len(dataset))
    result.info["world_size"] = int(os.environ.get("WORLD_SIZE", "1"))
    if rank == 0:
        atomic_write_json(Path(job.out_dir) / RESULT_FILE,
                          {"files": result.files, "reports": result.reports, "metrics": result.metrics,
                           "info": result.info})
    del keep_alive
    return result


def main(argv: list[str] | None = None) -> None:
    """Entry point of each launched rank: `python -m components.training.launch JOB.json`."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        raise SystemExit("usage: python -m components.training.launch JOB.json")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s rank" + os.environ.get("RANK", "0")
                        + " %(name)s %(levelname)s %(message)s")
    job = TrainingJob.model_validate_json(Path(args[0]).read_text())
    run_job(job)


if __name__ == "__main__":
    main()
