"""Router flaps through the real daemon: `vipd run` (BGP only) peering with FRR, GoBGP and BIRD
at once, each router passive (only vipd's reconnects can bring a session back). Run by
tests/e2e/controlplane/test_router_restart.py, in the background from the start of the test
session (see tests/e2e/controlplane/conftest.py): 330 s of it are routers being down, idle time
the rest of the suite uses. Runnable alone: ``python tests/e2e/controlplane/router_restart_scenario.py``.

* Every router is stopped, kept down 30 s, started: vipd is Established again at each router
  within connectRetryTimeSeconds + 2 s of the router being back (FRR / GoBGP semantics: retry
  every ConnectRetry with a little jitter, no back-off growing past it). Then once more with
  300 s down, in the same lab, so the long outage is paid once for the three routers. The
  default connectRetryTimeSeconds (120) would make the test 4 minutes longer and checks the same
  rule; the manifests use 5.
* `vipctl bgp reset <peer>`: Cease/Administrative Reset at the router, Established again; `--soft`
  re-sends the table without dropping the session (the router's uptime keeps growing).
* A ClusterConfig with an earlier name selecting the node does not take it over: the session
  at FRR is never reset and the conflict is a condition in `vipctl status`.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))
sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "benchmarks"))
from agent.lab import Lab, wait_until  # noqa: E402
from agent.lab.peers import FrrPeer, Neighbor  # noqa: E402
from agent.lab.scale import bgp_yaml, service_docs, vip_of  # noqa: E402
from bird import BirdDaemon  # noqa: E402

ROOT = Path(__file__).resolve().parents[3]
CONNECT_RETRY = 5
NODE_IP, NODE_ASN = "10.0.0.1", 65001
ROUTERS = {"frr": ("10.0.0.2", 65002), "gobgp": ("10.0.0.3", 65003), "bird": ("10.0.0.5", 65005)}
VIP = vip_of(0) + "/32"


def manifests() -> str:
    """One LoadBalancer Service (its LB-IPAM address is announced) and three peers."""
    return bgp_yaml(node_name="node1", node_ip=NODE_IP, local_asn=NODE_ASN, connect_retry=CONNECT_RETRY,
                    peers=[(name, ip, asn) for name, (ip, asn) in ROUTERS.items()]) + \
        service_docs(0, ports=1, pods=["10.1.0.10"], node_name="node1")


EARLIER_CONFIG = f"""\
apiVersion: cilium.io/v2
kind: CiliumBGPClusterConfig
metadata: {{name: aaa-other}}
spec:
  nodeSelector: {{matchLabels: {{bgp: "yes"}}}}
  bgpInstances:
  - name: other
    localASN: 65099
    peers:
    - name: frr
      peerASN: 65002
      peerAddress: 10.0.0.2
"""


def bird_config(ip: str, asn: int) -> str:
    return f"""\
router id {ip};
protocol device {{}}
protocol bgp node {{
  local {ip} as {asn};
  neighbor {NODE_IP} as {NODE_ASN};
  passive on;
  ipv4 {{ import all; export none; }};
}}
"""


class Routers:
    """The three routers, with one question each can answer: is the session to vipd up?"""

    def __init__(self, lab, hosts):
        self.lab, self.hosts = lab, hosts
        self.daemons: dict = {}

    def start(self, name: str):
        ip, asn = ROUTERS[name]
        host = self.hosts[name]
        if name == "bird":
            d = self.daemons.get("bird")
            if d is None:
                d = BirdDaemon(host, bird_config(ip, asn), name="bird-c")
                self.lab._daemons.append(d)  # stopped with the lab
            d.start()
        else:
            peer = FrrPeer(asn=asn, router_id=ip, neighbors=[Neighbor(NODE_IP, NODE_ASN, passive=True)])
            d = self.lab.frr(host, peer) if name == "frr" else self.lab.gobgp(host, peer)
        self.daemons[name] = d
        return d

    def stop(self, name: str) -> None:
        self.daemons[name].stop()

    def established(self, name: str) -> bool:
        d = self.daemons[name]
        try:
            if name == "bird":
                return "BGP state:          Established" in d.birdc("show", "protocols", "all", "node", check=False)
            s = d.sessions().get(NODE_IP)
            return s is not None and s.state == "established"
        except Exception:  # noqa: BLE001 - a router still starting answers nothing yet
            return False

    def has_vip(self, name: str) -> bool:
        d = self.daemons[name]
        if name == "bird":
            return VIP in d.birdc("show", "route", "protocol", "node", check=False)
        return any(r.prefix == VIP for r in d.routes("ipv4"))


def vipctl(socket_path, *args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "agent.api.cli", "--socket", str(socket_path), *args],
                          capture_output=True, text=True, timeout=60, cwd=ROOT)


def restart_all_after(routers: Routers, names, down: float) -> dict[str, float]:
    """Stop every router, wait ``down`` seconds, start them: seconds from each router's start to
    Established at that router."""
    for n in names:
        routers.stop(n)
    wait_until(lambda: not any(routers.established(n) for n in ("frr", "gobgp")), timeout=10)
    time.sleep(down)
    started = {}
    for n in names:
        routers.start(n)
        started[n] = time.monotonic()
    took: dict[str, float] = {}

    def poll():
        for n in names:
            if n not in took and routers.established(n):
                took[n] = time.monotonic() - started[n]
        return len(took) == len(names)
    wait_until(poll, timeout=CONNECT_RETRY * 3 + 10, interval=0.1, what="sessions back at every router")
    return took


def scenario() -> None:
    """The whole scenario; raises AssertionError (or any error) on failure."""
    with Lab("crst") as lab:
        node = lab.host("node")
        hosts = {n: lab.host(n) for n in ROUTERS}
        lab.segment("lan", [(node, [f"{NODE_IP}/24"])] + [(hosts[n], [f"{ip}/24"]) for n, (ip, _) in ROUTERS.items()])
        routers = Routers(lab, hosts)
        for n in ROUTERS:
            routers.start(n)
        base = lab.workdir / "vipd"
        cfg, state, sock = base / "config", base / "state", base / "run" / "vipd.sock"
        cfg.mkdir(parents=True)
        (cfg / "bgp.yaml").write_text(manifests())
        log_path = base / "vipd.log"
        proc = node.spawn([sys.executable, "-m", "agent.daemon", "run", "--config", str(cfg), "--node-name", "node1",
                           "--api-socket", str(sock), "--state-dir", str(state), "--log-format", "json"],
                          log_path=log_path, env={"PYTHONPATH": str(ROOT)})
        try:
            wait_until(lambda: all(routers.established(n) for n in ROUTERS) or proc.poll() is not None,
                       timeout=30, what="vipd established with FRR, GoBGP and BIRD")
            assert proc.poll() is None, log_path.read_text()[-3000:]
            wait_until(lambda: all(routers.has_vip(n) for n in ROUTERS), timeout=10, what="the VIP at every router")

            # operator resets: hard (Cease 6/4 at the router, session back) and soft (no drop)
            frr = routers.daemons["frr"]
            up_before = frr.sessions()[NODE_IP].uptime
            out = vipctl(sock, "bgp", "reset", "10.0.0.2", "--soft")
            assert out.returncode == 0, out.stderr
            time.sleep(1.0)
            s = frr.sessions()[NODE_IP]
            assert s.state == "established" and s.uptime >= up_before + 0.5, (up_before, s)
            assert "route refresh" in out.stdout.lower() or "re-sent" in out.stdout.lower(), out.stdout
            mark = len(frr.log())
            out = vipctl(sock, "bgp", "reset", "10.0.0.2")
            assert out.returncode == 0, out.stderr
            wait_until(lambda: "Administrative Reset" in frr.log()[mark:], timeout=10,
                       what="FRR logs the Cease/Administrative Reset")
            wait_until(lambda: routers.established("frr") and frr.sessions()[NODE_IP].uptime < 10, timeout=CONNECT_RETRY + 5,
                       what="FRR session re-established after the reset")
            wait_until(lambda: routers.has_vip("frr"), timeout=10, what="the VIP at FRR after the reset")
            bad = vipctl(sock, "bgp", "reset", "10.9.9.9")
            assert bad.returncode != 0 and "10.9.9.9" in bad.stderr, (bad.stdout, bad.stderr)

            # a ClusterConfig with an earlier name: the node stays with "racks", FRR never resets
            up_before = frr.sessions()[NODE_IP].uptime
            (cfg / "aaa.yaml").write_text(EARLIER_CONFIG)

            def conflict():
                st = json.loads(vipctl(sock, "status", "-o", "json").stdout)
                res = {(r["kind"], r["name"]): {c["type"]: c["status"] for c in r["conditions"]} for r in st["resources"]}
                return res.get(("CiliumBGPClusterConfig", "aaa-other"), {}).get("cilium.io/ConflictingClusterConfig") == "True"
            wait_until(conflict, timeout=10, what="ConflictingClusterConfig on aaa-other")
            time.sleep(2.0)
            s = frr.sessions()[NODE_IP]
            assert s.state == "established" and s.uptime >= up_before + 2.0, (up_before, s)
            assert s.peer_asn == NODE_ASN
            (cfg / "aaa.yaml").unlink()

            # router restarts: 30 s down, then 300 s down, the three routers together
            for down in (30, 300):
                took = restart_all_after(routers, list(ROUTERS), down)
                print(f"down {down}s: Established again after " +
                      ", ".join(f"{n} {t:.1f}s" for n, t in sorted(took.items())))
                late = {n: round(t, 1) for n, t in took.items() if t > CONNECT_RETRY + 2}
                assert not late, f"after {down}s down: {late} (limit {CONNECT_RETRY + 2}s)"
                wait_until(lambda: all(routers.has_vip(n) for n in ROUTERS), timeout=10,
                           what="the VIP back at every router")
            log = log_path.read_text()
            retries = [float(m) for m in re.findall(r'"retry_in": ([0-9.]+)', log)]
            assert retries and max(retries) <= CONNECT_RETRY, max(retries)
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
            if os.environ.get("CI") and proc.returncode not in (0, -15):
                print(log_path.read_text()[-3000:])


def _stop(signum, frame):
    raise SystemExit(f"stopped by signal {signum}")   # unwinds the lab: namespaces, daemons


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, _stop)
    scenario()
    print("router restart scenario: OK", flush=True)
