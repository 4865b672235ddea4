"""The seed 002 lab with vipd nodes: ``python -m agent.demo`` (``make demo``; root).

Topology (addresses and ASNs exactly as in seed 002, VyOS routers replaced by FRR):

                 client 192.168.0.2
                        |
      spine01 AS500   spine02 AS1000 (announces 192.168.0.0/24)
         |      \\     /     |
         |       \\   /      |
      leaf01 AS65005     leaf02 AS65010     (route reflectors; nodes are iBGP RR clients)
      10.0.5.1/24        10.0.10.1/24
       |      |           |       |
      cp     worker     worker2  worker3     four `vipd run` nodes, each with a "pod"
   10.0.5.11 10.0.5.12  10.0.10.11 10.0.10.12  namespace at .10 of its PodCIDR
  10.1.0.0/24 10.1.3.0/24 10.1.2.0/24 10.1.1.0/24

Every node runs ``vipd run --config <its dir>`` with the same manifests: the four Node objects
(labels rack=rack0|rack1, spec.podCIDRs) and either the seed's CiliumBGPPeeringPolicy (legacy)
or the equivalent v2 CiliumBGPClusterConfig / PeerConfig / Advertisement. Pod CIDRs are routed
natively: the routers learn them over BGP and FRR's zebra installs them in the kernel.

``--vip`` adds a second act: the nodes also run vipd's eBPF datapath (``--lb-interface``), the
config switches live to the v2 resources plus a LoadBalancer Service (LB-IPAM address,
externalTrafficPolicy=Local), and the client opens TCP connections to the VIP (~40 s: bcc
compiles the programs on each node).

The same builder serves the e2e tests (tests/e2e/controlplane/test_seed002_lab.py and
test_seed002_vip.py).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from agent.lab import Host, Lab, wait_until
from agent.lab.peers import Announce, FrrPeer, Neighbor

__all__ = ["NodeSpec", "NODES", "Seed002Lab", "nodes_yaml", "LEGACY_POLICY_YAML", "V2_BGP_YAML",
           "service_yaml", "main"]


@dataclass(frozen=True)
class NodeSpec:
    name: str          # the Kubernetes Node name (as kind named them in the seed)
    host: str          # lab host (namespace) name
    rack: str
    address: str
    pod_cidr: str
    leaf: str

    @property
    def pod_address(self) -> str:
        return self.pod_cidr.rsplit(".", 1)[0] + ".10"

    @property
    def leaf_address(self) -> str:
        return "10.0.5.1" if self.rack == "rack0" else "10.0.10.1"

    @property
    def pod_gateway(self) -> str:
        return self.pod_cidr.rsplit(".", 1)[0] + ".1"


# PodCIDRs as kind assigned them in the seed's run (see the routing tables there).
NODES = (
    NodeSpec("cilium-bgp-control-plane", "cp", "rack0", "10.0.5.11", "10.1.0.0/24", "leaf01"),
    NodeSpec("cilium-bgp-worker", "worker", "rack0", "10.0.5.12", "10.1.3.0/24", "leaf01"),
    NodeSpec("cilium-bgp-worker2", "worker2", "rack1", "10.0.10.11", "10.1.2.0/24", "leaf02"),
    NodeSpec("cilium-bgp-worker3", "worker3", "rack1", "10.0.10.12", "10.1.1.0/24", "leaf02"),
)


def nodes_yaml() -> str:
    docs = []
    for n in NODES:
        docs.append(f"""\
apiVersion: v1
kind: Node
metadata:
  name: {n.name}
  labels:
    rack: {n.rack}
    kubernetes.io/hostname: {n.name}
spec:
  podCIDR: {n.pod_cidr}
  podCIDRs:
  - {n.pod_cidr}
status:
  addresses:
  - type: InternalIP
    address: {n.address}
  - type: Hostname
    address: {n.name}
""")
    return "---\n".join(docs)


# Seed 002, verbatim (comments translated).
LEGACY_POLICY_YAML = """\
apiVersion: "cilium.io/v2alpha1"
kind: CiliumBGPPeeringPolicy
metadata:
  name: "rack0-65005"
spec:
  # which Kubernetes nodes this policy applies to
  nodeSelector:
    matchLabels:
      rack: rack0
  virtualRouters:
    - localASN: 65005 # the ASN of these worker nodes
      # export the Pod CIDR to announce. Must be set.
      exportPodCIDR: true
      # the BGP neighbors (peers)
      neighbors:
        - peerAddress: "10.0.5.1/24" # the BGP RR's address
          peerASN: 65005 # the peer's ASN
---
apiVersion: "cilium.io/v2alpha1"
kind: CiliumBGPPeeringPolicy
metadata:
  name: "rack1-65010"
spec:
  nodeSelector:
    matchLabels:
      rack: rack1
  virtualRouters:
    - localASN: 65010
      exportPodCIDR: true
      neighbors:
        - peerAddress: "10.0.10.1/24"
          peerASN: 65010
"""

# The same intent in cilium.io/v2 resources. Services are advertised too (selected with the
# NotIn trick = every service), with communities and local-pref for the leaves.
V2_BGP_YAML = """\
apiVersion: cilium.io/v2
kind: CiliumBGPClusterConfig
metadata:
  name: rack0
spec:
  nodeSelector:
    matchLabels:
      rack: rack0
  bgpInstances:
  - name: "65005"
    localASN: 65005
    peers:
    - name: leaf01
      peerASN: 65005
      peerAddress: 10.0.5.1
      peerConfigRef:
        name: route-reflector
---
apiVersion: cilium.io/v2
kind: CiliumBGPClusterConfig
metadata:
  name: rack1
spec:
  nodeSelector:
    matchLabels:
      rack: rack1
  bgpInstances:
  - name: "65010"
    localASN: 65010
    peers:
    - name: leaf02
      peerASN: 65010
      peerAddress: 10.0.10.1
      peerConfigRef:
        name: route-reflector
---
apiVersion: cilium.io/v2
kind: CiliumBGPPeerConfig
metadata:
  name: route-reflector
spec:
  timers:
    connectRetryTimeSeconds: 5
  gracefulRestart:
    enabled: true
    restartTimeSeconds: 120
  families:
  - afi: ipv4
    safi: unicast
    advertisements:
      matchLabels:
        advertise: bgp
  - afi: ipv6
    safi: unicast
    advertisements:
      matchLabels:
        advertise: bgp
---
apiVersion: cilium.io/v2
kind: CiliumBGPAdvertisement
metadata:
  name: pod-cidr
  labels:
    advertise: bgp
spec:
  advertisements:
  - advertisementType: PodCIDR
---
apiVersion: cilium.io/v2
kind: CiliumBGPAdvertisement
metadata:
  name: services
  labels:
    advertise: bgp
spec:
  advertisements:
  - advertisementType: Service
    service:
      addresses:
      - LoadBalancerIP
    selector:
      matchExpressions:
      - {key: somekey, operator: NotIn, values: ["never-used-value"]}
    attributes:
      communities:
        standard: ["65000:99"]
        large: ["65000:1:1"]
      localPreference: 200
"""

VIP_POOL_CIDR = "172.20.0.0/28"


def service_yaml(*, traffic_policy: str = "Local", endpoint_node: str | None = "cilium-bgp-worker",
                 ready: bool = True) -> str:
    """A LoadBalancer Service with an IP from an LB-IPAM pool and one endpoint on ``endpoint_node``."""
    endpoints = "[]"
    if endpoint_node:
        node = next(n for n in NODES if n.name == endpoint_node)
        endpoints = f"""
- addresses: ["{node.pod_address}"]
  conditions: {{ready: {str(ready).lower()}, serving: {str(ready).lower()}, terminating: false}}
  nodeName: {node.name}"""
    return f"""\
apiVersion: cilium.io/v2
kind: CiliumLoadBalancerIPPool
metadata:
  name: vips
spec:
  blocks:
  - cidr: {VIP_POOL_CIDR}
---
apiVersion: v1
kind: Service
metadata:
  name: web
  namespace: default
  labels:
    app: web
spec:
  type: LoadBalancer
  externalTrafficPolicy: {traffic_policy}
  selector:
    app: web
  ports:
  - port: 80
    protocol: TCP
    targetPort: 80
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: web-1
  namespace: default
  labels:
    kubernetes.io/service-name: web
addressType: IPv4
ports:
- port: 80
  protocol: TCP
endpoints: {endpoints}
"""


# A "pod": a TCP server on port 80 that answers each connection with its name.
POD_SERVER = r"""
import socket, sys, threading
name = sys.argv[1].encode()
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", 80)); s.listen(128)
def serve(c):
    with c:
        c.sendall(name + b"\n")
while True:
    c, _ = s.accept()
    threading.Thread(target=serve, args=(c,), daemon=True).start()
"""

# The client side: N fresh TCP connections to ADDR:80, one answer (or error) per line.
TCP_CLIENT = r"""
import socket, sys
vip, n = sys.argv[1], int(sys.argv[2])
answers = []
for i in range(n):
    try:
        with socket.create_connection((vip, 80), timeout=3) as c:
            answers.append(c.recv(100).decode().strip() or "EMPTY")
    except OSError as e:
        answers.append("ERROR " + type(e).__name__)
print("\n".join(answers))
"""

# veth XDP_TX / redirect needs an XDP program on the receiving peer (the bridge ports).
XDP_PASS = r"""
import sys
sys.path.append("/usr/lib/python3/dist-packages")
from bcc import BPF
b = BPF(text="int xdp_pass(struct xdp_md *ctx) { return XDP_PASS; }")
fn = b.load_func("xdp_pass", BPF.XDP)
for ifname in sys.argv[1:]:
    b.attach_xdp(ifname, fn, 0)
"""


@dataclass
class VipdNode:
    spec: NodeSpec
    host: Host
    config_dir: Path
    state_dir: Path
    socket: Path
    proc: subprocess.Popen | None = None

    def write(self, filename: str, text: str | None) -> None:
        """Atomically replace (or with None remove) one manifest in this node's config dir."""
        path = self.config_dir / filename
        if text is None:
            path.unlink(missing_ok=True)
            return
        tmp = self.config_dir / f".{filename}.tmp"
        tmp.write_text(text)
        os.replace(tmp, path)


@dataclass
class Seed002Lab:
    lab: Lab
    routers: dict = field(default_factory=dict)      # name -> FrrDaemon
    nodes: dict[str, VipdNode] = field(default_factory=dict)   # k8s node name -> VipdNode
    client: Host | None = None

    # -- building ------------------------------------------------------------------------------
    def build(self, *, zebra: bool = True, pods: bool = True) -> "Seed002Lab":
        lab = self.lab
        if zebra:
            # zebra drops privileges to user frr and must reach its directory inside the lab's
            # workdir, which mkdtemp created 0700 (reported to the harness owner).
            os.chmod(lab.workdir, 0o755)
        h = {name: lab.host(name, forwarding=True) for name in ("spine01", "spine02", "leaf01", "leaf02")}
        self.client = lab.host("client")
        lab.link(h["leaf01"], h["spine01"], ["10.0.101.2/24"], ["10.0.101.1/24"])
        lab.link(h["leaf01"], h["spine02"], ["10.0.103.2/24"], ["10.0.103.1/24"])
        lab.link(h["leaf02"], h["spine02"], ["10.0.102.2/24"], ["10.0.102.1/24"])
        lab.link(h["leaf02"], h["spine01"], ["10.0.104.2/24"], ["10.0.104.1/24"])
        lab.link(self.client, h["spine02"], ["192.168.0.2/24"], ["192.168.0.1/24"])
        self.client.route("default", via="192.168.0.1")
        node_hosts = {n.name: lab.host(n.host, forwarding=True) for n in NODES}
        for rack, leaf, gw in (("rack0", "leaf01", "10.0.5.1/24"), ("rack1", "leaf02", "10.0.10.1/24")):
            members = [(h[leaf], [gw])] + [(node_hosts[n.name], [f"{n.address}/24"])
                                          for n in NODES if n.rack == rack]
            lab.segment(f"{rack}-br", members)
        for n in NODES:
            host = node_hosts[n.name]
            host.route("default", via=n.leaf_address)
            if pods:
                pod = lab.host(f"pod-{n.host}")
                lab.link(host, pod, [f"{n.pod_gateway}/24"], [f"{n.pod_address}/24"],
                         a_if="pods", b_if="eth0")
                pod.route("default", via=n.pod_gateway)
        # Routers: the seed's VyOS configuration, in FRR. Leaves reflect between their nodes and
        # are graceful-restart helpers for them (used once the PeerConfig enables it).
        rr = lambda addr, asn: Neighbor(addr, asn, rr_client=True, graceful_restart=True)  # noqa: E731
        self.routers["spine01"] = lab.frr(h["spine01"], FrrPeer(
            asn=500, router_id="10.0.101.1", zebra=zebra,
            neighbors=[Neighbor("10.0.101.2", 65005), Neighbor("10.0.104.2", 65010)]))
        self.routers["spine02"] = lab.frr(h["spine02"], FrrPeer(
            asn=1000, router_id="10.0.102.1", zebra=zebra,
            neighbors=[Neighbor("10.0.102.2", 65010), Neighbor("10.0.103.2", 65005)],
            announce=[Announce("192.168.0.0/24")]))
        self.routers["leaf01"] = lab.frr(h["leaf01"], FrrPeer(
            asn=65005, router_id="10.0.5.1", zebra=zebra, graceful_restart=True,
            neighbors=[Neighbor("10.0.101.1", 500), Neighbor("10.0.103.1", 1000),
                       rr("10.0.5.11", 65005), rr("10.0.5.12", 65005)],
            announce=[Announce("10.0.5.0/24")]))
        self.routers["leaf02"] = lab.frr(h["leaf02"], FrrPeer(
            asn=65010, router_id="10.0.10.1", zebra=zebra, graceful_restart=True,
            neighbors=[Neighbor("10.0.102.1", 1000), Neighbor("10.0.104.1", 500),
                       rr("10.0.10.11", 65010), rr("10.0.10.12", 65010)],
            announce=[Announce("10.0.10.0/24")]))
        for n in NODES:
            base = lab.workdir / f"vipd-{n.host}"
            node = VipdNode(n, node_hosts[n.name], base / "config", base / "state", base / "run" / "vipd.sock")
            node.config_dir.mkdir(parents=True)
            self.nodes[n.name] = node
        return self

    def write_all(self, filename: str, text: str | None) -> None:
        for node in self.nodes.values():
            node.write(filename, text)

    def start_nodes(self, names: list[str] | None = None, *extra_args: str, lb: bool = False) -> None:
        """Start `vipd run` on the given nodes (default all) together and wait for their API
        sockets; ``lb`` adds each node's datapath options (see :meth:`lb_args`)."""
        chosen = [self.nodes[n] for n in (names or list(self.nodes))]
        for node in chosen:
            argv = [sys.executable, "-m", "agent.daemon", "run", "--config", str(node.config_dir),
                    "--node-name", node.spec.name, "--api-socket", str(node.socket),
                    "--state-dir", str(node.state_dir), "--log-format", "json", *extra_args,
                    *(self.lb_args(node.spec.name) if lb else ())]
            # share_mounts: the agent pins its maps in the host's bpffs, where its next
            # incarnation adopts them (`ip netns exec` would give it a private /sys).
            node.proc = node.host.spawn(argv, log_path=node.config_dir.parent / "vipd.log",
                                        env={"PYTHONPATH": str(Path(__file__).resolve().parent.parent)},
                                        share_mounts=True)
        for node in chosen:
            # with the datapath, bcc compiles the programs first (several seconds per node)
            wait_until(lambda: node.socket.exists() or node.proc.poll() is not None,
                       timeout=180 if lb else 30, what=f"vipd API socket of {node.spec.name}")
            if node.proc.poll() is not None:
                raise RuntimeError(f"vipd on {node.spec.name} exited:\n{self.vipd_log(node.spec.name)[-3000:]}")

    def stop_node(self, name: str, sig: int = 15, timeout: float = 20) -> int:
        """Signal one node's vipd (default SIGTERM) and wait for it; returns its exit status."""
        proc = self.nodes[name].proc
        proc.send_signal(sig)
        return proc.wait(timeout=timeout)

    def prepare_datapath(self) -> None:
        """Pod servers in every pod namespace and XDP_PASS on the bridge ports, so that
        `vipd run --lb-interface eth-<rack>-br` can serve VIPs in this lab."""
        # veth hands locally generated packets on with CHECKSUM_PARTIAL (only the pseudo-header
        # sum in the L4 checksum); XDP_TX drops that metadata. Senders compute full checksums, as
        # packets from a physical wire always have them.
        for host in self.lab.hosts.values():
            for link in json.loads(host.run("ip", "-j", "link", "show", "type", "veth")):
                host.run("ethtool", "-K", link["ifname"], "tx", "off")
        for rack in ("rack0", "rack1"):
            ports = [f"p-{n.host}" for n in NODES if n.rack == rack]
            self.lab.hosts[f"{rack}-br"].run(sys.executable, "-c", XDP_PASS, *ports, timeout=120)
        for n in NODES:
            self.lab.hosts[f"pod-{n.host}"].spawn([sys.executable, "-c", POD_SERVER, f"pod-on-{n.name}"])

    def lb_args(self, name: str) -> list[str]:
        spec = self.nodes[name].spec
        return ["--lb-interface", f"eth-{spec.rack}-br", "--bpf-pin-root", str(self.pin_root)]

    @property
    def pin_root(self) -> Path:
        return Path("/sys/fs/bpf") / f"{self.lab.prefix}vipd"

    def connect(self, address: str, n: int = 5) -> list[str]:
        """n TCP connections from the client to address:80; the answers (pod names) or errors."""
        out = subprocess.run(self.client.exec_argv([sys.executable, "-c", TCP_CLIENT, address, str(n)]),
                             capture_output=True, text=True, timeout=60)
        return out.stdout.split("\n")[:n]

    def vip(self) -> str:
        path = next(iter(self.nodes.values())).state_dir / "lbipam-allocations.yaml"

        def allocated():
            import yaml

            return path.exists() and (yaml.safe_load(path.read_text()) or {}).get(
                "allocations", {}).get("default/web", [None])[0]
        return wait_until(allocated, timeout=30, what="LB-IPAM allocation of default/web")

    def vip_announcers(self, prefix: str) -> set[str]:
        """Next hops of the leaves' paths for prefix learned from their own nodes."""
        return {p.next_hop for leaf in ("leaf01", "leaf02") for p in self.routes_by_prefix(leaf).get(prefix, [])
                if p.as_path == ()}

    def vipd_log(self, name: str) -> str:
        return (self.nodes[name].config_dir.parent / "vipd.log").read_text(errors="replace")

    def report_dead_agents(self) -> None:
        """Print the log tail of every vipd that exited: the first thing to look at when a
        step failed (tests call it on teardown)."""
        for name, node in self.nodes.items():
            if node.proc and node.proc.poll() is not None:
                print(f"--- vipd {name} exited ({node.proc.returncode}); log tail:\n"
                      f"{self.vipd_log(name)[-3000:]}")

    # -- inspecting ----------------------------------------------------------------------------
    def vipctl(self, name: str, *args: str, check: bool = True) -> str:
        node = self.nodes[name]
        proc = subprocess.run([sys.executable, "-m", "agent.api.cli", "--socket", str(node.socket), *args],
                              capture_output=True, text=True, timeout=30,
                              env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)})
        if check and proc.returncode != 0:
            raise RuntimeError(f"vipctl {' '.join(args)} on {name} failed ({proc.returncode}): {proc.stderr}")
        return proc.stdout

    def vipctl_all(self, *args: str) -> str:
        """vipctl against every node's socket at once: the cluster-wide layout (seed 004)."""
        sockets = ",".join(str(n.socket) for n in self.nodes.values())
        proc = subprocess.run([sys.executable, "-m", "agent.api.cli", *args], capture_output=True,
                              text=True, timeout=30,
                              env={**os.environ, "VIPD_SOCKET": sockets,
                                   "PYTHONPATH": str(Path(__file__).resolve().parent.parent)})
        if proc.returncode != 0:
            raise RuntimeError(f"vipctl {' '.join(args)} failed ({proc.returncode}): {proc.stderr}")
        return proc.stdout

    def peers_json(self, name: str) -> dict:
        return json.loads(self.vipctl(name, "bgp", "peers", "-o", "json"))

    def sessions_established(self) -> bool:
        for leaf, rack in (("leaf01", "rack0"), ("leaf02", "rack1")):
            sessions = self.routers[leaf].sessions()
            for n in NODES:
                if n.rack == rack and (n.address not in sessions or sessions[n.address].state != "established"):
                    return False
        return True

    def routes_by_prefix(self, router: str) -> dict[str, list]:
        out: dict[str, list] = {}
        for r in self.routers[router].routes("ipv4"):
            out.setdefault(r.prefix, []).append(r)
        return out

    def reflected_routes_received(self) -> bool:
        """Every node got what its route reflector sends it: the seed's "Received 6" (the two
        leaf subnets, 192.168.0.0/24, and the three other PodCIDRs)."""
        for name in self.nodes:
            for peer in self.peers_json(name)["peers"]:
                v4 = next(f for f in peer["families"] if f["afi"] == "ipv4")
                if v4["received"] < 6:
                    return False
        return True

    def learned_pod_cidrs(self) -> bool:
        for router in self.routers:
            table = self.routes_by_prefix(router)
            if not all(n.pod_cidr in table for n in NODES):
                return False
        return True


def _step(t0: float, text: str) -> None:
    print(f"[{time.monotonic() - t0:6.1f}s] {text}", flush=True)


def main(argv: list[str] | None = None) -> int:
    """``python -m agent.demo [--vip]``: --vip also runs vipd's eBPF datapath and serves a VIP."""
    argv = sys.argv[1:] if argv is None else argv
    with_vip = "--vip" in argv
    t0 = time.monotonic()
    if os.geteuid() != 0:
        print("agent.demo needs root (network namespaces, FRR)", file=sys.stderr)
        return 1
    lab = Lab("s002")
    try:
        with lab:
            failures, procs = _run(t0, lab, with_vip)
            _step(t0, "tearing down")
    finally:
        # pinned maps outlive the agents by design; the demo removes its own pin directory
        shutil.rmtree(Path("/sys/fs/bpf") / f"{lab.prefix}vipd", ignore_errors=True)
    left = [ns for ns in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.split()
            if ns.startswith(lab.prefix)]
    running = [p.pid for p in procs if p is not None and p.poll() is None]
    _step(t0, f"done; {'all checks passed' if not failures else f'{failures} check(s) failed'}; "
              f"namespaces left: {len(left)}, vipd processes left: {len(running)}")
    return 1 if failures or left or running else 0


def _run(t0: float, lab: Lab, with_vip: bool) -> tuple[int, list]:
    _step(t0, "building the seed 002 lab: 2 spines (AS 500, AS 1000), 2 leaves as route reflectors "
              "(AS 65005, AS 65010), 4 vipd nodes, a client behind spine02")
    env = Seed002Lab(lab).build()
    env.write_all("nodes.yaml", nodes_yaml())
    env.write_all("bgp.yaml", LEGACY_POLICY_YAML)
    if with_vip:
        env.prepare_datapath()
        _step(t0, "FRR routers up; starting `vipd run --lb-interface ...` (BGP + eBPF datapath) on the "
                  "four nodes with the seed's CiliumBGPPeeringPolicy")
        env.start_nodes(lb=True)
    else:
        _step(t0, "FRR routers up; starting `vipd run` on the four nodes with the seed's "
                  "CiliumBGPPeeringPolicy")
        env.start_nodes()
    procs = [n.proc for n in env.nodes.values()]
    wait_until(env.sessions_established, timeout=60, what="all node sessions established at the leaves")
    _step(t0, "all four nodes established with their leaf")
    wait_until(env.learned_pod_cidrs, timeout=60, what="every router learning all four PodCIDRs")
    wait_until(env.reflected_routes_received, timeout=30, what="each node receiving the reflected routes")
    first = NODES[0]
    _step(t0, f"vipctl bgp peers   (on {first.name}; the table of seed 002)")
    print(env.vipctl(first.name, "bgp", "peers"), flush=True)
    _step(t0, "vipctl --socket <each node> bgp peers   (cluster-wide, the table of seed 004)")
    print(env.vipctl_all("bgp", "peers"), flush=True)
    _step(t0, f"vipctl bgp routes advertised ipv4 unicast   (on {first.name})")
    print(env.vipctl(first.name, "bgp", "routes", "advertised", "ipv4", "unicast"), flush=True)
    for spine in ("spine01", "spine02"):
        _step(t0, f"{spine}: BGP table (show ip bgp)")
        out = env.routers[spine].vtysh("show ip bgp")
        print("\n".join(line for line in out.splitlines()
                        if line.strip() and not line.startswith(("Default local pref", "Status codes",
                                                                 "Nexthop codes", "RPKI", "Origin codes",
                                                                 "               ", "BGP table version"))),
              flush=True)
    _step(t0, "ping from the client (192.168.0.2) to a pod address in each rack, routed natively")
    failures = 0
    for n in NODES:
        r = subprocess.run(env.client.exec_argv(["ping", "-c", "1", "-W", "2", n.pod_address]),
                           capture_output=True, text=True)
        line = next((l for l in r.stdout.splitlines() if "bytes from" in l), "no reply")
        print(f"  {n.rack} {n.name:<26} pod {n.pod_address:<11} -> {line}", flush=True)
        failures += r.returncode != 0
    if with_vip:
        failures += _vip_act(t0, env)
    return failures, procs


def _vip_act(t0: float, env: Seed002Lab) -> int:
    _step(t0, "act 2: the same intent as cilium.io/v2 resources plus a LoadBalancer Service "
              "(LB-IPAM pool, externalTrafficPolicy=Local, its endpoint on cilium-bgp-worker), "
              "written into the config dirs: applied live")
    env.write_all("bgp.yaml", V2_BGP_YAML)
    env.write_all("svc.yaml", service_yaml(traffic_policy="Local", endpoint_node="cilium-bgp-worker"))
    vip = env.vip()
    wait_until(lambda: env.vip_announcers(f"{vip}/32") == {"10.0.5.12"}, timeout=30,
               what="the VIP announced by cilium-bgp-worker only")
    _step(t0, f"VIP {vip} announced only by the node with the ready endpoint; "
              "vipctl bgp routes advertised ipv4 unicast   (on cilium-bgp-worker)")
    print(env.vipctl("cilium-bgp-worker", "bgp", "routes", "advertised", "ipv4", "unicast"), flush=True)
    wait_until(lambda: env.connect(vip, 1) == ["pod-on-cilium-bgp-worker"], timeout=30,
               what="the first connection through the VIP")
    answers = env.connect(vip, 10)
    ok = answers.count("pod-on-cilium-bgp-worker")
    _step(t0, f"10 TCP connections from the client to {vip}:80 (XDP DNAT on the node): {ok} answered by "
              f"{answers[0]}")
    return 0 if ok == 10 else 1


if __name__ == "__main__":
    sys.exit(main())
