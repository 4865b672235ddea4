"""Datapath start-up at scale, without BGP or config parsing: the part of `vipd run` from
"configuration loaded" to "services programmed" (docs/datapath.md "Map writes").

N LoadBalancer-like frontends (one TCP port, one local backend out of 50 pods, M = 251, as
benchmarks/agent_scale.py's ScaleLab), programmed into a fresh pin directory:

* **cold**: capacity plan, ``Datapath.load`` (the loader child's compile + final load, then
  adoption of empty maps), first pass (``ServiceReconciler._apply``: every frontend written;
  Maglev slots copied into the mmap'ed array);
* **warm**: a second process-equivalent (new ``Datapath`` on the same pins): load + adoption
  of the N services, then the first pass with the same desired state, which must write 0;
* **reference** (same run): the same Maglev slots written with BPF_MAP_UPDATE_BATCH (64 Ki
  per call), as the agent did before the map was mmap-able.

    sudo .venv/bin/python benchmarks/datapath_start.py --services 20000

Not a test: it prints numbers. The compile (bcc) dominates "load" until helper P's program
cache lands; "load - compile" is what is left of it.
"""

from __future__ import annotations

import argparse
import ctypes
import ipaddress
import os
import sys
import time
from array import array
from pathlib import Path

if not os.environ.get("PYTHONPATH"):   # PYTHONPATH=<other checkout>: measure that one
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from agent.datapath import bpfsys  # noqa: E402
from agent.datapath.abi import MapName  # noqa: E402
from agent.datapath.api import Datapath, Features  # noqa: E402
from agent.datapath.capacity import plan_capacity  # noqa: E402
from agent.datapath.model import Backend, Proto, Service, ServiceKey  # noqa: E402
from agent.reconcilers.services import ServiceReconciler  # noqa: E402

PIN_ROOT = "/sys/fs/bpf/vipd-bench-dpstart"


def services(n: int) -> dict[ServiceKey, Service]:
    pods = [f"10.244.0.{i}" for i in range(1, 51)]
    base = int(ipaddress.ip_address("10.100.0.0"))
    out = {}
    for i in range(n):
        key = ServiceKey(ipaddress.ip_address(base + i + 1), 80, Proto.TCP)
        out[key] = Service(key, (Backend(pods[i % 50], 80, local=True),), maglev_m=251)
    return out


def start(instance: str, desired: dict) -> dict:
    """One agent start: plan, load (+ adopt), first pass. Returns the timings and writes."""
    t0 = time.monotonic()
    cap = plan_capacity(desired.values(), None)
    t1 = time.monotonic()
    dp = Datapath(instance, pin_root=PIN_ROOT, features=Features())
    dp.load(cap)
    t2 = time.monotonic()
    adopted = len(dp._plan.programmed)
    changed, failed = ServiceReconciler(dp, "bench")._apply(desired)
    t3 = time.monotonic()
    assert not failed, list(failed.items())[:3]
    return {"dp": dp, "plan_s": t1 - t0, "load_s": t2 - t1, "compile_s": dp._loaded.compile_s,
            "adopted": adopted, "pass_s": t3 - t2, "written": getattr(dp, "entries_written", "?"),
            "mmap": _view(dp.table(MapName.MAGLEV)) is not None}


def _view(tbl):
    """The mmap'ed slots (None: syscalls; also for a vipd from before the mapping, so this
    script can measure a checkout of that for comparison)."""
    if hasattr(tbl, "u32_window"):
        return tbl.u32_window()
    return tbl.u32_view() if hasattr(tbl, "u32_view") else None


def _read(view, start_: int, n: int) -> bytes:
    return view.read(start_, n) if hasattr(view, "read") else view[start_:start_ + n].tobytes()


def syscall_reference(dp: Datapath, slots: int) -> float:
    """Seconds to write ``slots`` Maglev slots (their current values) with BPF_MAP_UPDATE_BATCH."""
    tbl = dp.table(MapName.MAGLEV)
    chunk = 1 << 16
    view = _view(tbl)
    t0 = time.monotonic()
    for start_ in range(0, slots, chunk):
        n = min(chunk, slots - start_)
        keys = array("I", range(start_, start_ + n))
        vals = array("I", _read(view, start_, n)) if view is not None else array("I", bytes(4 * n))
        kbuf = (ctypes.c_char * (4 * n)).from_buffer(keys)
        vbuf = (ctypes.c_char * (4 * n)).from_buffer(vals)
        done, rc = bpfsys.update_batch(tbl.map_fd, kbuf, vbuf, n)
        if rc:
            raise OSError(-rc, os.strerror(-rc))
    return time.monotonic() - t0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--services", type=int, default=20000)
    args = p.parse_args()
    n = args.services
    instance = f"bench-{os.getpid()}"
    desired = services(n)
    print(f"{n} services, load average {os.getloadavg()[0]:.2f}")
    try:
        cold = start(instance, desired)
        slots = cold["dp"]._plan.alloc.top
        ref = syscall_reference(cold["dp"], slots)
        cold["dp"].close()
        warm = start(instance, desired)
        warm["dp"].close()
    finally:
        Datapath(instance, pin_root=PIN_ROOT).destroy()
        try:
            Path(PIN_ROOT).rmdir()   # only when empty: another run may be using it
        except OSError:
            pass
    for name, r in (("cold", cold), ("warm", warm)):
        print(f"{name}: plan {r['plan_s']:.3f} s, load {r['load_s']:.2f} s (compile {r['compile_s']:.2f} s, "
              f"rest {r['load_s'] - r['compile_s']:.2f} s; adopted {r['adopted']}), first pass {r['pass_s']:.2f} s, "
              f"entries+slots written {r['written']}, Maglev via mmap: {r['mmap']}")
    print(f"reference: {slots} Maglev slots by BPF_MAP_UPDATE_BATCH {ref:.2f} s "
          f"(the cold first pass, which includes copying them through the mapping, is {cold['pass_s'] / ref:.2f}x that)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
