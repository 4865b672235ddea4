"""sessionAffinity and loadBalancerSourceRanges end to end: Service YAML in `vipd run`'s config
directory -> the daemon's datapath (XDP + tc on the node's uplink) -> real TCP connections.

::

    inside  10.10.0.2 fd10::2 ─┐                                           ┌─ pod-1 10.30.0.2  fd30:1::2
                               ├─ router ── node 10.20.0.11 fd20::11 (vipd) ┼─ pod-2 10.30.0.6  fd30:2::2
    outside 10.11.0.2 fd11::2 ─┘   10.96.0.0/16, fd96::/32 via node         └─ pod-3 10.30.0.10 fd30:3::2

Services (port 80 -> pods :8080, all three pods are local endpoints of the node):

* ``sticky``, dual stack: LoadBalancer 10.96.0.50 + fd96::50, ClusterIP 10.96.1.50 + fd96::1:50,
  sessionAffinity ClientIP, loadBalancerSourceRanges [10.10.0.0/24] (inside, IPv4 only);
* ``plain``: LoadBalancer 10.96.0.51, no affinity, no ranges.

The ranges guard only the LoadBalancer IPs: outside reaches sticky's ClusterIP (routed here
like any VIP) but not its LoadBalancer IP, where XDP drops its SYNs as SOURCE_RANGE; and as the
ranges are IPv4 only, sticky's IPv6 LoadBalancer IP admits nobody, not even inside.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from agent.datapath.api import Datapath
from agent.datapath.model import ServiceKey
from agent.lab import Lab, wait_until

REPO = Path(__file__).resolve().parents[3]
POD_SERVER = REPO / "tests" / "e2e" / "datapath" / "pod_server.py"
TRAFFIC = REPO / "tests" / "e2e" / "datapath" / "traffic.py"
NODE = "node"
PODS = {  # pod -> (node side, pod side) for IPv4 (one /30 each) and IPv6 (one /64 each)
    "pod-1": (("10.30.0.1", "10.30.0.2"), ("fd30:1::1", "fd30:1::2")),
    "pod-2": (("10.30.0.5", "10.30.0.6"), ("fd30:2::1", "fd30:2::2")),
    "pod-3": (("10.30.0.9", "10.30.0.10"), ("fd30:3::1", "fd30:3::2")),
}
STICKY_LB, STICKY_LB6, STICKY_CLUSTER, STICKY_CLUSTER6 = "10.96.0.50", "fd96::50", "10.96.1.50", "fd96::1:50"
PLAIN_LB = "10.96.0.51"

NODE_YAML = """\
apiVersion: v1
kind: Node
metadata: {name: node}
status:
  addresses: [{type: InternalIP, address: 10.20.0.11}, {type: InternalIP, address: "fd20::11"}]
"""


def service_yaml(name: str, lb_ips: list[str], cluster_ips: list[str], extra_spec: str = "") -> str:
    def endpoint_slice(family: int) -> str:
        endpoints = "\n".join(f"- {{addresses: [\"{v6[1] if family == 6 else v4[1]}\"], conditions: {{ready: true}}, "
                              f"nodeName: {NODE}}}" for v4, v6 in PODS.values())
        return f"""\
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {{name: {name}-v{family}, namespace: default, labels: {{kubernetes.io/service-name: {name}}}}}
addressType: IPv{family}
ports: [{{name: http, port: 8080, protocol: TCP}}]
endpoints:
{endpoints}
"""
    families = sorted({6 if ":" in ip else 4 for ip in cluster_ips})
    return f"""\
apiVersion: v1
kind: Service
metadata: {{name: {name}, namespace: default}}
spec:
  type: LoadBalancer
  clusterIPs: {json.dumps(cluster_ips)}
  ports: [{{name: http, port: 80, protocol: TCP, targetPort: 8080}}]
{extra_spec}status:
  loadBalancer:
    ingress: {json.dumps([{"ip": ip} for ip in lb_ips])}
""" + "".join(endpoint_slice(f) for f in families)


def sticky_yaml(policies: str) -> str:
    return service_yaml("sticky", [STICKY_LB, STICKY_LB6], [STICKY_CLUSTER, STICKY_CLUSTER6], policies)


STICKY_POLICIES = """\
  sessionAffinity: ClientIP
  sessionAffinityConfig: {clientIP: {timeoutSeconds: 600}}
  loadBalancerSourceRanges: [10.10.0.0/24]
"""


class Env:
    def __init__(self, lab: Lab):
        self.lab = lab
        self.pin_root = Path("/sys/fs/bpf") / f"{lab.prefix}vipd"
        self.config = lab.workdir / "vipd" / "config"
        self.config.mkdir(parents=True)
        self.socket = lab.workdir / "vipd" / "vipd.sock"
        self.log = lab.workdir / "vipd" / "vipd.log"

    def build(self) -> "Env":
        lab = self.lab
        router = lab.host("router", forwarding=True)
        self.node = node = lab.host(NODE, forwarding=True)
        self.clients = {"inside": lab.host("inside"), "outside": lab.host("outside")}
        lab.link(router, self.clients["inside"], ["10.10.0.1/24", "fd10::1/64"], ["10.10.0.2/24", "fd10::2/64"])
        lab.link(router, self.clients["outside"], ["10.11.0.1/24", "fd11::1/64"], ["10.11.0.2/24", "fd11::2/64"])
        lab.link(router, node, ["10.20.0.1/24", "fd20::1/64"], ["10.20.0.11/24", "fd20::11/64"])  # uplink: eth-router
        for client, net in (("inside", "10"), ("outside", "11")):
            self.clients[client].route("0.0.0.0/0", via=f"10.{net}.0.1")
            self.clients[client].route("::/0", via=f"fd{net}::1")
        router.route("10.96.0.0/16", via="10.20.0.11")
        router.route("fd96::/32", via="fd20::11")
        node.route("0.0.0.0/0", via="10.20.0.1")
        node.route("::/0", via="fd20::1")
        for name, ((node4, pod4), (node6, pod6)) in PODS.items():
            pod = lab.host(name)
            lab.link(node, pod, [f"{node4}/30", f"{node6}/64"], [f"{pod4}/30", f"{pod6}/64"])
            pod.route("0.0.0.0/0", via=node4)
            pod.route("::/0", via=node6)
        # XDP sees raw bytes: senders on veth must fill in full checksums (as a real NIC's
        # peer would), not leave CHECKSUM_PARTIAL metadata that XDP_PASS cannot carry
        for host in lab.hosts.values():
            for link in json.loads(host.run("ip", "-j", "link", "show", "type", "veth")):
                host.run("ethtool", "-K", link["ifname"], "tx", "off")
        for name in PODS:
            lab.hosts[name].spawn([sys.executable, str(POD_SERVER), name, "8080"])
        for name in PODS:
            wait_until(lambda: ":8080" in lab.hosts[name].run("ss", "-ltn"), timeout=15, what=f"{name} server")
        return self

    def write(self, filename: str, text: str) -> None:
        tmp = self.config / f".{filename}.tmp"
        tmp.write_text(text)
        tmp.rename(self.config / filename)   # the daemon's watcher never sees half a file

    def start_vipd(self) -> None:
        # share_mounts: vipd pins into the host's bpffs, so the test opens the same maps.
        argv = [sys.executable, "-m", "agent.daemon", "run", "--config", str(self.config), "--node-name", NODE,
                "--api-socket", str(self.socket), "--state-dir", str(self.config.parent / "state"),
                "--log-format", "json", "--lb-interface", "eth-router", "--bpf-pin-root", str(self.pin_root)]
        self.proc = self.node.spawn(argv, log_path=self.log, env={"PYTHONPATH": str(REPO)}, share_mounts=True)
        wait_until(lambda: self.socket.exists() or self.proc.poll() is not None, timeout=120,
                   what="vipd API socket (bcc compiles the datapath first)")
        if self.proc.poll() is not None:
            raise RuntimeError(f"vipd exited:\n{self.log.read_text()[-3000:]}")

    def connect(self, client: str, vip: str, count: int, first_port: int) -> list[dict]:
        """``count`` new TCP connections to vip:80, one per source port; who served each."""
        argv = [sys.executable, str(TRAFFIC), "burst", vip, "80", "tcp", str(first_port), str(count)]
        out = subprocess.run(self.clients[client].exec_argv(argv), capture_output=True, text=True, timeout=120)
        if out.returncode != 0:
            raise RuntimeError(f"traffic.py failed: {out.stderr[-2000:]}")
        return json.loads(out.stdout)

    def served_by(self, client: str, vip: str, count: int, first_port: int) -> list[str]:
        return [r.get("served_by") or r["error"] for r in self.connect(client, vip, count, first_port)]


@pytest.fixture(scope="module")
def env():
    lab = Lab("svcpol")
    try:
        with lab:
            env = Env(lab).build()
            env.write("node.yaml", NODE_YAML)
            env.write("sticky.yaml", sticky_yaml(STICKY_POLICIES))
            env.write("plain.yaml", service_yaml("plain", [PLAIN_LB], ["10.96.1.51"]))
            env.start_vipd()
            wait_until(lambda: "served_by" in env.connect("inside", PLAIN_LB, 1, 30000)[0], timeout=60,
                       what="first connection through the datapath")
            # a second handle on the pinned maps, to read what the daemon programmed and the counters
            env.dp = Datapath(instance=NODE, pin_root=str(env.pin_root))
            try:
                env.dp.load()
                yield env
            finally:
                env.dp.close()
    finally:
        shutil.rmtree(Path("/sys/fs/bpf") / f"{lab.prefix}vipd", ignore_errors=True)


def source_range_drops(env) -> int:
    return env.dp.counters().drops["SOURCE_RANGE"]


def test_the_daemon_programs_affinity_everywhere_and_ranges_on_the_loadbalancer_ips_only(env):
    programmed = env.dp.services()
    sticky = {vip: programmed[ServiceKey(vip, 80)] for vip in (STICKY_LB, STICKY_LB6, STICKY_CLUSTER, STICKY_CLUSTER6)}
    assert [str(r) for r in sticky[STICKY_LB].source_ranges] == ["10.10.0.0/24"]
    assert [str(r) for r in sticky[STICKY_LB6].source_ranges] == ["::/128"]   # no IPv6 range: nobody
    assert sticky[STICKY_CLUSTER].source_ranges == sticky[STICKY_CLUSTER6].source_ranges == ()
    assert {s.affinity_timeout for s in sticky.values()} == {600}
    assert programmed[ServiceKey(PLAIN_LB, 80)].affinity_timeout == 0


def test_only_clients_inside_the_range_reach_the_loadbalancer_ip(env):
    assert all(name in PODS for name in env.served_by("inside", STICKY_LB, 3, 31000))
    before = source_range_drops(env)
    refused = env.connect("outside", STICKY_LB, 2, 32000)
    assert all("served_by" not in r for r in refused), refused
    assert source_range_drops(env) >= before + 2, "each refused SYN is a SOURCE_RANGE drop in XDP"
    # the same client reaches a Service without ranges, and sticky's own ClusterIP
    assert all(name in PODS for name in env.served_by("outside", PLAIN_LB, 3, 33000))
    assert all(name in PODS for name in env.served_by("outside", STICKY_CLUSTER, 3, 34000))


def test_ranges_of_one_family_shut_the_other_familys_loadbalancer_ip(env):
    got = env.served_by("inside", STICKY_CLUSTER6, 3, 31100)
    assert all(name in PODS for name in got), got
    before = source_range_drops(env)
    refused = env.connect("inside", STICKY_LB6, 2, 32100)
    assert all("served_by" not in r for r in refused), refused
    assert source_range_drops(env) >= before + 2


def test_client_ip_affinity_keeps_one_client_on_one_backend(env):
    sticky = env.served_by("inside", STICKY_LB, 20, 35000)
    assert len(set(sticky)) == 1 and sticky[0] in PODS, sticky
    # the same 20 source ports without affinity spread over the backends (Maglev on the 5-tuple)
    spread = env.served_by("inside", PLAIN_LB, 20, 35000)
    assert set(spread) <= set(PODS) and len(set(spread)) >= 2, spread


def test_removing_the_ranges_from_the_yaml_opens_the_loadbalancer_ips(env):
    env.write("sticky.yaml", sticky_yaml("  sessionAffinity: ClientIP\n"))
    for vip, port in ((STICKY_LB, 36000), (STICKY_LB6, 36010)):
        wait_until(lambda: "served_by" in env.connect("outside", vip, 1, port)[0], timeout=30,
                   what=f"outside client admitted to {vip} after the ranges were removed")
        assert len(set(env.served_by("outside", vip, 10, port + 100))) == 1   # affinity stays
