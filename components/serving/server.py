"""`lmforge serve`: resolve MODEL, start its backend on an internal port, run the front on host:port."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

from components.serving.backends import (
    BackendProcess,
    choose_backend,
    free_port,
    llamacpp_command,
    sampling_view,
    speculation_arguments,
    transformers_command,
    vllm_command,
)
from components.serving.resolve import (
    ServedModel,
    alias_version,
    merged_directory,
    registry_client,
    resolve_registry_model,
    resolve_served_model,
)

if TYPE_CHECKING:
    from components.config import PipelineConfig

log = logging.getLogger(__name__)


def launch(model: ServedModel, backend: str, workspace: Path, *, extra: tuple[str, ...] = (),
           ready_timeout: float = 600.0) -> BackendProcess:
    """Start `model` on `backend` (already chosen) on a free loopback port and wait until it answers; `extra`
    arguments go to the backend's command as they are."""
    port = free_port()
    if backend == "llamacpp":
        command = llamacpp_command(model.source, port, extra=extra)
    elif backend == "vllm":
        one_lora = len(model.adapters) == 1
        source = model.source if one_lora or not model.adapters else str(
            merged_directory(model, Path(workspace) / "serve-cache"))
        command = vllm_command(source, port, adapters=model.adapters if one_lora else (), served_name=model.name,
                               extra=extra)
    else:
        merged = merged_directory(model, Path(workspace) / "serve-cache")
        view, defaults = sampling_view(merged, Path(workspace) / "serve-cache" / "views")
        command = transformers_command(str(view), port, extra=extra, request_defaults=defaults)
    label = model.name.replace("/", "_").replace("@", "_") + (f"-v{model.version}" if model.version else "")
    process = BackendProcess(command, port, Path(workspace) / "logs" / f"serve-{label}.log")
    log.info("starting %s backend for %s on 127.0.0.1:%d (log %s)", backend, model.name, port, process.log_path)
    try:
        process.wait_ready(ready_timeout)
    except BaseException:
        process.stop()
        raise
    return process


def serve(spec: str, cfg: PipelineConfig, *, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
          backend: str = "auto", follow_interval: float = 30.0, backend_args: tuple[str, ...] = (),
          prompt_lookup: int = 0, draft_model: str | None = None) -> None:
    """Serve MODEL until interrupted. A `models:/NAME@alias` spec is followed: the alias is polled every
    `follow_interval` s (0: only on POST /admin/reload) and a moved alias switches backends without a restart.
    `backend_args` are appended to the backend's command (e.g. `--cb-num-blocks 64`, `--quantization bnb-4bit`,
    vLLM's `--gpu-memory-utilization 0.45`); `prompt_lookup` / `draft_model` turn on the backend's speculative
    decoding (speculation_arguments)."""
    import uvicorn

    from components.serving.gateway import Gateway, Route, build_app

    if not api_key and host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("listening on %s without an API key: anyone who reaches this port can use the model "
                    "(set LMFORGE_API_KEY)", host)
    model = resolve_served_model(spec, cfg)
    chosen = choose_backend(backend, is_gguf=model.is_gguf)
    backend_args = (*speculation_arguments(chosen, prompt_lookup=prompt_lookup, draft_model=draft_model),
                    *backend_args)
    first = launch(model, chosen, Path(cfg.workspace), extra=backend_args)
    route = Route(model.name, first, version=model.version, spec=spec)
    launched = [first]  # every backend this call started, all stopped at exit
    start_version = current_version = None
    if model.follows:
        client = registry_client(cfg)
        name, alias = model.follows

        def current_version() -> str:
            return alias_version(client, name, alias)

        def start_version(version: str) -> Route:
            new = resolve_registry_model(spec, cfg, client=client, version=version)
            launched.append(launch(new, chosen, Path(cfg.workspace), extra=backend_args))
            return Route(new.name, launched[-1], version=new.version, spec=spec)

    gateway = Gateway(route, api_key=api_key, start_version=start_version, current_version=current_version,
                      follow_interval=follow_interval if model.follows else 0.0)
    gateway.on_shutdown.append(lambda: [process.stop() for process in launched])
    log.info("serving %s%s at http://%s:%d/v1 (%s backend%s)", model.name,
             f" version {model.version}" if model.version else "", host, port, chosen,
             ", API key required" if api_key else "")
    try:
        uvicorn.run(build_app(gateway), host=host, port=port, log_level="warning")
    finally:
        for process in launched:
            process.stop()
