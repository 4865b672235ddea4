"""The next-hop cache of remote backends (lb.h nh_resolve, per-CPU map neigh_v1).

A miss does a FIB lookup and fills the slot; a hit forwards without one (proved by deleting
the route: the packet still leaves while the entry is fresh); an entry older than
NEIGH_TTL_NS (1 s) is looked up again, so a removed route or a changed neighbour is followed
within that bound; Datapath.flush_neighbours() makes the next packet look up at once; a
punt or failed lookup leaves nothing cached; a packet longer than any the lookup validated
looks up again (the route's MTU check is never skipped); another ingress interface misses.

The runs must stay on one CPU (the cache is per CPU), so each test pins itself.
"""

from __future__ import annotations

import json
import os
import time

import pytest
from scapy.layers.inet import IP, TCP
from scapy.layers.l2 import Ether
from scapy.packet import Raw

from agent.datapath.abi import XdpAction
from agent.datapath.model import Backend, Mode, Proto, Service, ServiceKey
from agent.datapath.testrun import test_run
from tests.bpf.conftest import NODE4, PEER4, run_xdp

VIP = "10.96.0.10"
CLIENT = "192.0.2.10"
BACKEND = "10.2.0.5"
TTL_S = 1.0


@pytest.fixture(autouse=True)
def one_cpu():
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {min(before)})
    yield
    os.sched_setaffinity(0, before)


@pytest.fixture(params=[Mode.DSR, Mode.SNAT], ids=["dsr", "snat"])
def svc(request, dp):
    dp.set_node_addresses(v4=NODE4)
    dp.flush_neighbours()    # entries of earlier tests (same module datapath) no longer count
    dp.upsert_service(Service(ServiceKey(VIP, 80, Proto.TCP), (Backend(BACKEND, 8080),),
                              mode=request.param, maglev_m=251))
    return request.param


def _req(sport=40000, flags="S", payload=b"request"):
    return (Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02") / IP(src=CLIENT, dst=VIP)
            / TCP(sport=sport, dport=80, flags=flags) / Raw(payload))


def _cached(dp, addr=BACKEND):
    return [e for e in dp.neighbours() if str(e.addr) == addr]


@pytest.fixture
def route(net):
    """The route to the backends (restored after the test, whatever it changed)."""
    node = net["node"]
    yield node
    node.run("ip", "route", "replace", "10.2.0.0/16", "via", PEER4)
    node.run("ip", "neigh", "replace", PEER4, "lladdr", net["peer_mac"], "dev", _node_if(net),
             "nud", "permanent")


def _node_if(net):
    return [link["ifname"] for link in json.loads(net["node"].run("ip", "-j", "link", "show"))
            if link["ifname"] != "lo"][0]


def test_miss_looks_up_and_fills_then_hits_without_a_lookup(dp, net, svc, route):
    assert _cached(dp) == []
    r = run_xdp(dp, _req(), netns=net["ns"])
    assert r.retval == XdpAction.REDIRECT
    (e,) = _cached(dp)
    assert (e.smac, e.dmac) == (net["node_mac"], net["peer_mac"])
    assert e.age_s < TTL_S
    out = Ether(r.data)
    assert (out.src, out.dst) == (net["node_mac"], net["peer_mac"])

    # a hit needs no FIB: with the route gone, packets still leave while the entry is fresh
    route.run("ip", "route", "del", "10.2.0.0/16")
    r = run_xdp(dp, _req(flags="A"), netns=net["ns"])
    assert r.retval == XdpAction.REDIRECT
    assert Ether(r.data)[IP].dst == BACKEND


def test_route_removal_is_followed_within_the_ttl(dp, net, svc, route):
    assert run_xdp(dp, _req(), netns=net["ns"]).retval == XdpAction.REDIRECT
    route.run("ip", "route", "del", "10.2.0.0/16")
    time.sleep(TTL_S + 0.1)
    before = dp.counters().drops["FIB_LOOKUP"]
    assert run_xdp(dp, _req(flags="A"), netns=net["ns"]).retval == XdpAction.DROP
    assert dp.counters().drops["FIB_LOOKUP"] == before + 1
    assert _cached(dp) == []     # a failed lookup leaves nothing cached


def test_neighbour_change_followed_after_ttl_or_at_once_after_flush(dp, net, svc, route):
    assert run_xdp(dp, _req(), netns=net["ns"]).retval == XdpAction.REDIRECT
    new_mac = "02:00:00:00:77:77"
    route.run("ip", "neigh", "replace", PEER4, "lladdr", new_mac, "dev", _node_if(net), "nud", "permanent")
    # within the TTL the cached MAC may still be used ...
    assert Ether(run_xdp(dp, _req(flags="A"), netns=net["ns"]).data).dst in (net["peer_mac"], new_mac)
    # ... a flush makes the very next packet look up
    dp.flush_neighbours()
    assert Ether(run_xdp(dp, _req(flags="A"), netns=net["ns"]).data).dst == new_mac
    # and without a flush the TTL bounds it
    route.run("ip", "neigh", "replace", PEER4, "lladdr", net["peer_mac"], "dev", _node_if(net), "nud", "permanent")
    time.sleep(TTL_S + 0.1)
    assert Ether(run_xdp(dp, _req(flags="A"), netns=net["ns"]).data).dst == net["peer_mac"]


def test_route_change_to_another_next_hop_is_followed(dp, net, svc, route):
    assert Ether(run_xdp(dp, _req(), netns=net["ns"]).data).dst == net["peer_mac"]
    # a second next hop on the same link, with its own MAC
    other, other_mac = "10.0.0.3", "02:00:00:00:33:33"
    route.run("ip", "neigh", "replace", other, "lladdr", other_mac, "dev", _node_if(net), "nud", "permanent")
    route.run("ip", "route", "replace", "10.2.0.0/16", "via", other)
    time.sleep(TTL_S + 0.1)
    assert Ether(run_xdp(dp, _req(flags="A"), netns=net["ns"]).data).dst == other_mac
    (e,) = _cached(dp)
    assert e.dmac == other_mac


def test_unresolved_neighbour_punts_and_caches_nothing(dp, net, svc, route):
    route.run("ip", "route", "replace", "10.2.0.0/16", "via", "10.0.0.4")   # no neighbour entry
    before = dp.counters().stat("xdp", "neigh_punt")
    assert run_xdp(dp, _req(), netns=net["ns"]).retval == XdpAction.PASS
    assert dp.counters().stat("xdp", "neigh_punt") == before + 1
    assert _cached(dp) == []


def test_longer_packet_than_validated_looks_up_again(dp, net, svc, route):
    """The cache never skips the route's MTU check: a small packet fills the entry, then a
    packet longer than the route's MTU is looked up again and refused."""
    route.run("ip", "route", "replace", "10.2.0.0/16", "via", PEER4, "mtu", "lock", "800")
    assert run_xdp(dp, _req(), netns=net["ns"]).retval == XdpAction.REDIRECT
    (e,) = _cached(dp)
    assert e.len_ok < 800
    before = dp.counters().drops["FIB_LOOKUP"]
    big = _req(flags="A", payload=b"x" * 900)
    assert run_xdp(dp, big, netns=net["ns"]).retval == XdpAction.DROP
    assert dp.counters().drops["FIB_LOOKUP"] == before + 1
    ok = _req(flags="A", payload=b"x" * 600)
    assert run_xdp(dp, ok, netns=net["ns"]).retval == XdpAction.REDIRECT
    (e,) = _cached(dp)
    assert e.len_ok >= 600 + 40


def test_entry_is_per_ingress_interface_and_xdp_tx_on_the_same_link(dp, net, svc, route):
    assert run_xdp(dp, _req(), netns=net["ns"]).retval == XdpAction.REDIRECT
    ifindex = json.loads(route.run("ip", "-j", "link", "show", _node_if(net)))[0]["ifindex"]
    # arriving on the uplink itself: a miss (other ingress), then XDP_TX back out of it
    route.run("ip", "route", "del", "10.2.0.0/16")
    before = dp.counters().drops["FIB_LOOKUP"]
    r = test_run(dp.program_fd("xdp"), bytes(_req(flags="A")), netns=net["ns"], ingress_ifindex=ifindex)
    assert r.retval == XdpAction.DROP and dp.counters().drops["FIB_LOOKUP"] == before + 1
    route.run("ip", "route", "replace", "10.2.0.0/16", "via", PEER4)
    r = test_run(dp.program_fd("xdp"), bytes(_req(flags="A")), netns=net["ns"], ingress_ifindex=ifindex)
    assert r.retval == XdpAction.TX
    (e,) = _cached(dp)     # one slot per backend: the latest ingress interface's lookup
    assert e.ingress_ifindex == ifindex
