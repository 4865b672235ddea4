"""ns per packet of the vipd XDP program under BPF_PROG_TEST_RUN.

Method (reference/datapath.md §4.1, Katran's katran_tester): one syscall per packet with
repeat=1, so a program that rewrites the packet always runs on a fresh copy of the input;
the statistic is the kernel-measured ``duration`` of each run; median (and p10/p99) over
``--runs`` runs (default 200,000) per case, pinned to one CPU.

Cases, for 1, 1,000 and 100,000 services (the measured service is the last one added):
  floor  xdp_pass            returns XDP_PASS (harness cost)
  floor  xdp_parse           the datapath's own parser (parse.h), nothing else
  established                one TCP flow, conntrack hit, DNAT to a local backend
  new flow (SYN)             the same SYN, its conntrack entries deleted between runs (outside
                             the timed region; Katran's SYN method): CT miss + Maglev + one
                             conntrack insert (the backends' designated service: its replies
                             need no REPLY entry) + DNAT, warm caches
  non-service                a packet to an address that is no VIP
  new flow (SYN), +REPLY     the same through a second service of the same backends (not their
                             designated service): two conntrack inserts, as every local flow
                             paid before, and as all do with Features(derive_local_replies=False)
  new flow, 200k distinct    a new 5-tuple every run (200k SYNs: inserts spread over the table)
  established, 200k flows    ACKs over the 200k flows the previous case created (cache misses)
  tc_egress reply, derived   the backend's reply of a designated flow (revnat + SERVICE lookups)
  tc_egress reply, REPLY     the reply of a flow with a REPLY entry (one lookup)
  tc_egress non-service      an egress packet of no flow (REPLY miss + revnat miss)
Ratios are to the parse-only floor measured in the same run (the tc rows too, for scale only:
tc test runs include skb setup, so they are not comparable with the XDP rows).
Targets: established <= 3.0x floor, new flow <= 5.0x floor, no growth with service count.

Run:  sudo .venv/bin/python benchmarks/datapath_ns.py [--runs 200000] [--services 1,1000,100000]
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import shutil
import statistics
import struct
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from scapy.layers.inet import IP, TCP  # noqa: E402
from scapy.layers.l2 import Ether  # noqa: E402
from scapy.packet import Raw  # noqa: E402

from agent.datapath.abi import MapName  # noqa: E402
from agent.datapath.api import Datapath, Features  # noqa: E402
from agent.datapath.loader import BPF_DIR, bundle, compile_program, import_bcc  # noqa: E402
from agent.datapath.model import Backend, Proto, Service, ServiceKey  # noqa: E402
from agent.datapath.testrun import TestRunner  # noqa: E402

PIN_ROOT = "/sys/fs/bpf/vipd-bench"
VIP = "10.96.0.10"
VIP2 = "10.96.0.11"     # a second service of the measured service's backends
CLIENT = "192.0.2.42"
SADDR_OFF, SPORT_OFF = 14 + 12, 14 + 20   # offsets in an untagged IPv4/TCP frame


def frame(dst: str, flags: str, src: str = CLIENT, sport: int = 31337) -> bytes:
    # 64 bytes: Ethernet + IPv4 + TCP + 10 bytes of payload (as in reference §4.1)
    return bytes(Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02") / IP(src=src, dst=dst)
                 / TCP(sport=sport, dport=80, flags=flags) / Raw(b"0123456789"))


def summarize(durations: list[int]) -> dict[str, float]:
    d = sorted(durations)
    n = len(d)
    return {"median": statistics.median(d), "p10": d[n // 10], "p99": d[min(n - 1, n * 99 // 100)],
            "mean": sum(d) / n}


def time_fixed(runner: TestRunner, data: bytes, runs: int) -> list[int]:
    runner.load(data)
    run = runner.run_loaded
    return [run()[1] for _ in range(runs)]


def time_distinct(runner: TestRunner, data: bytes, runs: int, base: int, expect: int | None) -> list[int]:
    """Each run gets its own source address and port (a new 5-tuple)."""
    runner.load(data)
    buf = runner.input_buffer
    run = runner.run_loaded
    pack = struct.pack_into
    out = []
    for i in range(runs):
        pack("!I", buf, SADDR_OFF, base + i)
        pack("!H", buf, SPORT_OFF, 1024 + i % 60000)
        rv, dur = run()
        if expect is not None and rv != expect:
            raise SystemExit(f"unexpected verdict {rv} in run {i}")
        out.append(dur)
    return out


def ct_keys_of_syn(dp: Datapath, backend: str, vip: str = VIP) -> list:
    """The conntrack keys a SYN frame can create (forward client->VIP, and reply backend->client
    for flows of a backend's non-designated services; deleting an absent key is a no-op)."""
    tbl = dp.table(MapName.CT)

    def key(saddr, sport, daddr, dport, direction):
        k = tbl.Key()
        k.saddr[0] = int.from_bytes(ipaddress.ip_address(saddr).packed, "little")
        k.daddr[0] = int.from_bytes(ipaddress.ip_address(daddr).packed, "little")
        k.sport, k.dport = struct.unpack("<H", struct.pack("!H", sport))[0], struct.unpack("<H", struct.pack("!H", dport))[0]
        k.proto, k.family, k.dir = 6, 4, direction
        return k

    return [key(CLIENT, 31337, vip, 80, 1), key(backend, 8080, CLIENT, 31337, 2)]


def time_new_flow_same_tuple(dp: Datapath, runner: TestRunner, data: bytes, runs: int,
                             vip: str = VIP) -> list[int]:
    """Katran's SYN method: the same SYN every run, but its conntrack entries are deleted
    (outside the timed region) before each run, so every run takes the full new-flow path
    (lookup miss, Maglev, insert(s), DNAT) with warm caches."""
    r = runner.run(data)
    backend = Ether(r.data)[IP].dst
    keys = ct_keys_of_syn(dp, backend, vip)
    tbl = dp.table(MapName.CT)
    from bcc.libbcc import lib
    import ctypes
    fd = tbl.map_fd
    ptrs = [ctypes.byref(k) for k in keys]
    runner.load(data)
    out = []
    for _ in range(runs):
        for p in ptrs:
            lib.bpf_delete_elem(fd, p)
        rv, dur = runner.run_loaded()
        out.append(dur)
    if not dp.conntrack():
        raise SystemExit("new-flow runs created no conntrack entries")
    return out


def add_fillers(dp: Datapath, have: int, want: int) -> None:
    """Services 10.200.0.0 + i, port 80/TCP, M=251, one local backend each (distinct tables)."""
    base = int(ipaddress.ip_address("10.200.0.0"))
    for i in range(have, want):
        vip = ipaddress.ip_address(base + i)
        backend = ipaddress.ip_address(int(ipaddress.ip_address("10.2.0.0")) + i % 60000)
        dp.upsert_service(Service(ServiceKey(vip, 80, Proto.TCP), (Backend(backend, 8080, local=True),),
                                  maglev_m=251))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=200_000)
    ap.add_argument("--services", default="1,1000,100000")
    ap.add_argument("--cpu", type=int, default=0)
    args = ap.parse_args()
    counts = [int(x) for x in args.services.split(",")]
    os.sched_setaffinity(0, {args.cpu})

    bcc = import_bcc()
    floors = compile_program(bundle(BPF_DIR / "xdp_floor.c"), {})
    pass_run = TestRunner(floors.load_func(b"xdp_pass", bcc.BPF.XDP).fd)
    parse_run = TestRunner(floors.load_func(b"xdp_parse", bcc.BPF.XDP).fd)

    need_slots = max(counts) * 251 + 16381 + 1024
    feats = Features(max_services=max(131072, max(counts) + 2), maglev_slots=1 << max(16, need_slots.bit_length()),
                     ct_size=1 << 20)
    dp = Datapath(f"bench-{os.getpid()}", pin_root=PIN_ROOT, features=feats)
    t0 = time.monotonic()
    dp.load()
    print(f"# compiled+loaded in {time.monotonic() - t0:.1f}s; runs per case: {args.runs}; CPU {args.cpu}")
    lb_run = TestRunner(dp.program_fd("xdp"))
    tc_run = TestRunner(dp.program_fd("tc-egress"))
    measured = Service(ServiceKey(VIP, 80, Proto.TCP),
                       tuple(Backend(f"10.1.0.{i}", 8080, local=True) for i in range(1, 11)), maglev_m=16381)
    shared = Service(ServiceKey(VIP2, 80, Proto.TCP), measured.backends, maglev_m=16381)
    rows = []
    have = 0
    try:
        for n_idx, n in enumerate(counts):
            t0 = time.monotonic()
            dp.delete_service(measured.key)
            dp.delete_service(shared.key)
            add_fillers(dp, have, n - 1)
            have = max(have, n - 1)
            dp.upsert_service(measured)     # first: its backends' designated service
            dp.upsert_service(shared)
            dp.table(MapName.CT).items_delete_batch()   # each block starts with empty conntrack
            setup_s = time.monotonic() - t0
            syn, ack, other = frame(VIP, "S"), frame(VIP, "A"), frame("10.97.0.1", "A")
            # sanity: the measured service translates
            r = lb_run.run(syn)
            assert Ether(r.data)[IP].dst.startswith("10.1.0."), "service not translated"
            res = {}
            res["floor xdp_pass"] = summarize(time_fixed(pass_run, syn, args.runs))
            res["floor xdp_parse"] = summarize(time_fixed(parse_run, syn, args.runs))
            res["established"] = summarize(time_fixed(lb_run, ack, args.runs))
            base = int(ipaddress.ip_address("100.64.0.0")) + n_idx * 0x40000
            res["new flow (SYN)"] = summarize(time_new_flow_same_tuple(dp, lb_run, syn, args.runs))
            res["new flow (SYN), +REPLY"] = summarize(
                time_new_flow_same_tuple(dp, lb_run, frame(VIP2, "S"), args.runs, vip=VIP2))
            res["non-service"] = summarize(time_fixed(lb_run, other, args.runs))
            res["new flow, 200k distinct"] = summarize(time_distinct(lb_run, syn, args.runs, base, expect=2))
            res["established, 200k flows"] = summarize(time_distinct(lb_run, ack, args.runs, base, expect=2))
            # replies through tc egress: a designated flow (sport 40001) and a REPLY-entry flow (40002)
            replies = {}
            for sport, vip in ((40001, VIP), (40002, VIP2)):
                b = Ether(lb_run.run(frame(vip, "S", sport=sport)).data)[IP].dst
                replies[vip] = bytes(Ether(src="02:00:00:00:00:02", dst="02:00:00:00:00:01") / IP(src=b, dst=CLIENT) / TCP(sport=8080, dport=sport, flags="A")
                                     / Raw(b"0123456789"))
                out = tc_run.run(replies[vip]).data
                assert Ether(out)[IP].src == vip, "reply not reversed"
            res["tc_egress reply, derived"] = summarize(time_fixed(tc_run, replies[VIP], args.runs))
            res["tc_egress reply, REPLY"] = summarize(time_fixed(tc_run, replies[VIP2], args.runs))
            res["tc_egress non-service"] = summarize(time_fixed(tc_run, other, args.runs))
            floor = res["floor xdp_parse"]["median"]
            for case, st in res.items():
                rows.append((n, case, st, st["median"] / floor))
            print(f"# {n} services programmed (setup {setup_s:.1f}s)")
        c = dp.counters()
        print(f"# counters: ct_new={c.stat('xdp', 'ct_new')} ct_hit={c.stat('xdp', 'ct_hit')} "
              f"drops={sum(c.drops.values())}")
    finally:
        dp.destroy()
        shutil.rmtree(PIN_ROOT, ignore_errors=True)

    print()
    print(f"{'services':>9}  {'case':<26}{'median ns':>10}{'p10':>7}{'p99':>7}{'mean':>8}  {'x parse floor':>13}")
    for n, case, st, ratio in rows:
        print(f"{n:>9}  {case:<26}{st['median']:>10.0f}{st['p10']:>7.0f}{st['p99']:>7.0f}{st['mean']:>8.0f}  {ratio:>12.2f}x")

    print()
    ok = True
    by = {(n, case): ratio for n, case, _, ratio in rows}
    med = {(n, case): st["median"] for n, case, st, _ in rows}
    for n in counts:
        for case, limit in (("established", 3.0), ("new flow (SYN)", 5.0)):
            verdict = "ok" if by[(n, case)] <= limit else "MISSED"
            ok &= verdict == "ok"
            print(f"target {case:<16} <= {limit:.1f}x floor at {n:>6} services: {by[(n, case)]:.2f}x  {verdict}")
    for case in ("established", "new flow (SYN)", "non-service", "tc_egress reply, derived"):
        first, last = med[(counts[0], case)], med[(counts[-1], case)]
        growth = last - first
        print(f"growth {case:<16} {counts[0]} -> {counts[-1]} services: {growth:+.0f} ns "
              f"({'flat' if growth <= max(10, 0.15 * first) else 'GROWS'})")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
