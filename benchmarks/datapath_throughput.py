"""TCP throughput through a VIP vs straight to the pod, in each mode, measured in the same run.

Run as root:  .venv/bin/python benchmarks/datapath_throughput.py [--seconds 5] [--reps 3]
              [--offloads on|off] [--mtu 1500] [--families 4,6] [--modes local,snat,dsr]

The lab is the traffic-matrix lab (tests/e2e/datapath/matrix_lab.py: client -> router -> LAN ->
node-a / node-b -> pods a1, b1; vipd's XDP + tc on both nodes' LAN interface, each node's
own agent process), with GRO/GSO/TSO on by default. For each mode (local: DNAT on node-a, tc
egress reverses replies; SNAT: DNAT + SNAT on node-a to b1; DSR: node-a adds the option,
b1's replies go straight back) and each family, iperf3 runs client -> VIP and client -> the
backend pod's own address (routed, no load balancer: "direct"), in turns, ``--reps`` times
each, in both directions (upload: client sends; download: -R, the pod sends: the reply path).
"Direct" takes the same path as the VIP traffic: the router sends b1's address via node-a
(kernel forwarding there, GRO/GSO included), as it sends the VIPs; without that host route it
would go straight to node-b and skip a hop the VIP traffic makes, which on this 2-CPU VM costs
~40 %. For SNAT the replies come back through node-a too (to node-a's address, where XDP
reverses them), so while SNAT is measured node-b routes the client via node-a as well: direct
replies then make the same two extra LAN hops (kernel forwarding on node-a instead of XDP).
Each cell is the median over the reps; the ratio is VIP / direct. The machine is shared, so
run it a few times and compare medians.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests" / "e2e" / "datapath"))

from agent.lab import Lab  # noqa: E402
from dp_topology import NODE_ADDR, NODE_ADDR6, pod_address  # noqa: E402
from matrix_lab import MODES, STREAM_PORT, VIPS, MatrixLab  # noqa: E402


def iperf(m: MatrixLab, dst: str, port: int, seconds: float, reverse: bool) -> float:
    """Gbit/s received (iperf3's receiver-side figure)."""
    argv = ["iperf3", "-c", dst, "-p", str(port), "-t", str(seconds), "-J", "--connect-timeout", "5000"]
    if reverse:
        argv.append("-R")
    for _ in range(20):
        r = json.loads(m.client(*argv, timeout=seconds + 60, check=False) or "{}")
        if "busy" not in r.get("error", ""):   # the server may not have closed the last test yet
            break
        time.sleep(0.5)
    if "error" in r or "end" not in r:
        raise RuntimeError(f"iperf3 to {dst}:{port}: {r.get('error', r)}")
    return r["end"]["sum_received"]["bits_per_second"] / 1e9


def same_path_replies(m: MatrixLab, fam: int):
    """Route node-b's traffic to the client via node-a (as SNAT replies go); returns the undo."""
    from dp_topology import CLIENT, CLIENT6

    node_b = m.env.nodes["node-b"]
    dst = f"{CLIENT}/32" if fam == 4 else f"{CLIENT6}/128"
    node_b.route(dst, via=NODE_ADDR["node-a"] if fam == 4 else NODE_ADDR6["node-a"])
    return lambda: node_b.run("ip", "-6" if fam == 6 else "-4", "route", "del", dst)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=5)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--offloads", default="on", choices=["on", "off"])
    ap.add_argument("--mtu", type=int, default=1500)
    ap.add_argument("--families", default="4,6")
    ap.add_argument("--modes", default=",".join(MODES), help=f"a subset of {','.join(MODES)}")
    args = ap.parse_args()
    families = [int(f) for f in args.families.split(",")]
    modes = {mode: MODES[mode] for mode in args.modes.split(",")}
    with Lab("tput") as lab:
        m = MatrixLab(lab, args.offloads, args.mtu)
        try:
            m.build()
            m.start_agents()
            m.ready()
            for fam in (4, 6):   # direct traffic to b1 crosses node-a too, like the VIP traffic
                m.env.router.route(f"{pod_address('b1', fam)}/{32 if fam == 4 else 128}",
                                   via=NODE_ADDR["node-a"] if fam == 4 else NODE_ADDR6["node-a"])
            rows = []
            for fam in families:
                for mode, pod in modes.items():
                    port = STREAM_PORT[mode, fam]
                    # SNAT returns b1's replies through node-a: so does "direct" for this mode
                    # (a host route on node-b), else the baseline skips two LAN hops
                    same_path = same_path_replies(m, fam) if mode == "snat" else None
                    targets = {"vip": VIPS[mode, fam], "direct": pod_address(pod, fam)}
                    for reverse in (False, True):
                        got: dict[str, list[float]] = {"vip": [], "direct": []}
                        for _ in range(args.reps):
                            for kind, dst in targets.items():   # in turns: noise falls on both
                                got[kind].append(iperf(m, dst, port, args.seconds, reverse))
                        vip, direct = statistics.median(got["vip"]), statistics.median(got["direct"])
                        rows.append((f"IPv{fam}", mode, "download" if reverse else "upload", vip, direct))
                        print(f"  IPv{fam} {mode:5s} {'download' if reverse else 'upload':8s} vip {vip:6.2f} "
                              f"direct {direct:6.2f} Gbit/s  runs vip={['%.2f' % x for x in got['vip']]} "
                              f"direct={['%.2f' % x for x in got['direct']]}", flush=True)
                    if same_path is not None:
                        same_path()
        finally:
            m.close()
    print(f"\niperf3 TCP, {args.seconds:g} s per run, median of {args.reps}; offloads {args.offloads}, "
          f"MTU {args.mtu}\n")
    print("| family | mode | direction | through VIP (Gbit/s) | direct to pod (Gbit/s) | VIP / direct |")
    print("|---|---|---|---|---|---|")
    for fam, mode, direction, vip, direct in rows:
        print(f"| {fam} | {mode} | {direction} | {vip:.2f} | {direct:.2f} | {vip / direct:.0%} |")


if __name__ == "__main__":
    main()
