"""BGP unnumbered peering (`autoDiscovery: {mode: Unnumbered}`), through `vipd run` as users run
it, against FRR's ``neighbor eth0 interface`` (RFC 8950 extended next hop)::

      r  (FRR + zebra, AS 65001)  eth0 ── eth0     node (vipd, AS 65010)
      link-local addresses only on the link; r announces 203.0.113.0/24 and 2001:db8:100::/48
      r2 (FRR, AS 65002) fd02::1 eth-node ── eth-r2 fd02::11   (IPv6 session, no extended next hop)

* ``--bgp-import-table 254``: r's routes land in the main table via r's link-local address on
  eth0 (IPv4 ones as ``via inet6``), and packets flow both ways;
* vipd learns r's link-local address from the Router Advertisements FRR sends on eth0 (the
  kernel's router-flagged neighbour entry, via the host facts) and connects to ``fe80::…%eth0``;
  FRR learns ours from the Router Advertisements vipd sends there;
* IPv4 and IPv6 Pod CIDRs reach FRR over the one IPv6 session, both with our link-local next
  hop; IPv4 in MP_REACH_NLRI (RFC 8950); FRR's IPv4 route reaches us the same way;
* r2 offers no extended next hop: the IPv4 Pod CIDR is not sent there, and `vipctl bgp peers`
  says why (the IPv6 one is);
* removing the Pod CIDRs withdraws them; a new router link-local address moves the session.
"""

from __future__ import annotations

import json
import sys

import pytest
import yaml

from agent.lab import Lab, wait_until
from agent.lab.peers import Announce, FrrPeer, Neighbor
from agent.lab.vipd import VipdRun
pytestmark = pytest.mark.e2e

POD4, POD6, FROM_R, FROM_R6 = "10.244.0.0/24", "fd44::/64", "203.0.113.0/24", "2001:db8:100::/48"

NODES_YAML = """\
apiVersion: v1
kind: Node
metadata: {name: node, labels: {bgp: "yes"}}
spec: {podCIDRs: [%s]}
status: {addresses: [{type: InternalIP, address: 192.0.2.11}]}
"""

BGP_YAML = """\
apiVersion: cilium.io/v2
kind: CiliumBGPClusterConfig
metadata: {name: unnumbered}
spec:
  nodeSelector: {matchLabels: {bgp: "yes"}}
  bgpInstances:
  - name: main
    localASN: 65010
    peers:
    - name: tor
      peerASN: 65001
      autoDiscovery: {mode: Unnumbered, unnumbered: {interface: eth0}}
      peerConfigRef: {name: tor}
    - name: r2
      peerASN: 65002
      peerAddress: "fd02::1"
      peerConfigRef: {name: tor}
---
apiVersion: cilium.io/v2
kind: CiliumBGPPeerConfig
metadata: {name: tor}
spec:
  timers: {connectRetryTimeSeconds: 1, holdTimeSeconds: 9, keepAliveTimeSeconds: 3}
  families:
  - {afi: ipv4, safi: unicast, advertisements: {matchLabels: {advertise: pods}}}
  - {afi: ipv6, safi: unicast, advertisements: {matchLabels: {advertise: pods}}}
---
apiVersion: cilium.io/v2
kind: CiliumBGPAdvertisement
metadata: {name: pods, labels: {advertise: pods}}
spec:
  advertisements:
  - advertisementType: PodCIDR
"""


class Env(VipdRun):
    def __init__(self, lab: Lab):
        self.router = lab.host("r", forwarding=True)
        super().__init__(lab, lab.host("node"))
        lab.link(self.router, self.node, a_if="eth0", b_if="eth0")
        self.node.add_address("lo", "192.0.2.11/32")
        self.frr = lab.frr(self.router, FrrPeer(
            65001, "10.255.0.1", [Neighbor("eth0", 65010, interface=True, families=("ipv4", "ipv6"),
                                           extended_nexthop=True, hold_time=9, keepalive=3)],
            [Announce(FROM_R), Announce(FROM_R6)], zebra=True))
        self.router2 = lab.host("r2")
        lab.link(self.router2, self.node, ["fd02::1/64"], ["fd02::11/64"])
        self.frr2 = lab.frr(self.router2, FrrPeer(
            65002, "10.255.0.2", [Neighbor("fd02::11", 65010, families=("ipv4", "ipv6"), hold_time=9, keepalive=3)],
            zebra=True))   # FRR needs zebra for the link-local half of our IPv6 next hop

    def link_local(self, host) -> str:
        [addr] = [a["local"] for i in json.loads(host.run("ip", "-j", "-6", "addr", "show", "dev", "eth0"))
                  for a in i["addr_info"] if a["scope"] == "link"]
        return addr

    def session(self):
        return self.frr.sessions().get("eth0")

    def established(self) -> bool:
        s = self.session()
        return s is not None and s.state == "established"

    def frr_routes(self, afi: str) -> dict[str, list[dict]]:
        """prefix -> FRR's next hops (as `show bgp <afi> unicast json` gives them)."""
        data = json.loads(self.frr.vtysh(f"show bgp {afi} unicast json") or "{}")
        return {p: [nh for path in paths for nh in path.get("nexthops", [])]
                for p, paths in data.get("routes", {}).items()}

    def peer(self, name: str = "tor") -> dict:
        return {p["name"]: p for p in json.loads(self.vipctl("bgp", "peers", "-o", "json"))["peers"]}[name]


@pytest.fixture(scope="module")
def env():
    with Lab("funnum") as lab:
        env = Env(lab)
        env.write("nodes.yaml", NODES_YAML % f'{POD4}, "{POD6}"')
        env.write("bgp.yaml", BGP_YAML)
        env.start_vipd(["--bgp-import-table", "254"])
        wait_until(env.established, timeout=60,
                   what="unnumbered session Established at FRR")
        yield env


def test_unnumbered_peer_is_found_from_router_advertisements_and_established_over_link_local(env):
    router_ll, node_ll = env.link_local(env.router), env.link_local(env.node)
    peer = env.peer()
    assert (peer["peerAddress"], peer["sessionState"]) == (f"{router_ll}%eth0", "established")
    assert peer["localAddress"].split("%")[0] == node_ll
    # FRR learned our link-local address (from our Router Advertisements) and negotiated RFC 8950
    session = env.session()
    assert session.raw["bgpNeighborAddr"] == node_ll
    assert session.raw["neighborCapabilities"]["extendedNexthop"] == "advertisedAndReceived"
    # what vipd heard, in the status file
    status = yaml.safe_load((env.state / "status.yaml").read_text())
    assert status["host"]["ipv6Routers"] == {"eth0": [router_ll]}
    # operators name the peer as vipctl shows it
    assert "soft reset" in env.vipctl("bgp", "reset", f"{router_ll}%eth0", "--soft")


def test_ipv4_and_ipv6_pod_cidrs_reach_frr_with_our_link_local_next_hop(env):
    node_ll = env.link_local(env.node)
    wait_until(lambda: POD4 in env.frr_routes("ipv4") and POD6 in env.frr_routes("ipv6"), timeout=30,
               what="both Pod CIDRs at FRR")
    for afi, prefix in (("ipv4", POD4), ("ipv6", POD6)):
        hops = env.frr_routes(afi)[prefix]
        # one 16-byte link-local next hop; FRR files it as "global" and shows its empty LL slot as ::
        assert {h["ip"] for h in hops if h["ip"] != "::"} == {node_ll} and {h["afi"] for h in hops} == {"ipv6"}, hops
    # FRR resolved the link-local next hop on eth0 and installed the IPv4 route via zebra
    fib = json.loads(env.router.run("ip", "-j", "-4", "route", "show", POD4))
    assert [(r["dev"], r["via"]["family"], r["via"]["host"]) for r in fib] == [("eth0", "inet6", node_ll)], fib
    # and IPv4 packets flow over the unnumbered link (the way back: by hand, vipd imports nothing here)
    env.router.add_address("lo", "10.255.0.1/32")
    env.node.add_address("lo", "10.244.0.10/32")
    env.node.run("ip", "route", "add", "10.255.0.1/32", "via", "inet6", env.link_local(env.router), "dev", "eth0")
    env.router.run("ping", "-c", "1", "-W", "2", "-I", "10.255.0.1", "10.244.0.10")


def test_frr_routes_are_imported_via_its_link_local_address_and_traffic_flows(env):
    router_ll = env.link_local(env.router)

    def imported(family):
        return {r["dst"]: r for r in json.loads(env.node.run("ip", "-j", family, "route", "show", "proto", "241"))}
    wait_until(lambda: FROM_R in imported("-4") and FROM_R6 in imported("-6"), timeout=30,
               what=f"{FROM_R} and {FROM_R6} imported into the main table")
    v4, v6 = imported("-4")[FROM_R], imported("-6")[FROM_R6]
    assert (v4["dev"], v4["via"], v6["dev"], v6["gateway"]) == (
        "eth0", {"family": "inet6", "host": router_ll}, "eth0", router_ll), (v4, v6)
    # a Pod answers a client behind the router: out through the imported route, back through
    # the Pod CIDR route FRR installed from our announcement
    env.router.add_address("lo", "203.0.113.1/32")
    env.node.run("ping", "-c", "1", "-W", "2", "-I", "10.244.0.10", "203.0.113.1")


def test_ipv4_is_not_sent_over_an_ipv6_session_without_extended_next_hop_and_vipctl_says_why(env):
    def at_r2(afi):
        return json.loads(env.frr2.vtysh(f"show bgp {afi} unicast json") or "{}").get("routes", {})
    wait_until(lambda: POD6 in at_r2("ipv6"), timeout=30, what=f"{POD6} at r2")
    assert POD4 not in at_r2("ipv4")
    peer = env.peer("r2")
    assert peer["sessionState"] == "established"
    assert "ipv4-unicast prefixes not sent: IPv4 prefixes need an IPv4 next hop or the extended next hop " \
           "capability (RFC 8950)" in peer["lastError"], peer
    assert "prefixes not sent to this peer" in env.vipd_log()


def test_removed_pod_cidrs_are_withdrawn(env):
    env.write("nodes.yaml", NODES_YAML % "")
    wait_until(lambda: POD4 not in env.frr_routes("ipv4") and POD6 not in env.frr_routes("ipv6"), timeout=30,
               what="Pod CIDRs withdrawn at FRR")
    assert env.established()   # a withdraw, not a session reset


def test_session_follows_a_new_router_link_local_address(env):
    # The old address stays a router until the kernel's neighbour entry for it fails: after the
    # ND reachable time (30 s by default; lowered here, as an operator can) plus the probes.
    env.node.sysctl("net.ipv6.neigh.eth0.base_reachable_time_ms", "3000")
    old = env.link_local(env.router)
    new = "fe80::ffff:ffff:ffff:fff0"   # sorts after the old one: the old must be found dead first
    env.router.run("ip", "-6", "addr", "add", f"{new}/64", "dev", "eth0")
    env.router.run("ip", "-6", "addr", "del", f"{old}/64", "dev", "eth0")
    try:
        wait_until(lambda: env.peer()["peerAddress"] == f"{new}%eth0" and env.peer()["sessionState"] == "established",
                   timeout=45, what=f"session to {new}")
    except TimeoutError as exc:   # what the node and the router saw at the end
        raise AssertionError(f"{exc}: {env.peer()}\nrouter: {env.router.run('ip', '-6', 'addr')}\nnode: "
                             f"{env.node.run('ip', '-6', 'neigh')}\n{env.vipd_log()[-3000:]}") from None
    wait_until(env.established, timeout=30, what="FRR re-established")

    def imported_via():
        [route] = json.loads(env.node.run("ip", "-j", "-4", "route", "show", FROM_R, "proto", "241"))
        return route["via"]["host"]
    wait_until(lambda: imported_via() == new, timeout=30, what=f"{FROM_R} imported via {new}")


DIAL_FROM_ROUTER = """
import socket, sys
s = socket.create_connection((sys.argv[1] + "%eth0", 179), timeout=10)
print(s.recv(4096)[:21].hex())
"""


def test_with_a_listener_a_connection_from_the_routers_link_local_address_is_matched_to_the_peer(env):
    # localPort makes vipd listen. A connection from fe80::…%eth0 must find the configured
    # peer (answered with an OPEN, or a collision Cease), not be refused as unknown (Cease 6/5).
    env.write("bgp.yaml", BGP_YAML.replace("    localASN: 65010\n", "    localASN: 65010\n    localPort: 179\n"))
    wait_until(lambda: '"event": "listening"' in env.vipd_log(), timeout=30, what="vipd listening on 179")
    first = bytes.fromhex(env.router.run(sys.executable, "-c", DIAL_FROM_ROUTER, env.link_local(env.node)).strip())
    assert first[18] == 1 or first[18:21] == bytes((3, 6, 7)), first.hex()   # OPEN, or Cease/collision
    assert "refused BGP connection from an unconfigured peer" not in env.vipd_log()
    wait_until(lambda: env.established() and env.peer()["sessionState"] == "established", timeout=45,
               what="session back with FRR")
