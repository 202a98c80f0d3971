"""Memory of one stretch of work: peak resident set and CUDA memory; freed memory handed back.

Stages run one after another in one process, so "what did this stage need" is the process's peak
while it ran. Linux keeps that peak (VmHWM) and lets a process reset it (`5` written to
/proc/self/clear_refs, since Linux 4.0), which `getrusage` cannot: so the resident peak is read
from there, and left out (None) where the reset is not possible. Worker processes a stage starts
(the data stages' pool) are not included.
"""

from __future__ import annotations

import ctypes
import gc
import re
import sys
from pathlib import Path

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def _reset_rss_peak() -> bool:
    try:
        _CLEAR_REFS.write_text("5")
        return True
    except OSError:
        return False


def _rss_peak_mb() -> float | None:
    try:
        found = re.search(r"^VmHWM:\s+(\d+) kB", _STATUS.read_text(), re.M)
    except OSError:
        return None
    return int(found.group(1)) / 1024 if found else None


def release_free_memory() -> None:
    """Collect garbage, then hand freed heap memory back to the system (glibc's malloc_trim).

    Between stages: a model held by a reference cycle lives until a full collection, and glibc
    keeps large freed blocks (a training step's activations) in the heap, so without this a stage
    would start from the previous stage's peak. The survivors of the collection are then frozen
    (gc.freeze): later collections skip them, so each call walks only what was made since the last
    one (a full walk of a process with torch, transformers and mlflow loaded takes ~0.3-0.5 s). The
    price: a frozen object that later becomes part of an unreachable cycle is never freed.
    """
    gc.collect()
    gc.freeze()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to do
        pass


def _cuda():
    """torch.cuda when a stage already uses it (never imports torch or starts CUDA for the asking)."""
    torch = sys.modules.get("torch")
    return torch.cuda if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized() else None


class PeakMemory:
    """`with PeakMemory() as peak: ...`, then `peak.rss_mb` and `peak.gpu_mb` (None when unknown).

    gpu_mb is the largest memory torch allocated on the current CUDA device, from CUDA being
    started or this block's start, whichever is later.
    """

    rss_mb: float | None = None
    gpu_mb: float | None = None

    def __enter__(self) -> PeakMemory:
        self._rss = _reset_rss_peak()
        cuda = _cuda()
        if cuda is not None:
            cuda.reset_peak_memory_stats()
        return self

    def __exit__(self, *exc: object) -> None:
        self.rss_mb = _rss_peak_mb() if self._rss else None
        cuda = _cuda()
        self.gpu_mb = cuda.max_memory_allocated() / 2**20 if cuda is not None else None

    def metrics(self, prefix: str = "") -> dict[str, float]:
        """The known peaks, rounded to 0.1 MB, as {prefix}peak_rss_mb / {prefix}peak_gpu_mb."""
        named = {"peak_rss_mb": self.rss_mb, "peak_gpu_mb": self.gpu_mb}
        return {f"{prefix}{k}": round(v, 1) for k, v in named.items() if v is not None}
