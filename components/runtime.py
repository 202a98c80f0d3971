"""Process-wide settings a stage applies before it runs: CPU threads, library warnings shown once."""

from __future__ import annotations

import os


def configure_threads(threads: int | None) -> None:
    """torch CPU threads: the configured number, else every core."""
    import torch

    torch.set_num_threads(threads or os.cpu_count() or 1)


def quiet_library_warnings() -> None:
    """Placeholder until the warnings work lands: nothing filtered yet."""
