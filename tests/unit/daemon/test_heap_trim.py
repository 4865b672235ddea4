"""The agent gives freed heap back to the kernel after its passes (agent/memory.py): memory a
pass's worker thread allocated and dropped leaves the process's RSS, though live objects are
scattered through it (so glibc cannot simply shrink the heap's top)."""

from __future__ import annotations

import threading

import pytest

from agent.memory import rss_mb, trim_heap

pytestmark = pytest.mark.unit


def test_freed_memory_of_a_worker_thread_leaves_the_rss_after_trim_heap():
    kept = []

    def work():   # a pass in a worker thread: its own glibc arena
        blocks = [[i] * 200 for i in range(100_000)]   # ~160 MB of 1.6 KB blocks (malloc, not pymalloc)
        kept.extend(blocks[::64])                     # a few survive, spread over the arena
        del blocks

    t = threading.Thread(target=work)
    t.start()
    t.join()
    before = rss_mb()
    assert trim_heap(), "no malloc_trim in this C library"
    after = rss_mb()
    assert before - after > 50, f"RSS {before:.0f} MB -> {after:.0f} MB after trim_heap"
    assert len(kept) == 1563
