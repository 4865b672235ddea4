"""BGP scale benchmark: 100,000 IPv4 prefixes in 10 attribute sets from one sender to FRR.

Measures, for the vipd speaker and for BIRD 2 (the reference, exporting static routes):

* **convergence**: seconds from the session reaching Established (FRR's own log, millisecond
  timestamps) until FRR's received-prefix counter (``pfxRcd``) reaches the full count;
* **withdraw**: seconds from asking the sender to withdraw everything until ``pfxRcd`` is 0;
* **peak RSS** of the sender process (``VmHWM`` from ``/proc/PID/status``).

FRR runs bgpd only (no zebra), passive, without soft-reconfiguration, in its own namespace; the
sender in another, joined by a veth pair. Targets (issue 3): vipd ≤ 2 s, ≤ 2× BIRD, ≤ 150 MB.

    sudo .venv/bin/python benchmarks/bgp_scale.py                 # both senders, 100k prefixes
    sudo .venv/bin/python benchmarks/bgp_scale.py --senders vipd --profile /tmp/vipd.prof
    sudo .venv/bin/python benchmarks/bgp_scale.py --prefixes 10000 --repeat 3 --json out.json

Not a test: it prints numbers (and PASS/MISS per target) and exits 0 unless a run failed.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import sys
import time
from datetime import datetime
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path[:0] = [str(REPO), str(HERE)]

from agent.lab import Lab, wait_until  # noqa: E402
from agent.lab.peers import FrrPeer, Neighbor  # noqa: E402
from bird import BirdDaemon, pid_vm_hwm_kib, static_export_config  # noqa: E402
from prefixes import bench_prefix_sets  # noqa: E402

SENDER, ROUTER = "10.0.0.1", "10.0.0.2"
SENDER_ASN, ROUTER_ASN = 65001, 65000
TARGET_SECONDS, TARGET_RATIO, TARGET_RSS_MB = 2.0, 2.0, 150.0


def frr_peer_summary(frr) -> dict:
    data = json.loads(frr.vtysh("show bgp ipv4 unicast summary json") or "{}")
    return data.get("peers", {}).get(SENDER, {})


def frr_established_at(frr) -> float | None:
    """Wall-clock time of the last '%ADJCHANGE ... Up' for the sender in FRR's log (ms precision)."""
    at = None
    for line in frr.log().splitlines():
        if "%ADJCHANGE" in line and f"neighbor {SENDER}" in line and line.rstrip().endswith("Up"):
            stamp = " ".join(line.split()[:2])
            at = datetime.strptime(stamp, "%Y/%m/%d %H:%M:%S.%f").timestamp()
    return at


def run_once(sender: str, prefixes: int, sets: int, timeout: float, profile: str | None) -> dict:
    prefix_sets = bench_prefix_sets(prefixes, sets)
    with Lab("bench") as lab:
        snd, rtr = lab.host("sender"), lab.host("router")
        lab.link(snd, rtr, [f"{SENDER}/24"], [f"{ROUTER}/24"])
        frr = lab.frr(rtr, FrrPeer(asn=ROUTER_ASN, router_id=ROUTER,
                                   neighbors=[Neighbor(SENDER, SENDER_ASN, passive=True)],
                                   extra_global_config="log timestamp precision 3"))
        extra: dict = {}
        if sender == "vipd":
            argv = [sys.executable, str(HERE / "bench_speaker.py"), "--peer", ROUTER,
                    "--peer-asn", str(ROUTER_ASN), "--asn", str(SENDER_ASN), "--router-id", SENDER,
                    "--prefixes", str(prefixes), "--sets", str(sets)]
            if profile:
                argv += ["--profile", profile]
            log_path = snd.workdir / "speaker.log"
            proc = snd.spawn(argv, env={"PYTHONPATH": str(REPO)}, log_path=log_path, cwd=REPO)
            pid = proc.pid

            def alive():
                if proc.poll() is not None:
                    raise RuntimeError(f"speaker exited ({proc.returncode}):\n{log_path.read_text()[-3000:]}")

            def withdraw_all():
                os.kill(pid, signal.SIGUSR1)
        else:
            config = static_export_config(router_id=SENDER, local=SENDER, local_asn=SENDER_ASN,
                                          neighbor=ROUTER, neighbor_asn=ROUTER_ASN,
                                          prefix_sets=[[str(p) for p in s] for s in prefix_sets],
                                          community_asn=SENDER_ASN)
            bird = BirdDaemon(snd, config).start()
            pid = bird.pid

            def alive():
                if bird.proc.poll() is not None:
                    raise RuntimeError(f"bird exited:\n{bird.log()[-3000:]}")

            def withdraw_all():
                bird.birdc("disable", '"set*"')

        # Poll as fast as vtysh answers (~30-60 ms per call); timestamps are taken after each answer.
        deadline = time.monotonic() + timeout
        first_seen_established = full_at = None
        while True:
            alive()
            peer = frr_peer_summary(frr)
            now = time.time()
            if peer.get("state") == "Established" and first_seen_established is None:
                first_seen_established = now
            if peer.get("pfxRcd", 0) >= prefixes:
                full_at = now
                break
            if time.monotonic() > deadline:
                raise TimeoutError(f"{sender}: FRR has {peer.get('pfxRcd', 0)}/{prefixes} after {timeout}s "
                                   f"(state {peer.get('state')})")
        established_at = frr_established_at(frr) or first_seen_established
        rss_full_kib = pid_vm_hwm_kib(pid)

        # Sanity: the table is real and carries the per-set community.
        sample = json.loads(frr.vtysh(f"show bgp ipv4 unicast {prefix_sets[-1][-1]} json"))
        community = sample["paths"][0]["community"]["string"]
        assert community == f"{SENDER_ASN}:{len(prefix_sets) - 1}", community

        withdraw_started = time.time()
        withdraw_all()
        wait_until(lambda: frr_peer_summary(frr).get("pfxRcd", 1) == 0, timeout=timeout, interval=0.01,
                   what=f"{sender}: FRR count back to 0")
        withdraw_seconds = time.time() - withdraw_started
        result = {
            "sender": sender, "prefixes": prefixes, "attribute_sets": len(prefix_sets),
            "convergence_seconds": round(full_at - established_at, 3),
            # cross-check: from the first poll that saw Established (later than the log line)
            "convergence_seconds_from_poll": round(full_at - first_seen_established, 3),
            "withdraw_seconds": round(withdraw_seconds, 3),
            "peak_rss_mb_after_table": round(rss_full_kib / 1024, 1),
            "peak_rss_mb": round(max(rss_full_kib, pid_vm_hwm_kib(pid)) / 1024, 1),
        }
        if sender == "vipd":
            events = [json.loads(l) for l in log_path.read_text().splitlines() if l.startswith("{\"event\"")]
            result["api_seconds"] = {e["event"]: e["api_seconds"] for e in events}
            if profile:
                os.kill(pid, signal.SIGTERM)
                proc.wait(timeout=30)
        return result


def summarize(runs: list[dict]) -> dict:
    """Median per metric (the machine is shared: single runs are noisy), plus the range."""
    out = {"sender": runs[0]["sender"], "prefixes": runs[0]["prefixes"],
           "attribute_sets": runs[0]["attribute_sets"], "runs": len(runs)}
    for key in ("convergence_seconds", "withdraw_seconds", "peak_rss_mb"):
        values = [r[key] for r in runs]
        out[key] = round(statistics.median(values), 3)
        out[key + "_range"] = [min(values), max(values)]
    if "api_seconds" in runs[0]:
        out["api_seconds_median"] = {k: round(statistics.median(r["api_seconds"][k] for r in runs), 3)
                                     for k in runs[0]["api_seconds"]}
    return out


def main() -> int:
    p = argparse.ArgumentParser(description="BGP scale benchmark (vipd vs BIRD 2 into FRR)")
    p.add_argument("--prefixes", type=int, default=100_000)
    p.add_argument("--sets", type=int, default=10)
    p.add_argument("--senders", default="vipd,bird")
    p.add_argument("--repeat", type=int, default=1)
    p.add_argument("--timeout", type=float, default=300)
    p.add_argument("--profile", help="cProfile output for the vipd speaker process")
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args()
    if os.geteuid() != 0:
        p.error("needs root (network namespaces)")

    results = {}
    for sender in args.senders.split(","):
        runs = []
        for i in range(args.repeat):
            r = run_once(sender, args.prefixes, args.sets, args.timeout, args.profile)
            print(f"  {sender} run {i + 1}: {json.dumps(r)}", flush=True)
            runs.append(r)
        results[sender] = summarize(runs)

    print(f"\n{args.prefixes} IPv4 prefixes in {args.sets} attribute sets -> FRR 8.4 bgpd "
          f"(passive, no soft-reconfiguration); median of {args.repeat}; load average "
          f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    print(f"  {'sender':8} {'Established->all (s)':>21} {'withdraw all (s)':>17} {'peak RSS (MB)':>14}   ranges")
    for name, r in results.items():
        ranges = "  ".join(f"{r[k + '_range'][0]}-{r[k + '_range'][1]}"
                           for k in ("convergence_seconds", "withdraw_seconds", "peak_rss_mb"))
        print(f"  {name:8} {r['convergence_seconds']:>21.3f} {r['withdraw_seconds']:>17.3f} "
              f"{r['peak_rss_mb']:>14.1f}   {ranges}")
    if "vipd" in results:
        v = results["vipd"]
        verdict = lambda ok: "PASS" if ok else "MISS"  # noqa: E731
        print(f"  vipd convergence {v['convergence_seconds']:.3f} s (target <= {TARGET_SECONDS} s): "
              f"{verdict(v['convergence_seconds'] <= TARGET_SECONDS)}")
        worst_rss = v["peak_rss_mb_range"][1]
        print(f"  vipd peak RSS {worst_rss:.1f} MB, worst run (target <= {TARGET_RSS_MB} MB): "
              f"{verdict(worst_rss <= TARGET_RSS_MB)}")
        if "bird" in results:
            ratio = v["convergence_seconds"] / results["bird"]["convergence_seconds"]
            wratio = v["withdraw_seconds"] / results["bird"]["withdraw_seconds"]
            results["ratio_vipd_over_bird"] = {"convergence": round(ratio, 2), "withdraw": round(wratio, 2)}
            print(f"  vipd / BIRD convergence: {ratio:.2f}x (target <= {TARGET_RATIO}x): "
                  f"{verdict(ratio <= TARGET_RATIO)}; withdraw: {wratio:.2f}x")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
