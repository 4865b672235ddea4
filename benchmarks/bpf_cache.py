"""Datapath.load with a cold vs a warm BPF program cache (agent/datapath/objcache.py).

Each round: an empty cache directory; ``Datapath.load()`` (a miss: the loader child imports
bcc and compiles bpf/xdp_lb.c and bpf/tc_lb.c, the agent stores the entry and loads it), the
datapath destroyed; then the same ``load()`` again (a hit: no child, the agent creates the maps
and calls BPF_PROG_LOAD itself), destroyed. Default ``Features`` (the production map sizes).
Printed per round and as the median of the rounds: the wall time of ``load()`` (what a caller
waits, including map creation at production sizes, the kernel-HZ probe and adoption, which
both do), of its programs part (miss: waiting for the child + loading; hit: reading the entry
+ loading), the child's compile time and peak RSS (the miss only), and the miss/hit ratio of
``load()`` measured in the same round. Run as root:

    PYTHONPATH=. python benchmarks/bpf_cache.py [--rounds 3]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from agent.datapath.api import Datapath  # noqa: E402
from agent.datapath.child import LoaderChild  # noqa: E402
from agent.datapath.objcache import ProgramCache  # noqa: E402

PIN_ROOT = f"/sys/fs/bpf/vipd-bench-pcache-{os.getpid()}"


def timed_load(name: str, cache: ProgramCache) -> tuple[float, Datapath]:
    dp = Datapath(name, pin_root=PIN_ROOT, bpf_cache=cache)
    t0 = time.monotonic()
    try:
        dp.load()
    except BaseException:
        dp.destroy()
        raise
    return time.monotonic() - t0, dp


def one_round(i: int) -> dict:
    with tempfile.TemporaryDirectory(prefix="vipd-bench-bpf-cache-") as d:
        cache = ProgramCache(Path(d) / "cache")
        children = LoaderChild.spawned
        miss_s, dp = timed_load(f"miss{i}", cache)
        compile_s, rss, miss_prog_s = dp._loaded.compile_s, dp._loaded.child_peak_rss_mb, dp._loaded.load_s
        assert not dp._loaded.from_cache and LoaderChild.spawned == children + 1
        dp.destroy()
        hit_s, dp = timed_load(f"hit{i}", cache)
        assert dp._loaded.from_cache and LoaderChild.spawned == children + 1
        hit_prog_s = dp._loaded.load_s
        dp.destroy()
        size = sum(p.stat().st_size for p in cache.entries())
    return {"miss_s": miss_s, "hit_s": hit_s, "miss_prog_s": miss_prog_s, "hit_prog_s": hit_prog_s,
            "compile_s": compile_s, "child_rss_mb": rss,
            "ratio": miss_s / hit_s, "entry_kb": size / 1024}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("run as root (bpf(2), bpffs)", file=sys.stderr)
        return 2
    print(f"load average at start: {os.getloadavg()[0]:.2f} ({os.cpu_count()} CPUs)")
    print(f"{'round':>5} {'miss (compile) s':>17} {'hit (cache) s':>14} {'programs: miss s':>17} "
          f"{'hit s':>6} {'child compile s':>16} {'child peak MB':>14} {'miss/hit':>9} {'entry KiB':>10}")
    rows = []
    try:
        for i in range(args.rounds):
            r = one_round(i)
            rows.append(r)
            print(f"{i + 1:>5} {r['miss_s']:>17.2f} {r['hit_s']:>14.2f} {r['miss_prog_s']:>17.2f} "
                  f"{r['hit_prog_s']:>6.2f} {r['compile_s']:>16.2f} "
                  f"{r['child_rss_mb']:>14.0f} {r['ratio']:>8.1f}x {r['entry_kb']:>10.0f}")
    finally:
        shutil.rmtree(PIN_ROOT, ignore_errors=True)
    med = {k: statistics.median(r[k] for r in rows) for k in rows[0]}
    print(f"{'med':>5} {med['miss_s']:>17.2f} {med['hit_s']:>14.2f} {med['miss_prog_s']:>17.2f} "
          f"{med['hit_prog_s']:>6.2f} {med['compile_s']:>16.2f} "
          f"{med['child_rss_mb']:>14.0f} {med['ratio']:>8.1f}x {med['entry_kb']:>10.0f}")
    print(f"load average at end: {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
