"""agent.routing.desired: the routes autoDirectNodeRoutes wants, as pure values."""

from __future__ import annotations

import pytest

from agent.routing.desired import PeerNode, blackhole_routes, direct_node_routes
from agent.routing.model import NextHop, Route

NODES = [
    PeerNode("a", ["10.20.0.11", "fd20::11"], ["10.30.1.0/24", "fd31::/48"]),
    PeerNode("b", ["10.20.0.12", "fd20::12"], ["10.30.2.0/24", "fd32::/48"]),
    PeerNode("c", ["10.99.0.13"], ["10.30.3.0/24"]),            # another subnet: not on-link
]


def test_other_nodes_on_link_only_both_families():
    routes = direct_node_routes("a", ["10.20.0.0/24", "fd20::/64"], NODES)
    assert sorted(map(str, routes)) == sorted(map(str, [
        Route("10.30.2.0/24", [NextHop("10.20.0.12")]),
        Route("fd32::/48", [NextHop("fd20::12")]),
    ]))


def test_no_v6_subnet_means_no_v6_routes():
    routes = direct_node_routes("a", ["10.20.0.0/24"], NODES)
    assert [str(r.prefix) for r in routes] == ["10.30.2.0/24"]


def test_connected_cidr_is_skipped_and_order_is_stable():
    nodes = NODES + [PeerNode("d", ["10.20.0.14"], ["10.20.0.128/25", "10.30.4.0/24"])]
    one = direct_node_routes("a", ["10.20.0.0/24"], nodes)
    two = direct_node_routes("a", ["10.20.0.0/24"], list(reversed(nodes)))
    assert {str(r.prefix) for r in one} == {"10.30.2.0/24", "10.30.4.0/24"}
    assert sorted(map(str, one)) == sorted(map(str, two))


def test_duplicate_pod_cidr_is_an_error():
    nodes = NODES + [PeerNode("e", ["10.20.0.15"], ["10.30.2.0/24"])]
    with pytest.raises(ValueError, match="claimed by nodes b and e"):
        direct_node_routes("a", ["10.20.0.0/24"], nodes)


def test_blackholes():
    [r] = blackhole_routes(["10.96.0.0/16"])
    assert r.type == "blackhole" and r.nexthops == ()


# ---- BGP import (vipd run --bgp-import-table) ---------------------------------------------------

from agent.routing.desired import ReceivedPath, bgp_import_routes  # noqa: E402


def test_import_makes_ecmp_over_every_peer_with_the_prefix_in_the_chosen_table():
    paths = [ReceivedPath("203.0.113.0/24", "10.1.0.1"), ReceivedPath("203.0.113.0/24", "10.3.0.1"),
             ReceivedPath("198.51.100.0/24", "10.3.0.1"), ReceivedPath("2001:db8::/32", "fd01::1")]
    routes = {str(r.prefix): r for r in bgp_import_routes(paths, table=100)}
    assert routes["203.0.113.0/24"] == Route("203.0.113.0/24", [NextHop("10.1.0.1"), NextHop("10.3.0.1")],
                                             table=100, metric=20)
    assert routes["198.51.100.0/24"].nexthops == (NextHop("10.3.0.1"),)
    assert routes["2001:db8::/32"].table == 100


def test_import_keeps_only_the_highest_local_pref_and_drops_unusable_next_hops():
    paths = [ReceivedPath("203.0.113.0/24", "10.1.0.1", local_pref=200),
             ReceivedPath("203.0.113.0/24", "10.2.0.1"),                  # 100 by default: loses
             ReceivedPath("198.51.100.0/24", "fe80::1"),                  # link-local: no device known
             ReceivedPath("2001:db8::/32", "10.1.0.1"),                   # IPv6 via IPv4: never
             ReceivedPath("192.0.2.0/24", "10.4.0.11"),                   # via ourselves: a loop
             ReceivedPath("192.0.2.128/25", None)]
    routes = bgp_import_routes(paths, exclude=["10.4.0.11"])
    assert [str(r) for r in routes] == ["203.0.113.0/24 via 10.1.0.1 metric 20"]


def test_import_of_rfc_8950_and_unnumbered_paths_uses_ipv6_next_hops_and_the_peer_interface():
    paths = [ReceivedPath("198.51.100.0/24", "fd01::1"),                  # IPv4 over a global IPv6 hop
             ReceivedPath("203.0.113.0/24", "fe80::1%eth0"),              # unnumbered peer on eth0
             ReceivedPath("203.0.113.0/24", "10.1.0.1"),                  # ECMP with a numbered one
             ReceivedPath("2001:db8::/32", "fe80::1%eth0")]
    assert [str(r) for r in bgp_import_routes(paths)] == [
        "198.51.100.0/24 via fd01::1 metric 20",
        "203.0.113.0/24 nexthop via 10.1.0.1 nexthop via fe80::1 dev eth0 metric 20",
        "2001:db8::/32 via fe80::1 dev eth0 metric 20"]
