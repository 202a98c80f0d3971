"""The temporary local Prefect API that `lmforge run` starts before its heavy imports."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

PROBE = """
import json, os, httpx
from flows.local_api import early_local_api
with early_local_api() as wait_ready:
    wait_ready()
    url = os.environ["PREFECT_API_URL"]
    from prefect.settings import get_current_settings
    from prefect.client.orchestration import get_client
    with get_client(sync_client=True) as client:
        healthy = client.api_healthcheck() is None
    from prefect.utilities.urls import url_for
    seen = {"url": url, "settings_url": get_current_settings().api.url, "healthy": healthy,
            "ui_link": url_for("flow-run", obj_id="00000000-0000-0000-0000-000000000001")}
try:
    httpx.get(seen["url"] + "/health", timeout=2)
    seen["after_exit"] = "still answering"
except httpx.HTTPError:
    seen["after_exit"] = "stopped"
seen["env_after"] = os.environ.get("PREFECT_API_URL")
seen["ui_env_after"] = os.environ.get("PREFECT_UI_URL")
print(json.dumps(seen))
"""


def _probe(env: dict) -> dict:
    done = subprocess.run([sys.executable, "-c", PROBE], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_starts_a_local_api_that_this_process_uses_and_stops_it(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env["PREFECT_HOME"] = str(tmp_path / "prefect")
    (tmp_path / "prefect").mkdir()
    seen = _probe(env)
    assert seen["url"].startswith("http://127.0.0.1:") and seen["url"].endswith("/api")
    assert seen["settings_url"] == seen["url"] and seen["healthy"]
    assert seen["after_exit"] == "stopped" and seen["env_after"] is None and seen["ui_env_after"] is None
    assert seen["ui_link"] is None  # no UI on this server: no "View at" link to nowhere
    assert (tmp_path / "prefect" / "prefect.db").is_file()  # the server kept its state in PREFECT_HOME


def test_a_configured_api_is_used_as_is(tmp_path):
    env = {**os.environ, "PREFECT_HOME": str(tmp_path), "PREFECT_API_URL": "http://127.0.0.1:9/api"}
    probe = ("import os\nfrom flows.local_api import early_local_api\n"
             "with early_local_api() as wait_ready:\n    wait_ready()\n    print(os.environ['PREFECT_API_URL'])\n")
    done = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip() == "http://127.0.0.1:9/api"


def test_a_server_started_before_the_settings_are_read_stops_when_they_name_an_api(tmp_path):
    # The CLI starts the server before importing prefect; an API named where it did not look (here a
    # prefect.toml in the working directory) must still win, and that server must go at once.
    (tmp_path / "prefect.toml").write_text('[api]\nurl = "http://127.0.0.1:9/api"\n')
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env.update(PREFECT_HOME=str(tmp_path / "home"), PYTHONPATH=str(ROOT))
    probe = ("import json, os, psutil\nfrom flows.local_api import early_local_api\n"
             "with early_local_api() as wait_ready:\n    wait_ready()\n"
             "    from prefect.settings import get_current_settings\n"
             "    print(json.dumps([get_current_settings().api.url, os.environ.get('PREFECT_API_URL'),\n"
             "                      [p.cmdline() for p in psutil.Process().children(recursive=True)]]))\n")
    done = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout.strip().splitlines()[-1]) == ["http://127.0.0.1:9/api", None, []]


def test_the_server_does_not_outlive_a_killed_run(tmp_path):
    # kill -9 skips every cleanup handler; the server must still go (Linux: parent-death signal).
    import signal
    import time

    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env["PREFECT_HOME"] = str(tmp_path)
    probe = ("import os, time\nfrom flows.local_api import early_local_api\n"
             "with early_local_api() as wait_ready:\n    wait_ready()\n"
             "    print(os.environ['PREFECT_API_URL'], flush=True)\n    time.sleep(600)\n")
    run = subprocess.Popen([sys.executable, "-c", probe], cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True)
    url = run.stdout.readline().strip()
    assert url.startswith("http://127.0.0.1:")
    import httpx

    assert httpx.get(f"{url}/health", timeout=5).status_code == 200
    run.send_signal(signal.SIGKILL)
    run.wait(timeout=30)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            httpx.get(f"{url}/health", timeout=1)
        except httpx.HTTPError:
            return
        time.sleep(0.2)
    raise AssertionError(f"the temporary API at {url} still answers after its run was killed")
