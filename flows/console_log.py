"""The terminal shows what happened in a few lines; the log file keeps every detail.

A failing stage makes Prefect log the same exception several times (task run, its final state,
flow run, its final state), each with a full traceback: hundreds of lines on the terminal. While a
CLI run lasts, console records keep their first line only, and a file under <workspace>/logs gets
every record with its traceback. Our own packages log at INFO into the file (what align kept, how
many rows a stage trained on, which checkpoint it resumed from); the terminal shows their warnings.
While a flow runs, those INFO records also go to its Prefect run log (logs_to_flow_run).
"""

from __future__ import annotations

import contextlib
import logging
import sys
import time
from collections.abc import Iterator
from pathlib import Path

_MAX_CONSOLE_CHARS = 300
OURS = ("components", "tasks", "flows")  # the packages whose INFO records go to the file only
FAILURE_RECORD = "run failed"  # logged with the traceback by the CLI, for the file


class _ConsoleQuiet(logging.Filter):
    """Console records without tracebacks, cut to their first line; Prefect's reports of a failure
    (the CLI prints the cause once itself) stay in the log file only."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if record.name.startswith("prefect") and (record.levelno >= logging.ERROR
                                                  or message.startswith("Finished in state Failed")):
            return False
        if record.name == "lmforge" and message == FAILURE_RECORD:
            return False
        if record.levelno < logging.WARNING and record.name.split(".")[0] in OURS:
            return False
        if record.exc_info or record.exc_text or record.levelno >= logging.ERROR:
            lines = message.strip().splitlines()
            line = lines[0] if lines else ""
            record.msg, record.args = line[:_MAX_CONSOLE_CHARS] + (" ..." if len(line) > _MAX_CONSOLE_CHARS else ""), ()
            record.exc_info, record.exc_text, record.stack_info = None, None, None
        return True


def _console_handlers() -> list[logging.Handler]:
    return [h for h in logging.getLogger().handlers
            if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler)]


@contextlib.contextmanager
def run_log(workspace: Path, *, prefect: bool = True) -> Iterator[Path]:
    """Yield the path of this run's log file; console handlers lose tracebacks until exit. Without `prefect`
    (a run that does not start it, flows/run_core.py), a plain console handler stands in for Prefect's."""
    plain = None
    if prefect:
        import prefect.logging.configuration  # noqa: F401  (sets up its handlers: ours must come first)
        from prefect.logging.configuration import setup_logging

        if not _console_handlers():
            setup_logging()
    elif not _console_handlers():
        plain = logging.StreamHandler()
        plain.setLevel(logging.WARNING)
        plain.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        logging.getLogger().addHandler(plain)
    logs = Path(workspace) / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    path = logs / f"run-{time.strftime('%Y%m%d-%H%M%S')}.log"
    file_handler = logging.FileHandler(path, encoding="utf-8", delay=True)
    file_handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    # First in line: it sees each record before the console filter trims it.
    root.handlers.insert(0, file_handler)
    quiet = _ConsoleQuiet()
    consoles = _console_handlers()
    for handler in consoles:
        handler.addFilter(quiet)
    levels = {name: logging.getLogger(name).level for name in OURS}
    for name in OURS:  # the root logger passes WARNING and up only (Prefect's default)
        logging.getLogger(name).setLevel(logging.INFO)
    try:
        yield path
    finally:
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)
        for handler in consoles:
            handler.removeFilter(quiet)
        root.removeHandler(file_handler)
        file_handler.close()
        if plain is not None:
            root.removeHandler(plain)


def _to_flow_run_handler() -> logging.Handler:
    from prefect.exceptions import MissingContextError
    from prefect.logging.handlers import APILogHandler

    class ToFlowRun(APILogHandler):
        """Prefect's API log handler, quiet about records made outside a run (a library's own thread):
        Prefect would warn once per such record."""

        def handleError(self, record: logging.LogRecord) -> None:
            if not isinstance(sys.exc_info()[1], MissingContextError):
                super().handleError(record)

    return ToFlowRun(level=logging.INFO)


@contextlib.contextmanager
def logs_to_flow_run() -> Iterator[None]:
    """While a flow runs, our packages' INFO records also go to its Prefect run log (the UI's Logs tab).

    Prefect sends only its own loggers' records to the API, so a run started from the UI or a
    deployment showed none of what the stages report (rows kept per task, rows trained on, the
    checkpoint resumed from). A logger that already has Prefect's API handler
    (PREFECT_LOGGING_EXTRA_LOGGERS) is left as it is, so nothing is sent twice.
    """
    from prefect.logging.handlers import APILogHandler

    handler = _to_flow_run_handler()
    changed: dict[str, int] = {}
    for name in OURS:
        logger = logging.getLogger(name)
        if any(isinstance(h, APILogHandler) for h in logger.handlers):
            continue
        changed[name] = logger.level
        if logger.getEffectiveLevel() > logging.INFO:
            logger.setLevel(logging.INFO)
        logger.addHandler(handler)
    try:
        yield
    finally:
        for name, level in changed.items():
            logging.getLogger(name).removeHandler(handler)
            logging.getLogger(name).setLevel(level)
