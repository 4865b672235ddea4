"""BFD scale benchmark: N single-hop sessions at 50 ms x 3 between vipd's BFD and FRR bfdd.

One veth between two namespaces carries N address pairs (10.78.0.i <-> 10.78.1.i). FRR bfdd
(the reference) runs the N sessions as static ``peer`` entries; the other side is vipd's BFD
(agent.bfd: the sans-IO sessions + the asyncio UDP transport that `vipd run` uses) in its own
process. After every session is Up on both sides, both run for ``--duration`` seconds.

Reported: false Down events on each side (the target is 0: nothing is cut), packets sent and
received, and CPU % of one core (utime+stime from /proc over the measured window) of the vipd
process and of bfdd, with the ratio vipd / bfdd.

    sudo .venv/bin/python benchmarks/bfd_scale.py                      # 100 sessions, 60 s
    sudo .venv/bin/python benchmarks/bfd_scale.py --sessions 20 --duration 10 --json out.json

Not a test: it prints numbers (and PASS/MISS for 0 false Down) and exits 0 unless a run failed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path[:0] = [str(REPO), str(HERE)]

from agent.lab import Lab, wait_until  # noqa: E402
from agent.lab.peers import FrrPeer  # noqa: E402

CLK_TCK = os.sysconf("SC_CLK_TCK")


def router_addr(i: int) -> str:
    return f"10.78.{i // 250}.{i % 250 + 1}"


def node_addr(i: int) -> str:
    return f"10.78.{100 + i // 250}.{i % 250 + 1}"


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK   # utime + stime


def _downs(counters: dict) -> int:
    """FRR's per-session count of transitions to Down (`show bfd peers counters json`)."""
    for key in ("session-down", "session-down-events"):
        if key in counters:
            return counters[key]
    raise KeyError(f"no session-down counter in FRR's output: {sorted(counters)}")


def bfdd_config(n: int, ms: int, mult: int) -> str:
    lines = ["bfd", " profile bench", f"  transmit-interval {ms}", f"  receive-interval {ms}",
             f"  detect-multiplier {mult}", " !"]
    for i in range(n):
        lines += [f" peer {node_addr(i)} local-address {router_addr(i)} interface eth-node",
                  "  profile bench", " !"]
    return "\n".join(lines + ["!"])


# ------------------------------------------------------------------------------ vipd side (child)

async def child(n: int, ms: int, mult: int, out: Path, stop_file: Path) -> None:
    from agent.bfd.session import BfdTimers
    from agent.bfd.transport import BfdManager

    manager = BfdManager()
    failed: list[tuple[str, str]] = []

    def on_change(peer, ch):
        if ch.failed:
            failed.append((peer, ch.diag.text))
    timers = BfdTimers(ms * 1000, ms * 1000, mult)
    for i in range(n):
        manager.add(router_addr(i), timers, on_change, local=node_addr(i))
    while not stop_file.exists():
        views = manager.peers()
        out.write_text(json.dumps({
            "up": sum(v.state == "up" and v.detection_time_ms == ms * mult for v in views),
            "false_down": len(failed), "down_detail": failed[:10],
            "packets_in": sum(v.packets_in for v in views), "packets_out": sum(v.packets_out for v in views),
            "dropped": sum(sum(v.dropped.values()) for v in views) + sum(manager.dropped.values())}))
        await asyncio.sleep(0.5)
    manager.close()


# ------------------------------------------------------------------------------ orchestration

def run(n: int, ms: int, mult: int, duration: float) -> dict:
    with Lab("bfdbench") as lab:
        router, node = lab.host("router"), lab.host("node")
        lab.link(router, node, a_if="eth-node", b_if="eth-router")
        for i in range(n):
            router.run("ip", "addr", "add", f"{router_addr(i)}/16", "dev", "eth-node")
            node.run("ip", "addr", "add", f"{node_addr(i)}/16", "dev", "eth-router")
        frr = lab.frr(router, FrrPeer(65000, "10.78.0.1", listen_port=0, bfdd_config=bfdd_config(n, ms, mult)))
        status = lab.workdir / "vipd-bfd.json"
        stop = lab.workdir / "stop"
        proc = node.spawn([sys.executable, __file__, "--child", "--sessions", str(n), "--interval", str(ms),
                           "--mult", str(mult), "--status", str(status), "--stop", str(stop)],
                          env={"PYTHONPATH": str(REPO)})

        def ours() -> dict:
            return json.loads(status.read_text()) if status.exists() else {"up": 0}

        def frr_counters() -> list[dict]:
            return json.loads(frr.vtysh("show bfd peers counters json") or "[]")

        def frr_up() -> int:
            return sum(p["status"] == "up" and p["remote-transmit-interval"] == ms
                       for p in json.loads(frr.vtysh("show bfd peers json") or "[]"))

        t0 = time.monotonic()
        wait_until(lambda: ours()["up"] == n and frr_up() == n, timeout=60 + n * 0.2, interval=0.5,
                   what=f"{n} BFD sessions up at {ms} ms on both sides")
        bringup = time.monotonic() - t0
        start_ours, start_frr = ours(), {p["peer"]: p for p in frr_counters()}
        cpu0 = (cpu_seconds(proc.pid), cpu_seconds(frr.bfdd.pid), time.monotonic())
        time.sleep(duration)
        cpu1 = (cpu_seconds(proc.pid), cpu_seconds(frr.bfdd.pid), time.monotonic())
        end_ours, end_frr = ours(), {p["peer"]: p for p in frr_counters()}
        frr_up_at_end = frr_up()
        stop.touch()
        proc.wait(timeout=10)
        wall = cpu1[2] - cpu0[2]
        frr_down = sum(_downs(end_frr[a]) - _downs(start_frr[a]) for a in end_frr)
        return {
            "sessions": n, "interval_ms": ms, "detect_mult": mult, "duration_s": round(wall, 1),
            "bring_up_s": round(bringup, 1),
            "vipd": {"cpu_percent": round(100 * (cpu1[0] - cpu0[0]) / wall, 1),
                     "false_down": end_ours["false_down"] - start_ours["false_down"],
                     "down_detail": end_ours["down_detail"],
                     "packets_out": end_ours["packets_out"] - start_ours["packets_out"],
                     "packets_in": end_ours["packets_in"] - start_ours["packets_in"],
                     "dropped": end_ours["dropped"] - start_ours["dropped"],
                     "sessions_up_at_end": end_ours["up"]},
            "frr_bfdd": {"cpu_percent": round(100 * (cpu1[1] - cpu0[1]) / wall, 1), "false_down": frr_down,
                         "sessions_up_at_end": frr_up_at_end},
        }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sessions", type=int, default=100)
    ap.add_argument("--interval", type=int, default=50, help="transmit/receive interval, ms")
    ap.add_argument("--mult", type=int, default=3)
    ap.add_argument("--duration", type=float, default=60.0, help="measured seconds")
    ap.add_argument("--json", type=Path, help="also write the result here")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--status", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--stop", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        asyncio.run(child(args.sessions, args.interval, args.mult, args.status, args.stop))
        return 0
    if os.geteuid() != 0:
        print("needs root (network namespaces)", file=sys.stderr)
        return 2
    r = run(args.sessions, args.interval, args.mult, args.duration)
    v, f = r["vipd"], r["frr_bfdd"]
    print(f"{r['sessions']} BFD sessions at {r['interval_ms']} ms x {r['detect_mult']}, "
          f"{r['duration_s']} s measured (all up after {r['bring_up_s']} s)")
    print(f"  vipd BFD   CPU {v['cpu_percent']:5.1f} % of a core   false Down {v['false_down']}   "
          f"packets out {v['packets_out']} in {v['packets_in']} dropped {v['dropped']}   up at end {v['sessions_up_at_end']}")
    print(f"  FRR bfdd   CPU {f['cpu_percent']:5.1f} % of a core   false Down {f['false_down']}   "
          f"up at end {f['sessions_up_at_end']}")
    ratio = v["cpu_percent"] / f["cpu_percent"] if f["cpu_percent"] else float("inf")
    print(f"  CPU ratio vipd / bfdd: {ratio:.1f}x")
    ok = v["false_down"] == 0 and f["false_down"] == 0
    print(f"  0 false Down on both sides: {'PASS' if ok else 'MISS'}"
          + ("" if ok else f"  (vipd detail: {v['down_detail']})"))
    if args.json:
        args.json.write_text(json.dumps(r | {"cpu_ratio": ratio}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
