"""Numbered checkpoints with a complete marker, as every training loop here writes them.

A checkpoint is a directory `<prefix>-<N>` (Trainer's `checkpoint-N`, PPO's `step-N`, RAFT's
`iteration-N`) that counts only once its COMPLETE marker is written (last, after every file): a
directory without one is what a crash mid-save left behind, never a state to resume from.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

log = logging.getLogger(__name__)

COMPLETE = "lmforge-complete"


def complete_checkpoints(root: Path, prefix: str, *, remove_incomplete: bool = True) -> list[tuple[int, Path]]:
    """(N, dir) of every complete `<prefix>-N` under `root`, oldest first; with `remove_incomplete`, the
    incomplete ones are deleted (a crash mid-save)."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for d in root.glob(f"{prefix}-*"):
        number = d.name[len(prefix) + 1:]
        if not number.isdigit():
            continue
        if (d / COMPLETE).exists():
            found.append((int(number), d))
        elif remove_incomplete:
            log.warning("removing incomplete checkpoint %s", d)
            shutil.rmtree(d, ignore_errors=True)
    return sorted(found)


def last_complete_checkpoint(root: Path, prefix: str = "checkpoint") -> Path | None:
    """The newest complete `<prefix>-N` under `root` (None when there is none); incomplete ones are deleted."""
    found = complete_checkpoints(root, prefix)
    return found[-1][1] if found else None


def prune_checkpoints(root: Path, prefix: str, keep: int) -> None:
    """Delete all but the newest `keep` complete `<prefix>-N` under `root` (incomplete ones are left alone:
    one may be being written)."""
    found = complete_checkpoints(root, prefix, remove_incomplete=False)
    for _, old in found[: max(len(found) - keep, 0)]:
        shutil.rmtree(old, ignore_errors=True)


def checkpoint_number(path: Path) -> int:
    """N of a `<prefix>-N` checkpoint directory."""
    return int(Path(path).name.rsplit("-", 1)[1])
