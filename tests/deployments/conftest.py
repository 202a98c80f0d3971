"""A real `prefect server start` for the deployment tests: one per module, on a free port, with its own
PREFECT_HOME, so tests talk to the server a production deployment talks to (not the test harness)."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import ROOT

PREFECT = str(Path(sys.executable).with_name("prefect"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running_prefect_server(home: Path, *, ui: bool = False) -> Iterator[tuple[str, dict]]:
    """Start `prefect server start` under `home` and wait for /api/health; yields (api_url, env for its
    clients and workers). `ui=False` skips the web UI, which only the browser test needs."""
    port = free_port()
    url = f"http://127.0.0.1:{port}/api"
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "PREFECT_API_URL": url, "PYTHONPATH": str(ROOT)}
    command = [PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(port), *([] if ui else ["--no-ui"])]
    with running_server(command, env, f"{url}/health", home / "server.log"):
        yield url, env


@contextlib.contextmanager
def running_server(command: list[str], env: dict, health_url: str, log_path: Path) -> Iterator[None]:
    """Run a server process (its output to `log_path`) until the `with` ends; fail the test with the log's
    tail when `health_url` does not answer 200 within four minutes (2 loaded cores start servers slowly)."""
    with open(log_path, "w") as log:
        server = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            deadline = time.monotonic() + 240
            while True:
                try:
                    with urllib.request.urlopen(health_url, timeout=5) as r:
                        if r.status == 200:
                            break
                except OSError:
                    pass
                if server.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"{Path(command[0]).name} server did not come up:\n{log_path.read_text()[-4000:]}")
                time.sleep(1)
            yield
        finally:
            # The whole process group: servers leave workers behind (MLflow's uvicorn and job consumers).
            for sig in (signal.SIGTERM, signal.SIGKILL):
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(server.pid, sig)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    server.wait(30)


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
