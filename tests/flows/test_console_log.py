"""A CLI run's log file keeps our packages' INFO records and every traceback; the terminal gets a few lines."""

from __future__ import annotations

import io
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

from flows.console_log import run_log

ROOT = Path(__file__).resolve().parents[2]


def test_info_goes_to_the_file_warnings_to_both_and_tracebacks_to_the_file_only(tmp_path):
    terminal = io.StringIO()
    console = logging.StreamHandler(terminal)
    root = logging.getLogger()
    root.addHandler(console)
    try:
        with run_log(tmp_path) as path:
            stage = logging.getLogger("components.training.sft")
            stage.info("resuming from checkpoint-200")
            stage.warning("rows of up to 300 tokens exceed the context window")
            try:
                raise ValueError("bad row 7\nsecond line")
            except ValueError:
                logging.getLogger("prefect.flow_runs").warning("stage failed", exc_info=True)
        assert logging.getLogger("components").level == logging.NOTSET  # put back after the run
    finally:
        root.removeHandler(console)
    file_text = path.read_text()
    assert "INFO components.training.sft: resuming from checkpoint-200" in file_text
    assert "exceed the context window" in file_text and "Traceback" in file_text and "second line" in file_text
    shown = terminal.getvalue()
    assert "resuming from" not in shown and "exceed the context window" in shown
    assert "stage failed" in shown and "Traceback" not in shown


def test_outside_a_flow_run_our_records_are_not_sent_and_not_warned_about():
    """A record made where there is no Prefect run (a library's own thread) is dropped quietly: Prefect's
    handler would warn once per record."""
    import logging
    import warnings

    from flows.console_log import logs_to_flow_run

    logger = logging.getLogger("components.example")
    before = logging.getLogger("components").level
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with logs_to_flow_run():
            assert logger.isEnabledFor(logging.INFO)
            logger.info("no run here")
    assert logging.getLogger("components").level == before
    assert not [h for h in logging.getLogger("components").handlers if type(h).__name__ == "ToFlowRun"]


def test_a_first_cli_run_on_a_fresh_machine_prints_only_log_records(tiny_model_dir, tmp_path):
    """A new Prefect home and workspace (the MLflow database is created): the terminal shows Prefect's
    records and our summary, not MLflow's 'Creating initial MLflow database tables' (the log file has it)."""
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env["PREFECT_HOME"] = str(tmp_path / "prefect")
    (tmp_path / "prefect").mkdir()
    workspace = tmp_path / "ws"
    done = subprocess.run(
        [sys.executable, "-m", "flows.cli", "run", "configs/demo-cpu.yaml", "--until", "fetch",
         "--set", f"workspace={workspace}", "--set", f"model.base={tiny_model_dir}"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    terminal = done.stdout + done.stderr
    assert "database tables" not in terminal, terminal
    record = re.compile(r"^\d\d:\d\d:\d\d\.\d{3} \| [A-Z]+ +\| ")  # Prefect's console format
    assert [line for line in done.stderr.splitlines() if not record.match(line)] == []
    (log_file,) = (workspace / "logs").glob("run-*.log")
    assert "Creating initial MLflow database tables" in log_file.read_text()
