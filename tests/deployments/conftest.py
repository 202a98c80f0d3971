"""A real `prefect server start` for the deployment tests: one per module, on a free port, with its own
PREFECT_HOME, so tests talk to the server a production deployment talks to (not the test harness)."""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import ROOT
from tests.servers import free_port, running_server

PREFECT = str(Path(sys.executable).with_name("prefect"))


@contextlib.contextmanager
def running_prefect_server(home: Path, *, ui: bool = False, env: dict | None = None) -> Iterator[tuple[str, dict]]:
    """Start `prefect server start` under `home` and wait for /api/health; yields (api_url, env for its
    clients and workers). `ui=False` skips the web UI, which only the browser test needs; `env` adds
    server settings."""
    port = free_port()
    url = f"http://127.0.0.1:{port}/api"
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "PREFECT_API_URL": url, "PYTHONPATH": str(ROOT), **(env or {})}
    command = [PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(port), *([] if ui else ["--no-ui"])]
    with running_server(command, env, f"{url}/health", home / "server.log"):
        yield url, env


@pytest.fixture(scope="module")
def prefect_server(tmp_path_factory):
    """A Prefect server (API only) for the module; yields (api_url, env for its clients)."""
    with running_prefect_server(tmp_path_factory.mktemp("prefect-server")) as server:
        yield server


def api_settings(url: str):
    """This process's Prefect client pointed at `url` for the duration of a `with`."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    return temporary_settings({PREFECT_API_URL: url})


def create_process_pool(url: str, name: str) -> None:
    """A `process` work pool on the server at `url` (replaced if it exists)."""
    import asyncio

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate

    async def create():
        async with get_client() as client:
            await client.create_work_pool(WorkPoolCreate(name=name, type="process"), overwrite=True)

    with api_settings(url):
        asyncio.run(create())
