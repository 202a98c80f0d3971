"""The domain-adaptation flow: the stage table (components/pipeline.py) walked in order.

prepare -> fetch -> align -> tokenize -> cpt -> sft -> reward -> alignment -> evaluate (base, +cpt, adapted,
aligned) -> quantize -> register -> promote, each node only where the config asks for it (components.pipeline
.planned_nodes). Wiring only: the walk is flows/run_core.py; here each node that is not complete on disk runs
as one cached, retried Prefect task (tasks/stages.py), and the summary goes to the Prefect UI as an artifact.
"""

from __future__ import annotations

import functools
import logging
from concurrent.futures import Future
from typing import Literal

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact
from prefect.context import get_run_context

from components.config import PipelineConfig
from components.models.loading import select_hardware
from components.pipeline import STAGE_KINDS
from components.run_summary import summary_markdown
from flows.console_log import logs_to_flow_run
from flows.deployment_config import config_for_run
from flows.run_core import RunHooks, adapt
from flows.task_runner import node_task_runner
from tasks import stages as t

log = logging.getLogger("lmforge.flow")

StageName = Literal[STAGE_KINDS]  # type: ignore[valid-type]  # the Prefect form shows a dropdown


@flow(name="domain_adaptation", log_prints=True)
def domain_adaptation(
    config: PipelineConfig = PipelineConfig(),
    from_stage: StageName | None = None,
    only: StageName | None = None,
    until: StageName | None = None,
    verify: Literal["fast", "deep"] = "fast",
) -> dict:
    """Adapt a base model to the domain data in `config`; returns the summary (metrics, versions, timings).

    from_stage: recompute this stage and everything after it, even when cached.
    only: run just this stage on cached upstream outputs (they must exist).
    until: stop after this stage (e.g. `tokenize` to check data without training).
    verify: how a cached output is checked before reuse: `fast` (sizes and mtimes; a file whose
    mtime moved is rehashed) or `deep` (every file rehashed against its manifest digest).
    """
    with logs_to_flow_run():
        cfg = config_for_run(config)  # in a deployment run: the fields given, over the deployment's preset
        flow_run_id = str(get_run_context().flow_run.id)
        hooks = RunHooks(run_id=flow_run_id, logger=get_run_logger(), run_stage=_run_task,
                         tags={"prefect.flow_run_id": flow_run_id}, publish=_publish)
        precision = select_hardware(cfg.compute.device, cfg.compute.precision).precision
        if cfg.compute.parallel_stages == 1:
            return adapt(cfg, hooks, precision=precision, from_stage=from_stage, only=only, until=until,
                         verify=verify)
        # Side by side, each node in a process of its own (flows/task_runner.py): here or on a Dask cluster.
        with node_task_runner(cfg.compute) as runner:
            hooks.submit_stage = functools.partial(_submit_task, runner)
            return adapt(cfg, hooks, precision=precision, from_stage=from_stage, only=only, until=until,
                         verify=verify)


def _run_task(node, key, refresh, run, cfg, stage_config, upstream, digests, force=False) -> tuple[dict, bool]:
    """A node as its cached Prefect task; Prefect refreshes its cache where the output on disk is not complete.
    `force` (`--from`): computed here even when a shared stage store holds it."""
    state = t.stage_task(node.spec).with_options(refresh_cache=refresh)(
        key, node.name, run, cfg, stage_config, upstream, digests, reuse_shared=not force, return_state=True,
    )
    return state.result(), state.name == "Cached"


def _submit_task(runner, node, key, refresh, run, cfg, stage_config, upstream, digests, force=False) -> Future:
    """`_run_task` submitted to a Prefect task runner (compute.parallel_stages > 1): a Prefect future, seen by
    the walk as a concurrent Future of (manifest, reused)."""
    future = runner.submit(t.stage_task(node.spec).with_options(refresh_cache=refresh), {
        "key": key, "node": node.name, "run": run, "cfg": cfg, "stage_config": stage_config, "upstream": upstream,
        "keyed_upstream": digests, "reuse_shared": not force})
    produced: Future = Future()

    def finished(done) -> None:
        try:
            done.wait()  # done already: this takes the final state the runner's future carries, not the API's
            state = done.state
            if not state.is_final():  # its process or Dask worker died: the runner's own future says how
                done.wrapped_future.result()
            produced.set_result((state.result(), state.name == "Cached"))
        except BaseException as exc:  # the task's error (or a crashed state) is the walk's to raise
            produced.set_exception(exc)

    future.add_done_callback(finished)
    return produced


def _publish(summary: dict) -> None:
    """A markdown table in the Prefect UI: every held-out metric for the base and after each stage."""
    try:
        create_markdown_artifact(summary_markdown(summary), key="evaluation", description="Held-out evaluation")
    except Exception as exc:  # an artifact is a convenience; never fail a finished run for it
        log.warning("could not publish the evaluation artifact: %s", exc)
