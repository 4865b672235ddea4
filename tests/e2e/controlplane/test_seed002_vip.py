"""A LoadBalancer VIP served end to end: the seed 002 lab with `vipd run --lb-interface`, so
each node both announces the VIP over BGP and programs it into its eBPF datapath (XDP + tc on
the uplink). The client behind spine02 opens real TCP connections to VIP:80:

* eTP=Local, endpoint on cilium-bgp-worker: only that node announces, its XDP DNATs to the
  local pod, the reply leaves as VIP:80 (tc egress);
* eTP=Cluster: every node announces; the node the routers pick DNATs + SNATs to the pod in the
  other rack and reverses the reply;
* an agent restart adopts the pinned maps: connections keep working.
"""

import shutil
from pathlib import Path

import pytest

from agent import demo
from agent.demo import NODES, Seed002Lab
from agent.lab import Lab, wait_until

@pytest.fixture(scope="module")
def env():
    lab = Lab("s002vip")
    try:
        with lab:
            env = Seed002Lab(lab).build()
            env.prepare_datapath()       # pod servers on :80, XDP_PASS on the bridge ports
            env.write_all("nodes.yaml", demo.nodes_yaml())
            env.write_all("bgp.yaml", demo.V2_BGP_YAML)
            env.write_all("svc.yaml", demo.service_yaml(traffic_policy="Local", endpoint_node="cilium-bgp-worker"))
            env.start_nodes(lb=True)
            wait_until(env.sessions_established, timeout=120, what="sessions established")
            yield env
    finally:
        shutil.rmtree(Path("/sys/fs/bpf") / f"{lab.prefix}vipd", ignore_errors=True)


def test_etp_local_vip_is_served_by_the_local_pod_through_xdp(env):
    address = env.vip()
    wait_until(lambda: env.vip_announcers(f"{address}/32") == {"10.0.5.12"}, timeout=30,
               what="VIP announced by cilium-bgp-worker only")
    wait_until(lambda: env.connect(address, 1) == ["pod-on-cilium-bgp-worker"], timeout=30,
               what="first connection through the VIP")
    assert env.connect(address, 20) == ["pod-on-cilium-bgp-worker"] * 20
    link = env.nodes["cilium-bgp-worker"].host.run("ip", "link", "show", "eth-rack0-br")
    assert "xdp" in link and "prog/xdp id" in link, link
    status = env.vipctl("cilium-bgp-worker", "status")
    assert "Reconcile errors: none" in status
    # the programs were compiled and loaded by a child process: bcc, clang and LLVM (~240 MB)
    # are not mapped into the serving agent
    agent = env.nodes["cilium-bgp-worker"].proc
    libs = {line.split()[-1] for line in Path(f"/proc/{agent.pid}/maps").read_text().splitlines()
            if ".so" in line}
    assert agent.poll() is None and libs, "agent not running"
    assert not [lib for lib in libs if "libbcc" in lib or "LLVM" in lib or "clang" in lib], sorted(libs)


def ingress_rack(env, address: str) -> str:
    """The rack whose nodes receive the client's VIP traffic: spine02's single best path (the
    two leaves' AS paths differ, so no ECMP there; inside the rack the leaf may spread flows
    over both nodes)."""
    hop = env.lab.hosts["spine02"].run("ip", "route", "get", address)
    return "rack0" if "via 10.0.103.2 " in hop else "rack1"


def test_etp_cluster_vip_crosses_racks_with_snat_to_a_remote_backend(env):
    address = env.vip()
    env.write_all("svc.yaml", demo.service_yaml(traffic_policy="Cluster", endpoint_node="cilium-bgp-worker"))
    wait_until(lambda: env.vip_announcers(f"{address}/32") == {n.address for n in NODES}, timeout=30,
               what="VIP announced by all four nodes")
    wait_until(lambda: env.connect(address, 1) == ["pod-on-cilium-bgp-worker"], timeout=30,
               what="connection through the VIP with eTP=Cluster")
    # put the only endpoint in the *other* rack than the node the client's traffic enters:
    # that node must DNAT + SNAT to a remote backend two router hops away, and un-SNAT the reply
    entry = ingress_rack(env, address)
    remote = next(n for n in NODES if n.rack != entry)
    env.write_all("svc.yaml", demo.service_yaml(traffic_policy="Cluster", endpoint_node=remote.name))
    expected = f"pod-on-{remote.name}"
    wait_until(lambda: env.connect(address, 1) == [expected], timeout=30,
               what=f"VIP entering in {entry} served by the pod on {remote.name}")
    assert ingress_rack(env, address) == entry, "the announcements (all nodes) did not change"
    assert env.connect(address, 20) == [expected] * 20
    env.write_all("svc.yaml", demo.service_yaml(traffic_policy="Cluster", endpoint_node="cilium-bgp-worker"))
    wait_until(lambda: env.connect(address, 1) == ["pod-on-cilium-bgp-worker"], timeout=30,
               what="endpoint back on cilium-bgp-worker")


def test_agent_restart_adopts_the_pinned_datapath(env):
    address = env.vip()
    for n in NODES:
        assert env.stop_node(n.name) == 0
    # the agents are gone; the programs and maps are not: the VIP still works
    assert env.connect(address, 5) == ["pod-on-cilium-bgp-worker"] * 5
    env.start_nodes(lb=True)
    wait_until(env.sessions_established, timeout=60, what="sessions back")
    assert env.connect(address, 10) == ["pod-on-cilium-bgp-worker"] * 10
