"""Run a training stage's ranks under a launcher, as a subprocess in its own process group.

Two launchers, one rank entry point (`python -m components.training.launch JOB.json`):
- DeepSpeed ZeRO-2/3 (a stage's deepspeed.stage > 0): one GPU, several GPUs on one node, or several
  nodes (a hostfile), through

    python -m deepspeed.launcher.runner [--num_gpus N] [--num_nodes M --hostfile FILE] \
        --no_local_rank --module components.training.launch JOB.json

- PyTorch DDP (compute.distributed: ddp, deepspeed.stage 0): N ranks on this node through

    python -m torch.distributed.run --standalone --nproc-per-node N -m components.training.launch JOB.json

Each rank loads the model and the tokenized data and calls `components.training.lora.run_lora_training`
(with the job's DeepSpeed config, or as a DDP rank: the Trainer reads torchrun's environment; gloo on CPU,
nccl on GPUs); rank 0 writes the result next to the adapter. The MLflow run id and tracking URI travel in
the environment (the DeepSpeed launcher exports MLFLOW_* variables to other nodes), so rank 0 logs the
curve into the stage's run. A timeout or an interrupt kills the whole process group, and a rank exits by
itself when a process between it and the stage dies (a kill -9 of the launcher included): no orphaned
ranks, and a rerun resumes from the last complete checkpoint.
"""

from __future__ import annotations

import contextlib
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

LAUNCHERS = ("deepspeed", "torchrun")
STAGE_PID_ENV = "LMFORGE_STAGE_PID"  # the stage process's pid: ranks exit when it or a launcher between dies
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


def launcher_command(job_file: Path, *, launcher: str = "deepspeed", num_gpus: int | None = None,
                     num_nodes: int | None = None, hostfile: Path | None = None, master_addr: str | None = None,
                     master_port: int | None = None) -> list[str]:
    """The launcher command line that runs `job_file` on the given devices and nodes.

    deepspeed: without a hostfile the job runs on this node only (num_gpus devices; all when None). With
    one, DeepSpeed starts the ranks on its hosts over pdsh, limited to num_nodes when given.
    torchrun: num_gpus ranks (1 when None) on this node, with a rendezvous of its own (--standalone).
    """
    if launcher == "torchrun":
        if hostfile is not None or (num_nodes or 1) > 1:
            raise ValueError("compute.distributed ddp launches ranks on this node only: for several nodes train "
                             "with deepspeed.stage 2 or 3 and a compute.hostfile, or run torchrun on each node")
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes", "1",
                "--nproc-per-node", str(num_gpus or 1), "-m", "components.training.launch", str(job_file)]
    if launcher != "deepspeed":
        raise ValueError(f"unknown launcher {launcher!r}: use one of {', '.join(LAUNCHERS)}")
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
    """SIGTERM the launcher's process group (every rank), then SIGKILL what is left after `grace_s`.

    A launcher that already exited may have left members behind (DeepSpeed's per-node launch process):
    they are killed outright. torchrun's ranks run in sessions of their own and follow torchrun (or end
    through their own watch, _exit_with_launcher)."""
    if proc.poll() is not None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    except ProcessLookupError:
        pass


def rank_environment(*, mlflow_run_id: str | None = None, tracking_uri: str | None = None,
                     threads_per_rank: int | None = None, env: dict[str, str] | None = None) -> dict[str, str]:
    """The environment the launcher and its ranks start with: this one, plus the project on PYTHONPATH, the
    stage's MLflow run, this process's pid (the ranks' watch), and each rank's CPU threads."""
    child_env = {**os.environ, **(env or {})}
    # The ranks import lmforge from this checkout even where it is not installed (PYTHON* is exported to nodes).
    child_env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(PROJECT_ROOT), child_env.get("PYTHONPATH")]))
    child_env[STAGE_PID_ENV] = str(os.getpid())
    if mlflow_run_id:
        child_env["MLFLOW_RUN_ID"] = mlflow_run_id
    if tracking_uri:
        child_env["MLFLOW_TRACKING_URI"] = tracking_uri
    if threads_per_rank:
        # Ranks on one CPU share its cores: without this each would start one thread per core.
        child_env["OMP_NUM_THREADS"] = str(threads_per_rank)
    return child_env


def launch_training(
    job: TrainingJob,
    *,
    launcher: str = "deepspeed",
    num_gpus: int | None = None,
    num_nodes: int | None = None,
    hostfile: Path | None = None,
    master_addr: str | None = None,
    master_port: int | None = None,
    mlflow_run_id: str | None = None,
    tracking_uri: str | None = None,
    threads_per_rank: int | None = None,
    timeout_s: float | None = None,
    env: dict[str, str] | None = None,
) -> StageResult:
    """Run `job` under `launcher` (deepspeed or torchrun, see launcher_command) and return rank 0's StageResult.

    The launcher runs in a new session (its own process group); the whole group is killed when
    `timeout_s` passes or this process is interrupted. Output goes to `<out_dir>/launch.log` and to
    the log at DEBUG level; a failure raises LaunchError with the log's last lines.
    """
    out_dir = Path(job.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    job_file = out_dir / JOB_FILE
    atomic_write_json(job_file, job.model_dump(mode="json"))
    (out_dir / RESULT_FILE).unlink(missing_ok=True)

    child_env = rank_environment(mlflow_run_id=mlflow_run_id, tracking_uri=tracking_uri,
                                 threads_per_rank=threads_per_rank, env=env)
    cmd = launcher_command(job_file, launcher=launcher, num_gpus=num_gpus, num_nodes=num_nodes,
                           hostfile=hostfile, master_addr=master_addr, master_port=master_port)
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
        if rc != 0:
            _kill_group(proc)  # what the dead launcher left in its group
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
        if ds_config.get("zero_optimization", {}).get("stage") == 3 and not job.adapters_below:
            # Alive while the model loads, this makes from_pretrained build it already sharded (zero.Init),
            # over the ranks' process group: it must exist before the Trainer would start it. Adapters below
            # merge into whole weights, so with them the model loads whole and DeepSpeed shards it at the start.
            import deepspeed
            from transformers.integrations import HfDeepSpeedConfig

            deepspeed.init_distributed()
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
    zero = (ds_config or {}).get("zero_optimization", {}).get("stage") if isinstance(ds_config, dict) else None
    result.info["distributed"] = f"deepspeed-zero{zero}" if zero else ("deepspeed" if ds_config else "ddp")
    if rank == 0:
        atomic_write_json(Path(job.out_dir) / RESULT_FILE,
                          {"files": result.files, "reports": result.reports, "metrics": result.metrics,
                           "info": result.info})
    del keep_alive
    return result


def _exit_with_launcher(poll_s: float = 1.0) -> None:
    """End this rank when a process between it and the stage process dies (the launcher killed with -9,
    the stage's worker gone): an orphaned rank would go on writing checkpoints beside the rerun's.

    Hand-written because neither launcher does it: torchrun starts each rank in a session of its own, and
    DeepSpeed's per-node launch process outlives a killed runner. A rank that does not descend from the stage
    process (another node's, started over pdsh) is left to its own launcher."""
    import psutil

    stage_pid = int(os.environ.get(STAGE_PID_ENV, "0"))
    watched = []
    for ancestor in psutil.Process().parents():  # nearest first
        watched.append(ancestor)
        if ancestor.pid == stage_pid:
            break
    else:
        return

    def gone(p: psutil.Process) -> bool:
        try:
            return not p.is_running() or p.status() == psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return True

    def watch():
        while True:
            time.sleep(poll_s)
            dead = next((p for p in watched if gone(p)), None)
            if dead is not None:
                print(f"rank {os.environ.get('RANK', '0')}: process {dead.pid} that launched it is gone; exiting",
                      file=sys.stderr, flush=True)
                os._exit(1)

    threading.Thread(target=watch, name="launcher-watch", daemon=True).start()


def main(argv: list[str] | None = None) -> None:
    """Entry point of each launched rank: `python -m components.training.launch JOB.json`."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        raise SystemExit("usage: python -m components.training.launch JOB.json")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s rank" + os.environ.get("RANK", "0")
                        + " %(name)s %(levelname)s %(message)s")
    _exit_with_launcher()
    job = TrainingJob.model_validate_json(Path(args[0]).read_text())
    run_job(job)
    _leave_process_group()


def _leave_process_group() -> None:
    """Wait until every rank is done (rank 0 has written the result and flushed the curve)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _end_rank() -> None:
    """End the rank at once, its outputs written and its logs flushed. Tearing down the comm threads of gloo
    and DeepSpeed, in destroy_process_group or at interpreter exit, aborted a rank now and then after its work
    was done ("terminate called without an active exception", rc -6), and the launch failed; the OS frees
    what the rank holds."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
    _end_rank()
