"""The Cilium fields that depend on the host, through `vipd run` as users run it, and vipd's
kernel routes (`--auto-direct-node-routes`, `--bgp-import-table`).

::

      r1 AS65001 10.1.0.1 fd01::1 ─┐ eth-r1 10.1.0.11/24 fd01::11/64 (MAC 02:00:0a:63:00:0b)
      r2 AS65001 10.2.0.1 fd02::1 ─┤ eth-r2 10.2.0.11/24 fd02::11/64
      r3 AS65003 10.3.0.1         ─┼ eth-r3 10.3.0.11/24          node (vipd), AS 65010
   nodeb 10.4.0.12 fd04::12     ─┘ eth-nodeb 10.4.0.11/24 fd04::11/64   adv0 192.0.2.7/32 (veth, up)
      (pods 10.244.1.10, fd44:1::10 on its lo)

* peers ``gw`` / ``gw6``: ``autoDiscovery: DefaultGateway`` (ipv4 / ipv6): r1 while the
  default routes point there, r2 after ``ip route replace default via 10.2.0.1`` (and fd02::1);
* peer ``r3``: 10.3.0.1 with ``transport.sourceInterface: adv0``: r3 knows the node only as
  192.0.2.7, so the session comes up only if vipd sources it from adv0's address;
* the Node object has only an IPv6 InternalIP: the router ID comes from eth-r1's MAC (the
  link holding that address) -> 10.99.0.11;
* an ``Interface`` advertisement of adv0 sends 192.0.2.7/32 to the peers;
* ``--auto-direct-node-routes``: nodeb's Pod CIDRs 10.244.1.0/24 via 10.4.0.12 and fd44:1::/64 via
  fd04::12 (on-link), none
  for nodec (10.9.0.5, not on-link);
* ``--bgp-import-table 100``: r1/r2 and r3 all announce 203.0.113.0/24 (ECMP), r3 also
  198.51.100.0/24, r1/r2 2001:db8:100::/48 over IPv6; withdraws and a dead session remove them;
  a static route to 203.0.113.0/24 in table 100 stays as it was.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from agent.lab import Lab, wait_until
from agent.lab.peers import Announce, FrrPeer, Neighbor
from agent.lab.vipd import VipdRun

pytestmark = pytest.mark.e2e

TABLE = 100
MAC, MAC_ROUTER_ID = "02:00:0a:63:00:0b", "10.99.0.11"
ECMP, R3_ONLY, V6 = "203.0.113.0/24", "198.51.100.0/24", "2001:db8:100::/48"
STATIC = ECMP   # a static route for the imported prefix, in the import table: never vipd's to touch
METRICS_PORT = 9964   # inside the node's own namespace

NODES_YAML = """\
apiVersion: v1
kind: Node
metadata: {name: node, labels: {bgp: "yes"}}
status: {addresses: [{type: InternalIP, address: "fd01::11"}]}
---
apiVersion: v1
kind: Node
metadata: {name: nodeb}
spec: {podCIDRs: [10.244.1.0/24, "fd44:1::/64"]}
status: {addresses: [{type: InternalIP, address: 10.4.0.12}, {type: InternalIP, address: "fd04::12"}]}
---
apiVersion: v1
kind: Node
metadata: {name: nodec}
spec: {podCIDRs: [10.244.2.0/24]}
status: {addresses: [{type: InternalIP, address: 10.9.0.5}]}
"""

BGP_YAML = """\
apiVersion: cilium.io/v2
kind: CiliumBGPClusterConfig
metadata: {name: host}
spec:
  nodeSelector: {matchLabels: {bgp: "yes"}}
  bgpInstances:
  - name: main
    localASN: 65010
    peers:
    - name: gw
      peerASN: 65001
      autoDiscovery: {mode: DefaultGateway, defaultGateway: {addressFamily: ipv4}}
      peerConfigRef: {name: plain}
    - name: gw6
      peerASN: 65001
      autoDiscovery: {mode: DefaultGateway, defaultGateway: {addressFamily: ipv6}}
      peerConfigRef: {name: plain6}
    - name: r3
      peerASN: 65003
      peerAddress: 10.3.0.1
      peerConfigRef: {name: from-adv0}
---
apiVersion: cilium.io/v2
kind: CiliumBGPPeerConfig
metadata: {name: plain}
spec:
  timers: {connectRetryTimeSeconds: 1}
  families:
  - {afi: ipv4, safi: unicast, advertisements: {matchLabels: {advertise: bgp}}}
---
apiVersion: cilium.io/v2
kind: CiliumBGPPeerConfig
metadata: {name: plain6}
spec:
  timers: {connectRetryTimeSeconds: 1}
  families:
  - {afi: ipv6, safi: unicast}
---
apiVersion: cilium.io/v2
kind: CiliumBGPPeerConfig
metadata: {name: from-adv0}
spec:
  transport: {sourceInterface: adv0}
  timers: {connectRetryTimeSeconds: 1}
  families:
  - {afi: ipv4, safi: unicast, advertisements: {matchLabels: {advertise: bgp}}}
---
apiVersion: cilium.io/v2
kind: CiliumBGPAdvertisement
metadata: {name: loopback, labels: {advertise: bgp}}
spec:
  advertisements:
  - advertisementType: Interface
    interface: {name: adv0}
"""


class Env(VipdRun):
    def build(self) -> "Env":
        lab = self.lab
        self.node = node = lab.host("node")   # VipdRun runs vipd here
        self.routers = {}
        for i, asn in ((1, 65001), (2, 65001), (3, 65003)):
            r = lab.host(f"r{i}")
            lab.link(r, node, [f"10.{i}.0.1/24", f"fd0{i}::1/64"], [f"10.{i}.0.11/24", f"fd0{i}::11/64"])
            self.routers[f"r{i}"] = r
        node.run("ip", "link", "set", "eth-r1", "address", MAC)
        nodeb = lab.host("nodeb")
        lab.link(nodeb, node, ["10.4.0.12/24", "fd04::12/64"], ["10.4.0.11/24", "fd04::11/64"])
        nodeb.add_address("lo", "10.244.1.10/32")
        nodeb.add_address("lo", "fd44:1::10/128")
        node.run("ip", "link", "add", "adv0", "type", "veth", "peer", "name", "adv0p")
        node.add_address("adv0", "192.0.2.7/32")
        for ifname in ("adv0", "adv0p"):
            node.run("ip", "link", "set", ifname, "up")
        node.route("0.0.0.0/0", via="10.1.0.1")
        node.route("::/0", via="fd01::1")
        node.run("ip", "route", "add", STATIC, "via", "10.1.0.1", "table", str(TABLE), "proto", "static")
        self.routers["r3"].route("192.0.2.7/32", via="10.3.0.11")
        self.frr = {}
        for name, asn, neighbors, announce in (
                ("r1", 65001, [Neighbor("10.1.0.11", 65010), Neighbor("fd01::11", 65010, families=("ipv6",))],
                 (ECMP, V6)),
                ("r2", 65001, [Neighbor("10.2.0.11", 65010), Neighbor("fd02::11", 65010, families=("ipv6",))],
                 (ECMP, V6)),
                ("r3", 65003, [Neighbor("192.0.2.7", 65010, ebgp_multihop=2)], (ECMP, R3_ONLY))):
            daemon = lab.frr(self.routers[name], FrrPeer(asn, f"10.{name[1]}.0.1", neighbors,
                                                         [Announce(p) for p in announce]))
            self.frr[name] = daemon
        return self

    def start_vipd(self) -> None:
        super().start_vipd(["--auto-direct-node-routes", "--bgp-import-table", str(TABLE),
                            "--metrics-addr", f"127.0.0.1:{METRICS_PORT}"])

    def state_of(self, router: str, neighbor: str) -> str:
        s = self.frr[router].sessions().get(neighbor)
        return s.state if s else "absent"

    def routes(self, *args: str, family: str = "-4") -> list[dict]:
        proc = subprocess.run(self.node.exec_argv(["ip", "-j", family, "route", "show", *args]),
                              capture_output=True, text=True, timeout=30)
        if proc.returncode != 0 and "does not exist" in proc.stderr:
            return []   # an IPv6 table without routes "does not exist"
        assert proc.returncode == 0, proc.stderr
        return json.loads(proc.stdout or "[]")

    def vipd_routes(self, table: int | str) -> dict[str, set[str]]:
        """prefix -> gateways of the routes vipd owns (protocol 241) in ``table``, both families."""
        out = {}
        for r in [*self.routes("table", str(table), "proto", "241"),
                  *self.routes("table", str(table), "proto", "241", family="-6")]:
            hops = r.get("nexthops") or [r]
            out[r["dst"]] = {h["gateway"] for h in hops}
        return out

    def kernel_routes_metric(self) -> dict[str, float]:
        from prometheus_client.parser import text_string_to_metric_families

        code = (f"import urllib.request; print(urllib.request.urlopen('http://127.0.0.1:{METRICS_PORT}/metrics', "
                "timeout=10).read().decode())")
        text = self.node.run(sys.executable, "-c", code)
        return {s.labels["table"]: s.value for f in text_string_to_metric_families(text)
                for s in f.samples if s.name == "vipd_kernel_routes"}


@pytest.fixture(scope="module")
def env():
    with Lab("dhost") as lab:
        env = Env(lab).build()
        env.write("nodes.yaml", NODES_YAML)
        env.write("bgp.yaml", BGP_YAML)
        env.start_vipd()
        wait_until(lambda: env.state_of("r1", "10.1.0.11") == "established", timeout=60,
                   what=f"DefaultGateway session to r1\n{env.vipd_log()[-3000:]}")
        yield env


def test_default_gateway_peer_establishes_with_the_gateway_and_the_router_id_comes_from_the_mac(env):
    session = env.frr["r1"].sessions()["10.1.0.11"]
    # the Node object has no IPv4 address: the router ID is eth-r1's MAC, low four bytes
    assert session.raw["remoteRouterId"] == MAC_ROUTER_ID
    assert env.state_of("r2", "10.2.0.11") != "established"
    # one session per family: the IPv6 default gateway is a peer of its own
    wait_until(lambda: env.state_of("r1", "fd01::11") == "established", timeout=30, what="IPv6 DefaultGateway session")


def test_source_interface_sources_the_session_from_the_interface_address(env):
    wait_until(lambda: env.state_of("r3", "192.0.2.7") == "established", timeout=30,
               what="r3 session from adv0's 192.0.2.7")
    # r3 knows no other neighbor: the TCP connection came from 192.0.2.7, as vipctl shows too
    peers = {p["name"]: p for p in json.loads(env.vipctl("bgp", "peers", "-o", "json"))["peers"]}
    assert (peers["r3"]["localAddress"], peers["r3"]["sessionState"]) == ("192.0.2.7", "established")


def test_interface_advertisement_reaches_the_peers(env):
    # (r3 gets it too, but with next hop 192.0.2.7 itself, which FRR rightly never resolves)
    wait_until(lambda: any(r.prefix == "192.0.2.7/32" for r in env.frr["r1"].routes()), timeout=30,
               what="192.0.2.7/32 (adv0) at r1")
    [route] = [r for r in env.frr["r1"].routes() if r.prefix == "192.0.2.7/32"]
    assert route.as_path == (65010,) and route.next_hop == "10.1.0.11"


def test_interface_advertisement_follows_the_link_state(env):
    def at_r1():
        return any(r.prefix == "192.0.2.7/32" for r in env.frr["r1"].routes())
    env.node.run("ip", "link", "set", "adv0p", "down")      # adv0's oper state: lowerlayerdown
    wait_until(lambda: not at_r1(), timeout=30, what="192.0.2.7/32 withdrawn while adv0 is down")
    env.node.run("ip", "link", "set", "adv0p", "up")
    wait_until(at_r1, timeout=30, what="192.0.2.7/32 announced again once adv0 is up")


def test_auto_direct_node_routes_install_the_on_link_node_pod_cidr_and_traffic_flows(env):
    wait_until(lambda: "10.244.1.0/24" in env.vipd_routes("main"), timeout=30, what="nodeb's Pod CIDR route")
    routes = env.vipd_routes("main")
    assert (routes["10.244.1.0/24"], routes.get("fd44:1::/64")) == ({"10.4.0.12"}, {"fd04::12"})
    assert "10.244.2.0/24" not in routes           # nodec's address is not on a connected network
    env.node.run("ping", "-c", "1", "-W", "2", "10.244.1.10")
    env.node.run("ping", "-6", "-c", "1", "-W", "2", "fd44:1::10")


def test_bgp_import_installs_ecmp_routes_in_the_chosen_table(env):
    wait_until(lambda: env.vipd_routes(TABLE).get(ECMP) == {"10.1.0.1", "10.3.0.1"}, timeout=30,
               what=f"{ECMP} via r1 and r3 in table {TABLE}: {env.vipd_routes(TABLE)}")
    assert env.vipd_routes(TABLE)[R3_ONLY] == {"10.3.0.1"}
    wait_until(lambda: env.vipd_routes(TABLE).get(V6) == {"fd01::1"}, timeout=30, what=f"{V6} via r1")
    assert set(env.vipd_routes(TABLE)) == {ECMP, R3_ONLY, V6}   # our own 192.0.2.7/32 is not re-imported
    # beside the static route to the same prefix (metric 0), ours has BGP's metric 20
    assert [(r.get("protocol"), r.get("metric", 0)) for r in env.routes("table", str(TABLE), ECMP)] == [
        ("static", 0), ("241", 20)]
    assert env.vipd_routes("main").keys() == {"10.244.1.0/24", "fd44:1::/64"}  # nothing imported into main
    wait_until(lambda: env.kernel_routes_metric() == {"100": 3, "254": 2}, timeout=10,
               what="vipd_kernel_routes per table")


def test_default_gateway_change_moves_the_session_and_the_imported_next_hop(env):
    env.node.route("0.0.0.0/0", via="10.2.0.1")
    env.node.route("::/0", via="fd02::1")
    wait_until(lambda: env.state_of("r2", "10.2.0.11") == "established", timeout=30,
               what=f"DefaultGateway session moved to r2\n{env.vipd_log()[-2000:]}")
    wait_until(lambda: env.state_of("r1", "10.1.0.11") != "established", timeout=15, what="r1 session closed")
    wait_until(lambda: env.vipd_routes(TABLE).get(ECMP) == {"10.2.0.1", "10.3.0.1"}, timeout=30,
               what=f"ECMP next hops r2 + r3: {env.vipd_routes(TABLE)}")
    wait_until(lambda: env.vipd_routes(TABLE).get(V6) == {"fd02::1"}, timeout=30, what=f"{V6} via r2")
    assert env.state_of("r1", "fd01::11") != "established"
    peers = {p["name"]: p for p in json.loads(env.vipctl("bgp", "peers", "-o", "json"))["peers"]}
    assert (peers["gw"]["peerAddress"], peers["gw6"]["peerAddress"]) == ("10.2.0.1", "fd02::1")


def test_withdrawn_prefixes_leave_the_table(env):
    env.frr["r3"].vtysh("configure terminal", "router bgp 65003", "address-family ipv4 unicast",
                        f"no network {R3_ONLY}")
    wait_until(lambda: R3_ONLY not in env.vipd_routes(TABLE), timeout=30, what=f"{R3_ONLY} withdrawn")
    assert env.vipd_routes(TABLE)[ECMP] == {"10.2.0.1", "10.3.0.1"}


def test_a_dropped_session_removes_its_next_hops_and_other_routes_stay(env):
    env.frr["r3"].stop()
    wait_until(lambda: env.vipd_routes(TABLE).get(ECMP) == {"10.2.0.1"}, timeout=30,
               what=f"r3's next hop gone after its session dropped: {env.vipd_routes(TABLE)}")
    env.frr["r2"].stop()
    wait_until(lambda: env.vipd_routes(TABLE) == {}, timeout=30, what="every imported route gone")
    # routes of other protocols are not ours to touch
    assert [(r["dst"], r["gateway"]) for r in env.routes("table", str(TABLE), "proto", "static")] == [
        (STATIC, "10.1.0.1")]
    assert any(r["dst"] == "default" for r in env.routes("table", "main"))
    assert [r["dst"] for r in env.routes("table", "main", "proto", "241")] == ["10.244.1.0/24"]


def test_two_nodes_claiming_one_pod_cidr_is_an_error_in_vipctl_status(env):
    env.write("nodes.yaml", NODES_YAML + """\
---
apiVersion: v1
kind: Node
metadata: {name: noded}
spec: {podCIDRs: [10.244.1.0/24]}
status: {addresses: [{type: InternalIP, address: 10.4.0.13}]}
""")

    def routes_error():
        errors = json.loads(env.vipctl("status", "-o", "json")).get("reconcileErrors", [])
        return [e for e in errors if e["reconciler"] == "routes"]
    wait_until(routes_error, timeout=30, what="routes error in vipctl status")
    [error] = routes_error()
    assert "10.244.1.0/24" in error["error"] and "nodeb" in error["error"] and "noded" in error["error"]
    assert env.vipd_routes("main")["10.244.1.0/24"] == {"10.4.0.12"}   # the last good set stays
    env.write("nodes.yaml", NODES_YAML)
    wait_until(lambda: not routes_error(), timeout=30, what="routes error cleared")


def test_removing_the_node_object_removes_its_pod_cidr_route(env):
    env.write("nodes.yaml", NODES_YAML.split("---\n")[0] + "---\n" + NODES_YAML.split("---\n")[2])
    wait_until(lambda: not env.vipd_routes("main"), timeout=30, what="nodeb's routes removed")
    out = env.node.run("ping", "-c", "1", "-W", "1", "10.244.1.10", check=False)
    assert " 0% packet loss" not in out
