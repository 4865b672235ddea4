"""Seed 002 end to end: the spine-leaf lab in namespaces with real FRR routers and four
`vipd run` nodes (agent.demo builds it). One lab for the module; the steps build on each other:

1. the seed's CiliumBGPPeeringPolicy, unchanged: every leaf and spine learns all four PodCIDRs
   with the right next hops; `vipctl bgp peers` shows the seed's columns, established;
2. the same intent as v2 ClusterConfig/PeerConfig/Advertisement, swapped in by editing the
   config dirs (applied live): the same routes, from the v2 instances;
3. a LoadBalancer Service with an LB-IPAM address and eTP=Local: announced only by the node
   with a ready local endpoint; the announcement moves with the endpoint; eTP=Cluster: every
   node announces it; the Advertisement's communities and local-pref arrive at the leaves;
4. the client pings a pod in each rack over the natively routed PodCIDRs.
"""

import ipaddress
import json
import re
import subprocess
import sys

import pytest
import yaml

from agent import demo
from agent.demo import NODES, Seed002Lab
from agent.lab import Lab, wait_until

LEAF_OF_RACK = {"rack0": "leaf01", "rack1": "leaf02"}
# spine -> rack -> the leaf address that spine uses as next hop for that rack (direct eBGP link)
SPINE_NEXT_HOP = {"spine01": {"rack0": "10.0.101.2", "rack1": "10.0.104.2"},
                  "spine02": {"rack0": "10.0.103.2", "rack1": "10.0.102.2"}}
RACK_ASN = {"rack0": 65005, "rack1": 65010}
SPINES_OF_LEAF = {"leaf01": {"10.0.101.1", "10.0.103.1"}, "leaf02": {"10.0.102.1", "10.0.104.1"}}


@pytest.fixture(scope="module")
def env():
    with Lab("s002") as lab:
        env = Seed002Lab(lab).build()
        env.write_all("nodes.yaml", demo.nodes_yaml())
        env.write_all("bgp.yaml", demo.LEGACY_POLICY_YAML)
        env.start_nodes()
        try:
            yield env
        finally:
            env.report_dead_agents()


def assert_pod_cidrs_everywhere(env: Seed002Lab) -> None:
    """Leaves: own rack's PodCIDRs from the nodes themselves (RR clients), the other rack's via
    a spine; spines: each PodCIDR via the directly connected leaf of its rack (AS path = leaf)."""
    for n in NODES:
        for leaf_rack, leaf in LEAF_OF_RACK.items():
            paths = env.routes_by_prefix(leaf)[n.pod_cidr]
            if leaf_rack == n.rack:
                assert [p.next_hop for p in paths] == [n.address], (leaf, n.pod_cidr, paths)
                assert paths[0].as_path == () and paths[0].local_pref == 100
            else:
                assert paths and all(p.next_hop in SPINES_OF_LEAF[leaf] for p in paths), paths
                assert all(p.as_path[-1] == RACK_ASN[n.rack] for p in paths), paths
        for spine, hops in SPINE_NEXT_HOP.items():
            paths = env.routes_by_prefix(spine)[n.pod_cidr]
            direct = [p for p in paths if p.as_path == (RACK_ASN[n.rack],)]
            assert [p.next_hop for p in direct] == [hops[n.rack]], (spine, n.pod_cidr, paths)


def peers_rows(text: str) -> list[list[str]]:
    return [re.split(r"\s{2,}", line.strip()) for line in text.splitlines()]


def test_1_seed_peering_policy_announces_all_pod_cidrs(env):
    wait_until(env.sessions_established, timeout=60, what="every node established with its leaf")
    wait_until(env.learned_pod_cidrs, timeout=60, what="all routers learning the four PodCIDRs")
    assert_pod_cidrs_everywhere(env)
    wait_until(env.reflected_routes_received, timeout=30, what="reflected routes received by every node")
    for n in NODES:
        text = env.vipctl(n.name, "bgp", "peers")
        lines = text.splitlines()
        # the seed's columns, in its layout (cilium-dbg / agent view)
        assert re.split(r"\s{2,}", lines[0]) == ["Local AS", "Peer AS", "Peer Address", "Session", "Uptime",
                                                 "Family", "Received", "Advertised"]
        row = lines[1].split()
        asn = str(RACK_ASN[n.rack])
        assert row[:4] == [asn, asn, f"{n.leaf_address}:179", "established"]
        assert re.fullmatch(r"(\d+h)?(\d+m)?\d+s", row[4]) and row[5] == "ipv4/unicast"
        # as in the seed: 6 received (2 leaf subnets, 192.168.0.0/24, 3 other PodCIDRs), 1 advertised
        assert row[6:] == ["6", "1"]
        assert lines[2].split() == ["ipv6/unicast", "0", "0"]
        # -o json is the API model
        (peer,) = env.peers_json(n.name)["peers"]
        assert (peer["localASN"], peer["peerASN"], peer["peerAddress"], peer["peerPort"],
                peer["sessionState"]) == (int(asn), int(asn), n.leaf_address, 179, "established")
        assert peer["timers"]["appliedHoldTimeSeconds"] == 90 and peer["uptimeSeconds"] >= 0
    caps = env.vipctl(NODES[0].name, "bgp", "peers", "--caps").splitlines()
    assert caps[:2] == ["BGP neighbor is 10.0.5.1, remote AS 65005", "Neighbor capabilities:"]
    assert "\tmultiprotocol(ipv4-unicast): advertised and received" in caps
    assert "\tmultiprotocol(ipv6-unicast): advertised" in caps   # FRR has only ipv4 activated
    # BGP-only nodes (no --lb-interface) say so when asked about the load balancer
    proc = subprocess.run([sys.executable, "-m", "agent.api.cli", "--socket", str(env.nodes[NODES[0].name].socket),
                           "service", "list"], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 1 and "datapath is off" in proc.stderr and "--lb-interface" in proc.stderr


def test_2a_vipctl_migrate_output_replaces_the_policy_live(env):
    """`vipctl migrate` on the seed's policy; its v2 output in place of the legacy file."""
    legacy = env.lab.workdir / "seed-policy.yaml"
    legacy.write_text(demo.LEGACY_POLICY_YAML)
    migrated = subprocess.run([sys.executable, "-m", "agent.api.cli", "migrate", str(legacy)],
                              capture_output=True, text=True, timeout=30, check=True).stdout
    kinds = [d["kind"] for d in yaml.safe_load_all(migrated) if d]
    assert "CiliumBGPPeeringPolicy" not in kinds and kinds.count("CiliumBGPClusterConfig") == 2
    env.write_all("bgp.yaml", migrated)

    def migrated_everywhere():
        return all(p["name"] != p["peerAddress"] and p["sessionState"] == "established"
                   for n in NODES for p in env.peers_json(n.name)["peers"])
    wait_until(migrated_everywhere, timeout=60, what="migrated v2 config established on every node")
    wait_until(env.learned_pod_cidrs, timeout=60, what="PodCIDRs learned from the migrated config")
    wait_until(env.reflected_routes_received, timeout=30, what="reflected routes received again")
    assert_pod_cidrs_everywhere(env)


def test_2_equivalent_v2_resources_applied_live(env):
    env.write_all("bgp.yaml", demo.V2_BGP_YAML)

    def v2_everywhere():
        # the v2 peer names (legacy peers are named after their address)
        return all(p["name"] in ("leaf01", "leaf02") and p["sessionState"] == "established"
                   and p["timers"]["appliedHoldTimeSeconds"] == 90
                   for n in NODES for p in env.peers_json(n.name)["peers"])
    wait_until(v2_everywhere, timeout=60, what="v2 instances established on every node")
    wait_until(env.sessions_established, timeout=60, what="sessions re-established at the leaves")
    wait_until(env.learned_pod_cidrs, timeout=60, what="PodCIDRs learned from the v2 config")
    assert_pod_cidrs_everywhere(env)
    text = env.vipctl(NODES[0].name, "bgp", "routes", "advertised", "ipv4", "unicast")
    rows = peers_rows(text)
    assert rows[0] == ["VRouter", "Peer", "Prefix", "NextHop", "Age", "Attrs"]
    assert rows[1][:4] == ["65005", "10.0.5.1", "10.1.0.0/24", "10.0.5.11"]
    avail = peers_rows(env.vipctl(NODES[1].name, "bgp", "routes", "available", "ipv4", "unicast"))
    assert avail[0] == ["VRouter", "Prefix", "NextHop", "Age", "Attrs"]
    assert avail[1][:3] == ["65005", "10.1.3.0/24", "0.0.0.0"] and avail[1][4] == "[{Origin: i} {Nexthop: 0.0.0.0}]"
    # the cluster-wide tables of seed 004, over all four agents' sockets
    cluster = env.vipctl_all("bgp", "peers").splitlines()
    assert re.split(r"\s{2,}", cluster[0]) == ["Node", "Local AS", "Peer AS", "Peer Address", "Session State",
                                               "Uptime", "Family", "Received", "Advertised"]
    first_cells = [line.split()[0] for line in cluster[1:] if not line.startswith(" ")]
    assert first_cells == sorted(n.name for n in NODES)
    cluster_routes = peers_rows(env.vipctl_all("bgp", "routes", "available", "ipv4", "unicast"))
    assert cluster_routes[0] == ["Node", "VRouter", "Prefix", "NextHop", "Age", "Attrs"]
    assert sorted(r[2] for r in cluster_routes[1:]) == sorted(n.pod_cidr for n in NODES)
    rps = peers_rows(env.vipctl(NODES[0].name, "bgp", "route-policies"))
    assert rps[0] == ["VRouter", "Policy Name", "Type", "Match Peers", "Match Prefixes (Min..Max Len)",
                      "RIB Action", "Path Actions"]
    assert any("10.1.0.0/24 (24..24)" in " ".join(r) for r in rps[1:])


def vip_of(env) -> str:
    state = env.nodes[NODES[0].name].state_dir / "lbipam-allocations.yaml"
    ips = wait_until(lambda: state.exists() and yaml.safe_load(state.read_text())["allocations"].get("default/web"),
                     timeout=30, what="LB-IPAM allocation")
    (ip,) = ips
    assert ipaddress.ip_address(ip) in ipaddress.ip_network(demo.VIP_POOL_CIDR)
    return ip


def announcers(env, prefix: str) -> dict[str, set[str]]:
    """leaf -> next hops of paths for prefix learned from its own rack's nodes."""
    out = {}
    for rack, leaf in LEAF_OF_RACK.items():
        nodes = {n.address for n in NODES if n.rack == rack}
        out[leaf] = {p.next_hop for p in env.routes_by_prefix(leaf).get(prefix, []) if p.next_hop in nodes}
    return out


def connections_established(env) -> dict[str, int]:
    """FRR's per-neighbor count of sessions established so far (a reset increments it)."""
    out = {}
    for leaf in LEAF_OF_RACK.values():
        for addr, sess in env.routers[leaf].sessions().items():
            out[addr] = sess.raw.get("connectionsEstablished")
    return out


def test_3_lb_service_etp_local_follows_the_ready_endpoint(env):
    before = connections_established(env)
    env.write_all("svc.yaml", demo.service_yaml(traffic_policy="Local", endpoint_node="cilium-bgp-worker"))
    vip = vip_of(env)
    prefix = f"{vip}/32"
    wait_until(lambda: announcers(env, prefix) == {"leaf01": {"10.0.5.12"}, "leaf02": set()},
               timeout=30, what="VIP announced only by cilium-bgp-worker")
    # all nodes agree on the allocation (persisted per node, same pool, same answer)
    for n in NODES:
        alloc = yaml.safe_load((env.nodes[n.name].state_dir / "lbipam-allocations.yaml").read_text())
        assert alloc["allocations"]["default/web"] == [vip]
    # communities and local-pref from the CiliumBGPAdvertisement arrive at the leaf
    (path,) = [p for p in env.routes_by_prefix("leaf01")[prefix] if p.next_hop == "10.0.5.12"]
    assert path.local_pref == 200
    assert "65000:99" in path.communities and "65000:1:1" in path.large_communities
    # `vipctl bgp routes advertised` is the Adj-RIB-Out as sent: every route with the attributes
    # leaf01 received from the node, LOCAL_PREF 100 on the PodCIDR included (iBGP, on the wire)
    sent = wait_until(lambda: advertised_equals_received(env, "cilium-bgp-worker", "10.0.5.12", "leaf01",
                                                         "10.0.5.1"),
                      timeout=15, what="vipctl's advertised routes equal leaf01's received routes")
    assert sent[prefix][2] == 200 and sent["10.1.3.0/24"][2] == 100, sent
    # the endpoint moves to rack1: the announcement moves with it
    env.write_all("svc.yaml", demo.service_yaml(traffic_policy="Local", endpoint_node="cilium-bgp-worker3"))
    wait_until(lambda: announcers(env, prefix) == {"leaf01": set(), "leaf02": {"10.0.10.12"}},
               timeout=30, what="VIP announcement moved to cilium-bgp-worker3")
    # a not-ready endpoint is no local endpoint: nobody announces
    env.write_all("svc.yaml", demo.service_yaml(traffic_policy="Local", endpoint_node="cilium-bgp-worker3",
                                                ready=False))
    wait_until(lambda: announcers(env, prefix) == {"leaf01": set(), "leaf02": set()},
               timeout=30, what="VIP withdrawn when the only endpoint is not ready")
    # advertisement-only changes never reset a session
    assert connections_established(env) == before
    assert all(before[n.address] for n in NODES)


def advertised_equals_received(env, node: str, node_address: str, leaf: str, leaf_address: str):
    """{prefix: (next hop, AS path, LOCAL_PREF, communities, large communities)} when what
    ``vipctl bgp routes advertised`` shows toward the leaf equals the paths the leaf's FRR holds
    from the node (else None)."""
    data = json.loads(env.vipctl(node, "-o", "json", "bgp", "routes", "advertised", "ipv4", "unicast",
                                 "peer", leaf_address))
    data = data if isinstance(data, list) else [data]     # one node: one response
    sent = {r["prefix"]: (r.get("nextHop"), tuple(int(a) for a in r.get("asPath", [])),
                          r.get("localPref") if r.get("hasLocalPref") else None,
                          tuple(sorted(r.get("communities", []))), tuple(sorted(r.get("largeCommunities", []))))
            for resp in data for r in resp.get("routes", [])}
    received = {p.prefix: (p.next_hop, p.as_path, p.local_pref, tuple(sorted(p.communities)),
                           tuple(sorted(p.large_communities)))
                for paths in env.routes_by_prefix(leaf).values() for p in paths
                if p.next_hop == node_address and p.as_path == ()}
    return sent if sent and sent == received else None


def test_4_lb_service_etp_cluster_announced_by_every_node(env):
    env.write_all("svc.yaml", demo.service_yaml(traffic_policy="Cluster", endpoint_node="cilium-bgp-worker"))
    prefix = f"{vip_of(env)}/32"
    wait_until(lambda: announcers(env, prefix) == {"leaf01": {"10.0.5.11", "10.0.5.12"},
                                                   "leaf02": {"10.0.10.11", "10.0.10.12"}},
               timeout=30, what="VIP announced by all four nodes")
    for leaf in ("leaf01", "leaf02"):
        for p in env.routes_by_prefix(leaf)[prefix]:
            if p.as_path == ():
                assert p.local_pref == 200 and "65000:99" in p.communities
    # the spines see the VIP too (via the leaves)
    for spine in ("spine01", "spine02"):
        assert prefix in env.routes_by_prefix(spine)


def test_5_client_reaches_a_pod_in_each_rack(env):
    for n in NODES:
        proc = subprocess.run(env.client.exec_argv(["ping", "-c", "1", "-W", "2", n.pod_address]),
                              capture_output=True, text=True)
        assert proc.returncode == 0, f"client -> pod {n.pod_address} on {n.name}: {proc.stdout}{proc.stderr}"


def stale_state(env, leaf: str, prefix: str, next_hop: str):
    paths = [p for p in env.routes_by_prefix(leaf).get(prefix, []) if p.next_hop == next_hop]
    return None if not paths else paths[0].stale


def ping(env, address: str) -> bool:
    return subprocess.run(env.client.exec_argv(["ping", "-c", "1", "-W", "2", address]),
                          capture_output=True).returncode == 0


def test_6_sigterm_is_a_graceful_restart_and_notify_mode_withdraws(env):
    """The v2 PeerConfig enables graceful restart: SIGTERM closes the session without a
    NOTIFICATION, the leaf keeps the node's routes (stale) and traffic to its pods keeps flowing;
    the restarted agent refreshes them. `--shutdown-mode notify` makes the leaf withdraw at once."""
    worker = next(n for n in NODES if n.name == "cilium-bgp-worker")
    assert stale_state(env, "leaf01", worker.pod_cidr, worker.address) is False
    assert env.stop_node(worker.name) == 0
    wait_until(lambda: env.routers["leaf01"].sessions()[worker.address].state != "established",
               timeout=10, what="leaf01 noticing the closed session")
    wait_until(lambda: stale_state(env, "leaf01", worker.pod_cidr, worker.address) is True,
               timeout=10, what="route kept as stale by the graceful-restart helper")
    assert ping(env, worker.pod_address), "the datapath keeps forwarding while the agent is down"
    assert worker.pod_cidr in env.routes_by_prefix("spine01"), "the spines never lost the route"
    env.start_nodes([worker.name])
    wait_until(lambda: stale_state(env, "leaf01", worker.pod_cidr, worker.address) is False
               and env.routers["leaf01"].sessions()[worker.address].state == "established",
               timeout=30, what="route refreshed after the restart (End-of-RIB)")
    # the same stop with --shutdown-mode notify: Cease, the leaf withdraws immediately
    other = next(n for n in NODES if n.name == "cilium-bgp-worker2")
    assert env.stop_node(other.name) == 0
    env.start_nodes([other.name], "--shutdown-mode", "notify")
    wait_until(lambda: env.routers["leaf02"].sessions()[other.address].state == "established",
               timeout=30, what="worker2 back")
    assert env.stop_node(other.name) == 0
    wait_until(lambda: stale_state(env, "leaf02", other.pod_cidr, other.address) is None,
               timeout=10, what="leaf02 withdrawing worker2's PodCIDR after the Cease")
    env.start_nodes([other.name])
    wait_until(lambda: stale_state(env, "leaf02", other.pod_cidr, other.address) is False,
               timeout=30, what="worker2's PodCIDR back")


OVERRIDE_LOCAL_PORT = """\
apiVersion: cilium.io/v2
kind: CiliumBGPNodeConfigOverride
metadata:
  name: cilium-bgp-worker3
spec:
  bgpInstances:
  - name: "65010"
    localPort: 1790
"""


def test_7_failing_instance_reports_bgp_reconcile_error_retries_and_recovers(env):
    """worker3's instance must listen on a port another process holds: the neighbor reconciler
    fails, cilium.io/BGPReconcileError says why, retries back off, the other nodes are untouched;
    once the port is free the retry succeeds and the condition clears."""
    w3 = next(n for n in NODES if n.name == "cilium-bgp-worker3")
    host = env.nodes[w3.name].host
    blocker = host.spawn([sys.executable, "-c", "import socket, time\n"
                          "s = socket.socket(); s.bind(('0.0.0.0', 1790)); s.listen(); time.sleep(600)"])
    wait_until(lambda: "1790" in host.run("ss", "-ltn"), timeout=10, what="blocker listening")
    others_before = {a: c for a, c in connections_established(env).items() if a != w3.address}
    env.write_all("override.yaml", OVERRIDE_LOCAL_PORT)

    def reconcile_error():
        status = json.loads(env.vipctl(w3.name, "status", "-o", "json"))
        errors = [e for e in status.get("reconcileErrors", []) if e["reconciler"] == "neighbors"]
        return errors and errors[0]["attempts"] >= 2 and (status, errors[0])
    status, err = wait_until(reconcile_error, timeout=30, what="BGPReconcileError with retries")
    assert err["instance"] == "65010" and "1790" in err["error"] and "in use" in err["error"]
    (node_cond,) = [c for r in status["resources"] if r["kind"] == "CiliumBGPNodeConfig" for c in r["conditions"]]
    assert node_cond["type"] == "cilium.io/BGPReconcileError" and node_cond["status"] == "True"
    assert "65010: neighbors:" in node_cond["message"]
    assert "BGPReconcileError" in env.vipctl(w3.name, "status")
    # nobody else was disturbed
    assert {a: c for a, c in connections_established(env).items() if a != w3.address} == others_before
    assert all(p["sessionState"] == "established" for n in NODES if n is not w3
               for p in env.peers_json(n.name)["peers"])
    # free the port: the next retry brings the instance up, listening, and clears the condition
    blocker.kill()
    blocker.wait(5)

    def recovered():
        status = json.loads(env.vipctl(w3.name, "status", "-o", "json"))
        peers = env.peers_json(w3.name)["peers"]
        return (not status["reconcileErrors"] and peers and peers[0]["sessionState"] == "established")
    wait_until(recovered, timeout=45, what="instance recovered after the port was freed")
    assert "1790" in host.run("ss", "-ltn")          # vipd itself listens on localPort now
    wait_until(lambda: stale_state(env, "leaf02", w3.pod_cidr, w3.address) is False, timeout=30,
               what="worker3's PodCIDR back at leaf02")
    env.write_all("override.yaml", None)
