"""RouteManager against the real kernel, inside namespaces this test creates.

Topology: node ─ r1 (10.0.1.0/24, fd00:1::/64) and node ─ r2 (10.0.2.0/24, fd00:2::/64).
r1 and r2 both own 10.77.0.1 / fd77::1 on their loopback and answer pings for it, so a
route's next hop decides which of them gets the packet.
"""

from __future__ import annotations

import asyncio
import json

import pytest

from agent.lab import Lab
from agent.routing.manager import RouteManager, RouteError
from agent.routing.model import RTPROT_VIPD, NextHop, Route


@pytest.fixture(scope="module")
def lab():
    with Lab("routes") as lab:
        node = lab.host("node", forwarding=True)
        r1, r2 = lab.host("r1"), lab.host("r2")
        lab.link(node, r1, ["10.0.1.1/24", "fd00:1::1/64"], ["10.0.1.2/24", "fd00:1::2/64"])
        lab.link(node, r2, ["10.0.2.1/24", "fd00:2::1/64"], ["10.0.2.2/24", "fd00:2::2/64"])
        for r, net in ((r1, "1"), (r2, "2")):
            r.add_address("lo", "10.77.0.1/32")
            r.add_address("lo", "fd77::1/128")
            r.route("0.0.0.0/0", via=f"10.0.{net}.1")
            r.route("::/0", via=f"fd00:{net}::1")
        yield lab


def run(coro):
    return asyncio.run(coro)


def kernel_routes(host, family: str) -> list[dict]:
    return json.loads(host.run("ip", "-j", family, "route", "show", "table", "all"))


def ours(host, family="-4") -> list[dict]:
    return [r for r in kernel_routes(host, family) if r.get("protocol") in ("241", "vipd", 241)]


def rx_packets(host, ifname: str) -> int:
    return int(host.run("cat", f"/sys/class/net/{ifname}/statistics/rx_packets"))


def test_install_replace_delete_v4(lab):
    node, r1, r2 = lab.hosts["node"], lab.hosts["r1"], lab.hosts["r2"]
    mgr = RouteManager(netns=node.ns)
    # Routes we do not own, including one for the very same prefix at another metric.
    node.run("ip", "route", "add", "10.99.0.0/24", "via", "10.0.1.2", "proto", "static")
    node.run("ip", "route", "add", "10.77.0.0/24", "via", "10.0.2.2", "metric", "500")

    desired = [Route("10.77.0.0/24", [NextHop("10.0.1.2")])]
    result = run(mgr.sync(desired))
    assert result.replaced == tuple(desired) and not result.failed
    [installed] = ours(node)
    assert installed["dst"] == "10.77.0.0/24" and installed["gateway"] == "10.0.1.2"

    before = rx_packets(r1, "eth-node")
    node.run("ping", "-c", "3", "-i", "0.05", "-W", "1", "10.77.0.1")
    assert rx_packets(r1, "eth-node") - before >= 3  # traffic follows our route to r1

    # Idempotent: the same desired set (next hop without a device) changes nothing.
    assert run(mgr.sync(desired)) == type(result)((), (), ())

    # Next hop change: replaced in place (no delete), traffic now goes to r2.
    moved = [Route("10.77.0.0/24", [NextHop("10.0.2.2", dev="eth-r2")])]
    result = run(mgr.sync(moved))
    assert result.replaced == tuple(moved) and result.deleted == ()
    before = rx_packets(r2, "eth-node")
    node.run("ping", "-c", "3", "-i", "0.05", "-W", "1", "10.77.0.1")
    assert rx_packets(r2, "eth-node") - before >= 3

    # A new manager instance (agent restart) adopts what is there: nothing to do.
    assert run(RouteManager(netns=node.ns).sync(moved)).replaced == ()

    # The static route's identity is taken: reported, never replaced.
    result = run(mgr.sync([*moved, Route("10.99.0.0/24", [NextHop("10.0.2.2")])]))
    [(route, why)] = result.failed
    assert str(route.prefix) == "10.99.0.0/24" and "protocol 4" in why and "not replaced" in why
    [static] = [r for r in kernel_routes(node, "-4") if r["dst"] == "10.99.0.0/24"]
    assert (static["gateway"], static.get("protocol")) == ("10.0.1.2", "static")

    # Empty desired set: only our route goes; the static one and the metric-500 one stay.
    result = run(mgr.sync([]))
    assert [str(r.prefix) for r in result.deleted] == ["10.77.0.0/24"]
    left = {(r["dst"], r.get("metric", 0), r.get("protocol")) for r in kernel_routes(node, "-4")}
    assert ("10.99.0.0/24", 0, "static") in left
    assert ("10.77.0.0/24", 500) in {(dst, metric) for dst, metric, _ in left}
    assert ours(node) == []
    node.run("ip", "route", "del", "10.99.0.0/24")
    node.run("ip", "route", "del", "10.77.0.0/24", "metric", "500")


def test_multipath_weights_v4_and_v6(lab):
    node = lab.hosts["node"]
    mgr = RouteManager(netns=node.ns)
    desired = [
        Route("10.78.0.0/24", [NextHop("10.0.1.2"), NextHop("10.0.2.2", weight=3)]),
        Route("fd78::/64", [NextHop("fd00:1::2", dev="eth-r1"), NextHop("fd00:2::2", dev="eth-r2", weight=2)]),
    ]
    assert not run(mgr.sync(desired)).failed
    [v4] = ours(node, "-4")
    assert sorted((h["gateway"], h.get("weight", 1)) for h in v4["nexthops"]) == [("10.0.1.2", 1), ("10.0.2.2", 3)]
    [v6] = ours(node, "-6")
    assert sorted((h["gateway"], h.get("weight", 1)) for h in v6["nexthops"]) == [("fd00:1::2", 1), ("fd00:2::2", 2)]
    assert run(mgr.sync(desired)).replaced == ()  # idempotent, both families

    # Shrink v6 multipath to one path, and grow v4 to equal weights: replaced, not duplicated.
    changed = [
        Route("10.78.0.0/24", [NextHop("10.0.1.2"), NextHop("10.0.2.2")]),
        Route("fd78::/64", [NextHop("fd00:2::2", dev="eth-r2")]),
    ]
    assert len(run(mgr.sync(changed)).replaced) == 2
    [v6] = ours(node, "-6")
    assert v6.get("gateway") == "fd00:2::2" and "nexthops" not in v6
    [v4] = ours(node, "-4")
    assert sorted(h.get("weight", 1) for h in v4["nexthops"]) == [1, 1]
    assert run(mgr.sync(changed)).replaced == ()
    assert len(run(mgr.flush()).deleted) == 2
    assert ours(node, "-4") == ours(node, "-6") == []


def test_v6_traffic_and_blackhole(lab):
    node, r1 = lab.hosts["node"], lab.hosts["r1"]
    mgr = RouteManager(netns=node.ns)
    run(mgr.sync([Route("fd77::/64", [NextHop("fd00:1::2")]), Route("10.79.0.0/16", type="blackhole"),
                  Route("10.80.0.0/24", [NextHop("10.0.1.2")], table=100)]))
    node.run("ping", "-6", "-c", "2", "-i", "0.05", "-W", "1", "fd77::1")
    assert node.run("ip", "route", "show", "10.79.0.0/16").startswith("blackhole")
    assert "blackhole" in node.run("ip", "-4", "route", "get", "10.79.1.1", check=False) + \
        node.run("ip", "route", "show", "10.79.0.0/16")
    assert "10.80.0.0/24" in node.run("ip", "route", "show", "table", "100")
    assert {str(r.prefix) for r in run(mgr.routes())} == {"fd77::/64", "10.79.0.0/16", "10.80.0.0/24"}
    run(mgr.flush())
    assert run(mgr.routes()) == []


def test_failure_is_reported_and_does_not_stop_the_rest(lab):
    node = lab.hosts["node"]
    mgr = RouteManager(netns=node.ns)
    good = Route("10.81.0.0/24", [NextHop("10.0.1.2")])
    no_dev = Route("10.82.0.0/24", [NextHop(dev="nonexistent0")])
    unreachable = Route("10.83.0.0/24", [NextHop("192.0.2.99")])  # no connected route to it
    result = run(mgr.sync([no_dev, unreachable, good]))
    assert result.replaced == (good,)
    reasons = dict((str(r.prefix), why) for r, why in result.failed)
    assert "nonexistent0" in reasons["10.82.0.0/24"]
    assert "ENETUNREACH" in reasons["10.83.0.0/24"]
    with pytest.raises(RouteError, match="10.82.0.0/24"):
        result.raise_for_failures()
    assert [r["dst"] for r in ours(node)] == ["10.81.0.0/24"]
    run(mgr.flush())


def test_proto_number_is_ours():
    assert RTPROT_VIPD == 241
    with pytest.raises(ValueError):
        RouteManager(proto=2)


def test_ipv4_routes_via_ipv6_link_local_next_hops_install_once_and_carry_traffic(lab):
    # What BGP import makes of unnumbered / RFC 8950 paths: `via inet6 fe80::… dev IF`, single and
    # ECMP; a second sync reads them back as equal (RTA_VIA parsed), so nothing is rewritten.
    node, r1, r2 = lab.hosts["node"], lab.hosts["r1"], lab.hosts["r2"]
    lls = []
    for r in (r1, r2):
        [ll] = [a["local"] for i in json.loads(r.run("ip", "-j", "-6", "addr", "show", "scope", "link"))
                for a in i["addr_info"] if a.get("local", "").startswith("fe80:")]
        lls.append(ll)
    mgr = RouteManager(netns=node.ns)
    desired = [Route("10.78.0.0/24", [NextHop(f"{lls[0]}%eth-r1")], table=300),
               Route("10.79.0.0/24", [NextHop(f"{lls[0]}%eth-r1"), NextHop(f"{lls[1]}%eth-r2")], table=300)]
    assert run(mgr.sync(desired)).replaced == tuple(desired)
    again = run(mgr.sync(desired))
    assert (again.replaced, again.deleted, again.failed) == ((), (), ())
    got = {r["dst"]: r for r in json.loads(node.run("ip", "-j", "-4", "route", "show", "table", "300"))}
    assert (got["10.78.0.0/24"]["via"], got["10.78.0.0/24"]["dev"]) == ({"family": "inet6", "host": lls[0]}, "eth-r1")
    assert {(h["via"]["host"], h["dev"]) for h in got["10.79.0.0/24"]["nexthops"]} == {
        (lls[0], "eth-r1"), (lls[1], "eth-r2")}
    # packets follow the route: to 10.77.0.1 (both routers have it) through r1's link-local address
    run(mgr.sync([Route("10.77.0.0/24", [NextHop(f"{lls[0]}%eth-r1")])]))
    before = rx_packets(r1, "eth-node")
    node.run("ping", "-c", "2", "-W", "2", "-I", "10.0.1.1", "10.77.0.1")
    assert rx_packets(r1, "eth-node") >= before + 2
    run(mgr.sync([]))
