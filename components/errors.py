"""What can go wrong, sorted by what to do about it.

A retry helps only when the cause can go away by itself (a dropped connection, a timeout, a busy
server). A missing local file, malformed JSON or a schema mismatch fails the same way every time,
so the orchestrator must not retry it: `is_transient` is the one rule the tasks' retry condition uses.
"""

from __future__ import annotations

import errno


class TransientError(Exception):
    """A failure worth retrying: connection trouble, a timeout, HTTP 408/425/429/5xx, a short read.

    `retry_after_s` carries a server's Retry-After when it sent one.
    """

    def __init__(self, message: str, retry_after_s: float | None = None):
        super().__init__(message)
        self.retry_after_s = retry_after_s


# OS errors a retry can cure: the network or a remote filesystem came back.
_TRANSIENT_ERRNO = {errno.ECONNRESET, errno.ECONNREFUSED, errno.ECONNABORTED, errno.ETIMEDOUT, errno.EHOSTUNREACH,
                    errno.ENETUNREACH, errno.ENETDOWN, errno.EPIPE, errno.EAGAIN}


def is_transient(exc: BaseException) -> bool:
    """True when retrying the same work could succeed (walks the exception's cause chain)."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, (TransientError, TimeoutError, ConnectionError)):
            return True
        if isinstance(exc, OSError) and exc.errno in _TRANSIENT_ERRNO:
            return True
        name = type(exc).__module__.split(".")[0]
        if name in ("requests", "urllib3", "httpx", "aiohttp") and "Timeout" in type(exc).__name__ or (
            name in ("requests", "urllib3", "httpx", "aiohttp") and "Connect" in type(exc).__name__
        ):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


class StageInputError(RuntimeError):
    """A stage cannot start: an input it needs is not there (e.g. `--only` before a full run)."""


class TrainingDiverged(RuntimeError):
    """Training left the safe region (a NaN loss, a KL to the reference beyond its bound) at a known step.

    Not transient: a rerun resumes from the last good checkpoint and would diverge again with the same
    settings; lower the learning rate or raise the bound.
    """

    def __init__(self, step: int, what: str,
                 advice: str = "Lower the learning rate (or raise the bound) and rerun."):
        super().__init__(f"training diverged at step {step}: {what}; the last good checkpoint is kept. {advice}")
        self.step, self.what = step, what
