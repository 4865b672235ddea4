"""Giving freed heap memory back to the kernel after the start-up passes.

The first passes at 20,000 Services build and drop tens of MB of short-lived objects (the
capacity plan, the first frontends and map writes, the first UPDATE flood) in several
threads. glibc keeps what is freed in its per-thread arenas, where later allocations of the
event-loop thread cannot reuse it, and returns it to the kernel only from the top of each
heap. ``malloc_trim(0)`` releases the free pages inside every arena too (glibc >= 2.8).
"""

from __future__ import annotations

import ctypes
import ctypes.util

__all__ = ["trim_heap", "rss_mb"]

_libc = None


def rss_mb() -> float:
    """The process's resident memory (VmRSS) in MB; 0.0 where /proc is not readable."""
    try:
        with open("/proc/self/status", "rb") as fh:
            for line in fh:
                if line.startswith(b"VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def trim_heap() -> bool:
    """``malloc_trim(0)``: False where the C library has none (musl, non-Linux)."""
    global _libc
    if _libc is None:
        try:
            _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            _libc.malloc_trim.argtypes = [ctypes.c_size_t]
        except (OSError, AttributeError):
            _libc = False
    if not _libc:
        return False
    _libc.malloc_trim(0)
    return True
