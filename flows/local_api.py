"""Prefect's temporary local API, started before the heavy imports so that its boot overlaps them.

With no PREFECT_API_URL configured, Prefect starts a temporary API server on the flow's first API
call and waits for it (3-4 s of importing Prefect's server here), after the process has spent
seconds importing prefect and mlflow. `early_local_api` starts the same server (the same uvicorn
app and settings as Prefect's ephemeral mode) first, so both happen at once, and points this process
at it. An unchanged rerun is mostly this start-up, so it takes seconds off every run.

When this process has not imported prefect yet (the CLI), the server is started before prefect is
imported here (~1 s), unless PREFECT_API_URL is in the environment or the Prefect profiles file; if
Prefect's settings then name an API after all (another settings source), that server is stopped at
once and the configured API is used. A configured API (a `prefect server start` for the UI) is
always used as is.
"""

from __future__ import annotations

import contextlib
import http.client
import importlib.util
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path


def _die_with_parent() -> None:  # pragma: no cover (runs in the child between fork and exec)
    """Linux: the server gets SIGTERM when this process dies, even by kill -9 (no orphaned server)."""
    try:
        import ctypes
        import signal

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _drain_prefect_workers() -> None:
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    APILogWorker.drain_all(timeout=10, at_exit=False)
    EventsWorker.drain_all(timeout=10, at_exit=False)


def _api_in_environment() -> bool:
    """Whether PREFECT_API_URL is set where a look costs nothing: the environment or the profiles file."""
    if os.environ.get("PREFECT_API_URL"):
        return True
    home = Path(os.environ.get("PREFECT_HOME") or Path.home() / ".prefect").expanduser()
    profiles = Path(os.environ.get("PREFECT_PROFILES_PATH") or home / "profiles.toml").expanduser()
    try:
        return "PREFECT_API_URL" in profiles.read_text(encoding="utf-8")
    except OSError:
        return False


class _Server:
    """The uvicorn process serving Prefect's API app on a free local port; its output goes to a temp file."""

    def __init__(self, env: dict[str, str]):
        self.port = _free_port()
        prefect_dir = Path(importlib.util.find_spec("prefect").origin).parent  # finds it without importing it
        env = {
            **env,
            # What Prefect's own temporary server sets: no UI, ephemeral-mode services.
            "PREFECT_UI_ENABLED": "0",
            "PREFECT__SERVER_EPHEMERAL": "1",
            "PREFECT__SERVER_FINAL": "1",
        }
        self.log_file = tempfile.TemporaryFile()  # not a pipe: nobody reads it while the server runs
        self.process = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "--app-dir", str(prefect_dir.parent), "--factory",
             "prefect.server.api.server:create_app", "--host", "127.0.0.1", "--port", str(self.port),
             "--log-level", "error", "--lifespan", "on"],
            env=env, stdout=self.log_file, stderr=subprocess.STDOUT,
            preexec_fn=_die_with_parent if sys.platform == "linux" else None,
        )

    def healthy(self) -> bool:
        """Whether it answers /api/health. Plain http.client: a poll costs a fraction of a millisecond, where
        an httpx call (a new client and TLS context each time) took ~10 ms of CPU from the booting server."""
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=1)
        try:
            connection.request("GET", "/api/health")
            return connection.getresponse().status == 200
        except (OSError, http.client.HTTPException):
            return False
        finally:
            connection.close()

    def output(self) -> str:
        self.log_file.seek(0)
        return self.log_file.read().decode(errors="replace")

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.log_file.close()


@contextlib.contextmanager
def early_local_api() -> Iterator[Callable[[], None]]:
    """Start a temporary local Prefect API unless one is configured; yields `wait_ready`.

    Call `wait_ready()` before the first flow call: it returns once the server answers /health
    (immediately when an API is configured) and raises, with the server's output, when it exits.
    The server is stopped on exit.
    """
    # Before prefect is imported, no setting can differ in this process from what the server's own
    # import reads (the environment, profiles, prefect.toml), so it can start first.
    server = None if "prefect" in sys.modules or _api_in_environment() else _Server(dict(os.environ))
    try:
        from prefect.settings import get_current_settings

        settings = get_current_settings()
    except BaseException:
        if server is not None:
            server.stop()
        raise
    if settings.api.url or not settings.server.ephemeral.enabled:
        if server is not None:
            server.stop()
        yield lambda: None
        return

    import prefect.context

    if server is None:
        server = _Server({**os.environ, **settings.to_environment_variables(exclude_unset=True)})
    url = f"http://127.0.0.1:{server.port}/api"
    # No UI URL: this server has no UI, so Prefect's "View at <url>" line would be a dead link.
    previous = {name: os.environ.get(name) for name in ("PREFECT_API_URL", "PREFECT_UI_URL")}
    os.environ.update(PREFECT_API_URL=url, PREFECT_UI_URL="")
    prefect.context.refresh_global_settings_context()  # every thread of this process now sees the URL
    # Prefect's 20 s default is short for a first start (database migrations) on a busy 2-core machine.
    timeout = max(settings.server.ephemeral.startup_timeout_seconds, 60)

    def wait_ready() -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if server.process.poll() is not None:
                raise RuntimeError(f"the temporary Prefect API server exited with code {server.process.returncode}:\n"
                                   f"{server.output()[-4000:]}")
            if server.healthy():
                return
            time.sleep(0.05)
        raise RuntimeError(f"the temporary Prefect API server did not answer within {timeout} s; "
                           "raise PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS or run `prefect server start` "
                           "and set PREFECT_API_URL")

    try:
        yield wait_ready
    finally:
        _drain_prefect_workers()  # their last logs and events go out while the server still answers
        server.stop()
        for name, value in previous.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        prefect.context.refresh_global_settings_context()
