"""What every `lmforge` command shares: the console, the config argument, loading it, and failures printed as a
few clean lines with the traceback in the run's log."""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console

console = Console()

ConfigArg = Annotated[Optional[Path], typer.Argument(help="Pipeline YAML (configs/...). Omitted: the built-in defaults (domain-neutral; configs/demo-cpu.yaml is the demo).")]
SetOpt = Annotated[list[str], typer.Option("--set", help="Override a field: --set sft.learning_rate=1e-4 (repeatable).")]


def load(config: Path | None, overrides: list[str]):
    from components.config import ConfigError, load_config

    try:
        return load_config(config, overrides)
    except ConfigError as exc:
        from rich.markup import escape

        # Unwrapped (a path split over lines cannot be copied) and escaped (a value may hold [brackets]).
        console.print(f"[red]{escape(str(exc))}[/red]", soft_wrap=True, highlight=False)
        raise typer.Exit(2) from None


@contextlib.contextmanager
def failures_reported(workspace: str, *, prefect: bool = True):
    """A failure prints as a few clean lines naming the cause; the full traceback goes to a log file.

    Prefect's console records lose their tracebacks (first line only) while the run lasts; the file
    under <workspace>/logs keeps everything.
    """
    from flows.console_log import FAILURE_RECORD, run_log

    with run_log(Path(workspace), prefect=prefect) as log_path:
        try:
            yield
        except (KeyboardInterrupt, typer.Exit):
            raise
        except Exception as exc:
            logging.getLogger("lmforge").error(FAILURE_RECORD, exc_info=True)
            from rich.markup import escape

            console.print(f"[red]error:[/red] {escape(root_message(exc))}", highlight=False, soft_wrap=True)
            console.print(f"full traceback: {log_path}", highlight=False, soft_wrap=True)
            raise typer.Exit(1) from None


def root_message(exc: BaseException) -> str:
    """The message that names the cause: our own errors carry it; wrappers (Prefect's) repeat it."""
    from components.config import ConfigError
    from components.data.dataset_info import DataError
    from components.errors import StageInputError
    from components.models.loading import BaseModelError

    ours = (DataError, ConfigError, StageInputError, BaseModelError, FileNotFoundError)
    seen, node = set(), exc
    while node is not None and id(node) not in seen:
        if isinstance(node, ours):
            return str(node)
        seen.add(id(node))
        node = node.__cause__ or node.__context__
    return f"{type(exc).__name__}: {exc}"


def fmt(x) -> str:
    return "" if x is None else f"{x:.4f}" if isinstance(x, float) else str(x)


def check_stage_names(*names: str | None) -> None:
    from components.pipeline import STAGE_KINDS

    for name in names:
        if name is not None and name not in STAGE_KINDS:
            console.print(f"[red]unknown stage {name!r}; stages: {', '.join(STAGE_KINDS)}[/red]")
            raise typer.Exit(2)


def table_console() -> Console:
    """The terminal's console, or for piped or logged output (no width to fit) one wide enough that no
    table wraps its cells: one row per line for grep and less."""
    return console if console.is_terminal else Console(width=200)
