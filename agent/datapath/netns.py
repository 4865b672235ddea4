"""Run a function inside a named network namespace (``ip netns`` name) without forking.

setns(2) on a network namespace changes only the calling thread, so the work runs on a
short-lived thread that enters the namespace first. Everything that opens netlink sockets
(XDP/tc attach) or depends on the current namespace (bpf_fib_lookup under
BPF_PROG_TEST_RUN) sees that namespace; file descriptors stay shared with the process.
"""

from __future__ import annotations

import ctypes
import os
import threading
from typing import Callable, TypeVar

T = TypeVar("T")
CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


def in_netns(netns: str | None, fn: Callable[[], T]) -> T:
    """Call ``fn()`` inside ``netns`` (or directly when None) and return its result."""
    if netns is None:
        return fn()
    path = f"/var/run/netns/{netns}"
    if not os.path.exists(path):
        raise FileNotFoundError(f"network namespace {netns!r} does not exist ({path})")
    box: dict[str, object] = {}

    def worker():
        try:
            fd = os.open(path, os.O_RDONLY)
            try:
                if _libc.setns(fd, CLONE_NEWNET) != 0:
                    err = ctypes.get_errno()
                    raise OSError(err, f"setns({path}): {os.strerror(err)}")
            finally:
                os.close(fd)
            box["result"] = fn()
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread
            box["error"] = exc

    t = threading.Thread(target=worker, name=f"netns-{netns}")
    t.start()
    t.join()
    if "error" in box:
        raise box["error"]  # type: ignore[misc]
    return box["result"]  # type: ignore[return-value]
