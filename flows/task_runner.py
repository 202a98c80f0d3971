"""The Prefect task runner that runs DAG nodes side by side (compute.parallel_stages > 1).

process: a pool of processes on this machine. dask: the workers of a Dask cluster (prefect-dask), one started
here for the run or a running one at compute.dask_address, so that nodes can run on other machines. Either way a
node runs in a process of its own, one at a time there: transformers builds a model on the meta device, and
two loads in threads of one process clash (a stage then finds meta tensors in its model).
"""

from __future__ import annotations

import contextlib
import multiprocessing
from collections.abc import Iterator

from prefect.task_runners import ProcessPoolTaskRunner, TaskRunner

from components.config import ComputeConfig

DASK_MISSING = ("compute.task_runner is dask, which needs prefect-dask (with dask.distributed): "
                "pip install -e '.[dask]'")


@contextlib.contextmanager
def node_task_runner(compute: ComputeConfig) -> Iterator[TaskRunner]:
    """A started task runner with room for compute.parallel_stages nodes, closed (its local cluster
    stopped) when the block ends."""
    if compute.task_runner == "process":
        with ProcessPoolTaskRunner(max_workers=compute.parallel_stages) as runner:
            yield runner
        return
    dask_runner = _dask_task_runner_class()
    import dask

    if compute.dask_address:
        with dask_runner(address=compute.dask_address) as runner:
            _check_workers(runner.client, compute.dask_address)
            yield runner
        return
    # The local workers as the process pool's: no memory cap for the nanny to kill a stage at (the default
    # is the machine's memory / workers), free to start processes of their own (data workers; a daemonic
    # worker may not), and the flow's thread settings (Dask pins OMP/MKL/OpenBLAS to one thread).
    settings = {"distributed.worker.daemon": False,
                "distributed.nanny.pre-spawn-environ": {"MALLOC_TRIM_THRESHOLD_": 65536}}
    cluster = {"n_workers": compute.parallel_stages, "threads_per_worker": 1, "processes": True,
               "memory_limit": 0}
    with dask.config.set(settings), dask_runner(cluster_kwargs=cluster) as runner:
        _check_workers(runner.client, "the local cluster")
        yield runner


def _dask_task_runner_class() -> type[TaskRunner]:
    """prefect_dask.DaskTaskRunner, imported only where compute.task_runner is dask; a missing package is an
    error that says what to install."""
    try:
        from prefect_dask import DaskTaskRunner
    except ImportError as exc:
        raise ImportError(DASK_MISSING) from exc
    return DaskTaskRunner


def _check_workers(client, where: str) -> None:
    """Refuse a cluster whose workers would run two nodes in one process or may not start processes: each
    worker is asked."""
    facts = client.run(_worker_facts)
    if not facts:
        raise RuntimeError(f"the Dask cluster at {where} has no workers")
    crowded = [worker for worker, threads in client.nthreads().items() if threads > 1]
    daemonic = [worker for worker, fact in facts.items() if fact["daemon"]]
    if crowded:
        raise RuntimeError(f"Dask workers {crowded} at {where} run several threads: start them with "
                           "`dask worker --nthreads 1` (two nodes in threads of one process clash)")
    if daemonic:
        raise RuntimeError(f"Dask workers {daemonic} at {where} are daemonic processes, which may not start "
                           "the processes a stage starts: start them with DASK_DISTRIBUTED__WORKER__DAEMON=False")


def _worker_facts() -> dict:
    """Run on each Dask worker: what _check_workers needs to know of it."""
    return {"daemon": multiprocessing.current_process().daemon}
