"""BPF_PROG_TEST_RUN through the bpf(2) syscall (bcc 0.26 has no Python wrapper for it).

``test_run(fd, frame)`` runs a loaded program once on a copy of ``frame`` and returns the
verdict, the output frame and the kernel-measured duration. ``TestRunner`` reuses its
buffers for benchmarks (one syscall per packet, so a rewriting program always sees a fresh
copy of the input: repeat > 1 would re-run it on its own output).
"""

from __future__ import annotations

import ctypes
import os
from dataclasses import dataclass

from agent.datapath.netns import in_netns

__all__ = ["RunResult", "TestRunner", "test_run"]

_NR_BPF = 321           # x86_64
_BPF_PROG_TEST_RUN = 10
_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


class _TestAttr(ctypes.Structure):
    """The BPF_PROG_TEST_RUN member of union bpf_attr (include/uapi/linux/bpf.h)."""

    _fields_ = [
        ("prog_fd", ctypes.c_uint32),
        ("retval", ctypes.c_uint32),
        ("data_size_in", ctypes.c_uint32),
        ("data_size_out", ctypes.c_uint32),
        ("data_in", ctypes.c_uint64),
        ("data_out", ctypes.c_uint64),
        ("repeat", ctypes.c_uint32),
        ("duration", ctypes.c_uint32),
        ("ctx_size_in", ctypes.c_uint32),
        ("ctx_size_out", ctypes.c_uint32),
        ("ctx_in", ctypes.c_uint64),
        ("ctx_out", ctypes.c_uint64),
        ("flags", ctypes.c_uint32),
        ("cpu", ctypes.c_uint32),
        ("batch_size", ctypes.c_uint32),
        ("_pad", ctypes.c_uint32),
    ]


@dataclass(frozen=True)
class RunResult:
    retval: int        # the program's return value (XDP_* / TC_ACT_*)
    data: bytes        # the frame after the program ran
    duration_ns: int   # kernel-measured run time (per repeat)


class _XdpMd(ctypes.Structure):
    """struct xdp_md: the XDP test run's ctx_in (data = 0, data_end = frame length)."""

    _fields_ = [("data", ctypes.c_uint32), ("data_end", ctypes.c_uint32), ("data_meta", ctypes.c_uint32),
                ("ingress_ifindex", ctypes.c_uint32), ("rx_queue_index", ctypes.c_uint32),
                ("egress_ifindex", ctypes.c_uint32)]


class TestRunner:
    """Repeated single runs of one program with preallocated buffers.

    ``ingress_ifindex`` (XDP only): the run sees ``ctx->ingress_ifindex`` = that interface,
    which must exist in the namespace the run happens in (so XDP_TX vs redirect decisions and
    FIB lookups behave as on that interface)."""

    def __init__(self, prog_fd: int, max_out: int = 4096, ingress_ifindex: int = 0):
        self.prog_fd = prog_fd
        self._out = ctypes.create_string_buffer(max_out)
        self._in = ctypes.create_string_buffer(max_out)
        self._attr = _TestAttr()
        self._attr.prog_fd = prog_fd
        self._attr.data_out = ctypes.addressof(self._out)
        self._attr.data_in = ctypes.addressof(self._in)
        self._max_out = max_out
        self._ctx = None
        if ingress_ifindex:
            self._ctx = _XdpMd(ingress_ifindex=ingress_ifindex)
            self._attr.ctx_in = ctypes.addressof(self._ctx)
            self._attr.ctx_size_in = ctypes.sizeof(self._ctx)

    def load(self, frame: bytes) -> None:
        """Set the input frame (kept until the next load; patch it with ``input_buffer``)."""
        if len(frame) > self._max_out:
            raise ValueError("frame larger than the runner's buffer")
        ctypes.memmove(self._in, frame, len(frame))
        self._attr.data_size_in = len(frame)
        if self._ctx is not None:
            self._ctx.data_end = len(frame)

    @property
    def input_buffer(self):
        return self._in

    @property
    def output_buffer(self):
        """The last run's output frame, in place (no copy; valid until the next run)."""
        return self._out

    def run_loaded(self, repeat: int = 1) -> tuple[int, int]:
        """Run on the loaded frame; returns (retval, duration_ns). No output copy to Python."""
        a = self._attr
        a.repeat = repeat
        a.data_size_out = self._max_out
        rc = _libc.syscall(_NR_BPF, _BPF_PROG_TEST_RUN, ctypes.byref(a), ctypes.sizeof(a))
        if rc != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"BPF_PROG_TEST_RUN: {os.strerror(err)}")
        return a.retval, a.duration

    def output(self) -> bytes:
        return self._out.raw[: self._attr.data_size_out]

    def run(self, frame: bytes, repeat: int = 1) -> RunResult:
        self.load(frame)
        retval, duration = self.run_loaded(repeat)
        return RunResult(retval, self.output(), duration)


def test_run(prog_fd: int, frame: bytes, *, repeat: int = 1, netns: str | None = None,
             ingress_ifindex: int = 0) -> RunResult:
    """Run ``prog_fd`` once on ``frame``; inside ``netns`` when given (bpf_fib_lookup uses the
    routes and neighbours of the namespace the run happens in), arriving on ``ingress_ifindex``
    (an interface of that namespace; XDP only) when given."""
    runner = TestRunner(prog_fd, max(4096, len(frame) + 512), ingress_ifindex=ingress_ifindex)
    return in_netns(netns, lambda: runner.run(bytes(frame), repeat))


test_run.__test__ = False  # not a pytest test
TestRunner.__test__ = False
