"""The lab harness against real FRR and GoBGP: sessions, attributes, MD5, teardown."""

from __future__ import annotations

import os
import subprocess

import pytest

from agent.lab import Lab, LabError, Topology, HostSpec, LinkSpec, wait_until
from agent.lab.peers import Announce, FrrPeer, GobgpPeer, Neighbor


def _established(daemon, address):
    s = daemon.sessions().get(address)
    return s is not None and s.state == "established"


@pytest.fixture
def pair():
    with Lab("h") as lab:
        a = lab.host("frr")
        b = lab.host("gobgp")
        lab.link(a, b, ["10.0.0.1/24", "fd00::1/64"], ["10.0.0.2/24", "fd00::2/64"])
        yield lab, a, b


@pytest.mark.parametrize("afi,frr_addr,go_addr,prefix_frr,prefix_go", [
    ("ipv4", "10.0.0.1", "10.0.0.2", "10.9.0.0/24", "10.8.0.0/24"),
    ("ipv6", "fd00::1", "fd00::2", "2001:db8:9::/48", "2001:db8:8::/48"),
])
def test_frr_gobgp_ebgp_session_and_communities(pair, afi, frr_addr, go_addr, prefix_frr, prefix_go):
    lab, a, b = pair
    frr = lab.frr(a, FrrPeer(asn=65001, router_id="1.1.1.1",
                             neighbors=[Neighbor(go_addr, 65002, families=(afi,), hold_time=9)],
                             announce=[Announce(prefix_frr, communities=("65000:1",),
                                                large_communities=("65000:1:1",))]))
    go = lab.gobgp(b, GobgpPeer(asn=65002, router_id="2.2.2.2",
                                neighbors=[Neighbor(frr_addr, 65001, families=(afi,), hold_time=9)],
                                announce=[Announce(prefix_go, communities=("65002:7",),
                                                   large_communities=("65002:1:2",))]))
    wait_until(lambda: _established(frr, go_addr) and _established(go, frr_addr), timeout=30,
               what="FRR <-> GoBGP session")
    assert frr.sessions()[go_addr].hold_time == 9
    assert go.sessions()[frr_addr].hold_time == 9

    def seen(daemon, prefix):
        return [r for r in daemon.routes(afi) if r.prefix == prefix and r.source]

    got_go = wait_until(lambda: seen(go, prefix_frr), timeout=15, what="FRR prefix at GoBGP")[0]
    assert got_go.communities == ("65000:1",)
    assert got_go.large_communities == ("65000:1:1",)
    assert got_go.as_path == (65001,)
    assert got_go.next_hop == frr_addr

    got_frr = wait_until(lambda: seen(frr, prefix_go), timeout=15, what="GoBGP prefix at FRR")[0]
    assert got_frr.communities == ("65002:7",)
    assert got_frr.large_communities == ("65002:1:2",)
    assert got_frr.as_path == (65002,)
    assert got_frr.next_hop == go_addr
    assert wait_until(lambda: frr.sessions()[go_addr].accepted == 1, timeout=10, what="FRR count")


@pytest.mark.parametrize("frr_key,go_key,expect_up", [("s3cret", "s3cret", True), ("s3cret", "wrong", False)])
def test_md5(pair, frr_key, go_key, expect_up):
    lab, a, b = pair
    frr = lab.frr(a, FrrPeer(asn=65001, router_id="1.1.1.1",
                             neighbors=[Neighbor("10.0.0.2", 65002, password=frr_key)]))
    go = lab.gobgp(b, GobgpPeer(asn=65002, router_id="2.2.2.2",
                                neighbors=[Neighbor("10.0.0.1", 65001, password=go_key)]))
    if expect_up:
        wait_until(lambda: _established(frr, "10.0.0.2") and _established(go, "10.0.0.1"),
                   timeout=30, what="MD5 session")
    else:
        with pytest.raises(TimeoutError):
            wait_until(lambda: _established(frr, "10.0.0.2") or _established(go, "10.0.0.1"),
                       timeout=8, what="MD5 mismatch session (must not come up)")
        assert frr.sessions()["10.0.0.2"].state != "established"


def _snapshot():
    netns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
    links = sorted(l.split(":")[1].strip() for l in links.splitlines())
    pids = {int(p) for p in os.listdir("/proc") if p.isdigit()}
    return set(netns.split("\n")), links, pids


def test_teardown_leaves_nothing_behind_even_on_error():
    _, links_before, _ = _snapshot()
    daemon_pids = []
    lab_namespaces = []
    with pytest.raises(ZeroDivisionError):
        with Lab("td") as lab:
            lab.build(Topology(hosts=[HostSpec("r", forwarding=True), HostSpec("x"), HostSpec("y")],
                               links=[LinkSpec("r", "x", ["10.1.0.1/24"], ["10.1.0.2/24"]),
                                      LinkSpec("r", "y", ["10.2.0.1/24"], ["10.2.0.2/24"])],
                               routes={"x": [("10.2.0.0/24", "10.1.0.1")], "y": [("10.1.0.0/24", "10.2.0.1")]}))
            lab.segment("lan", [(lab.hosts["x"], ["10.3.0.1/24"]), (lab.hosts["y"], ["10.3.0.2/24"])])
            # routed through r, and switched across the bridge
            lab.hosts["x"].run("ping", "-c1", "-W2", "10.2.0.2")
            lab.hosts["x"].run("ping", "-c1", "-W2", "10.3.0.2")
            frr = lab.frr(lab.hosts["x"], FrrPeer(asn=65001, router_id="1.1.1.1",
                                                  neighbors=[Neighbor("10.3.0.2", 65002)]))
            go = lab.gobgp(lab.hosts["y"], GobgpPeer(asn=65002, router_id="2.2.2.2",
                                                     neighbors=[Neighbor("10.3.0.1", 65001)]))
            sleeper = lab.hosts["r"].spawn(["sleep", "600"])
            daemon_pids = [frr.pid, go.pid, sleeper.pid]
            lab_namespaces = lab.namespaces()
            assert all(os.path.exists(f"/proc/{p}") for p in daemon_pids)
            1 / 0
    ns_after, links_after, pids_after = _snapshot()
    # Other labs may run concurrently: judge only this lab's own resources.
    assert lab_namespaces and not set(lab_namespaces) & ns_after, "lab namespaces left behind"
    assert not any(ns.startswith(lab.prefix) for ns in ns_after)
    assert links_after == links_before, "root namespace links changed"
    assert not set(daemon_pids) & pids_after, "lab processes left running"


def test_failed_command_names_command_and_stderr():
    with Lab("err") as lab:
        h = lab.host("h")
        with pytest.raises(LabError, match="ip route add 10.0.0.0/8 via 192.0.2.1"):
            h.run("ip", "route", "add", "10.0.0.0/8", "via", "192.0.2.1")
