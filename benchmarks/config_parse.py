"""Configuration parsing at scale: a config directory of N LoadBalancer Services (+ one
EndpointSlice each, agent/lab/scale.py, the same files benchmarks/agent_scale.py loads) read and
validated the ways vipd reads it, against the floor of PyYAML's C loader on the same files.

Per N (default 1,000 / 10,000 / 20,000 Services), each figure from a fresh process:

* **floor**: ``yaml.load_all(CSafeLoader)`` of every file, values only: no limits, no checks,
  no typed objects (what "just parse the YAML" costs in Python);
* **validate**: ``load_files`` in-process (what `vipctl config validate` runs), without imports;
* **daemon**: ``FileSource.reload()`` as `vipd run` starts: the parser process is spawned, reads,
  parses, validates, streams the objects back, the agent assembles them into the store. Wall
  seconds from the call to the store's snapshot, and the CPU seconds of both processes;
* **warm**: the same after a restart, every file served by the parse cache
  (STATE_DIR/config-cache, written by a first run);
* **vipctl**: `vipctl config validate DIR`, process start to exit (imports included);
* the same with ``VIPD_FAST_YAML=0`` (libyaml for every file: the path before yaml_rs), in the
  same run, so the speed-up is measured on the same machine at the same load.

    .venv/bin/python benchmarks/config_parse.py                      # 1k, 10k, 20k
    .venv/bin/python benchmarks/config_parse.py --services 20000 --json out.json

Not a test: it prints numbers (and the target at 20,000: daemon load <= 1.5 s) and exits 0
unless a run failed. The machine's load average is printed: other work skews every figure.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TARGET_DAEMON_S = 1.5

FLOOR = r"""
import sys, time, yaml
from pathlib import Path
files = sorted(p for p in Path(sys.argv[1]).iterdir() if p.suffix == ".yaml")
t = time.perf_counter()
n = sum(1 for f in files for d in yaml.load_all(f.read_bytes(), Loader=yaml.CSafeLoader) if d)
print(time.perf_counter() - t, n)
"""

VALIDATE = r"""
import sys, time
from pathlib import Path
from agent.config.loader import load_files, manifest_files
t = time.perf_counter()
r = load_files(manifest_files(Path(sys.argv[1])))
assert not r.errors, r.errors[:3]
print(time.perf_counter() - t, len(r.objects.all()))
"""

# as agent.daemon.run_agent: its GC thresholds, then the file source's first reload
DAEMON = r"""
import asyncio, gc, sys, time
gc.set_threshold(100_000, 20, 20)
from agent.sources.files import FileSource
from agent.store import Store

def cpu_of(pid):
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

async def main():
    store = Store()
    source = FileSource(sys.argv[1], store, cache_dir=sys.argv[2] if len(sys.argv) > 2 else None)
    c, t = time.process_time(), time.perf_counter()
    await source.reload()
    wall, parent = time.perf_counter() - t, time.process_time() - c
    assert not store.current.errors, store.current.errors[:3]
    worker = cpu_of(source._parser._proc.pid)
    await source.close()
    assert source.last_load["cached"] == (source.last_load["files"] if len(sys.argv) > 3 else 0)
    print(wall, len(store.current.objects.all()), parent, worker)

import os
asyncio.run(main())
"""


def run(code: str, directory: Path, fast: bool, *extra: str) -> list[float]:
    env = {**os.environ, "PYTHONPATH": str(REPO), "VIPD_FAST_YAML": "1" if fast else "0"}
    out = subprocess.run([sys.executable, "-c", code, str(directory), *extra], env=env, check=True,
                         capture_output=True, text=True, timeout=600).stdout
    return [float(x) for x in out.splitlines()[-1].split()]   # earlier lines: the agent's log


def vipctl(directory: Path, fast: bool) -> float:
    env = {**os.environ, "PYTHONPATH": str(REPO), "VIPD_FAST_YAML": "1" if fast else "0"}
    t = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "agent.api.cli", "config", "validate",
                           str(directory)], env=env, capture_output=True, text=True, timeout=600)
    took = time.perf_counter() - t
    if done.returncode != 0:
        raise RuntimeError(f"vipctl config validate failed:\n{done.stdout[-2000:]}{done.stderr[-2000:]}")
    return took


def measure(n: int) -> dict:
    sys.path.insert(0, str(REPO))
    from agent.lab.scale import bgp_yaml, write_services

    with tempfile.TemporaryDirectory(prefix="vipd-config-parse-") as tmp:
        d = Path(tmp) / "config"
        d.mkdir()
        write_services(d, n, ports=1, pods=["10.1.0.10", "10.1.0.11", "10.1.0.12"],
                       node_name="node1")
        (d / "bgp.yaml").write_text(bgp_yaml(node_name="node1", node_ip="10.0.0.2",
                                             peer_ip="10.0.0.1", local_asn=65001, peer_asn=65000))
        size = sum(f.stat().st_size for f in d.iterdir())
        out: dict = {"services": n, "bytes": size}
        floor, docs = run(FLOOR, d, True)
        cache = d.parent / (d.name + "-cache")
        run(DAEMON, d, True, str(cache))                       # writes the cache
        warm, objects, warm_parent, warm_worker = run(DAEMON, d, True, str(cache), "warm")
        out["warm"] = {"daemon_s": round(warm, 3), "daemon_agent_cpu_s": round(warm_parent, 3),
                       "daemon_parser_cpu_s": round(warm_worker, 3)}
        out["documents"] = int(docs)
        out["floor_s"] = round(floor, 3)
        for fast in (True, False):
            tag = "fast" if fast else "libyaml"
            validate, objects = run(VALIDATE, d, fast)
            wall, objects2, parent, worker = run(DAEMON, d, fast)
            assert objects == objects2 == docs, (objects, objects2, docs)
            out[tag] = {"validate_s": round(validate, 3), "daemon_s": round(wall, 3),
                        "daemon_agent_cpu_s": round(parent, 3),
                        "daemon_parser_cpu_s": round(worker, 3),
                        "vipctl_s": round(vipctl(d, fast), 3)}
        return out


def main() -> int:
    p = argparse.ArgumentParser(description="configuration parsing at scale vs PyYAML's floor")
    p.add_argument("--services", default="1000,10000,20000", help="comma-separated Service counts")
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args()
    results = []
    for n in (int(x) for x in args.services.split(",")):
        r = measure(n)
        print(f"  {n}: {json.dumps(r)}", flush=True)
        results.append(r)
    print(f"\nseconds per load (fresh process each; load average {os.getloadavg()[0]:.1f} on "
          f"{os.cpu_count()} CPUs); floor = yaml.load_all(CSafeLoader), values only")
    print("  daemon: wall s (parser process CPU s + agent CPU s); CPU is the steadier figure on a "
          "busy machine")
    print(f"  {'services':>8} {'docs':>6} {'MB':>5} {'floor':>6} | {'validate':>8} {'daemon':>19} "
          f"{'warm':>19} {'vipctl':>7} | libyaml: {'validate':>8} {'daemon':>19} {'vipctl':>7} | "
          f"{'daemon/floor':>12} {'speed-up':>8}")

    def daemon(x: dict) -> str:
        return (f"{x['daemon_s']:.2f} ({x['daemon_parser_cpu_s']:.2f}+"
                f"{x['daemon_agent_cpu_s']:.2f})").rjust(19)
    for r in results:
        f, s, w = r["fast"], r["libyaml"], r["warm"]
        print(f"  {r['services']:>8} {r['documents']:>6} {r['bytes'] / 1e6:>5.1f} {r['floor_s']:>6.2f} | "
              f"{f['validate_s']:>8.2f} {daemon(f)} {daemon(w)} {f['vipctl_s']:>7.2f} | "
              f"         {s['validate_s']:>8.2f} {daemon(s)} {s['vipctl_s']:>7.2f} | "
              f"{f['daemon_s'] / r['floor_s']:>12.2f} {s['daemon_s'] / f['daemon_s']:>7.1f}x")
    top = results[-1]
    if top["services"] >= 20000:
        ok = top["fast"]["daemon_s"] <= TARGET_DAEMON_S
        print(f"  at {top['services']}: daemon load {top['fast']['daemon_s']:.2f} s "
              f"(target <= {TARGET_DAEMON_S} s): {'PASS' if ok else 'MISS'}; "
              f"{top['libyaml']['daemon_s'] / top['fast']['daemon_s']:.1f}x faster than libyaml")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
