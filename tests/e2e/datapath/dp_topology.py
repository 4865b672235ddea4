"""The datapath e2e lab: client -> router -> two nodes on a LAN -> "pods" behind each node.

::

    client 10.10.0.2 ── router 10.10.0.1 | 10.20.0.1 ──[lan bridge]── node-a 10.20.0.11 ── a1 10.30.1.2, a2 10.30.1.6
                                                              └────── node-b 10.20.0.12 ── b1 10.30.2.2, b2 10.30.2.6

IPv6 in parallel: client fd10::2, router fd10::1 | fd20::1, nodes fd20::11 / fd20::12, pods
fd31:0:0:N::2 (node-a, fd31::/48) and fd32:0:0:N::2 (node-b, fd32::/48), VIPs in fd96::/64.

Pods are routed natively (no overlay): the router has a route per node's pod CIDR and one for
the VIP range via node-a (the load-balancing node); each node has a direct route to the
other node's pod CIDR (autoDirectNodeRoutes). All routes go through agent.routing's
RouteManager, the component the daemon uses for them.
"""

from __future__ import annotations

import asyncio
import json
import sys
from dataclasses import dataclass
from pathlib import Path

from agent.lab import Host, Lab, wait_until
from agent.routing.manager import RouteManager
from agent.routing.model import NextHop, Route

HERE = Path(__file__).resolve().parent
POD_PORT = 8080
NODE_ADDR = {"node-a": "10.20.0.11", "node-b": "10.20.0.12"}
POD_CIDR = {"node-a": "10.30.1.0/24", "node-b": "10.30.2.0/24"}
PODS = {  # pod -> (node, node-side address, pod address), each on its own /30
    "a1": ("node-a", "10.30.1.1", "10.30.1.2"),
    "a2": ("node-a", "10.30.1.5", "10.30.1.6"),
    "b1": ("node-b", "10.30.2.1", "10.30.2.2"),
    "b2": ("node-b", "10.30.2.5", "10.30.2.6"),
}
PODS6 = {  # pod -> (node-side address, pod address), one /64 per pod link
    "a1": ("fd31:0:0:1::1", "fd31:0:0:1::2"),
    "a2": ("fd31:0:0:2::1", "fd31:0:0:2::2"),
    "b1": ("fd32:0:0:1::1", "fd32:0:0:1::2"),
    "b2": ("fd32:0:0:2::1", "fd32:0:0:2::2"),
}
NODE_ADDR6 = {"node-a": "fd20::11", "node-b": "fd20::12"}
POD_CIDR6 = {"node-a": "fd31::/48", "node-b": "fd32::/48"}
VIP_RANGE = "10.96.0.0/24"
VIP_RANGE6 = "fd96::/64"
CLIENT = "10.10.0.2"
CLIENT6 = "fd10::2"


def pod_address(pod: str, family: int) -> str:
    return PODS[pod][2] if family == 4 else PODS6[pod][1]


@dataclass
class DatapathLab:
    lab: Lab
    client: Host
    router: Host
    nodes: dict[str, Host]
    pods: dict[str, Host]

    def pod_addr(self, pod: str) -> str:
        return PODS[pod][2]

    def node_of(self, pod: str) -> str:
        return PODS[pod][0]


XDP_PASS_LOADER = """
import sys
sys.path.insert(0, sys.argv[1])
from agent.datapath.loader import BPF_F_XDP_HAS_FRAGS, import_bcc, load_prog
bcc = import_bcc()
b = bcc.BPF(text="int xdp_pass(struct xdp_md *ctx) { return XDP_PASS; }")
# multi-buffer aware, like xdp_lb: veth refuses an MTU above ~3.5k to a program without frags
fn = load_prog(b, "xdp_pass", bcc.BPF.XDP, prog_flags=BPF_F_XDP_HAS_FRAGS)
for ifname in sys.argv[2:]:
    b.attach_xdp(ifname, fn, 0)   # netlink attachment: stays after this process exits
"""
ROOT = HERE.parents[2]


def attach_xdp_pass(host: Host, ifnames: list[str]) -> None:
    host.run(sys.executable, "-c", XDP_PASS_LOADER, str(ROOT), *ifnames, timeout=120)


def veths(host: Host) -> list[str]:
    return [link["ifname"] for link in json.loads(host.run("ip", "-j", "link", "show", "type", "veth"))]


def configure_links(lab: Lab, *, mtu: int | None, offloads: str) -> None:
    """Link settings of every veth in the lab.

    ``offloads``: "tx-off" — transmit checksum offload off everywhere (the existing tests: every
    sender computes full checksums); "on" — the veth defaults (TSO, GSO, tx checksum offload)
    plus GRO on every veth, except that the bridge ports facing the nodes complete checksums
    (tx off), as a physical wire would deliver them: a veth otherwise hands a forwarded packet
    on with CHECKSUM_PARTIAL metadata, which XDP_TX / redirect cannot carry; "off" — GRO, GSO,
    TSO and checksum offload off on every veth."""
    for host in lab.hosts.values():
        for ifname in veths(host):
            if mtu:
                host.run("ip", "link", "set", ifname, "mtu", str(mtu))
            if offloads == "tx-off":
                host.run("ethtool", "-K", ifname, "tx", "off")
            elif offloads == "off":
                host.run("ethtool", "-K", ifname, "tx", "off", "tso", "off", "gso", "off", "gro", "off")
            elif offloads == "on":
                host.run("ethtool", "-K", ifname, "gro", "on")
                if ifname.startswith("p-node-"):
                    host.run("ethtool", "-K", ifname, "tx", "off")
            else:
                raise ValueError(f"offloads must be tx-off, on or off, not {offloads!r}")


def _sync(host: Host, routes: list[Route]) -> None:
    asyncio.run(RouteManager(netns=host.ns).sync(routes)).raise_for_failures()


def build(lab: Lab, *, mtu: int | None = None, offloads: str = "tx-off", pods_wanted=None,
          pod_servers: bool = True,
          extra_pods: dict[str, tuple[tuple[str, str, str], tuple[str, str]]] | None = None) -> DatapathLab:
    """The lab above (``pods_wanted``: a subset of the pods; ``mtu`` / ``offloads``: see
    configure_links; ``pod_servers``: start pod_server.py in every pod; ``extra_pods``: more pods,
    ``{name: ((node, node-side v4, pod v4), (node-side v6, pod v6))}`` inside the nodes' pod
    CIDRs, each on its own /30 and /64)."""
    all_pods = {**PODS, **{p: v4 for p, (v4, _) in (extra_pods or {}).items()}}
    all_pods6 = {**PODS6, **{p: v6 for p, (_, v6) in (extra_pods or {}).items()}}
    client = lab.host("client")
    router = lab.host("router", forwarding=True)
    nodes = {name: lab.host(name, forwarding=True) for name in NODE_ADDR}
    lab.link(router, client, ["10.10.0.1/24", "fd10::1/64"], [f"{CLIENT}/24", f"{CLIENT6}/64"])
    lan = lab.segment("lan", [(router, ["10.20.0.1/24", "fd20::1/64"]),
                              *[(nodes[n], [f"{a}/24", f"{NODE_ADDR6[n]}/64"]) for n, a in NODE_ADDR.items()]])
    client.route("0.0.0.0/0", via="10.10.0.1")
    client.route("::/0", via="fd10::1")
    pods = {}
    for pod, (node, node_side, pod_addr) in all_pods.items():
        if pods_wanted is not None and pod not in pods_wanted:
            continue
        pods[pod] = host = lab.host(pod)
        side6, pod6 = all_pods6[pod]
        lab.link(nodes[node], host, [f"{node_side}/30", f"{side6}/64"], [f"{pod_addr}/30", f"{pod6}/64"])
        host.route("0.0.0.0/0", via=node_side)
        host.route("::/0", via=side6)
    _sync(router, [Route(POD_CIDR[n], [NextHop(NODE_ADDR[n])]) for n in NODE_ADDR]
          + [Route(POD_CIDR6[n], [NextHop(NODE_ADDR6[n])]) for n in NODE_ADDR]
          + [Route(VIP_RANGE, [NextHop(NODE_ADDR["node-a"])]),
             Route(VIP_RANGE6, [NextHop(NODE_ADDR6["node-a"])])])
    for name, node in nodes.items():
        other = "node-b" if name == "node-a" else "node-a"
        _sync(node, [Route("0.0.0.0/0", [NextHop("10.20.0.1")]),
                     Route("::/0", [NextHop("fd20::1")]),
                     Route(POD_CIDR[other], [NextHop(NODE_ADDR[other])]),
                     Route(POD_CIDR6[other], [NextHop(NODE_ADDR6[other])])])
    configure_links(lab, mtu=mtu, offloads=offloads)
    # XDP_TX / redirect into a veth is dropped unless its peer runs NAPI, which a veth does
    # only with an XDP program attached: give the bridge ports facing the nodes an XDP_PASS.
    attach_xdp_pass(lan, [f"p-{name}" for name in NODE_ADDR])
    if pod_servers:
        for pod, host in pods.items():
            proc = host.spawn([sys.executable, str(HERE / "pod_server.py"), pod, str(POD_PORT)])
            host.proc = proc  # type: ignore[attr-defined]
        for pod, host in pods.items():
            wait_until(lambda: f":{POD_PORT}" in host.run("ss", "-ltn"), timeout=15, what=f"pod {pod} server")
    return DatapathLab(lab, client, router, nodes, pods)
