"""A deployment run's config: what the trigger sets, field by field, on top of the deployment's preset.

Prefect merges a run's parameters with its deployment's one level deep, so
`run_deployment(name, parameters={"config": {"sft": {"learning_rate": 1e-4}}})` alone would replace the
whole preset and every field left out would take the built-in default. The flow keeps its typed
`config` parameter (the UI's Custom run form shows every field, filled with the preset) and, in a
deployment run, lays the fields the trigger actually set (pydantic's `model_fields_set`, at every
depth) over the deployment's stored preset. A form submission sets every field, so it runs as
submitted; a partial dict from the CLI or the API changes only what it names. Outside a deployment
(`lmforge run`, a direct call) the config is taken as given.
"""

from __future__ import annotations

import copy
import logging

from pydantic import BaseModel

from components.config import PipelineConfig

log = logging.getLogger("lmforge.flow")


def lay_over(preset: dict, given: BaseModel) -> dict:
    """`preset` with every field that `given` set explicitly put on top: sections merge, values replace
    (a list is a value: a given list replaces the preset's)."""
    out = copy.deepcopy(preset)
    dumped = given.model_dump(mode="json")
    for name in given.model_fields_set:
        value = getattr(given, name)
        if isinstance(value, BaseModel) and isinstance(out.get(name), dict):
            out[name] = lay_over(out[name], value)
        else:
            out[name] = dumped[name]
    return out


def deployment_preset() -> dict | None:
    """The `config` parameter stored on the deployment this flow run came from; None outside a deployment."""
    from prefect.runtime import deployment

    deployment_id = deployment.id
    if not deployment_id:
        return None
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        stored = client.read_deployment(deployment_id).parameters or {}
    return stored.get("config")


class RemoteCodeRefused(ValueError):
    """A triggered run asks to run model code that its deployment does not allow."""


def check_remote_code(preset: dict, merged: PipelineConfig) -> None:
    """A run triggered from the UI or the API may not turn `model.trust_remote_code` on: only the
    deployment's own preset (prefect.yaml, written by whoever deploys) can allow model code to run."""
    allowed = bool((preset.get("model") or {}).get("trust_remote_code"))
    if merged.model.trust_remote_code and not allowed:
        raise RemoteCodeRefused(
            "this run sets model.trust_remote_code=true, which would run code shipped with the model, and its "
            "deployment does not allow it; set model.trust_remote_code: true in the deployment's preset "
            "(prefect.yaml) if you trust that model")


def config_for_run(config: PipelineConfig) -> PipelineConfig:
    """`config` laid over the deployment's preset in a deployment run; `config` itself otherwise."""
    preset = deployment_preset()
    if not preset:
        return config
    merged = PipelineConfig.model_validate(lay_over(preset, config))
    check_remote_code(preset, merged)
    if merged != config:
        changed = sorted(config.model_fields_set)
        log.info("config: the deployment's preset with the fields this run set (%s)", ", ".join(changed) or "none")
    return merged
