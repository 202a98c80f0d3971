"""Peak memory of a block: the resident peak is reset at the block's start, so it is the block's own."""

from __future__ import annotations

import sys

import pytest

from components.resources import PeakMemory

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="VmHWM and clear_refs are Linux's")


def test_a_block_reports_its_own_resident_peak_not_the_process_lifetime_one() -> None:
    with PeakMemory() as big:
        block = b"\x01" * (300 * 2**20)  # written: resident
        del block
    with PeakMemory() as small:
        block = b"\x01" * (20 * 2**20)
        del block
    assert big.rss_mb is not None and small.rss_mb is not None
    assert big.rss_mb - small.rss_mb > 200  # the second block's peak no longer includes the first's 300 MB
    assert big.metrics("stage_") == {"stage_peak_rss_mb": round(big.rss_mb, 1)}  # no CUDA in use: no GPU figure


def _rss_mb() -> float:
    import re
    from pathlib import Path

    return int(re.search(r"^VmRSS:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M).group(1)) / 1024


def test_freed_heap_memory_is_handed_back() -> None:
    from components.resources import release_free_memory

    blocks = [b"\x01" * (100 * 1024) for _ in range(3000)]  # 300 MB in heap-sized blocks
    pin = b"\x02" * (100 * 1024)  # allocated last: the heap cannot simply shrink from its top
    del blocks
    before = _rss_mb()
    release_free_memory()
    assert before - _rss_mb() > 200, "freed blocks stayed resident"
    del pin
