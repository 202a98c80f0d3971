"""Worker processes for the data stages: JSONL read in chunks, converted in order by a spawned pool.

Align and tokenize both hand chunks of raw JSONL lines to worker processes and fold the results
back in file order, so their output (and the row an error names) is the same whatever the number
of workers. Spawn, not fork: the flow runs stages inside a Prefect worker thread, and forking a
threaded process can deadlock on a lock another thread held.
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Executor
from pathlib import Path
from typing import Any

CHUNK_BYTES = 1 << 20  # JSONL is handed out in chunks of about this size (~5k short rows)
AUTO_PARALLEL_BYTES = 32 << 20  # files larger than this get worker processes by default
MAX_AUTO_WORKERS = 8


def line_chunks(path: Path) -> Iterator[tuple[int, list[bytes]]]:
    """(number of the first line, raw lines) in chunks of about CHUNK_BYTES, read in C."""
    with open(path, "rb") as f:
        first = 1
        while lines := f.readlines(CHUNK_BYTES):
            yield first, lines
            first += len(lines)


def resolve_num_proc(num_proc: int | None, path: Path | None) -> int:
    """Worker processes for a file: as set, else one per core (at most 8) for files over
    AUTO_PARALLEL_BYTES (or when `path` is None) and 1 below (starting workers costs a second or two)."""
    if num_proc is not None:
        return num_proc
    if path is not None and path.stat().st_size < AUTO_PARALLEL_BYTES:
        return 1
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(cores, MAX_AUTO_WORKERS))


def spawn_pool(num_proc: int, initializer: Callable | None = None, initargs: tuple = ()) -> Executor:
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    return ProcessPoolExecutor(num_proc, mp_context=multiprocessing.get_context("spawn"),
                               initializer=initializer, initargs=initargs)


def ordered_map(pool: Executor, fn: Callable, items: Iterator[tuple], in_flight: int) -> Iterator[Any]:
    """`fn(*args)` for each args of `items` on `pool`, results in order, with at most `in_flight`
    submitted and not yet consumed (memory stays bounded however long `items` is)."""
    pending: deque = deque()
    for args in items:
        pending.append(pool.submit(fn, *args))
        if len(pending) >= in_flight:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


class SharedPool:
    """Worker processes started on first use and shared by the files of a run. `num_proc` None: one
    per core (at most 8), for files over AUTO_PARALLEL_BYTES only; a number > 1: that many, for every file."""

    def __init__(self, num_proc: int | None):
        self.num_proc = num_proc
        self.size = resolve_num_proc(num_proc, None)
        self._pool: Executor | None = None
        self.files = 0  # files handed to the workers

    def wants(self, path: Path) -> bool:
        """Whether `path` is worth the workers."""
        return resolve_num_proc(self.num_proc, path) > 1

    def map_ordered(self, fn: Callable, items: Iterator[tuple]) -> Iterator:
        """`ordered_map` of one file's chunks on the pool."""
        self.files += 1
        if self._pool is None:
            self._pool = spawn_pool(self.size)
        return ordered_map(self._pool, fn, items, 2 * self.size)

    def __enter__(self) -> SharedPool:
        return self

    def __exit__(self, *exc) -> None:
        if self._pool is not None:
            self._pool.shutdown(cancel_futures=True)
