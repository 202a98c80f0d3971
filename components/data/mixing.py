"""Mixing the datasets of a group: interleaving streams by probability or round-robin, and
reweighting the tasks of the SFT group.

Each dataset is first aligned to a part file; `write_interleaved` draws lines from the open part
files, so mixing streams too (memory bounded by the open files, whatever their size).
"""

from __future__ import annotations

import bisect
import itertools
import json
import random
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any, Literal, TypeVar

from components.artifacts import atomic_file
from components.data.dataset_info import DataError
from components.data.records import interleave_probs_problem

MIX_STRATEGIES = ("concat", "interleave_under", "interleave_over")
T = TypeVar("T")


def interleave(
    sources: list[Callable[[], Iterator[T]]],
    *,
    probs: list[float] | None,
    stop: Literal["first_exhausted", "all_exhausted"],
    rng: random.Random,
) -> Iterator[tuple[int, T]]:
    """Mix several sources into one stream of (source index, item), like `datasets.interleave_datasets`.

    Each step takes the next item of a source drawn with `probs` (from `rng`), or of the next
    source in turn when `probs` is None. `sources` are functions that open a fresh iterator, so
    an exhausted source can be restarted. `first_exhausted` ends the stream once a source has run
    out; `all_exhausted` restarts a source that runs out and ends once every source has run out
    at least once (the shorter ones are oversampled). Round-robin mixing ends only after a full
    round, so every source gives the same number of items.

    >>> list(interleave([lambda: iter("ab"), lambda: iter("xyz")], probs=None, stop="first_exhausted",
    ...                 rng=random.Random(0)))
    [(0, 'a'), (1, 'x'), (0, 'b'), (1, 'y')]
    >>> "".join(item for _, item in interleave([lambda: iter("ab"), lambda: iter("xyz")], probs=None,
    ...                                        stop="all_exhausted", rng=random.Random(0)))
    'axbyaz'
    """
    if probs is not None and len(probs) != len(sources):
        raise ValueError(f"{len(probs)} probabilities for {len(sources)} sources")
    end = object()
    iterators = [open_source() for open_source in sources]
    try:
        upcoming = [next(it, end) for it in iterators]  # one item ahead: a source's end is seen when it is reached
        empty = [i for i, item in enumerate(upcoming) if item is end]
        if empty:
            raise ValueError(f"source {empty[0]} is empty")
        exhausted = [False] * len(sources)
        done = any if stop == "first_exhausted" else all
        cumulative = list(itertools.accumulate(probs)) if probs else None
        for step in itertools.count():
            if (cumulative or step % len(sources) == 0) and done(exhausted):
                return
            if cumulative:
                i = min(bisect.bisect_right(cumulative, rng.random() * cumulative[-1]), len(sources) - 1)
            else:
                i = step % len(sources)
            item, upcoming[i] = upcoming[i], next(iterators[i], end)
            if upcoming[i] is end:
                exhausted[i] = True
                if stop == "all_exhausted" and not all(exhausted):
                    _close(iterators[i])
                    iterators[i] = sources[i]()
                    upcoming[i] = next(iterators[i], end)
            yield i, item
    finally:
        for it in iterators:
            _close(it)


def _close(iterator: Iterator) -> None:
    close = getattr(iterator, "close", None)  # a generator holding an open file
    if close:
        close()


def _lines(path: Path) -> Iterator[str]:
    with open(path, encoding="utf-8") as f:
        yield from f


def write_interleaved(parts: list[Path], out: IO[str], **mixing: Any) -> list[int]:
    """Interleave the lines of aligned part files into `out`; returns the lines written from each."""
    written = [0] * len(parts)
    for i, line in interleave([lambda p=p: _lines(p) for p in parts], **mixing):
        out.write(line)
        written[i] += 1
    return written


def check_mixing(groups: dict[str, list[str]], mix_strategy: str, interleave_probs: list[float] | None) -> None:
    """Fail, naming the option, when the mixing options do not fit the groups."""
    if mix_strategy not in MIX_STRATEGIES:
        raise DataError(f"unknown mix_strategy {mix_strategy!r}; known: {', '.join(MIX_STRATEGIES)}")
    problem = interleave_probs_problem(groups, mix_strategy, interleave_probs)
    if problem:
        raise DataError(problem)


def phase_tasks(path: Path, weights: dict[str, float], phases: list[dict[str, float]], rng: random.Random,
                source: str = "") -> list[dict[str, dict[str, int]]]:
    """Rewrite an aligned group file with each task's rows repeated `weights[task]` times, then the rows of
    each later phase of a curriculum (data.sft_task_weights, data.sft_phases).

    A row's task is its record's `task` field. A weight of 2 writes every row of the task twice, 0.5 a
    seeded half of them, 0 none. A task `weights` does not name (and a row without a task, reported as
    "(none)") keeps its rows once; a task a phase does not name gets 0 there. Each phase is shuffled
    within itself, so repeats spread over it, and the phases follow each other, so a trainer reading the
    file in order sees them in turn. Two passes over the file (line offsets, then seeks), so memory holds
    16 bytes per written row, not the rows. Returns each phase's {task: {"rows_in", "rows_out"}};
    `source` names the rows' datasets in errors.
    """
    where = source or path.name
    offsets: dict[str, list[int]] = {}
    with open(path, "rb") as f:
        while True:
            start = f.tell()
            line = f.readline()
            if not line:
                break
            task = json.loads(line).get("task") or "(none)"
            offsets.setdefault(str(task), []).append(start)
    chosen: list[int] = []
    counts: list[dict[str, dict[str, int]]] = []
    for k, (phase, unnamed) in enumerate([(weights, 1.0)] + [(p, 0.0) for p in phases]):
        option = "data.sft_task_weights" if k == 0 else f"data.sft_phases[{k - 1}]"
        unknown = sorted(set(phase) - set(offsets))
        if unknown:
            raise DataError(f"{option} names {', '.join(map(repr, unknown))}, but no row of {where} has that "
                            f"task; tasks present: {', '.join(sorted(offsets))}. Fix the name, or map the datasets' "
                            "task column in dataset_info.json")
        picked: list[int] = []
        counts.append({})
        for task in sorted(offsets):
            rows = offsets[task]
            weight = phase.get(task, unnamed)
            whole, fraction = int(weight), weight - int(weight)
            taken = rows * whole + sorted(rng.sample(rows, round(fraction * len(rows))))
            picked += taken
            if taken or k == 0:
                counts[-1][task] = {"rows_in": len(rows), "rows_out": len(taken)}
        if not picked:
            raise DataError(f"{option} {phase} leaves no row of {where}; give some task a weight above 0")
        rng.shuffle(picked)
        chosen += picked
    with open(path, "rb") as src, atomic_file(path, "wb") as out:
        for start in chosen:
            src.seek(start)
            out.write(src.readline())
    return counts
