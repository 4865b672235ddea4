"""agent.sources.host.facts_from_netlink: netlink messages (pyroute2's dict view) -> HostFacts,
the input of DefaultGateway, sourceInterface, Interface advertisements, the MAC router ID and
autoDirectNodeRoutes. The netlink side is tested through `vipd run` in
tests/e2e/controlplane/test_host_facts.py."""

from socket import AF_INET, AF_INET6

import pytest

from agent.sources.host import facts_from_netlink

pytestmark = pytest.mark.unit


def link(index, name, mac, up=True, oper="UP"):
    return {"index": index, "flags": 1 if up else 0, "ifname": name, "address": mac, "operstate": oper}


def addr(index, address, prefixlen):
    return {"index": index, "address": address, "prefixlen": prefixlen}


def default(family, gateway, oif, metric=None, table=254, multipath=None):
    return {"family": family, "dst_len": 0, "table": table, "type": 1, "gateway": gateway, "oif": oif,
            "priority": metric, "multipath": multipath}


LINKS = [link(1, "lo", "00:00:00:00:00:00", oper="UNKNOWN"), link(2, "eth0", "02:00:0a:63:00:0b"),
         link(3, "eth1", "02:00:00:00:00:02"), link(4, "down0", "02:00:00:00:00:03", up=False)]
ADDRS = [addr(1, "127.0.0.1", 8), addr(2, "10.1.0.11", 24), addr(2, "fd01::11", 64),
         addr(2, "fe80::1", 64), addr(3, "10.2.0.11", 24), addr(4, "10.9.0.1", 24)]


def test_the_lowest_metric_default_route_per_family_of_the_main_table_is_the_gateway():
    routes = [default(AF_INET, "10.1.0.1", 2, metric=100), default(AF_INET, "10.2.0.1", 3, metric=50),
              default(AF_INET, "10.9.0.9", 4, table=100),                       # not the main table
              {**default(AF_INET, "10.3.0.1", 2, metric=0), "proto": 241},       # vipd's own (BGP import)
              default(AF_INET6, None, 2),                                        # device only: no neighbor
              default(AF_INET6, None, 3, multipath=[{"oif": 3, "attrs": [("RTA_GATEWAY", "fd02::1")]}])]
    facts = facts_from_netlink(LINKS, ADDRS, routes)
    assert facts.default_gateways() == {"ipv4": "10.2.0.1", "ipv6": "fd02::1"}
    assert [(g.dev, g.metric) for g in facts.gateways] == [("eth1", 50), ("eth1", 0)]


def test_interfaces_up_interfaces_and_connected_networks():
    facts = facts_from_netlink(LINKS, ADDRS, [])
    assert facts.interfaces()["eth0"] == ["10.1.0.11/24", "fd01::11/64", "fe80::1/64"]
    assert "down0" in facts.interfaces() and "down0" not in facts.up_interfaces()
    # lo is "unknown" like Cilium's loopback/dummy devices: counts as up
    assert "lo" in facts.up_interfaces()
    assert facts.connected_networks() == ["10.1.0.0/24", "fd01::/64", "10.2.0.0/24"]


def test_router_id_mac_is_the_mac_of_the_link_holding_the_node_address():
    routes = [default(AF_INET6, "fd02::1", 3)]
    facts = facts_from_netlink(LINKS, ADDRS, routes)
    assert facts.router_id_mac(["fd01::11"]) == "02:00:0a:63:00:0b"
    assert facts.router_id_mac([]) == "02:00:00:00:00:02"           # else the IPv6 default route's link
    assert facts.link("lo").mac is None                             # all-zero MAC: none


def neigh(index, dst, state=0x04, router=True, family=AF_INET6):
    return {"family": family, "ifindex": index, "dst": dst, "state": state, "flags": 0x80 if router else 0}


def test_ipv6_routers_are_the_router_flagged_link_local_neighbours_that_still_answer():
    neighbours = [neigh(2, "fe80::2"), neigh(2, "fe80::1", state=0x02),   # STALE, REACHABLE
                  neigh(2, "fe80::9", state=0x20),                         # FAILED: moved or gone
                  neigh(2, "fe80::7", router=False),                       # a host, not a router
                  neigh(2, "fd01::1"),                                     # not link-local
                  neigh(3, "fe80::3", state=0x10),                         # PROBE: still counts
                  neigh(2, "10.1.0.1", family=AF_INET), neigh(99, "fe80::5")]   # IPv4; unknown link
    facts = facts_from_netlink(LINKS, ADDRS, [], neighbours)
    assert facts.link_local_routers() == {"eth0": ["fe80::1", "fe80::2"], "eth1": ["fe80::3"]}
    assert facts_from_netlink(LINKS, ADDRS, [], neighbours[:1]) != facts_from_netlink(LINKS, ADDRS, [], [])


def test_only_router_neighbour_events_wake_the_host_source():
    from agent.sources.host import _relevant

    def ev(dst, router=True, family=AF_INET6, event="RTM_NEWNEIGH"):
        return {**neigh(2, dst, router=router, family=family), "event": event}
    known = lambda: {"fe80::1"}   # noqa: E731
    assert _relevant(ev("fe80::9"), known)                             # a (new) router
    assert _relevant(ev("fe80::1", router=False), known)               # ours lost the router flag
    assert _relevant(ev("fe80::1", router=False, event="RTM_DELNEIGH"), known)
    assert not _relevant(ev("fe80::7", router=False), known)           # a Pod's veth neighbour
    assert not _relevant(ev("fd01::1"), known) and not _relevant(ev("10.0.0.1", family=AF_INET), known)
