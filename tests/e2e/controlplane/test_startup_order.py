"""Start-up order through the real daemon (`vipd run --lb-interface`, agent/lab/scale.py
ScaleLab, a real FRR peer with zebra):

* the BGP session comes up and the node's Pod CIDR is announced while the datapath is still
  loading: when the router installs the Pod CIDR, a VIP does not answer TCP yet (the router
  routes the pool to the node statically, so the probe does not depend on BGP);
* no VIP reaches the router before it is served: the moment the router installs a VIP's /32, a
  TCP connection to it is answered by the right pod, on the first try;
* graceful restart (FRR and vipd with gracefulRestart enabled): across a warm restart (SIGTERM,
  same state dir and pinned datapath) the router never removes a VIP route: the new agent holds
  End-of-RIB until every programmed VIP is in its table again, so FRR keeps the stale ones
  until then; every file comes from the parse cache.

5,000 Services: loading and programming them takes seconds, so the window is wide.
"""

from __future__ import annotations

import json
import subprocess
import threading
import time

from agent.lab import Lab, wait_until
from agent.lab.scale import NODE_IP, POOL, ScaleLab, bgp_yaml, service_docs, vip_of

N = 5000
POD_CIDR = "10.244.7.0/24"


def _config_with_pod_cidr() -> str:
    """The lab's BGP config, plus a podCIDR on the Node and a PodCIDR advertisement."""
    from agent.lab.scale import NODE_ASN, NODE_NAME, ROUTER_ASN, ROUTER_IP

    text = bgp_yaml(node_name=NODE_NAME, node_ip=NODE_IP, peer_ip=ROUTER_IP, local_asn=NODE_ASN,
                    peer_asn=ROUTER_ASN)
    node = f'metadata: {{name: {NODE_NAME}, labels: {{bgp: "yes"}}}}\n'
    assert node in text
    text = text.replace(node, node + f"spec: {{podCIDRs: [{POD_CIDR}]}}\n")
    timers = "  timers: {connectRetryTimeSeconds: 1}\n"
    assert timers in text
    text = text.replace(timers, timers + "  gracefulRestart: {enabled: true, restartTimeSeconds: 120}\n")
    return text + """---
apiVersion: cilium.io/v2
kind: CiliumBGPAdvertisement
metadata: {name: pods, labels: {advertise: bgp}}
spec:
  advertisements:
  - advertisementType: PodCIDR
"""


class RouteWatch:
    """`ip monitor route` in the router: on each BGP route installed, ``on_route(prefix)`` runs
    at once (in the watcher thread), so a probe sees the datapath at that moment."""

    def __init__(self, env: ScaleLab, on_route, on_delete=None):
        self.proc = subprocess.Popen(env.router.exec_argv(["ip", "-4", "monitor", "route"]),
                                     stdout=subprocess.PIPE, text=True, bufsize=1)
        env.lab._procs.append(self.proc)
        self.on_route = on_route
        self.on_delete = on_delete
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        time.sleep(0.2)   # subscribed

    def _run(self):
        for line in self.proc.stdout:
            if "proto bgp" not in line:
                continue
            if not line.startswith("Deleted"):
                self.on_route(line.split()[0])
            elif self.on_delete is not None:
                self.on_delete(line.split()[1])

    def stop(self):
        self.proc.kill()
        self.proc.wait()


def test_session_up_before_the_datapath_and_no_vip_announced_before_it_answers():
    first, last = vip_of(1), vip_of(N - 1)
    with Lab("sstart") as lab:
        env = ScaleLab(lab, graceful_restart=True)
        try:
            (env.config_dir / "bgp.yaml").write_text(_config_with_pod_cidr())
            env.write_services(N, ports=1)
            env.router.route(POOL, via=NODE_IP)        # TCP to a VIP reaches the node without BGP
            seen: dict[str, list[str]] = {}

            def on_route(prefix: str) -> None:
                if prefix == POD_CIDR or prefix in (first, last):
                    vip = last if prefix == POD_CIDR else prefix
                    seen.setdefault(prefix, env.connect(vip, 80, 1))

            watch = RouteWatch(env, on_route)
            try:
                env.start()
                wait_until(lambda: env.accepted() >= N + 1 or env.proc.poll() is not None, timeout=120,
                           interval=0.5, what=f"{N} VIPs and the Pod CIDR at FRR")
                assert env.proc.poll() is None, env.log()[-3000:]
                wait_until(lambda: len(seen) == 3, timeout=30, what="the watched routes probed")
            finally:
                watch.stop()
            # The session is started before the start-up plan (LB-IPAM, frontends, paths), so
            # its TCP/OPEN exchange overlaps that work.
            events = [json.loads(line).get("event") for line in env.log().splitlines() if line.startswith("{")]
            assert events.index("neighbor added") < events.index("start-up plan"), events[:40]
            # The session was up and the Pod CIDR installed while the datapath did not serve yet.
            assert seen[POD_CIDR][0].startswith("ERROR"), (seen, env.log()[-3000:])
            # Each VIP answered the moment the router had its route (Service i -> pod i % 4).
            assert seen[first] == [f"p{1 % 4}"], seen
            assert seen[last] == [f"p{(N - 1) % 4}"], seen
            status = env.vipctl("status")
            assert "Reconcile errors: none" in status, status[-2000:]
            # One Service more fits the maps' headroom; a fresh plan for N + 1 would ask for a
            # little more than is pinned: the restart below must not grow (reload) the maps for that.
            env.write("extra.yaml", service_docs(N, ports=1, pods=env.pod_ips, node_name="node1"))
            wait_until(lambda: env.accepted() >= N + 2, timeout=30, what="one more VIP at FRR")
            assert '"datapath grown"' not in env.log()

            # Warm restart, graceful: FRR keeps the routes as stale; not one VIP route may go.
            deleted: list[str] = []
            watch = RouteWatch(env, lambda prefix: None, deleted.append)
            try:
                env.proc.terminate()
                env.proc.wait(timeout=60)
                wait_until(lambda: env.frr.sessions().get(NODE_IP) is None
                           or env.frr.sessions()[NODE_IP].state != "established", timeout=30,
                           what="the session closed")
                env.start()
                wait_until(lambda: env.proc.poll() is not None or (
                    '"vipd running"' in env.log().rsplit('"vipd stopped"', 1)[-1] and env.accepted() >= N + 2),
                    timeout=120, interval=0.5, what=f"the restarted agent running, {N + 1} VIPs at FRR")
                assert env.proc.poll() is None, env.log()[-3000:]
                time.sleep(2.0)    # End-of-RIB processed: FRR has dropped whatever stayed stale
            finally:
                watch.stop()
            assert deleted == [], f"routes removed at the router across the restart: {deleted[:5]}"
            assert env.accepted() == N + 2
            assert '"datapath grown"' not in env.log(), "the restart reloaded the maps it could adopt"
            assert env.connect(last, 80, 2) == [f"p{(N - 1) % 4}"] * 2
            loads = [json.loads(line) for line in env.log().splitlines()
                     if line.startswith("{") and '"configuration loaded"' in line]
            assert loads[-1]["cached"] == loads[-1]["files"], loads[-1]   # every file from the parse cache
        finally:
            env.cleanup_pins()
