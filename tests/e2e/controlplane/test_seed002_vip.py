"""A LoadBalancer VIP served end to end: the seed 002 lab with `vipd run --lb-interface`, so
each node both announces the VIP over BGP and programs it into its eBPF datapath (XDP + tc on
the uplink). The client behind spine02 opens real TCP connections to VIP:80:

* eTP=Local, endpoint on cilium-bgp-worker: only that node announces, its XDP DNATs to the
  local pod, the reply leaves as VIP:80 (tc egress);
* eTP=Cluster: every node announces; whichever node the routers pick forwards to the pod on
  cilium-bgp-worker (SNAT to a remote backend when it is not that node);
* an agent restart adopts the pinned maps: connections keep working.
"""

import shutil
import socket  # noqa: F401  (used in the client snippet's namespace)
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from agent import demo
from agent.demo import NODES, Seed002Lab
from agent.lab import Lab, wait_until

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

CLIENT = r"""
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

XDP_PASS = r"""
import sys
sys.path.append("/usr/lib/python3/dist-packages")
from bcc import BPF
b = BPF(text="int xdp_pass(struct xdp_md *ctx) { return XDP_PASS; }")
fn = b.load_func("xdp_pass", BPF.XDP)
for ifname in sys.argv[1:]:
    b.attach_xdp(ifname, fn, 0)
"""


@pytest.fixture(scope="module")
def env():
    with Lab("s002vip") as lab:
        pin_root = Path("/sys/fs/bpf") / f"{lab.prefix}vipd"
        try:
            env = Seed002Lab(lab).build()
            # veth XDP_TX/redirect needs an XDP program on the receiving peer: the bridge ports
            for rack in ("rack0", "rack1"):
                switch = lab.hosts[f"{rack}-br"]
                ports = [f"p-{n.host}" for n in NODES if n.rack == rack]
                switch.run(sys.executable, "-c", XDP_PASS, *ports, timeout=120)
            for n in NODES:
                lab.hosts[f"pod-{n.host}"].spawn([sys.executable, "-c", POD_SERVER, f"pod-on-{n.name}"])
            env.write_all("nodes.yaml", demo.nodes_yaml())
            env.write_all("bgp.yaml", demo.V2_BGP_YAML)
            env.write_all("svc.yaml", demo.service_yaml(traffic_policy="Local", endpoint_node="cilium-bgp-worker"))
            env.lb_args = ("--bpf-pin-root", str(pin_root))
            for n in NODES:
                env.start_nodes([n.name], "--lb-interface", f"eth-{n.rack}-br", *env.lb_args)
            wait_until(env.sessions_established, timeout=120, what="sessions established")
            yield env
        finally:
            lab.close()
            shutil.rmtree(pin_root, ignore_errors=True)


def vip(env) -> str:
    path = env.nodes[NODES[0].name].state_dir / "lbipam-allocations.yaml"
    return wait_until(lambda: path.exists() and yaml.safe_load(path.read_text())["allocations"]["default/web"][0],
                      timeout=30, what="VIP allocated")


def connect(env, address: str, n: int = 5) -> list[str]:
    out = subprocess.run(env.client.exec_argv([sys.executable, "-c", CLIENT, address, str(n)]),
                         capture_output=True, text=True, timeout=60)
    return out.stdout.split("\n")[:n]


def announcers(env, prefix):
    return {p.next_hop for leaf in ("leaf01", "leaf02") for p in env.routes_by_prefix(leaf).get(prefix, [])
            if p.as_path == ()}


def test_etp_local_vip_is_served_by_the_local_pod_through_xdp(env):
    address = vip(env)
    wait_until(lambda: announcers(env, f"{address}/32") == {"10.0.5.12"}, timeout=30,
               what="VIP announced by cilium-bgp-worker only")
    wait_until(lambda: connect(env, address, 1) == ["pod-on-cilium-bgp-worker"], timeout=30,
               what="first connection through the VIP")
    assert connect(env, address, 20) == ["pod-on-cilium-bgp-worker"] * 20
    link = env.nodes["cilium-bgp-worker"].host.run("ip", "link", "show", "eth-rack0-br")
    assert "xdp" in link and "prog/xdp id" in link, link
    status = env.vipctl("cilium-bgp-worker", "status")
    assert "Reconcile errors: none" in status


def test_etp_cluster_vip_is_served_from_whichever_node_the_routers_pick(env):
    address = vip(env)
    env.write_all("svc.yaml", demo.service_yaml(traffic_policy="Cluster", endpoint_node="cilium-bgp-worker"))
    wait_until(lambda: announcers(env, f"{address}/32") == {n.address for n in NODES}, timeout=30,
               what="VIP announced by all four nodes")
    # spine02 (the client's router) picks one leaf, the leaf one node; that node may be any
    wait_until(lambda: connect(env, address, 1) == ["pod-on-cilium-bgp-worker"], timeout=30,
               what="connection through the VIP with eTP=Cluster")
    assert connect(env, address, 20) == ["pod-on-cilium-bgp-worker"] * 20


def test_agent_restart_adopts_the_pinned_datapath(env):
    address = vip(env)
    for n in NODES:
        assert env.stop_node(n.name) == 0
    # the agents are gone; the programs and maps are not: the VIP still works
    assert connect(env, address, 5) == ["pod-on-cilium-bgp-worker"] * 5
    for n in NODES:
        env.start_nodes([n.name], "--lb-interface", f"eth-{n.rack}-br", *env.lb_args)
    wait_until(env.sessions_established, timeout=60, what="sessions back")
    assert connect(env, address, 10) == ["pod-on-cilium-bgp-worker"] * 10
