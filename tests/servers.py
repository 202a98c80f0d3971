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


@contextlib.contextmanager
def serving_directory(root: Path, validators: str = "etag") -> Iterator[tuple[str, type]]:
    """An HTTP server in a thread serving the files under `root`: yields (base URL, handler class).

    `validators` says what a response carries to tell versions apart: "etag" (from the file's mtime and
    size, as nginx makes it), "last-modified", or "none". Set `handler.head_status` (e.g. 405) to refuse
    HEAD; `handler.requests` records (method, path) of every request."""
    import functools
    import http.server
    import threading

    class Handler(http.server.SimpleHTTPRequestHandler):
        requests: list[tuple[str, str]] = []
        head_status: int | None = None

        def do_HEAD(self) -> None:  # noqa: N802 (http.server's naming)
            type(self).requests.append(("HEAD", self.path))
            if self.head_status is not None:
                self.send_error(self.head_status)
                return
            super().do_HEAD()

        def do_GET(self) -> None:  # noqa: N802
            type(self).requests.append(("GET", self.path))
            super().do_GET()

        def send_header(self, keyword: str, value: str) -> None:
            if keyword == "Last-Modified":  # SimpleHTTPRequestHandler sends it for every file
                if validators == "last-modified":
                    super().send_header(keyword, value)
                elif validators == "etag":
                    st = os.stat(self.translate_path(self.path))
                    super().send_header("ETag", f'"{st.st_mtime_ns:x}-{st.st_size:x}"')
                return
            super().send_header(keyword, value)

        def log_message(self, *args: object) -> None:
            pass

    Handler.requests = []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", Handler
    finally:
        server.shutdown()
        server.server_close()


@contextlib.contextmanager
def running_mlflow_server(backend_store_uri: str, artifacts_destination: Path, log_path: Path) -> Iterator[str]:
    """`mlflow server` on a free loopback port with proxied artifacts, as in production: runs and the registry
    in `backend_store_uri` (e.g. PostgreSQL), artifact files under `artifacts_destination`, which clients
    reach only through the server (`mlflow-artifacts:/` URIs, uploads over HTTP). Yields the tracking URL."""
    import sys

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    command = [str(Path(sys.executable).with_name("mlflow")), "server", "--host", "127.0.0.1", "--port", str(port),
               "--workers", "1", "--serve-artifacts", "--artifacts-destination", str(artifacts_destination)]
    # The store's URI (its password) in the environment, not on the command line every local user can list.
    # The server's background job runner (MLflow's GenAI jobs) is unused here; on 2 cores it slows the start.
    env = {**os.environ, "MLFLOW_BACKEND_STORE_URI": backend_store_uri, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    with running_server(command, env, f"{url}/health", log_path):
        yield url
