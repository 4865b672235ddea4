"""ns per packet of the vipd XDP program under BPF_PROG_TEST_RUN, local and remote backends.

Method (reference/datapath.md §4.1, Katran's katran_tester): one syscall per packet with
repeat=1, so a program that rewrites the packet always runs on a fresh copy of the input
(repeat > 1 re-runs it on its own output: valid only for the floors, and not used here);
the statistic is the kernel-measured ``duration`` of each run; per case the median over
``--runs`` runs, pinned to one CPU. Every case is measured ``--rounds`` times (default 3,
rounds interleaved with the floors), and the reported figure is the median of the rounds'
medians; each ratio divides a round's median by the XDP_PASS floor of the *same round*.
The kernel's duration ticks in ~10 ns steps on this machine kind, so the interquartile mean
(IQM) of each case is printed too (and its ratio to the floor's IQM); targets use medians.

All XDP runs happen inside a network namespace the benchmark creates ("node": a veth to
"peer", routes to the remote backends 10.2.0.0/16 and to the clients via the peer, a
permanent neighbour entry for the peer), arriving on the node's veth (test_run's ctx
``ingress_ifindex``), so ``bpf_fib_lookup`` succeeds and a remote backend's packet leaves
with XDP_TX, as on a load balancer "on a stick".

Cases, for 1 and 20,000 services (the measured services are the last ones added):
  floor xdp_pass              returns XDP_PASS: harness cost (the denominator of the ratios)
  floor xdp_parse             the datapath's parser (parse.h), nothing else
  <mode> established          one TCP flow (ACK), conntrack hit
  <mode> SYN                  the same SYN each run, its conntrack entries deleted between runs
                              (outside the timed region; Katran's SYN method): the whole
                              new-flow path with warm caches
  <mode> ACK, 100k flows      ACKs over 100k distinct flows created just before (by 100k SYNs,
                              not timed): conntrack hits spread over the table (cache misses)
  non-service                 a packet to an address that is no VIP
  local SYN, +REPLY           a SYN through a second service of the local backends (not their
                              designated one): two conntrack inserts
  tc_egress reply, derived    a designated local flow's reply (revnat + SERVICE lookups)
  tc_egress reply, REPLY      the reply of a flow with a REPLY entry (one lookup)
  tc_egress non-service       an egress packet of no flow (tc test runs include skb setup:
                              compare tc rows only with each other)
for the modes
  local                       DNAT to a local backend, XDP_PASS to the stack
  DSR                         remote backend, DNAT + IPv4 DSR option (first packet), XDP_TX
  SNAT                        remote backend, DNAT + SNAT to node:port, XDP_TX
Targets (issue 8; Katran on this machine kind in one run with a ~100 ns floor: 280 / 511 /
491 ns): remote established <= 2.8x, SYN <= 5.0x, ACK over 100k flows <= 4.9x the floor;
local no worse than before; flat from 1 to 20,000 services. The verifier's processed
instructions of every program are printed too.

Run:  sudo .venv/bin/python benchmarks/datapath_ns.py [--runs 100000] [--services 1,20000]
A/B:  ... --ab-bpf /path/to/other/bpf  also loads the programs of another version of the C
      sources (same map and field names: e.g. a layout change reverted), runs every round on
      both with the order alternating, and prints the per-round paired differences: on a
      machine whose load moves a case by +-100 ns between invocations, the only comparison
      that holds (the targets and ratios above are this build's). Identical code still
      differed by up to +-230 ns in the 100k-flow cases of one invocation (the SNAT rows of a
      DSR-only change; mostly the build loaded first read slower), so run it again with the
      dirs swapped (--bpf DIR: this build's sources), take both orders' differences and watch
      an unchanged mode's rows as the control.
"""

from __future__ import annotations

import argparse
import ctypes
import ipaddress
import json
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
from agent.datapath.snatports import snat_search_start, snat_slot_index  # noqa: E402
from agent.datapath.loader import BPF_DIR, bundle, compile_program, import_bcc, verified_insns  # noqa: E402
from agent.datapath.model import Backend, Mode, Proto, Service, ServiceKey  # noqa: E402
from agent.datapath.netns import in_netns  # noqa: E402
from agent.datapath.testrun import TestRunner  # noqa: E402
from agent.lab import Lab  # noqa: E402

PIN_ROOT = "/sys/fs/bpf/vipd-bench"
VIPS = {"local": "10.96.0.10", "DSR": "10.96.0.20", "SNAT": "10.96.0.30"}
VIP_SHARED = "10.96.0.11"   # a second service of the local backends (flows need a REPLY entry)
NODE, PEER = "10.0.0.1", "10.0.0.2"
CLIENT = "192.0.2.42"
FLOWS_BASE = "100.64.0.0"   # sources of the 100k-flow cases (routed via the peer)
SADDR_OFF, SPORT_OFF = 14 + 12, 14 + 20   # offsets in an untagged IPv4/TCP frame
DADDR_OFF = 14 + 16
XDP_PASS, XDP_TX = 2, 3
EXPECT = {"local": XDP_PASS, "DSR": XDP_TX, "SNAT": XDP_TX}


def frame(dst: str, flags: str, src: str = CLIENT, sport: int = 31337) -> bytes:
    # 64 bytes: Ethernet + IPv4 + TCP + 10 bytes of payload (as in reference §4.1)
    return bytes(Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02") / IP(src=src, dst=dst)
                 / TCP(sport=sport, dport=80, flags=flags) / Raw(b"0123456789"))


def iqm(d: list[int]) -> float:
    """Interquartile mean: the kernel's duration ticks in ~10 ns steps here, so a median can sit
    a whole step away from the typical value (a floor of ~115 ns reads 110 or 120)."""
    d = sorted(d)
    q = len(d) // 4
    mid = d[q:len(d) - q] or d
    return sum(mid) / len(mid)


def time_fixed(runner: TestRunner, data: bytes, runs: int, expect: int | None = None) -> list[int]:
    runner.load(data)
    run = runner.run_loaded
    if expect is not None and run()[0] != expect:
        raise SystemExit(f"unexpected verdict {run()[0]}, want {expect}")
    return [run()[1] for _ in range(runs)]


def time_distinct(runner: TestRunner, data: bytes, runs: int, base: int, expect: int) -> list[int]:
    """Each run gets its own source address and port (a new 5-tuple); the same base and runs
    give the same tuples, so SYNs then ACKs make "ACK over N flows"."""
    runner.load(data)
    buf = runner.input_buffer
    run = runner.run_loaded
    pack = struct.pack_into
    out = []
    for i in range(runs):
        pack("!I", buf, SADDR_OFF, base + i)
        pack("!H", buf, SPORT_OFF, 1024 + i % 60000)
        rv, dur = run()
        if rv != expect:
            raise SystemExit(f"unexpected verdict {rv} in run {i} (want {expect}): {bytes(buf[:64]).hex()}")
        out.append(dur)
    return out


def _be16(v: int) -> int:
    return struct.unpack("<H", struct.pack("!H", v))[0]


def _w(addr: str) -> int:
    return int.from_bytes(ipaddress.ip_address(addr).packed, "little")


def ct_key(tbl, saddr: str, sport: int, daddr: str, dport: int, direction: int):
    k = tbl.Key()
    k.saddr[0], k.daddr[0] = _w(saddr), _w(daddr)
    k.sport, k.dport = _be16(sport), _be16(dport)
    k.proto, k.family, k.dir = 6, 4, direction
    return k


def time_syn(dp: Datapath, runner: TestRunner, data: bytes, runs: int, mode: str, vip: str) -> list[int]:
    """Katran's SYN method: the same SYN every run, its conntrack entries deleted (outside the
    timed region) before each run, so every run takes the full new-flow path."""
    from agent.datapath import bpfsys
    runner.load(data)
    rv, _ = runner.run_loaded()
    if rv != EXPECT[mode]:
        raise SystemExit(f"{mode} SYN: verdict {rv}, want {EXPECT[mode]}")
    backend = str(ipaddress.ip_address(runner.output()[DADDR_OFF:DADDR_OFF + 4]))
    tbl = dp.table(MapName.CT)
    fd = tbl.map_fd
    fwd = ct_key(tbl, CLIENT, 31337, vip, 80, 1)
    # local: the REPLY entry of a non-designated flow (absent for designated ones: no-op);
    # SNAT: the node port's slot {backend:8080 -> node:nat_port}, nat_port read from each
    # output, and the flow's index entry (an --ab-bpf build from before SNAT lines; SNAT flows
    # have no SERVICE entry). A flow-table line (DSR, and SNAT since SNAT lines) stays: the SYN
    # takes it back in place, as a retransmitted or re-balanced SYN does
    rep = ct_key(tbl, backend, 8080, CLIENT, 31337, 2)
    slots = dp.table(MapName.SNAT_PORTS)
    free_slot = slots.Leaf()
    seed, nslots = dp.features.hash_seed, dp.features.snat_slots
    flows_fd = dp.table("snat_flows_v1").map_fd
    flow_idx = ctypes.c_uint32(snat_search_start(CLIENT, 31337, vip, 80, 6, seed) & (nslots - 1))
    no_flow = ctypes.c_uint32(0)
    delete, update = bpfsys.delete, bpfsys.update
    outbuf = runner.output_buffer   # the output frame: SNAT's node port is its TCP source port
    run = runner.run_loaded
    out = []
    for _ in range(runs):
        delete(fd, fwd)
        if mode == "SNAT":
            nat_port = struct.unpack_from("!H", outbuf, SPORT_OFF)[0]
            idx = ctypes.c_uint32(snat_slot_index(backend, 8080, nat_port, 6, seed, nslots))
            update(slots.map_fd, idx, free_slot)
            update(flows_fd, flow_idx, no_flow)
        elif mode == "local":
            delete(fd, rep)
        rv, dur = run()
        out.append(dur)
    return out


def clear_flows(dp: Datapath) -> None:
    """Forget every flow: conntrack, the SNAT node-port slots and flow index, the DSR flow table
    (arrays: zeroed in one batch each; an --ab-bpf build without the DSR table skips it)."""
    from agent.datapath import bpfsys
    ct = dp.table(MapName.CT)
    keys = [k for k, _ in ct.items_lookup_batch()]
    if keys:
        bpfsys.delete_batch(ct.map_fd, (ct.Key * len(keys))(*keys), len(keys))
    arrays = [MapName.SNAT_PORTS, "snat_flows_v1"] + [MapName.DSR_FLOWS] * has_map(dp, MapName.DSR_FLOWS)
    for tbl in map(dp.table, arrays):
        n = tbl.max_entries
        _, rc = bpfsys.update_batch(tbl.map_fd, (tbl.Key * n)(*range(n)), (tbl.Leaf * n)(), n)
        if rc:
            raise SystemExit(f"clearing {tbl.name}: {os.strerror(-rc)}")


def has_map(dp: Datapath, name: str) -> bool:
    try:
        dp.table(name)
    except KeyError:
        return False
    return True


def add_fillers(dp: Datapath, have: int, want: int) -> None:
    """Services 10.200.0.0 + i, port 80/TCP, M=251, one local backend each (distinct tables)."""
    base = int(ipaddress.ip_address("10.200.0.0"))
    for i in range(have, want):
        vip = ipaddress.ip_address(base + i)
        backend = ipaddress.ip_address(int(ipaddress.ip_address("10.3.0.0")) + i % 60000)
        dp.upsert_service(Service(ServiceKey(vip, 80, Proto.TCP), (Backend(backend, 8080, local=True),),
                                  maglev_m=251))


def measured_services() -> list[Service]:
    local = tuple(Backend(f"10.1.0.{i}", 8080, local=True) for i in range(1, 11))
    remote = tuple(Backend(f"10.2.0.{i}", 8080) for i in range(1, 33))
    return [Service(ServiceKey(VIPS["local"], 80, Proto.TCP), local, maglev_m=16381),
            Service(ServiceKey(VIP_SHARED, 80, Proto.TCP), local, maglev_m=16381),
            Service(ServiceKey(VIPS["DSR"], 80, Proto.TCP), remote, mode=Mode.DSR, maglev_m=16381),
            Service(ServiceKey(VIPS["SNAT"], 80, Proto.TCP), remote, mode=Mode.SNAT, maglev_m=16381)]


def drop_totals(dp: Datapath) -> dict[str, int]:
    """Drops so far by reason (summed over CPUs): a case whose verdicts are not all checked
    (the SYN method's, the warm-up runs) must still not hide a refusal."""
    from agent.datapath.abi import DropReason
    dt = dp.table(MapName.DROPS)
    return {r.name: int(sum(dt[dt.Key(r)])) for r in DropReason}


def one_round(dp, runners, args, flows_base: int) -> dict[str, list[int]]:
    """All cases once; returns case -> durations. Runs inside the bench namespace."""
    os.sched_setaffinity(0, {args.cpu})
    seen = drop_totals(dp)

    def no_new_drops(case: str) -> None:
        nonlocal seen
        now = drop_totals(dp)
        new = {k: now[k] - seen[k] for k in now if now[k] != seen[k]}
        seen = now
        if new:
            raise SystemExit(f"{case}: drops {new} (every run of a case must take the measured path)")
    lb, floor_pass, floor_parse = runners["lb"], runners["pass"], runners["parse"]
    res: dict[str, list[int]] = {}
    ack_any = frame(VIPS["local"], "A")
    res["floor xdp_pass"] = time_fixed(floor_pass, ack_any, args.runs)
    res["floor xdp_parse"] = time_fixed(floor_parse, ack_any, args.runs)
    for i, mode in enumerate(("local", "DSR", "SNAT")):
        if mode not in args.modes:
            continue
        vip = VIPS[mode]
        clear_flows(dp)
        syn, ack = frame(vip, "S"), frame(vip, "A")
        lb.load(syn)
        lb.run_loaded()
        res[f"{mode} established"] = time_fixed(lb, ack, args.runs, expect=EXPECT[mode])
        no_new_drops(f"{mode} established")
        res[f"{mode} SYN"] = time_syn(dp, lb, syn, args.runs, mode, vip)
        no_new_drops(f"{mode} SYN")
        base = flows_base + i * 0x40000
        time_distinct(lb, syn, args.flows, base, EXPECT[mode])          # create the flows
        res[f"{mode} ACK, {args.flows // 1000}k flows"] = time_distinct(lb, ack, args.flows, base, EXPECT[mode])
        no_new_drops(f"{mode} ACK, {args.flows // 1000}k flows")
    clear_flows(dp)
    if "local" in args.modes:
        res["local SYN, +REPLY"] = time_syn(dp, lb, frame(VIP_SHARED, "S"), args.runs, "local", VIP_SHARED)
        # replies through tc egress: a designated flow (sport 40001) and a REPLY-entry flow (40002)
        tc = runners["tc"]
        replies = {}
        for sport, vip in ((40001, VIPS["local"]), (40002, VIP_SHARED)):
            lb.load(frame(vip, "S", sport=sport))
            lb.run_loaded()
            b = str(ipaddress.ip_address(lb.output()[DADDR_OFF:DADDR_OFF + 4]))
            replies[vip] = bytes(Ether(src="02:00:00:00:00:02", dst="02:00:00:00:00:01") / IP(src=b, dst=CLIENT)
                                 / TCP(sport=8080, dport=sport, flags="A") / Raw(b"0123456789"))
            if Ether(tc.run(replies[vip]).data)[IP].src != vip:
                raise SystemExit("tc_egress did not reverse the reply")
        res["tc_egress reply, derived"] = time_fixed(tc, replies[VIPS["local"]], args.runs)
        res["tc_egress reply, REPLY"] = time_fixed(tc, replies[VIP_SHARED], args.runs)
        res["tc_egress non-service"] = time_fixed(tc, frame("10.97.0.1", "A"), args.runs)
        no_new_drops("local SYN, +REPLY / tc_egress")
    res["non-service"] = time_fixed(lb, frame("10.97.0.1", "A"), args.runs, expect=XDP_PASS)
    clear_flows(dp)
    return res


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=100_000, help="runs per case and round")
    ap.add_argument("--flows", type=int, default=100_000, help="distinct flows of the ACK cases")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--services", default="1,20000")
    ap.add_argument("--cpu", type=int, default=0)
    ap.add_argument("--modes", default="local,DSR,SNAT", help="a subset of local,DSR,SNAT (targets need all)")
    ap.add_argument("--json", help="also write the results to this file")
    ap.add_argument("--ab-bpf", type=Path, metavar="DIR",
                    help="also load the programs built from DIR (another version of bpf/ with the same map and "
                         "field names), run every round on both builds, alternating which goes first, and "
                         "print each case's paired difference: an A/B that holds on a busy machine")
    ap.add_argument("--bpf", type=Path, metavar="DIR",
                    help="this build's C sources (default: the repository's bpf/); with --ab-bpf, swapping the two "
                         "dirs between two invocations cancels a bias of the load order")
    ap.add_argument("--dsr-slots", type=int, default=1 << 18,
                    help="DSR flow table slots (power of 2; default: the agent's default, 256 Ki; 0: conntrack's "
                         "size, --ct-size)")
    ap.add_argument("--ct-size", type=int, default=1 << 20,
                    help="conntrack entries (default 1 Mi, as in every earlier run here; the agent's default is "
                         "256 Ki: compare a change of a map's size with both builds at the agent's sizes)")
    ap.add_argument("--snat-slots", type=int, default=1 << 18,
                    help="SNAT node-port slots (power of 2; default: the agent's default, 256 Ki)")
    args = ap.parse_args()
    counts = [int(x) for x in args.services.split(",")]
    args.modes = args.modes.split(",")
    os.sched_setaffinity(0, {args.cpu})

    bcc = import_bcc()
    floors = compile_program(bundle(BPF_DIR / "xdp_floor.c"), {})
    fn_pass = floors.load_func(b"xdp_pass", bcc.BPF.XDP)
    fn_parse = floors.load_func(b"xdp_parse", bcc.BPF.XDP)

    need_slots = max(counts) * 251 + 4 * 16381 + 1024
    # a wide SNAT port range: 100k SNAT flows over 32 backends must not run out of ports; the
    # default 256 Ki port slots hold them at <= 38 % (16 independent candidates: ~1e-3 refusals
    # per round expected, and a refusal stops the run)
    feats = Features(max_services=max(65536, 2 * max(counts) + 8), maglev_slots=1 << need_slots.bit_length(),
                     ct_size=args.ct_size, snat_slots=args.snat_slots, snat_port_min=1024, dsr_flow_slots=args.dsr_slots)
    dp = Datapath(f"bench-{os.getpid()}", pin_root=PIN_ROOT, features=feats, bpf_dir=args.bpf)
    # the A/B build: its own maps, the same services and flows, its rounds interleaved with ours
    other = (Datapath(f"bench-ab-{os.getpid()}", pin_root=PIN_ROOT, features=feats, bpf_dir=args.ab_bpf)
             if args.ab_bpf else None)
    dps = [d for d in (dp, other) if d is not None]
    t0 = time.monotonic()
    try:
        for d in dps:
            d.load()
    except BaseException:   # e.g. an --ab-bpf build whose maps this agent does not know: no pins left
        for d in dps:
            d.destroy()
        shutil.rmtree(PIN_ROOT, ignore_errors=True)
        raise
    insns = {"xdp_lb": verified_insns(dp.program_fd("xdp")),
             "tc_egress": verified_insns(dp.program_fd("tc-egress")),
             "tc_ingress": verified_insns(dp.program_fd("tc-ingress")),
             "xdp_parse (floor)": verified_insns(fn_parse.fd)}
    print(f"# compiled+loaded in {time.monotonic() - t0:.1f}s; runs per case: {args.runs}; "
          f"rounds: {args.rounds}; flows: {args.flows}; CPU {args.cpu}")
    # (services, case, median ns, ratio, spread of the rounds' medians, IQM ns, IQM ratio)
    rows: list[tuple[int, str, float, float, float, float, float]] = []
    ab: list[tuple[int, str, list[float], list[float]]] = []   # (services, case, ours, other's) per round
    try:
        with Lab("dpbench") as lab:
            node = lab.host("node", forwarding=True)
            peer = lab.host("peer")
            n_if, p_if = lab.link(node, peer, [f"{NODE}/24"], [f"{PEER}/24"])
            for prefix in ("10.2.0.0/16", "192.0.2.0/24", "100.64.0.0/10"):
                node.run("ip", "route", "add", prefix, "via", PEER)
            peer_mac = json.loads(peer.run("ip", "-j", "link", "show", p_if))[0]["address"]
            node.run("ip", "neigh", "replace", PEER, "lladdr", peer_mac, "dev", n_if, "nud", "permanent")
            ifindex = json.loads(node.run("ip", "-j", "link", "show", n_if))[0]["ifindex"]
            runners = {id(d): {"lb": TestRunner(d.program_fd("xdp"), ingress_ifindex=ifindex),
                               "pass": TestRunner(fn_pass.fd, ingress_ifindex=ifindex),
                               "parse": TestRunner(fn_parse.fd, ingress_ifindex=ifindex),
                               "tc": TestRunner(d.program_fd("tc-egress"))} for d in dps}
            for d in dps:
                d.set_node_addresses(v4=NODE)
            have = 0
            for n_idx, n in enumerate(counts):
                t0 = time.monotonic()
                svcs = measured_services()
                want = max(0, n - len(svcs))   # n services in all
                for d in dps:
                    for s in svcs:
                        d.delete_service(s.key)
                    add_fillers(d, have, want)
                    for s in svcs:
                        d.upsert_service(s)      # local first: its backends' designated service
                have = max(have, want)
                print(f"# {n} services programmed (setup {time.monotonic() - t0:.1f}s)", flush=True)
                rounds, other_rounds = [], []
                for r in range(args.rounds):
                    base = int(ipaddress.ip_address(FLOWS_BASE)) + (n_idx * args.rounds + r) * 0x100000
                    for d in (dps if r % 2 == 0 else dps[::-1]):
                        res = in_netns(node.ns, lambda: one_round(d, runners[id(d)], args, base))
                        (rounds if d is dp else other_rounds).append(res)
                for case in (rounds[0] if other_rounds else ()):
                    ab.append((n, case, [statistics.median(rd[case]) for rd in rounds],
                               [statistics.median(rd[case]) for rd in other_rounds]))
                for case in rounds[0]:
                    meds = [statistics.median(rd[case]) for rd in rounds]
                    ratios = [statistics.median(rd[case]) / statistics.median(rd["floor xdp_pass"]) for rd in rounds]
                    iqm_ns = statistics.median(iqm(rd[case]) for rd in rounds)
                    iqm_ratio = statistics.median(iqm(rd[case]) / iqm(rd["floor xdp_pass"]) for rd in rounds)
                    rows.append((n, case, statistics.median(meds), statistics.median(ratios),
                                 max(meds) - min(meds), iqm_ns, iqm_ratio))
    finally:   # also when a case stopped on an unexpected verdict: the drop reasons say why
        c = dp.counters()
        print(f"# counters: ct_new={c.stat('xdp', 'ct_new')} ct_hit={c.stat('xdp', 'ct_hit')} "
              f"tx={c.stat('xdp', 'tx')} neigh_punt={c.stat('xdp', 'neigh_punt')} "
              f"snat_reuse={c.stat('xdp', 'snat_reuse')} drops={ {k: v for k, v in c.drops.items() if v} }")
        for d in dps:
            d.destroy()
        shutil.rmtree(PIN_ROOT, ignore_errors=True)

    print()
    print("verifier: processed insns (limit 1,000,000 per program)")
    for name, n in insns.items():
        print(f"  {name:<20}{n:>10,}")
    print()
    print(f"{'services':>9}  {'case':<24}{'median ns':>10}{'x xdp_pass':>12}{'spread':>8}"
          f"{'IQM ns':>9}{'x IQM floor':>13}")
    for n, case, ns, ratio, spread, iqm_ns, iqm_ratio in rows:
        print(f"{n:>9}  {case:<24}{ns:>10.0f}{ratio:>11.2f}x{spread:>8.0f}{iqm_ns:>9.0f}{iqm_ratio:>12.2f}x")

    if ab:
        print()
        print(f"A/B against {args.ab_bpf} (rounds interleaved; diff = this build - that build, per round)")
        print(f"{'services':>9}  {'case':<24}{'this ns':>9}{'that ns':>9}{'diff median':>13}{'diff mean':>11}"
              f"{'this faster':>13}")
        for n, case, ours, theirs in ab:
            diffs = [a - b for a, b in zip(ours, theirs)]
            print(f"{n:>9}  {case:<24}{statistics.median(ours):>9.0f}{statistics.median(theirs):>9.0f}"
                  f"{statistics.median(diffs):>+13.0f}{statistics.mean(diffs):>+11.0f}"
                  f"{sum(x < 0 for x in diffs):>8}/{len(diffs)}")

    print()
    ok = True
    by = {(r[0], r[1]): r[3] for r in rows}       # targets: on the medians
    med = {(r[0], r[1]): r[2] for r in rows}
    flows = f"ACK, {args.flows // 1000}k flows"
    for n in counts:
        for mode in [m for m in ("DSR", "SNAT") if m in args.modes]:
            for case, limit in (("established", 2.8), ("SYN", 5.0), (flows, 4.9)):
                got = by[(n, f"{mode} {case}")]
                verdict = "ok" if got <= limit else "MISSED"
                ok &= verdict == "ok"
                print(f"target {mode + ' ' + case:<26} <= {limit:.1f}x at {n:>6} services: {got:.2f}x  {verdict}")
    for case in [f"{m} {c}" for m in args.modes for c in ("established", "SYN", flows)]:
        first, last = med[(counts[0], case)], med[(counts[-1], case)]
        growth = last - first
        print(f"growth {case:<26} {counts[0]} -> {counts[-1]} services: {growth:+.0f} ns "
              f"({'flat' if growth <= max(15, 0.15 * first) else 'GROWS'})")
    if args.json:
        Path(args.json).write_text(json.dumps({"insns": insns, "rows": rows}, indent=1))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
