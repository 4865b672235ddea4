"""Agent restart at scale: `vipd run --lb-interface` with N LoadBalancer Services (agent/lab/scale.py
ScaleLab, as benchmarks/agent_scale.py), started on fresh pins (cold), stopped (SIGTERM, notify
mode: programs and pinned maps stay), started again on the same pins (warm).

Per start it prints: start -> all N prefixes at FRR, the start-up milestones (seconds from the
process start to the first log line of each), the first reconcile pass's steps, and
``vipd_datapath_map_writes_total`` after the start: the warm start adopts the pinned maps and,
with an unchanged configuration, must write 0 entries. The ratio is warm / cold of the
"services" step (the reference is the cold start of the same run).

    sudo .venv/bin/python benchmarks/agent_restart.py --services 20000

Not a test: it prints numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE)]

import agent_scale  # noqa: E402
from agent.lab import Lab, wait_until  # noqa: E402
from agent.lab.scale import NODE_IP, POOL, ScaleLab  # noqa: E402

METRICS_PORT = 9479
MILESTONES = tuple(agent_scale.MILESTONES) + ("adopted pinned datapath state",)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--services", type=int, default=20000)
    args = p.parse_args()
    n = args.services
    agent_scale.MILESTONES = MILESTONES   # its timeline() reads this
    print(f"{n} services, load average {os.getloadavg()[0]:.2f}")
    results = {}
    with Lab("cagsr") as lab:
        env = ScaleLab(lab)
        try:
            env.write_services(n, ports=1)
            env.router.route(POOL, via=NODE_IP)
            offset = 0
            for run in ("cold", "warm"):
                started = time.time()
                env.start("--shutdown-mode", "notify", metrics_port=METRICS_PORT)
                wait_until(lambda: env.accepted() >= n, timeout=600, what=f"{n} prefixes at FRR ({run})")
                took = time.time() - started
                time.sleep(2)   # the pass's log line and metrics are out
                full = env.log()
                log, offset = full[offset:], len(full)
                passes = [json.loads(line) for line in log.splitlines()
                          if line.startswith("{") and '"reconcile pass"' in line]
                writes = [line.split()[-1] for line in env.metrics(METRICS_PORT).splitlines()
                          if line.startswith("vipd_datapath_map_writes_total")]
                results[run] = {"start_to_all_seconds": round(took, 2),
                                "timeline_seconds": agent_scale.timeline(log, started),
                                "first_pass_seconds": {k: v for k, v in passes[0].items() if isinstance(v, float)}
                                if passes else {},
                                "map_writes": float(writes[0]) if writes else None}
                print(f"  {run}: {json.dumps(results[run])}", flush=True)
                env.proc.terminate()
                env.proc.wait(timeout=60)
        finally:
            env.cleanup_pins()
    cold = results["cold"]["first_pass_seconds"].get("services")
    warm = results["warm"]["first_pass_seconds"].get("services")
    if cold and warm is not None:
        print(f"services step of the first pass: cold {cold:.2f} s, warm {warm:.2f} s ({warm / cold:.2f}x); "
              f"map writes cold {results['cold']['map_writes']:.0f}, warm {results['warm']['map_writes']:.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
