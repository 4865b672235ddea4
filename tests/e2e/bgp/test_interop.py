"""vipd's BGP speaker against real FRR 8.4, GoBGP 3 and BIRD 2 in network namespaces, over real TCP.

Every scenario asserts what a network operator would check on the router: the session is
Established on both ends, the router's table holds exactly our prefixes with exactly the
attributes we sent, and (where the router cannot show it) the bytes on the wire.
"""

from __future__ import annotations

import json
import time

import pytest

from agent.lab import wait_until
from agent.lab.peers import Neighbor

from bgp_helpers import (FAR_ADDR, LOCAL_AS, NO_EXPORT, PEER_ADDRS, PEER_ASNS, SPEAKER_ASN, SPEAKER_V4,
                      SPEAKER_V6, Capture, community, community_text, learned, neighbor,
                      peer_established, update_attribute_types, updates, wait_established, wait_routes)

KINDS = ["frr", "gobgp"]
# (peer, our side of the TCP connection). GoBGP waits 5-10 s before its first connect, so the
# combination where GoBGP dials us is kept to the cases where our listener matters most (plain
# IPv4 and IPv6 listener, MD5 key on the listener, listen port).
BOTH_SIDES = [("frr", "active"), ("frr", "passive"), ("gobgp", "active"), ("gobgp", "passive")]
FAST_SIDES = [("frr", "active"), ("frr", "passive"), ("gobgp", "active")]


def sides(our_side: str) -> tuple[dict, bool]:
    """(speaker kwargs, peer passive?) so that exactly one side opens the TCP connection."""
    if our_side == "active":
        return {}, True
    return {"listen_port": 179}, False


# -------------------------------------------------------------------------------------------
# sessions and attributes
# -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind,our_side,relation",
                         [(k, s, "ebgp") for k, s in BOTH_SIDES] + [(k, s, "ibgp") for k, s in FAST_SIDES])
def test_ipv4_session_carries_communities_and_local_pref_exactly(bgp, kind, our_side, relation):
    peer_v4 = PEER_ADDRS[kind][0]
    peer_asn = SPEAKER_ASN if relation == "ibgp" else PEER_ASNS[kind]
    spk_kw, peer_passive = sides(our_side)
    capture = Capture.start(bgp.topo.hosts[kind])
    daemon = bgp.peer(kind, [Neighbor(SPEAKER_V4, SPEAKER_ASN, passive=peer_passive)], asn=peer_asn)
    comms = sorted([community("65000:100"), community("65001:65535"), NO_EXPORT, LOCAL_AS])
    large = [[65001, 1, 2], [4200000000, 7, 8]]
    spk = bgp.speaker(
        [neighbor(peer_v4, peer_asn, passive=our_side == "passive")],
        [{"neighbor": peer_v4, "prefix": "10.9.0.0/24",
          "attrs": {"med": 50, "local_pref": 250, "communities": comms, "large_communities": large}},
         {"neighbor": peer_v4, "prefix": "10.9.1.0/24", "attrs": {}}],
        **spk_kw)
    wait_established(spk, daemon, SPEAKER_V4, peer_v4)
    routes = wait_routes(daemon, ["10.9.0.0/24", "10.9.1.0/24"])

    rich, plain = routes["10.9.0.0/24"], routes["10.9.1.0/24"]
    assert rich.next_hop == SPEAKER_V4 and plain.next_hop == SPEAKER_V4
    assert rich.as_path == ((SPEAKER_ASN,) if relation == "ebgp" else ())
    assert rich.origin == "igp"
    assert rich.med == 50
    assert sorted(rich.communities) == sorted(community_text(c) for c in comms)
    assert sorted(rich.large_communities) == ["4200000000:7:8", "65001:1:2"]
    assert plain.communities == () and plain.large_communities == () and plain.med is None
    if relation == "ibgp":
        assert rich.local_pref == 250

    state = spk.peer(peer_v4)
    assert state["peer_asn"] == peer_asn
    assert state["families"]["IPV4_UNICAST"]["advertised"] == 2

    capture.stop()
    sent = [update_attribute_types(u) for u in updates(capture.messages_from(SPEAKER_V4))]
    with_nlri = [types for types in sent if 1 in types]          # ORIGIN present: not EoR/withdraw
    assert with_nlri, f"no UPDATE with NLRI captured; the capture:\n{capture.text()}"
    for types in with_nlri:
        if relation == "ebgp":
            assert 5 not in types, f"LOCAL_PREF sent to an eBGP peer: attribute types {types}"
        else:
            assert 5 in types, f"LOCAL_PREF missing towards an iBGP peer: attribute types {types}"


@pytest.mark.parametrize("kind,our_side", BOTH_SIDES)
def test_ipv6_session_global_next_hop(bgp, kind, our_side):
    peer_v6 = PEER_ADDRS[kind][1]
    spk_kw, peer_passive = sides(our_side)
    # zebra: FRR needs interface context to accept a link-local next hop (see bgp-interop.md).
    extra = {"zebra": True} if kind == "frr" else {}
    daemon = bgp.peer(kind, [Neighbor(SPEAKER_V6, SPEAKER_ASN, passive=peer_passive, families=("ipv6",))],
                      **extra)
    spk = bgp.speaker([neighbor(peer_v6, PEER_ASNS[kind], families=["ipv6"], passive=our_side == "passive")],
                      [{"neighbor": peer_v6, "prefix": "2001:db8:9::/48",
                        "attrs": {"communities": [community("65000:6")], "large_communities": [[65001, 6, 6]]}}],
                      **spk_kw)
    wait_established(spk, daemon, SPEAKER_V6, peer_v6)
    route = wait_routes(daemon, ["2001:db8:9::/48"], afi="ipv6")["2001:db8:9::/48"]
    assert route.next_hop == SPEAKER_V6, route
    assert "::" not in route.next_hops and "" not in route.next_hops, route
    spk_ll = _link_local(bgp.topo.spk)
    assert set(route.next_hops) <= {SPEAKER_V6, spk_ll}, f"{route.next_hops} not ours ({SPEAKER_V6}, {spk_ll})"
    assert route.as_path == (SPEAKER_ASN,)
    assert route.communities == ("65000:6",) and route.large_communities == ("65001:6:6",)
    if kind == "frr":
        fib = wait_until(lambda: daemon.host.run("ip", "-6", "route", "show", "2001:db8:9::/48").strip(),
                         timeout=10, what="FRR installs the IPv6 route")
        assert "proto bgp" in fib


def test_ipv6_to_frr_without_zebra_with_global_next_hop_only(bgp):
    """FRR without zebra cannot use a link-local next hop; `link_local_next_hop=False` sends the
    16-byte global next hop only, which such an FRR accepts."""
    peer_v6 = PEER_ADDRS["frr"][1]
    daemon = bgp.peer("frr", [Neighbor(SPEAKER_V6, SPEAKER_ASN, passive=True, families=("ipv6",))])
    spk = bgp.speaker([neighbor(peer_v6, PEER_ASNS["frr"], families=["ipv6"], link_local_next_hop=False)],
                      [{"neighbor": peer_v6, "prefix": "2001:db8:7::/48", "attrs": {}}])
    wait_established(spk, daemon, SPEAKER_V6, peer_v6)
    route = wait_routes(daemon, ["2001:db8:7::/48"], afi="ipv6")["2001:db8:7::/48"]
    assert route.next_hops == (SPEAKER_V6,), route


@pytest.mark.parametrize("kind,our_side", FAST_SIDES)
def test_ipv4_prefix_over_ipv6_session_rfc8950(bgp, kind, our_side):
    peer_v6 = PEER_ADDRS[kind][1]
    spk_kw, peer_passive = sides(our_side)
    extra = {"zebra": True} if kind == "frr" else {}
    daemon = bgp.peer(kind, [Neighbor(SPEAKER_V6, SPEAKER_ASN, passive=peer_passive, families=("ipv4",),
                                      extended_nexthop=True)], **extra)
    spk = bgp.speaker([neighbor(peer_v6, PEER_ASNS[kind], families=["ipv4"], passive=our_side == "passive")],
                      [{"neighbor": peer_v6, "prefix": "10.9.8.0/24", "attrs": {}}], **spk_kw)
    wait_established(spk, daemon, SPEAKER_V6, peer_v6)
    route = wait_routes(daemon, ["10.9.8.0/24"])["10.9.8.0/24"]
    assert route.next_hop in (SPEAKER_V6, _link_local(bgp.topo.spk)), route
    assert ":" in route.next_hop, f"IPv4 NLRI over IPv6 must carry an IPv6 next hop: {route}"
    if kind == "frr":
        fib = wait_until(lambda: daemon.host.run("ip", "route", "show", "10.9.8.0/24").strip(),
                         timeout=10, what="FRR installs the IPv4 route via an IPv6 next hop")
        assert "via inet6" in fib and "proto bgp" in fib, fib


def _link_local(host) -> str:
    data = json.loads(host.run("ip", "-6", "-j", "addr", "show", "dev", "eth-lan"))
    return next(a["local"] for a in data[0]["addr_info"] if a.get("scope") == "link")


# -------------------------------------------------------------------------------------------
# transport: MD5, multihop, ports
# -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind,our_side", BOTH_SIDES + [("bird", "active"), ("bird", "passive")])
def test_md5_matching_key_establishes(bgp, kind, our_side):
    peer_v4 = PEER_ADDRS[kind][0]
    spk_kw, peer_passive = sides(our_side)
    daemon = bgp.peer(kind, [Neighbor(SPEAKER_V4, SPEAKER_ASN, passive=peer_passive, password="s3cr3t-key")])
    spk = bgp.speaker([neighbor(peer_v4, PEER_ASNS[kind], password="s3cr3t-key", passive=our_side == "passive")],
                      [{"neighbor": peer_v4, "prefix": "10.9.2.0/24", "attrs": {}}], **spk_kw)
    wait_established(spk, daemon, SPEAKER_V4, peer_v4)
    wait_routes(daemon, ["10.9.2.0/24"])


@pytest.mark.parametrize("kind,our_side", FAST_SIDES)
def test_md5_key_mismatch_never_establishes_and_log_names_the_key(bgp, kind, our_side):
    peer_v4 = PEER_ADDRS[kind][0]
    spk_kw, peer_passive = sides(our_side)
    daemon = bgp.peer(kind, [Neighbor(SPEAKER_V4, SPEAKER_ASN, passive=peer_passive, password="router-key")])
    spk = bgp.speaker([neighbor(peer_v4, PEER_ASNS[kind], password="node-key", passive=our_side == "passive")],
                      **spk_kw)
    if our_side == "active":
        # The router drops our signed SYNs silently; only the speaker can tell the user why.
        wait_until(lambda: "key mismatch" in spk.log().lower(), timeout=20,
                   what="speaker log saying a TCP MD5 key mismatch is a likely cause")
    else:
        time.sleep(4)  # several connect attempts by the router (timers connect 1)
    assert not spk.established(peer_v4)
    assert daemon.sessions()[SPEAKER_V4].state != "established"
    assert learned(daemon) == {}


@pytest.mark.parametrize("kind,our_side", FAST_SIDES)
def test_ebgp_multihop_through_a_router(bgp, kind, our_side):
    spk_kw, peer_passive = sides(our_side)
    daemon = bgp.peer(kind, [Neighbor(SPEAKER_V4, SPEAKER_ASN, passive=peer_passive, ebgp_multihop=2)],
                      host=bgp.topo.far, router_id=FAR_ADDR)
    spk = bgp.speaker([neighbor(FAR_ADDR, PEER_ASNS[kind], ebgp_multihop_ttl=2, passive=our_side == "passive")],
                      [{"neighbor": FAR_ADDR, "prefix": "10.9.3.0/24", "attrs": {}}], **spk_kw)
    wait_established(spk, daemon, SPEAKER_V4, FAR_ADDR)
    route = wait_routes(daemon, ["10.9.3.0/24"])["10.9.3.0/24"]
    assert route.next_hop == SPEAKER_V4


def test_ebgp_default_ttl_one_does_not_cross_a_router(bgp):
    """Without multihop our packets leave with TTL 1 and die at the intermediate router."""
    daemon = bgp.peer("frr", [Neighbor(SPEAKER_V4, SPEAKER_ASN, passive=True, ebgp_multihop=2)],
                      host=bgp.topo.far, router_id=FAR_ADDR)
    spk = bgp.speaker([neighbor(FAR_ADDR, PEER_ASNS["frr"])])
    # The intermediate router answers the TTL-1 SYN with ICMP time exceeded; the kernel fails
    # the connect at once and the speaker must say so (and keep retrying, not crash).
    try:
        wait_until(lambda: spk.log().count('"connect failed"') >= 2, timeout=15, what="connect failures logged")
    except TimeoutError as exc:
        raise AssertionError(f"{exc}\nspeaker log:\n{spk.log()[-3000:]}") from exc
    assert not spk.established(FAR_ADDR)
    assert daemon.sessions()[SPEAKER_V4].state != "established"


@pytest.mark.parametrize("kind,our_side", BOTH_SIDES)
def test_custom_port(bgp, kind, our_side):
    peer_v4 = PEER_ADDRS[kind][0]
    if our_side == "active":      # the router listens on 1790, we connect there
        daemon = bgp.peer(kind, [Neighbor(SPEAKER_V4, SPEAKER_ASN, passive=True)], listen_port=1790)
        spk = bgp.speaker([neighbor(peer_v4, PEER_ASNS[kind], port=1790)],
                          [{"neighbor": peer_v4, "prefix": "10.9.4.0/24", "attrs": {}}])
    else:                         # we listen on 1790, the router connects there
        daemon = bgp.peer(kind, [Neighbor(SPEAKER_V4, SPEAKER_ASN, port=1790)], listen_port=0)
        spk = bgp.speaker([neighbor(peer_v4, PEER_ASNS[kind], passive=True)],
                          [{"neighbor": peer_v4, "prefix": "10.9.4.0/24", "attrs": {}}], listen_port=1790)
    wait_established(spk, daemon, SPEAKER_V4, peer_v4)
    wait_routes(daemon, ["10.9.4.0/24"])
    # The established TCP connection, as the kernel in our namespace sees it.
    conns = bgp.topo.spk.run("ss", "-tnH", "state", "established", "dst", peer_v4).split()
    ours, theirs = conns[2], conns[3]
    if our_side == "active":
        assert theirs == f"{peer_v4}:1790", conns
    else:
        assert ours == f"{SPEAKER_V4}:1790", conns


# -------------------------------------------------------------------------------------------
# session options: any peer AS, 4-octet AS, connection collision
# -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", KINDS)
def test_peer_asn_zero_learns_the_routers_as(bgp, kind):
    peer_v4 = PEER_ADDRS[kind][0]
    daemon = bgp.peer(kind, [Neighbor(SPEAKER_V4, SPEAKER_ASN, passive=True)])
    spk = bgp.speaker([neighbor(peer_v4, 0)], [{"neighbor": peer_v4, "prefix": "10.9.6.0/24", "attrs": {}}])
    wait_established(spk, daemon, SPEAKER_V4, peer_v4)
    assert spk.peer(peer_v4)["peer_asn"] == PEER_ASNS[kind]
    assert wait_routes(daemon, ["10.9.6.0/24"])["10.9.6.0/24"].as_path == (SPEAKER_ASN,)


@pytest.mark.parametrize("kind", KINDS)
def test_four_octet_local_as(bgp, kind):
    peer_v4 = PEER_ADDRS[kind][0]
    big_as = 4200000001
    daemon = bgp.peer(kind, [Neighbor(SPEAKER_V4, big_as, passive=True)])
    spk = bgp.speaker([neighbor(peer_v4, PEER_ASNS[kind])], [{"neighbor": peer_v4, "prefix": "10.9.7.0/24", "attrs": {}}],
                      asn=big_as)
    wait_established(spk, daemon, SPEAKER_V4, peer_v4)
    assert daemon.sessions()[SPEAKER_V4].peer_asn == big_as
    assert wait_routes(daemon, ["10.9.7.0/24"])["10.9.7.0/24"].as_path == (big_as,)


def test_connection_collision_leaves_one_stable_session(bgp):
    """Both sides dial and listen at once (RFC 4271 §6.8): exactly one session survives."""
    peer_v4 = PEER_ADDRS["frr"][0]
    daemon = bgp.peer("frr", [Neighbor(SPEAKER_V4, SPEAKER_ASN, passive=False)])
    spk = bgp.speaker([neighbor(peer_v4, PEER_ASNS["frr"])],
                      [{"neighbor": peer_v4, "prefix": "10.9.8.0/24", "attrs": {}}], listen_port=179)
    wait_established(spk, daemon, SPEAKER_V4, peer_v4)
    wait_routes(daemon, ["10.9.8.0/24"])
    established_at = spk.peer(peer_v4)["established_at"]
    time.sleep(3)
    assert spk.peer(peer_v4)["established_at"] == pytest.approx(established_at, abs=0.01)
    assert _peer_connections(daemon, SPEAKER_V4) == 1
    sessions = bgp.topo.spk.run("ss", "-tnH", "state", "established", "dst", peer_v4).splitlines()
    assert len(sessions) == 1, sessions


# -------------------------------------------------------------------------------------------
# timers
# -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("hold,keepalive", [(9, 3), (3, 1), (0, 0)])
@pytest.mark.parametrize("kind", KINDS)
def test_hold_time_negotiation_seen_on_both_sides(bgp, kind, hold, keepalive):
    peer_v4 = PEER_ADDRS[kind][0]
    # The router keeps its defaults (FRR 180/60, GoBGP 90/30): the smaller offer, ours, wins.
    daemon = bgp.peer(kind, [Neighbor(SPEAKER_V4, SPEAKER_ASN, passive=True)])
    spk = bgp.speaker([neighbor(peer_v4, PEER_ASNS[kind], hold_time=hold, keepalive=keepalive)])
    wait_established(spk, daemon, SPEAKER_V4, peer_v4)
    ours = spk.peer(peer_v4)
    theirs = daemon.sessions()[SPEAKER_V4]
    assert (ours["hold_time"], ours["keepalive"]) == (hold, keepalive)
    assert theirs.hold_time == hold
    if kind == "frr":  # GoBGP reports its configured keepalive, not the negotiated one
        assert theirs.keepalive == keepalive
    if hold == 3:
        # Longer than one hold time: keepalives must flow both ways or someone resets.
        established_at = ours["established_at"]
        time.sleep(4)
        assert spk.peer(peer_v4)["established_at"] == pytest.approx(established_at, abs=0.01)
        assert peer_established(daemon, SPEAKER_V4)
        assert _peer_connections(daemon, SPEAKER_V4) == 1


def _peer_connections(daemon, address) -> int:
    """How many times the router brought this session up (1 = never reset)."""
    raw = daemon.sessions()[address].raw
    if "connectionsEstablished" in raw:
        return raw["connectionsEstablished"]
    return int(raw.get("state", {}).get("flops", 0)) + 1


# -------------------------------------------------------------------------------------------
# route refresh, churn
# -------------------------------------------------------------------------------------------

def test_route_refresh_from_frr_is_answered_with_the_full_table(bgp):
    """FRR keeps no Adj-RIB-In (no soft-reconfiguration): after its inbound prefix-list changes
    from deny to permit, only our answer to its ROUTE-REFRESH can put the routes into its table.

    (A prefix-list, not a route-map: FRR applies route-map edits only after its delay timer.)
    """
    peer_v4 = PEER_ADDRS["frr"][0]
    daemon = bgp.peer("frr", [Neighbor(SPEAKER_V4, SPEAKER_ASN, passive=True)],
                      extra_config=f"neighbor {SPEAKER_V4} prefix-list FROM-VIPD in",
                      extra_global_config="ip prefix-list FROM-VIPD seq 5 deny any")
    prefixes = [f"10.9.{i}.0/24" for i in range(20)]
    spk = bgp.speaker([neighbor(peer_v4, PEER_ASNS["frr"])],
                      [{"neighbor": peer_v4, "prefix": p, "attrs": {"communities": [community(f"65000:{i % 3}")]}}
                       for i, p in enumerate(prefixes)])
    wait_established(spk, daemon, SPEAKER_V4, peer_v4)
    # Three attribute sets: at least three UPDATEs make up our table.
    wait_until(lambda: daemon.sessions()[SPEAKER_V4].raw["messageStats"]["updatesRecv"] >= 3,
               what="FRR received our table")
    time.sleep(0.5)
    assert learned(daemon) == {}, "the deny prefix-list should have discarded everything"
    before = daemon.sessions()[SPEAKER_V4].raw["messageStats"]
    daemon.vtysh("configure terminal", "ip prefix-list FROM-VIPD seq 5 permit any")
    daemon.vtysh(f"clear bgp ipv4 unicast {SPEAKER_V4} soft in")
    routes = wait_routes(daemon, prefixes)
    after = daemon.sessions()[SPEAKER_V4].raw["messageStats"]
    assert after["routeRefreshSent"] == before["routeRefreshSent"] + 1
    assert after["updatesRecv"] >= before["updatesRecv"] + 3
    assert routes["10.9.4.0/24"].communities == ("65000:1",)
    assert _peer_connections(daemon, SPEAKER_V4) == 1


@pytest.mark.parametrize("kind", KINDS)
def test_fifty_vip_changes_do_not_reset_the_session(bgp, kind):
    peer_v4 = PEER_ADDRS[kind][0]
    daemon = bgp.peer(kind, [Neighbor(SPEAKER_V4, SPEAKER_ASN, passive=True)])
    spk = bgp.speaker([neighbor(peer_v4, PEER_ASNS[kind])],
                      [{"neighbor": peer_v4, "prefix": "10.0.96.0/20", "attrs": {}}])
    wait_established(spk, daemon, SPEAKER_V4, peer_v4)
    wait_routes(daemon, ["10.0.96.0/20"])
    established_at = spk.peer(peer_v4)["established_at"]
    uptime0 = daemon.sessions()[SPEAKER_V4].uptime

    expected = {"10.0.96.0/20"}
    vips = [f"10.96.0.{i}/32" for i in range(1, 31)]
    ops = 0
    for vip in vips:                                      # 30 adds
        spk.advertise(peer_v4, vip, communities=[community("65000:96")])
        expected.add(vip)
        ops += 1
    for vip in vips[::3] + vips[1::3]:                    # 20 withdrawals
        spk.withdraw(peer_v4, vip)
        expected.discard(vip)
        ops += 1
    assert ops == 50
    wait_routes(daemon, expected)
    time.sleep(1.1)
    assert spk.peer(peer_v4)["established_at"] == pytest.approx(established_at, abs=0.01)
    assert _peer_connections(daemon, SPEAKER_V4) == 1
    assert daemon.sessions()[SPEAKER_V4].uptime > uptime0
    assert spk.peer(peer_v4)["families"]["IPV4_UNICAST"]["advertised"] == len(expected)


# -------------------------------------------------------------------------------------------
# BIRD 2 as the router (proves the BIRD snippet in docs/bgp-interop.md)
# -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("afi", ["ipv4", "ipv6"])
@pytest.mark.parametrize("our_side", ["active", "passive"])
def test_bird_receives_our_routes_with_communities(bgp, our_side, afi):
    v = 0 if afi == "ipv4" else 1
    peer_addr, our_addr = PEER_ADDRS["bird"][v], (SPEAKER_V4, SPEAKER_V6)[v]
    prefix = "10.9.5.0/24" if afi == "ipv4" else "2001:db8:5::/48"
    spk_kw, peer_passive = sides(our_side)
    daemon = bgp.peer("bird", [Neighbor(our_addr, SPEAKER_ASN, passive=peer_passive, families=(afi,))])
    spk = bgp.speaker([neighbor(peer_addr, PEER_ASNS["bird"], families=[afi], passive=our_side == "passive")],
                      [{"neighbor": peer_addr, "prefix": prefix,
                        "attrs": {"communities": [community("65000:5"), NO_EXPORT],
                                  "large_communities": [[65001, 5, 5]]}}], **spk_kw)
    wait_established(spk, daemon, our_addr, peer_addr)
    route = wait_routes(daemon, [prefix], afi=afi)[prefix]
    assert route.next_hop == our_addr
    assert route.as_path == (SPEAKER_ASN,)
    assert sorted(route.communities) == ["65000:5", "no-export"]
    assert route.large_communities == ("65001:5:5",)
