"""Agent start-up at scale: `vipd run --lb-interface` with N LoadBalancer Services from a config
directory, against BIRD 2 exporting the same prefixes as static routes, to the same FRR.

Per N (default 1,000 / 10,000 / 20,000 Services, one TCP port each; agent/lab/scale.py ScaleLab):

* **start -> all**: seconds from spawning the process (``vipd run`` / ``bird``) until FRR's
  received-prefix counter for the node reaches N (FRR polled every 0.2 s);
* **agent CPU**: CPU seconds (user + system, all threads) of the agent process until then, the
  figure to compare on a busy machine (the parser and BPF loader child processes not in it);
* **peak RSS** of the agent (``VmHWM``, read once FRR has all and the agent logged "vipd running",
  the end of its start-up; at the largest N again after the one change), and its RSS at each
  start-up milestone (the agent logs ``rss_mb`` / ``peak_rss_mb`` on those lines);
* **first start after ``vipd prepare``** (unless ``--no-prepared``): a fresh lab (fresh state
  dir, no pinned maps) whose program cache ``vipd prepare`` filled first (its time reported on
  its own, as an install step), then start -> all: a node's first start once installed;
* **warm restart** (unless ``--no-restart``): the agent stopped (Cease: FRR withdraws) and started
  again with the same state dir (parse cache, LB-IPAM allocations) and the pinned datapath:
  start -> all, RSS and milestones again;
* at the largest N, **one change**: one more Service written to the config directory (atomic
  rename); seconds until (a) a TCP connection from the router to its VIP is answered by a pod
  (the datapath serves it; the router has a static route to the pool, so this does not wait
  for BGP) and (b) FRR has the /32.

Targets (issue 9): at 20,000, vipd start->all <= 2x BIRD, RSS <= 300 MB, one change <= 1 s.

    sudo .venv/bin/python benchmarks/agent_scale.py                    # 1k, 10k, 20k
    sudo .venv/bin/python benchmarks/agent_scale.py --services 20000 --json out.json
    sudo .venv/bin/python benchmarks/agent_scale.py --services 20000 --only-prepared   # prepared first start

Not a test: it prints numbers (PASS/MISS per target) and exits 0 unless a run failed.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path[:0] = [str(REPO), str(HERE)]

from agent.lab import Lab, wait_until  # noqa: E402
from agent.lab.scale import (NODE_ASN, NODE_IP, NODE_NAME, POOL, ROUTER_ASN, ROUTER_IP, ScaleLab,  # noqa: E402
                             service_docs, vip_of)
from bird import BirdDaemon, pid_vm_hwm_kib, static_export_config  # noqa: E402

TARGET_RATIO, TARGET_RSS_MB, TARGET_CHANGE_S = 2.0, 300.0, 1.0

# In the router: connect to VIP:80 until a pod answers; prints the wall time of the answer.
PROBE = r"""
import socket, sys, time
vip, deadline = sys.argv[1], time.time() + float(sys.argv[2])
print("ready", flush=True)
while time.time() < deadline:
    try:
        with socket.create_connection((vip, 80), timeout=0.2) as c:
            if c.recv(100).strip():
                print(f"{time.time():.4f}", flush=True)
                sys.exit(0)
    except OSError:
        time.sleep(0.01)
sys.exit(1)
"""


def frr_received(env: ScaleLab) -> int:
    data = json.loads(env.frr.vtysh("show bgp ipv4 unicast summary json") or "{}")
    peer = data.get("peers", {}).get(NODE_IP, {})
    return peer.get("pfxRcd", 0) if peer.get("state") == "Established" else 0


def wait_all(env: ScaleLab, n: int, started: float, alive, timeout: float) -> float:
    """Seconds from ``started`` (wall clock) until FRR has n prefixes from the node."""
    while True:
        alive()
        if frr_received(env) >= n:
            return time.time() - started
        if time.time() - started > timeout:
            raise TimeoutError(f"FRR has {frr_received(env)}/{n} prefixes after {timeout}s")
        time.sleep(0.2)


def one_change(env: ScaleLab, n: int) -> dict:
    """Add Service n; seconds until its VIP answers through the datapath and until FRR has it."""
    vip = vip_of(n)
    probe = subprocess.Popen(env.router.exec_argv([sys.executable, "-c", PROBE, vip, "30"]),
                             stdout=subprocess.PIPE, text=True)
    env.lab._procs.append(probe)
    assert probe.stdout.readline().strip() == "ready"
    written = time.time()
    env.write("extra.yaml", service_docs(n, ports=1, pods=env.pod_ips, node_name=NODE_NAME))
    frr_at = None
    while frr_at is None and time.time() - written < 30:
        if env.has_route(f"{vip}/32"):
            frr_at = time.time()
        else:
            time.sleep(0.05)
    answered = probe.stdout.readline().strip()
    probe.wait(timeout=30)
    time.sleep(1.0)   # the agent's log lines of this change are on disk
    return {"datapath_seconds": round(float(answered) - written, 3) if answered else None,
            "frr_seconds": round(frr_at - written, 3) if frr_at else None,
            "timeline_seconds": change_timeline(env.log(), written)}


KEEP_LOG: str | None = None   # --keep-log

CHANGE_MILESTONES = ("configuration loaded", "services programmed", "advertisements changed", "reconcile pass")


def change_timeline(log: str, written: float) -> dict:
    """Seconds from the file write to the agent's first log line of each step of the change:
    the reload (parse in the worker), the datapath upsert, the Adj-RIB-Out update, the pass's end."""
    from datetime import datetime

    out: dict = {}
    for line in log.splitlines():
        if not line.startswith("{"):
            continue
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        ev = rec.get("event")
        if ev not in CHANGE_MILESTONES or ev in out or "timestamp" not in rec:
            continue
        at = datetime.fromisoformat(rec["timestamp"].replace("Z", "+00:00")).timestamp()
        if at >= written:
            out[ev] = round(at - written, 3)
            if ev == "reconcile pass":
                out["pass_steps"] = {k: v for k, v in rec.items() if isinstance(v, float)}
    return out


MILESTONES = ("configuration loaded", "datapath loaded", "datapath attached", "services programmed",
              "session established", "vipd running")


def timeline(log: str, started: float) -> tuple[dict, dict]:
    """-> (seconds from the process start to the first log line of each milestone, the agent's
    resident memory in MB at it: VmRSS, and the peak so far, VmHWM). Lines before ``started``
    (an earlier run appending to the same log) are skipped."""
    from datetime import datetime

    out, rss = {}, {}
    for line in log.splitlines():
        if not line.startswith("{"):
            continue
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        ev = rec.get("event")
        if ev in MILESTONES and ev not in out and "timestamp" in rec:
            at = datetime.fromisoformat(rec["timestamp"].replace("Z", "+00:00")).timestamp()
            if at < started:
                continue
            out[ev] = round(at - started, 2)
            if "rss_mb" in rec:
                rss[ev] = {"rss_mb": rec["rss_mb"], "peak_rss_mb": rec.get("peak_rss_mb")}
    return out, rss


def start_and_measure(env: ScaleLab, n: int, timeout: float) -> dict:
    """Start the agent; seconds until FRR has all n prefixes, peak RSS, the milestones."""
    runs_before = env.log().count('"vipd running"') if (env.config_dir.parent / "vipd.log").exists() else 0
    started = time.time()
    env.start("--shutdown-mode", "notify")

    def alive():
        if env.proc.poll() is not None:
            raise RuntimeError(f"vipd exited ({env.proc.returncode}):\n{env.log()[-3000:]}")
    seconds = wait_all(env, n, started, alive, timeout)
    cpu = cpu_seconds(env.proc.pid)
    # the peak of the whole start-up: the agent may still be finishing it (last pass, API)
    # when FRR has every prefix
    wait_until(lambda: alive() or env.log().count('"vipd running"') > runs_before, timeout=60,
               what="vipd running")
    out = {"start_to_all_seconds": round(seconds, 3), "agent_cpu_seconds": round(cpu, 2),
           "peak_rss_mb": round(pid_vm_hwm_kib(env.proc.pid) / 1024, 1)}
    out["timeline_seconds"], out["rss_at_milestones_mb"] = timeline(env.log(), started)
    passes = [rec for rec in (json.loads(line) for line in env.log().splitlines()
                              if line.startswith("{") and '"reconcile pass"' in line)
              if rec.get("timestamp", "") >= time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(started))]
    if passes:
        out["first_passes_seconds"] = [{k: v for k, v in p.items() if isinstance(v, float)} for p in passes[:2]]
    return out


def cpu_seconds(pid: int) -> float:
    """CPU time (user + system, every thread) the process used so far: unlike the wall clock,
    hardly moved by other work on the machine (the parser and loader child processes are
    not in it)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def stop_agent(env: ScaleLab, timeout: float = 60) -> None:
    """SIGTERM with --shutdown-mode notify: the sessions close with a Cease, FRR withdraws."""
    env.proc.terminate()
    env.proc.wait(timeout=timeout)
    wait_until(lambda: frr_received(env) == 0, timeout=30, what="FRR withdrew the stopped agent's routes")


def prepare(env: ScaleLab) -> dict:
    """``vipd prepare`` into the (fresh) state dir's program cache, as an install does: timed
    on its own, not part of the start that follows."""
    argv = [sys.executable, "-m", "agent.daemon", "prepare", "--state-dir", str(env.state_dir),
            "--bpf-pin-root", str(env.pin_root)]
    t0 = time.time()
    out = subprocess.run(argv, capture_output=True, text=True, timeout=300, cwd=REPO,
                         env={**os.environ, "PYTHONPATH": str(REPO)})
    if out.returncode != 0:
        raise RuntimeError(f"vipd prepare failed ({out.returncode}): {out.stderr[-3000:]}")
    return {"prepare_seconds": round(time.time() - t0, 2), "prepare_output": out.stdout.strip()}


def run_vipd(n: int, timeout: float, change: bool, restart: bool, prepared: bool = False) -> dict:
    """A first start in a fresh lab (fresh state dir, no pinned maps): without a program cache
    (the loader child compiles), or with ``prepared`` after `vipd prepare` filled it."""
    with Lab("cagsp" if prepared else "cagsc") as lab:
        env = ScaleLab(lab)
        try:
            env.write_services(n, ports=1)
            # the datapath probe must not depend on BGP: the pool is routed to the node statically
            env.router.route(POOL, via=NODE_IP)
            pre = prepare(env) if prepared else {}
            out = {"sender": "vipd", "services": n, "start": "cold (prepared)" if prepared else "cold (no cache)",
                   **pre, **start_and_measure(env, n, timeout)}
            if change:
                time.sleep(2.0)  # steady state: the router's zebra installed the initial flood
                out["one_change"] = one_change(env, n)
                out["peak_rss_mb"] = round(pid_vm_hwm_kib(env.proc.pid) / 1024, 1)
            stop_agent(env)
            if restart:
                # warm: the same state dir (parse cache, allocations) and the pinned datapath
                out["warm_restart"] = start_and_measure(env, n + (1 if change else 0), timeout)
                stop_agent(env)
            return out
        finally:
            if KEEP_LOG:
                Path(KEEP_LOG).write_text(env.log())
            env.cleanup_pins()


def run_bird(n: int, timeout: float) -> dict:
    with Lab("cagsb") as lab:
        env = ScaleLab(lab, pods=1)
        config = static_export_config(router_id=NODE_IP, local=NODE_IP, local_asn=NODE_ASN, neighbor=ROUTER_IP,
                                      neighbor_asn=ROUTER_ASN, prefix_sets=[[f"{vip_of(i)}/32" for i in range(n)]],
                                      community_asn=NODE_ASN)
        bird = BirdDaemon(env.node, config)
        started = time.time()
        bird.start()
        lab._daemons.append(bird)

        def alive():
            if bird.proc.poll() is not None:
                raise RuntimeError(f"bird exited:\n{bird.log()[-3000:]}")
        seconds = wait_all(env, n, started, alive, timeout)
        return {"sender": "bird", "services": n, "start_to_all_seconds": round(seconds, 3),
                "peak_rss_mb": round(pid_vm_hwm_kib(bird.pid) / 1024, 1)}


def main() -> int:
    p = argparse.ArgumentParser(description="vipd start-up at scale vs BIRD static routes, into FRR")
    p.add_argument("--services", default="1000,10000,20000", help="comma-separated Service counts")
    p.add_argument("--timeout", type=float, default=300)
    p.add_argument("--json", help="also write the results here")
    p.add_argument("--keep-log", help="write the last vipd run's log (cold start and warm restart) here")
    p.add_argument("--no-restart", action="store_true",
                   help="skip the warm restart (same state dir and pinned maps) after the cold start")
    p.add_argument("--no-prepared", action="store_true",
                   help="skip the first start after `vipd prepare` (fresh state dir and pins, the "
                        "program cache filled by prepare: what an installed node's first start is)")
    p.add_argument("--only-prepared", action="store_true",
                   help="only the prepared first start (and BIRD): no cold start without cache, "
                        "no change, no warm restart")
    args = p.parse_args()
    global KEEP_LOG
    KEEP_LOG = args.keep_log
    if os.geteuid() != 0:
        p.error("needs root (network namespaces, XDP)")
    counts = [int(x) for x in args.services.split(",")]
    results = []
    for n in counts:
        r = {"services": n}
        if not args.only_prepared:
            r["vipd"] = run_vipd(n, args.timeout, change=n == max(counts), restart=not args.no_restart)
            print(f"  vipd {n}: {json.dumps(r['vipd'])}", flush=True)
        if not args.no_prepared:
            r["vipd_prepared"] = run_vipd(n, args.timeout, change=False, restart=False, prepared=True)
            print(f"  vipd prepared {n}: {json.dumps(r['vipd_prepared'])}", flush=True)
        r["bird"] = b = run_bird(n, args.timeout)
        print(f"  bird {n}: {json.dumps(b)}", flush=True)
        for k in ("vipd", "vipd_prepared"):
            if k in r:
                r[f"ratio_{k}_over_bird"] = round(r[k]["start_to_all_seconds"] / b["start_to_all_seconds"], 2)
        results.append(r)

    print(f"\nprocess start -> all prefixes at FRR (bgpd + zebra), vipd run --lb-interface vs BIRD 2 "
          f"static routes; load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    print(f"  {'services':>8} {'start':>6} {'vipd (s)':>9} {'BIRD (s)':>9} {'ratio':>6} {'vipd RSS (MB)':>14} "
          f"{'agent CPU (s)':>14}")
    for r in results:
        runs = [("cold", r["vipd"])] if "vipd" in r else []
        if "vipd_prepared" in r:
            runs.append(("prep'd", r["vipd_prepared"]))
        if "warm_restart" in r.get("vipd", {}):
            runs.append(("warm", r["vipd"]["warm_restart"]))
        for kind, v in runs:
            print(f"  {r['services']:>8} {kind:>6} {v['start_to_all_seconds']:>9.2f} "
                  f"{r['bird']['start_to_all_seconds']:>9.2f} "
                  f"{v['start_to_all_seconds'] / r['bird']['start_to_all_seconds']:>6.2f} {v['peak_rss_mb']:>14.1f} "
                  f"{v['agent_cpu_seconds']:>14.2f}")
            marks = v.get("timeline_seconds", {})
            mem = v.get("rss_at_milestones_mb", {})
            print("           " + ", ".join(
                f"{ev} {at:.2f} s" + (f" ({mem[ev]['rss_mb']:.0f} MB)" if ev in mem else "")
                for ev, at in sorted(marks.items(), key=lambda kv: kv[1])))
            if "prepare_seconds" in v:
                print(f"           (vipd prepare before it, not timed in the start: {v['prepare_seconds']:.2f} s)")
    verdict = lambda ok: "PASS" if ok else "MISS"  # noqa: E731
    top = results[-1]
    for k, what in (("vipd", "cold, no program cache"), ("vipd_prepared", "cold, after vipd prepare")):
        if k in top:
            ratio = top[f"ratio_{k}_over_bird"]
            print(f"  at {top['services']} ({what}): ratio {ratio:.2f}x (target <= {TARGET_RATIO}x): "
                  f"{verdict(ratio <= TARGET_RATIO)}; RSS {top[k]['peak_rss_mb']:.1f} MB "
                  f"(target <= {TARGET_RSS_MB:.0f}): {verdict(top[k]['peak_rss_mb'] <= TARGET_RSS_MB)}")
    ch = top.get("vipd", {}).get("one_change")
    if ch:
        seconds = [ch.get("datapath_seconds"), ch.get("frr_seconds")]   # ch also holds pass_seconds
        worst = max(seconds) if all(x is not None for x in seconds) else None
        print(f"  one Service added at {top['services']}: datapath {ch['datapath_seconds']} s, FRR "
              f"{ch['frr_seconds']} s (target <= {TARGET_CHANGE_S} s): "
              f"{verdict(worst is not None and worst <= TARGET_CHANGE_S)}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
