"""Manifests for scale labs: N LoadBalancer Services (LB-IPAM pool) with EndpointSlices whose
endpoints are spread over a few pods, written as a few multi-document YAML files.

Used by tests/e2e/controlplane/test_scale_vips.py and by hand::

    python -m agent.lab.scale 20000 1 /tmp/cfg     # 20,000 Services x 1 port
"""

from __future__ import annotations

import ipaddress
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

__all__ = ["POOL", "vip_of", "service_docs", "write_services", "bgp_yaml", "ScaleLab"]

POOL = "172.16.0.0/16"            # LB-IPAM pool: Service i gets 172.16.0.0 + i (see vip_of)
PORTS = (80, 81)


def vip_of(i: int) -> str:
    """The address LB-IPAM gives Service i when every Service is created in order (the pool is
    allocated lowest first, in the order of creationTimestamp, then name; Cilium's default
    allowFirstLastIPs uses the network address too)."""
    return str(ipaddress.IPv4Address(int(ipaddress.IPv4Address(POOL.split("/")[0])) + i))


def service_docs(i: int, *, ports: int, pods: list[str], node_name: str, backends: int = 1,
                 name: str | None = None) -> str:
    """One Service (``ports`` TCP ports 80, 81) and its EndpointSlice with ``backends`` endpoints
    taken round-robin from ``pods``."""
    name = name or f"svc-{i:05d}"
    port_lines = "".join(f"  - {{name: p{p}, port: {p}, protocol: TCP, targetPort: {p}}}\n" for p in PORTS[:ports])
    slice_ports = ", ".join(f"{{name: p{p}, port: {p}, protocol: TCP}}" for p in PORTS[:ports])
    eps = "".join(f"- {{addresses: [{pods[(i + j) % len(pods)]}], conditions: {{ready: true}}, nodeName: {node_name}}}\n"
                  for j in range(backends))
    return (f"---\napiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: scale, "
            f"labels: {{app: scale}}}}\n"
            f"spec:\n  type: LoadBalancer\n  externalTrafficPolicy: Cluster\n  ports:\n{port_lines}"
            f"---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: {name}-1, "
            f"namespace: scale, labels: {{kubernetes.io/service-name: {name}}}}}\naddressType: IPv4\n"
            f"ports: [{slice_ports}]\nendpoints:\n{eps}")


def log_events(text: str) -> list[dict]:
    """The JSON log lines of ``text`` (a vipd log, ``--log-format json``) as dicts."""
    out = []
    for line in text.splitlines():
        try:
            ev = json.loads(line)
        except ValueError:
            continue
        if isinstance(ev, dict):
            out.append(ev)
    return out


def write_services(directory: Path, count: int, *, ports: int, pods: list[str], node_name: str,
                   backends: int = 1, per_file: int = 2000) -> list[Path]:
    """Services 0..count-1 in files of ``per_file`` Services each (``services-NNN.yaml``)."""
    files = []
    for start in range(0, count, per_file):
        path = Path(directory) / f"services-{start // per_file:03d}.yaml"
        text = "".join(service_docs(i, ports=ports, pods=pods, node_name=node_name, backends=backends)
                       for i in range(start, min(count, start + per_file)))
        path.write_text(text)
        files.append(path)
    return files


def bgp_yaml(*, node_name: str, node_ip: str, peer_ip: str = "", local_asn: int, peer_asn: int = 0,
             peers: list[tuple[str, str, int]] | None = None, connect_retry: int = 1) -> str:
    """Node, LB-IPAM pool and the v2 BGP resources: announce every LoadBalancer IP to one peer
    (``peer_ip``, ``peer_asn``, named router) or to ``peers`` ((name, address, ASN) each)."""
    peer_lines = "".join(f"""\
    - name: {name}
      peerASN: {asn}
      peerAddress: {ip}
      peerConfigRef: {{name: router}}
""" for name, ip, asn in (peers or [("router", peer_ip, peer_asn)]))
    return f"""\
apiVersion: v1
kind: Node
metadata: {{name: {node_name}, labels: {{bgp: "yes"}}}}
status:
  addresses: [{{type: InternalIP, address: {node_ip}}}]
---
apiVersion: cilium.io/v2
kind: CiliumLoadBalancerIPPool
metadata: {{name: scale}}
spec:
  blocks: [{{cidr: {POOL}}}]
---
apiVersion: cilium.io/v2
kind: CiliumBGPClusterConfig
metadata: {{name: scale}}
spec:
  nodeSelector: {{matchLabels: {{bgp: "yes"}}}}
  bgpInstances:
  - name: i1
    localASN: {local_asn}
    peers:
{peer_lines}---
apiVersion: cilium.io/v2
kind: CiliumBGPPeerConfig
metadata: {{name: router}}
spec:
  timers: {{connectRetryTimeSeconds: {connect_retry}}}
  families:
  - afi: ipv4
    safi: unicast
    advertisements: {{matchLabels: {{advertise: bgp}}}}
---
apiVersion: cilium.io/v2
kind: CiliumBGPAdvertisement
metadata: {{name: services, labels: {{advertise: bgp}}}}
spec:
  advertisements:
  - advertisementType: Service
    service: {{addresses: [LoadBalancerIP]}}
    selector: {{matchExpressions: [{{key: somekey, operator: NotIn, values: [never]}}]}}
"""


if __name__ == "__main__":
    n, p, out = int(sys.argv[1]), int(sys.argv[2]), Path(sys.argv[3])
    out.mkdir(parents=True, exist_ok=True)
    write_services(out, n, ports=p, pods=["10.1.0.10", "10.1.0.11", "10.1.0.12", "10.1.0.13"], node_name="node1")
    (out / "bgp.yaml").write_text(bgp_yaml(node_name="node1", node_ip="10.0.0.2", peer_ip="10.0.0.1",
                                           local_asn=65001, peer_asn=65000))


# ------------------------------------------------------------------------------- the lab

# A "pod": TCP servers on ports 80 and 81 answering each connection with the pod's name, then
# echoing whatever the client sends until it closes (long-lived connections).
POD_SERVER = r"""
import socket, sys, threading
name = sys.argv[1].encode()
def echo(c):
    with c:
        c.sendall(name + b"\n")
        while True:
            data = c.recv(4096)
            if not data:
                return
            c.sendall(data)
def serve(port):
    s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("0.0.0.0", port)); s.listen(256)
    while True:
        c, _ = s.accept()
        threading.Thread(target=echo, args=(c,), daemon=True).start()
for port in (80, 81):
    threading.Thread(target=serve, args=(port,), daemon=True).start()
threading.Event().wait()
"""

# One long-lived connection: prints the pod's name, then echoes each stdin line through it.
LONG_CLIENT = r"""
import socket, sys
c = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=10)
print(c.recv(100).decode().strip(), flush=True)
for line in sys.stdin:
    try:
        c.sendall(line.encode())
        print(c.recv(100).decode().strip() or "CLOSED", flush=True)
    except OSError as e:
        print("ERROR " + type(e).__name__, flush=True)
"""

# N TCP connections to ADDR:PORT from the client; one answer (or error) per line.
TCP_CLIENT = r"""
import socket, sys
vip, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
out = []
for _ in range(n):
    try:
        with socket.create_connection((vip, port), timeout=3) as c:
            out.append(c.recv(100).decode().strip() or "EMPTY")
    except OSError as e:
        out.append("ERROR " + type(e).__name__)
print("\n".join(out))
"""

NODE_NAME = "node1"
ROUTER_IP, NODE_IP = "10.0.0.1", "10.0.0.2"
ROUTER_ASN, NODE_ASN = 65000, 65001


class ScaleLab:
    """router (FRR with zebra: the BGP peer, and the TCP client) -- node (``vipd run
    --lb-interface eth-router``) -- pods p0..p3 (one link each, 10.1.k.10): many LoadBalancer
    Services whose endpoints are spread over the pods, announced to the router over BGP and
    served by the node's XDP datapath (local backends: DNAT, reply rewritten by tc)."""

    def __init__(self, lab, *, pods: int = 4, graceful_restart: bool = False):
        from agent.lab.peers import FrrPeer, Neighbor

        self.lab = lab
        self.router = lab.host("router", forwarding=True)
        self.node = lab.host("node", forwarding=True)
        lab.link(self.router, self.node, [f"{ROUTER_IP}/24"], [f"{NODE_IP}/24"])
        self.pods = []
        for k in range(pods):
            pod = lab.host(f"p{k}")
            lab.link(self.node, pod, [f"10.1.{k}.1/24"], [f"10.1.{k}.10/24"], a_if=f"pod{k}", b_if="eth0")
            pod.route("default", via=f"10.1.{k}.1")
            self.pods.append(pod)
        self.pod_ips = [f"10.1.{k}.10" for k in range(pods)]
        # veth hands locally generated packets on with a partial checksum; a wire never does
        for host in lab.hosts.values():
            for link in json.loads(host.run("ip", "-j", "link", "show", "type", "veth")):
                host.run("ethtool", "-K", link["ifname"], "tx", "off")
        for k, pod in enumerate(self.pods):
            pod.spawn([sys.executable, "-c", POD_SERVER, f"p{k}"])
        self.frr = lab.frr(self.router, FrrPeer(asn=ROUTER_ASN, router_id=ROUTER_IP, zebra=True,
                                                graceful_restart=graceful_restart,
                                                neighbors=[Neighbor(NODE_IP, NODE_ASN,
                                                                    graceful_restart=graceful_restart)]))
        base = lab.workdir / "vipd"
        self.config_dir, self.state_dir = base / "config", base / "state"
        self.socket = base / "run" / "vipd.sock"
        self.config_dir.mkdir(parents=True)
        self.pin_root = Path("/sys/fs/bpf") / f"{lab.prefix}vipd"
        self.proc = None
        (self.config_dir / "bgp.yaml").write_text(bgp_yaml(node_name=NODE_NAME, node_ip=NODE_IP, peer_ip=ROUTER_IP,
                                                           local_asn=NODE_ASN, peer_asn=ROUTER_ASN))

    def write_services(self, count: int, *, ports: int, backends: int = 1) -> None:
        write_services(self.config_dir, count, ports=ports, pods=self.pod_ips, node_name=NODE_NAME,
                       backends=backends)

    def write(self, name: str, text: str) -> None:
        """Atomically add/replace one manifest file."""
        tmp = self.config_dir / f".{name}.tmp"
        tmp.write_text(text)
        os.replace(tmp, self.config_dir / name)

    def start(self, *extra: str, metrics_port: int | None = None) -> None:
        argv = [sys.executable, "-m", "agent.daemon", "run", "--config", str(self.config_dir),
                "--node-name", NODE_NAME, "--api-socket", str(self.socket), "--state-dir", str(self.state_dir),
                "--log-format", "json", "--lb-interface", "eth-router", "--bpf-pin-root", str(self.pin_root),
                *(["--metrics-addr", f"127.0.0.1:{metrics_port}"] if metrics_port else []), *extra]
        self.proc = self.node.spawn(argv, log_path=self.config_dir.parent / "vipd.log", share_mounts=True,
                                    env={"PYTHONPATH": str(Path(__file__).resolve().parents[2])})

    def log(self) -> str:
        return (self.config_dir.parent / "vipd.log").read_text(errors="replace")

    def accepted(self) -> int:
        """Prefixes FRR accepted from the node (0 while the session is not up)."""
        s = self.frr.sessions().get(NODE_IP)
        return s.accepted if s is not None and s.state == "established" else 0

    def kernel_routes(self) -> int:
        """Routes FRR's zebra installed in the router's kernel from BGP."""
        return len(self.router.run("ip", "-4", "route", "show", "proto", "bgp", timeout=60).splitlines())

    def has_route(self, prefix: str) -> bool:
        out = self.frr.vtysh(f"show bgp ipv4 unicast {prefix} json")
        data = json.loads(out) if out.strip() else {}
        return bool(data.get("paths"))

    def routed(self, prefix: str) -> bool:
        """The router's kernel forwards ``prefix`` by a BGP route: zebra installed it. FRR's BGP
        table has it first; a client connecting in between gets EHOSTUNREACH/ENETUNREACH."""
        return bool(self.router.run("ip", "route", "show", "exact", prefix, "proto", "bgp").strip())

    def wait_routed(self, prefix: str, timeout: float = 30) -> None:
        """Until ``prefix`` is in FRR's BGP table and in the router's kernel."""
        from agent.lab import wait_until
        wait_until(lambda: self.has_route(prefix) and self.routed(prefix), timeout=timeout, interval=0.1,
                   what=f"{prefix} in FRR's BGP table and the router's kernel")

    def connect(self, address: str, port: int = 80, n: int = 1) -> list[str]:
        out = subprocess.run(self.router.exec_argv([sys.executable, "-c", TCP_CLIENT, address, str(port), str(n)]),
                             capture_output=True, text=True, timeout=60)
        return out.stdout.split("\n")[:n]

    def long_connection(self, address: str, port: int = 80) -> subprocess.Popen:
        """A TCP connection kept open by a client process (see LONG_CLIENT); the lab stops it."""
        proc = subprocess.Popen(self.router.exec_argv([sys.executable, "-c", LONG_CLIENT, address, str(port)]),
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.lab._procs.append(proc)
        return proc

    def vipctl(self, *args: str) -> str:
        proc = subprocess.run([sys.executable, "-m", "agent.api.cli", "--socket", str(self.socket), *args],
                              capture_output=True, text=True, timeout=60,
                              env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])})
        if proc.returncode != 0:
            raise RuntimeError(f"vipctl {' '.join(args)} failed ({proc.returncode}): {proc.stderr}")
        return proc.stdout

    def metrics(self, port: int) -> str:
        code = f"import urllib.request; print(urllib.request.urlopen('http://127.0.0.1:{port}/metrics', timeout=10).read().decode())"
        return self.node.run(sys.executable, "-c", code, timeout=30)

    def allocations(self) -> dict[str, list[str]]:
        """LB-IPAM's allocations ("namespace/name" -> addresses) as persisted by the agent. The
        start-up pass that announces the VIPs writes the state dir last, so wait for the file."""
        import yaml

        from agent.lab import wait_until
        path = self.state_dir / "lbipam-allocations.yaml"
        wait_until(path.exists, timeout=30, interval=0.2, what=f"{path} written")
        text = path.read_text()
        return yaml.load(text, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))["allocations"]

    def map_memory(self) -> int:
        """Bytes of kernel memory (memlock) of every BPF map the agent holds open."""
        maps: dict[int, int] = {}     # map_id -> memlock (each map is open once per program object)
        for fd in Path(f"/proc/{self.proc.pid}/fdinfo").iterdir():
            try:
                info = dict(line.split(":", 1) for line in fd.read_text().splitlines() if ":" in line)
            except OSError:
                continue
            if "map_type" in info:
                maps[int(info["map_id"])] = int(info["memlock"])
        return sum(maps.values())

    def status_file(self) -> dict:
        import yaml
        return yaml.load((self.state_dir / "status.yaml").read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))

    def cleanup_pins(self) -> None:
        shutil.rmtree(self.pin_root, ignore_errors=True)
