"""Real servers for tests (Prefect, MLflow, `mlflow models serve`): a free loopback port, and a process
run until the `with` ends, waited for on its health URL and stopped with its whole process group."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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
