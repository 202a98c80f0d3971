"""Peak memory of a block: the resident peak is reset at the block's start, so it is the block's own."""

from __future__ import annotations

import mmap
import sys

import pytest

from components import resources
from components.resources import PeakMemory

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="VmHWM and clear_refs are Linux's")


def _touch_fresh_pages(mb: int) -> None:
    """Make `mb` MB resident, then hand them back. Fresh pages from the kernel: a malloc'd block could
    be carved from heap memory an earlier test freed but the process still holds, and so add nothing
    to the resident set (this test failed that way in CI, after the suite's model tests)."""
    block = mmap.mmap(-1, mb * 2**20)
    for offset in range(0, len(block), mmap.PAGESIZE):
        block[offset] = 1
    block.close()


def test_a_block_reports_its_own_resident_peak_not_the_process_lifetime_one() -> None:
    with PeakMemory() as big:
        _touch_fresh_pages(300)
    with PeakMemory() as small:
        _touch_fresh_pages(20)
    assert big.rss_mb is not None and small.rss_mb is not None
    assert big.rss_mb - small.rss_mb > 200  # the second block's peak no longer includes the first's 300 MB
    assert big.metrics("stage_") == {"stage_peak_rss_mb": round(big.rss_mb, 1)}  # no CUDA in use: no GPU figure


def test_where_the_peak_cannot_be_reset_no_figure_is_given(monkeypatch, tmp_path) -> None:
    # Not the process's lifetime peak under this block's name: nothing.
    monkeypatch.setattr(resources, "_CLEAR_REFS", tmp_path / "absent" / "clear_refs")
    with PeakMemory() as peak:
        _touch_fresh_pages(20)
    assert peak.rss_mb is None and peak.metrics() == {}


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
