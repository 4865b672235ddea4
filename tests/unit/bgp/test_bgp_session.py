"""Session rules, one test per RFC point, on the sans-IO level with byte-exact wire checks."""

from __future__ import annotations

import random
from ipaddress import IPv4Address, IPv6Address

import pytest

from agent.bgp.codec import KEEPALIVE_BYTES, MessageReader, decode, encode, encode_prefix
from agent.bgp.errors import BgpProtocolError
from agent.bgp.fsm import State
from agent.bgp.messages import (
    AsPath, AsSegment, As4Path, Communities, ExtendedMessage, FourOctetAs, GracefulRestart, LocalPref,
    MpReach, MpUnreach, MultiProtocol, NextHop, Notification, OriginAttr, RouteRefresh, UnknownCapability,
    Update,
)
from agent.bgp.session import (
    CloseConnection, ConnectFailed, ConnectRequested, EndOfRibReceived, Session, SessionConfig, SessionDown,
    UpdateErrorHandled,
)

from sansio_pair import ESTABLISHED, PA, V4, V6, Pair, cfg, ebgp_pair, net, open_bytes

M = "ff" * 16


def h(s: str) -> bytes:
    return bytes.fromhex(s.replace(" ", ""))


def messages(wire: bytes, four=True) -> list:
    r = MessageReader(65535)
    r.four_octet_as = four
    r.feed(wire)
    out = []
    while (m := r.next_message()) is not None:
        out.append(m)
    return out


def raw_established(config: SessionConfig, peer_open: bytes, *, local="10.0.0.1", remote="10.0.0.2",
                    link_local=None) -> Session:
    """Our session against a scripted peer that sent ``peer_open`` and a KEEPALIVE."""
    s = Session(config, rng=random.Random(7))
    s.start(0.0)
    s.connection_made(0.0, local, remote, outgoing=True, link_local=link_local)
    s.data_to_send()
    s.receive_data(peer_open + KEEPALIVE_BYTES, 0.0)
    assert s.state is ESTABLISHED
    return s


# ------------------------------------------------------------------ OPEN / establishment

def test_open_is_byte_exact_with_all_capabilities():
    p = ebgp_pair(a_graceful_restart=True).connect()
    assert p.a.state is ESTABLISHED and p.b.state is ESTABLISHED
    assert p.wire["a"][0][:67] == h(
        M + "0043 01 04 fde9 005a 01010101 26" + "02 24"
        + "01 04 0001 00 01" + "01 04 0002 00 01"       # MP-BGP IPv4 + IPv6 unicast (RFC 4760)
        + "02 00" + "46 00"                             # route refresh (2918), enhanced (7313)
        + "06 00"                                       # extended messages (8654)
        + "40 0a c078 0001 01 80 0002 01 80"            # GR: R+N bits, 120 s, F bit per family
        + "41 04 0000fde9")                             # 4-octet AS (6793)


def test_table_then_end_of_rib_byte_exact():
    p = ebgp_pair()
    p.a.rib_out[V4].advertise(encode_prefix(net("10.9.0.0/24")), PA(med=5, communities=(0xFDE80001,)))
    p.connect()
    tail = b"".join(p.wire["a"])[-(61 + 23 + 29):]
    assert tail == h(
        M + "003d 02 0000 0022" + "40 01 01 00" + "40 02 06 02 01 0000fde9" + "40 03 04 0a000001"
        + "80 04 04 00000005" + "c0 08 04 fde80001" + "18 0a0900"
        + M + "0017 02 0000 0000"                               # End-of-RIB IPv4 (RFC 4724 §2)
        + M + "001d 02 0000 0006 80 0f 03 0002 01")             # End-of-RIB IPv6
    assert p.of_type("b", EndOfRibReceived) == [EndOfRibReceived(V4), EndOfRibReceived(V6)]
    assert p.b.rib_in[V4].routes[encode_prefix(net("10.9.0.0/24"))][2] == NextHop(IPv4Address("10.0.0.1"))


def test_held_end_of_rib_follows_the_paths_added_before_the_release():
    # vipd's start-up: the session comes up while the datapath loads (Pod CIDR only); the VIPs
    # join later, and only then End-of-RIB, so a graceful-restart peer keeps its stale VIPs.
    p = ebgp_pair()
    p.a.hold_end_of_rib = True
    p.a.rib_out[V4].advertise(encode_prefix(net("10.244.0.0/24")), PA())
    p.connect()
    assert p.of_type("b", EndOfRibReceived) == []
    assert encode_prefix(net("10.244.0.0/24")) in p.b.rib_in[V4].routes
    p.a.rib_out[V4].advertise(encode_prefix(net("172.16.0.1/32")), PA())
    p.call("a", p.a.release_end_of_rib)
    p.run()
    assert p.of_type("b", EndOfRibReceived) == [EndOfRibReceived(V4), EndOfRibReceived(V6)]
    last = messages(b"".join(p.wire["a"]))
    eor_at = next(i for i, m in enumerate(last) if isinstance(m, Update) and not m.nlri and not m.withdrawn
                  and not m.attributes)
    assert any(isinstance(m, Update) and net("172.16.0.1/32") in m.nlri for m in last[:eor_at]), last
    assert encode_prefix(net("172.16.0.1/32")) in p.b.rib_in[V4].routes
    p.call("a", p.a.release_end_of_rib)    # once only
    p.run()
    assert len(p.of_type("b", EndOfRibReceived)) == 2


def test_hold_time_is_the_minimum_and_keepalive_a_third():
    p = ebgp_pair(b_hold_time=9).connect()
    assert (p.a.hold_time, p.a.keepalive_time) == (9, 3)
    assert (p.b.hold_time, p.b.keepalive_time) == (9, 3)


def test_hold_time_zero_means_no_keepalives_and_no_hold_timer():
    p = ebgp_pair(b_hold_time=0).connect()
    assert p.a.hold_time == 0 and p.a.next_deadline() is None
    before = len(p.wire["a"])
    p.advance(10_000)
    assert p.a.state is ESTABLISHED and len(p.wire["a"]) == before


@pytest.mark.parametrize("hold", [1, 2])
def test_hold_time_1_or_2_is_rejected_with_2_6(hold):
    s = Session(cfg())
    s.start(0.0)
    s.connection_made(0.0, "10.0.0.1", "10.0.0.2", outgoing=True)
    s.data_to_send()
    with pytest.raises(BgpProtocolError):
        s.receive_data(open_bytes(hold=hold), 0.0)
    assert s.data_to_send() == h(M + "0015 03 02 06")
    assert s.state is State.IDLE


def test_keepalives_flow_and_the_hold_timer_fires_when_the_peer_goes_silent():
    p = ebgp_pair(a_hold_time=9).connect()
    n = len(p.wire["a"])
    p.advance(3.5)
    assert p.wire["a"][n:] == [KEEPALIVE_BYTES]
    # b keeps running its timers, but a's bytes no longer arrive (TCP stuck): b's hold timer fires.
    for _ in range(10):
        p.now += 1
        for name in ("a", "b"):
            if (d := p.side(name).next_deadline()) is not None and d <= p.now:
                p.call(name, p.side(name).handle_timer, p.now)
        p.side("a").data_to_send()  # dropped on the floor
        p.transfer("b")
    assert encode(Notification(4, 0)) == h(M + "0015 03 04 00") in p.wire["b"]
    down = p.of_type("b", SessionDown)[-1]
    assert "hold timer expired" in down.reason and down.retry_in is not None


def test_bad_peer_as_is_2_2():
    p = Pair(cfg(peer=65099), cfg(65002, "2.2.2.2", 65001)).connect()
    assert p.errors["a"] and (p.errors["a"][0].code, p.errors["a"][0].subcode) == (2, 2)
    assert encode(Notification(2, 2)) in p.wire["a"][-1]


def test_peer_asn_zero_learns_the_asn():
    p = Pair(cfg(peer=0), cfg(65002, "2.2.2.2", 65001)).connect()
    assert p.a.state is ESTABLISHED and p.a.peer_asn == 65002 and p.a.ibgp is False


def test_identical_router_id_is_rejected_on_ibgp_with_2_3():
    p = Pair(cfg(65001, "1.1.1.1", 65001), cfg(65001, "1.1.1.1", 65001)).connect()
    assert {(e.code, e.subcode) for e in p.errors["a"] + p.errors["b"]} == {(2, 3)}


def test_identical_router_id_is_fine_on_ebgp():
    p = Pair(cfg(65001, "1.1.1.1", 65002), cfg(65002, "1.1.1.1", 65001)).connect()
    assert p.a.state is ESTABLISHED


def test_router_id_zero_in_open_is_2_3():
    s = Session(cfg())
    s.start(0.0)
    s.connection_made(0.0, "10.0.0.1", "10.0.0.2", outgoing=True)
    with pytest.raises(BgpProtocolError) as ei:
        s.receive_data(open_bytes(rid="0.0.0.0"), 0.0)
    assert (ei.value.code, ei.value.subcode) == (2, 3)


# ------------------------------------------------------------------ capabilities

def test_unknown_capabilities_are_ignored():
    caps = (MultiProtocol(1, 1), UnknownCapability(73, b"\x04host"), UnknownCapability(200), FourOctetAs(65002))
    s = raw_established(cfg(), open_bytes(caps=caps))
    assert s.families == (V4,)
    assert "unknown(73)" in s.remote_capabilities()


def test_no_mp_capability_means_ipv4_unicast_only():
    s = raw_established(cfg(), open_bytes(caps=(FourOctetAs(65002),)))
    assert s.families == (V4,)


def test_rfc9072_extended_open_from_the_peer_establishes():
    caps = h("01 04 0001 00 01" + "41 04 0000fdea")
    params = h("02") + len(caps).to_bytes(2, "big") + caps
    body = h("04 fdea 005a 02020202 ff ff") + len(params).to_bytes(2, "big") + params
    s = raw_established(cfg(), h(M) + (19 + len(body)).to_bytes(2, "big") + b"\x01" + body)
    assert s.peer_asn == 65002


def test_updates_only_for_families_both_sides_negotiated():
    p = ebgp_pair(b_families=(V4,))
    p.a.rib_out[V6].advertise(encode_prefix(net("fd99::/64")), PA())
    p.a.rib_out[V4].advertise(encode_prefix(net("10.9.0.0/24")), PA())
    p.connect()
    sent = [m for m in messages(b"".join(p.wire["a"])) if isinstance(m, Update)]
    assert not any(m.attribute(MpReach) or m.attribute(MpUnreach) for m in sent)  # no IPv6 at all
    assert p.a.advertised_count(V6) == 0 and p.a.advertised_count(V4) == 1


def test_four_octet_asn_towards_a_two_octet_peer_uses_as_trans_and_as4_path():
    s = Session(cfg(4200000001, "1.1.1.1", 65002))
    s.rib_out[V4].advertise(encode_prefix(net("10.9.0.0/24")), PA())
    s.start(0.0)
    s.connection_made(0.0, "10.0.0.1", "10.0.0.2", outgoing=True)
    assert s.data_to_send()[19:22] == h("04 5ba0")  # my_as = AS_TRANS 23456
    s.receive_data(open_bytes(caps=(MultiProtocol(1, 1),)) + KEEPALIVE_BYTES, 0.0)  # an OLD speaker
    upd = [m for m in messages(s.data_to_send(), four=False) if isinstance(m, Update) and m.nlri][0]
    assert upd.attribute(AsPath) == AsPath((AsSegment(2, (23456,)),))
    assert upd.attribute(As4Path) == As4Path((AsSegment(2, (4200000001,)),))


# ------------------------------------------------------------------ attributes

def test_local_pref_only_on_ibgp():
    ibgp = Pair(cfg(65001, "1.1.1.1", 65001), cfg(65001, "2.2.2.2", 65001))
    ibgp.a.rib_out[V4].advertise(encode_prefix(net("10.9.0.0/24")), PA(local_pref=200))
    ibgp.a.rib_out[V4].advertise(encode_prefix(net("10.8.0.0/24")), PA(med=1))
    ibgp.connect()
    got = ibgp.b.rib_in[V4].routes
    assert LocalPref(200) in got[encode_prefix(net("10.9.0.0/24"))]
    assert LocalPref(100) in got[encode_prefix(net("10.8.0.0/24"))]  # iBGP always carries one
    assert AsPath(()) in got[encode_prefix(net("10.9.0.0/24"))]  # iBGP: empty AS_PATH
    ebgp = ebgp_pair()
    ebgp.a.rib_out[V4].advertise(encode_prefix(net("10.9.0.0/24")), PA(local_pref=200))
    ebgp.connect()
    assert b"\x40\x05\x04" not in b"".join(ebgp.wire["a"])
    assert not any(isinstance(a, LocalPref) for a in ebgp.b.rib_in[V4].routes[encode_prefix(net("10.9.0.0/24"))])


def test_ipv6_next_hop_global_plus_link_local_only_when_directly_connected():
    peer = open_bytes(caps=(MultiProtocol(2, 1), FourOctetAs(65002)))
    for ll, nh_len in (("fe80::1", 32), (None, 16)):
        s = Session(cfg(families=(V6,)))
        s.rib_out[V6].advertise(encode_prefix(net("fd99::/64")), PA())
        s.start(0.0)
        s.connection_made(0.0, "fd00::1", "fd00::2", outgoing=True, link_local=ll)
        s.receive_data(peer + KEEPALIVE_BYTES, 0.0)
        reach = [m for m in messages(s.data_to_send()) if isinstance(m, Update) and m.attribute(MpReach)
                 and m.attribute(MpReach).nlri][0].attribute(MpReach)
        assert len(reach.next_hop) == nh_len
        assert reach.next_hops()[0] == IPv6Address("fd00::1")
        if ll:
            assert reach.next_hops()[1] == IPv6Address("fe80::1")


def test_ipv6_prefixes_on_an_ipv4_session_need_a_configured_ipv6_next_hop():
    s = raw_established(cfg(), open_bytes(caps=(MultiProtocol(1, 1), MultiProtocol(2, 1), FourOctetAs(65002))))
    s.data_to_send()
    s.rib_out[V6].advertise(encode_prefix(net("fd99::/64")), PA())  # no next hop: never ::ffff:10.0.0.1
    assert [m for m in messages(s.data_to_send()) if isinstance(m, Update)] == []
    s.rib_out[V6].advertise(encode_prefix(net("fd98::/64")), PA(next_hop="fd00::9"))
    (u,) = [m for m in messages(s.data_to_send()) if isinstance(m, Update)]
    assert u.attribute(MpReach).next_hop == IPv6Address("fd00::9").packed
    assert s.advertised_count(V6) == 1


def test_extended_next_hop_sends_ipv4_nlri_with_ipv6_next_hop():
    p = Pair(cfg(), cfg(65002, "2.2.2.2", 65001), a_addr="fd00::1", b_addr="fd00::2")
    p.a.rib_out[V4].advertise(encode_prefix(net("10.9.0.0/24")), PA())
    p.connect()
    assert p.a.extended_next_hop
    ups = [m for m in messages(b"".join(p.wire["a"])) if isinstance(m, Update) and m.attribute(MpReach)]
    reach = ups[0].attribute(MpReach)
    assert (reach.afi, reach.safi, reach.next_hop) == (1, 1, IPv6Address("fd00::1").packed)
    assert ups[0].attribute(NextHop) is None
    assert encode_prefix(net("10.9.0.0/24")) in p.b.rib_in[V4].routes


def test_unnumbered_session_sends_both_families_with_the_16_byte_link_local_next_hop():
    # Over a link-local (unnumbered) session our only address is fe80::…%eth0: IPv4 prefixes go in
    # MP_REACH_NLRI (RFC 8950) and IPv6 ones too, with that address alone, never :: or a zone.
    p = Pair(cfg(), cfg(65002, "2.2.2.2", 65001), a_addr="fe80::2%eth0", b_addr="fe80::1%eth0")
    p.a.rib_out[V4].advertise(encode_prefix(net("10.9.0.0/24")), PA())
    p.a.rib_out[V6].advertise(encode_prefix(net("fd44::/64")), PA())
    p.connect()
    reaches = {(r.afi, r.safi): r for m in messages(b"".join(p.wire["a"]))
               if isinstance(m, Update) and (r := m.attribute(MpReach)) is not None}
    assert {k: r.next_hop for k, r in reaches.items()} == {(1, 1): IPv6Address("fe80::2").packed,
                                                          (2, 1): IPv6Address("fe80::2").packed}
    assert encode_prefix(net("10.9.0.0/24")) in p.b.rib_in[V4].routes
    assert encode_prefix(net("fd44::/64")) in p.b.rib_in[V6].routes


def test_ipv4_over_ipv6_session_without_extended_next_hop_is_not_sent():
    s = raw_established(cfg(), open_bytes(caps=(MultiProtocol(1, 1), MultiProtocol(2, 1), FourOctetAs(65002))),
                        local="fd00::1", remote="fd00::2")
    s.data_to_send()
    assert not s.extended_next_hop
    s.rib_out[V4].advertise(encode_prefix(net("10.9.0.0/24")), PA())
    assert [m for m in messages(s.data_to_send()) if isinstance(m, Update)] == []
    assert s.encoder.unsendable[V4].startswith("IPv4 prefixes need")
    # reported once per session and family (the speaker logs it and shows it as the peer's lastError)
    [event] = s.take_routes_not_sent()
    assert (event.family, "extended next hop capability (RFC 8950)" in event.reason) == (V4, True)
    assert s.take_routes_not_sent() == []


# ------------------------------------------------------------------ UPDATE handling

def test_incremental_updates_never_reset_the_session():
    p = ebgp_pair().connect()
    for i in range(50):
        key = encode_prefix(net(f"10.20.{i}.0/24"))
        p.a.rib_out[V4].advertise(key, PA())
        p.run()
        assert p.wire["a"][-1] == h(M + "002f 02 0000 0014" + "40 01 01 00" + "40 02 06 02 01 0000fde9"
                                    + "40 03 04 0a000001") + key
        p.a.rib_out[V4].withdraw(key)
        p.run()
        assert p.wire["a"][-1] == h(M) + (23 + len(key)).to_bytes(2, "big") + b"\x02" \
            + len(key).to_bytes(2, "big") + key + b"\x00\x00"
    assert p.a.state is ESTABLISHED and p.b.state is ESTABLISHED
    assert not p.of_type("a", SessionDown) and p.b.rib_in[V4].routes == {}


def test_nlri_packed_per_attribute_set_up_to_4096_bytes():
    s = Session(cfg(extended_messages=False))
    for i in range(3000):
        s.rib_out[V4].advertise(encode_prefix(net(f"11.{i // 256}.{i % 256}.0/24")),
                                PA(communities=((65000 << 16) | (i % 2),)))
    s.start(0.0)
    s.connection_made(0.0, "10.0.0.1", "10.0.0.2", outgoing=True)
    s.receive_data(open_bytes(caps=(MultiProtocol(1, 1), FourOctetAs(65002), ExtendedMessage())) + KEEPALIVE_BYTES, 0)
    wire = s.data_to_send()
    ups = [m for m in messages(wire) if isinstance(m, Update) and m.nlri]
    sizes = [len(encode(u)) for u in ups]
    assert max(sizes) <= 4096 and sum(len(u.nlri) for u in ups) == 3000
    # 4096 - 23 (header, lengths) - 27 (attributes) = 4046 bytes: 1011 /24s per UPDATE, so each
    # set of 1500 prefixes needs 2 UPDATEs.
    assert len(ups) == 4 and len({u.attribute(Communities) for u in ups}) == 2
    assert sorted(len(u.nlri) for u in ups) == [489, 489, 1011, 1011]


def test_extended_messages_when_both_sides_offer_them():
    s = Session(cfg())
    for i in range(3000):
        s.rib_out[V4].advertise(encode_prefix(net(f"11.{i // 256}.{i % 256}.0/24")), PA())
    s.start(0.0)
    s.connection_made(0.0, "10.0.0.1", "10.0.0.2", outgoing=True)
    s.receive_data(open_bytes(caps=(MultiProtocol(1, 1), FourOctetAs(65002), ExtendedMessage())) + KEEPALIVE_BYTES, 0)
    ups = [m for m in messages(s.data_to_send()) if isinstance(m, Update) and m.nlri]
    assert len(ups) == 1 and 4096 < len(encode(ups[0])) <= 65535


def test_as_path_loop_drops_our_own_routes_reflected_back():
    p = ebgp_pair().connect()
    back = Update((), (OriginAttr(0), AsPath((AsSegment(2, (65002, 65001)),)), NextHop(IPv4Address("10.0.0.2"))),
                  (net("10.9.0.0/24"),))
    fresh = Update((), (OriginAttr(0), AsPath((AsSegment(2, (65002,)),)), NextHop(IPv4Address("10.0.0.2"))),
                   (net("10.7.0.0/24"),))
    p.call("a", p.a.receive_data, encode(back) + encode(fresh), p.now)
    assert list(p.a.rib_in[V4].routes) == [encode_prefix(net("10.7.0.0/24"))]
    assert p.a.rib_in[V4].rejected == {encode_prefix(net("10.9.0.0/24"))}


def test_treat_as_withdraw_removes_the_route_and_keeps_the_session():
    p = ebgp_pair().connect()
    good = Update((), (OriginAttr(0), AsPath((AsSegment(2, (65002,)),)), NextHop(IPv4Address("10.0.0.2"))),
                  (net("10.7.0.0/24"),))
    p.call("a", p.a.receive_data, encode(good), p.now)
    assert p.a.rib_in[V4].routes
    bad = bytearray(encode(good))
    bad[26] = 9  # ORIGIN value 9: RFC 7606 treat-as-withdraw
    p.call("a", p.a.receive_data, bytes(bad), p.now)
    assert p.a.rib_in[V4].routes == {} and p.a.state is ESTABLISHED
    assert p.of_type("a", UpdateErrorHandled)[-1].action == "treat-as-withdraw"


def test_missing_mandatory_attribute_is_treat_as_withdraw():
    p = ebgp_pair().connect()
    p.call("a", p.a.receive_data, encode(Update((), (OriginAttr(0), NextHop(IPv4Address("10.0.0.2"))),
                                                (net("10.7.0.0/24"),))), p.now)
    assert p.a.rib_in[V4].routes == {} and p.a.state is ESTABLISHED
    assert "AS_PATH" in p.of_type("a", UpdateErrorHandled)[-1].reason


def test_local_pref_from_an_external_peer_is_discarded():
    p = ebgp_pair().connect()
    u = Update((), (OriginAttr(0), AsPath((AsSegment(2, (65002,)),)), NextHop(IPv4Address("10.0.0.2")),
                    LocalPref(500)), (net("10.7.0.0/24"),))
    p.call("a", p.a.receive_data, encode(u), p.now)
    stored = p.a.rib_in[V4].routes[encode_prefix(net("10.7.0.0/24"))]
    assert not any(isinstance(a, LocalPref) for a in stored)


# ------------------------------------------------------------------ refresh, GR, stop

def test_route_refresh_is_answered_with_the_table_inside_borr_eorr():
    p = ebgp_pair()
    p.a.rib_out[V4].advertise(encode_prefix(net("10.9.0.0/24")), PA())
    p.connect()
    n = len(p.wire["a"])
    p.call("a", p.a.receive_data, encode(RouteRefresh(1, 1)), p.now)
    p.run()
    got = messages(b"".join(p.wire["a"][n:]))
    assert got[0] == RouteRefresh(1, 1, 1) and got[-1] == RouteRefresh(1, 1, 2)
    assert [m.nlri for m in got[1:-1]] == [(net("10.9.0.0/24"),)]


def test_graceful_restart_r_bit_only_until_the_first_established_session():
    p = ebgp_pair(a_graceful_restart=True, b_graceful_restart=True).connect()
    assert p.b.remote_open.capability(GracefulRestart).restart_state is True
    p.call("a", p.a.stop, p.now, notify=False)
    assert p.a.data_to_send() == b""  # no NOTIFICATION: the peer keeps our routes (RFC 4724)
    # half close: the driver waits for the peer's FIN (so the peer is in helper mode before our
    # BFD AdminDown can reach it); an administrative stop closes at once
    assert [c.until_peer_closes for c in p.of_type("a", CloseConnection)] == [True]
    s = p.a
    s.start(p.now)
    s.connection_made(p.now, "10.0.0.1", "10.0.0.2", outgoing=True)
    assert decode(s.data_to_send()).capability(GracefulRestart).restart_state is False


def test_stop_sends_administrative_shutdown_with_message():
    p = ebgp_pair().connect()
    p.call("a", p.a.stop, p.now, subcode=2, data=b"\x0bmaintenance")
    p.run()
    assert p.wire["a"][-1] == h(M + "0021 03 06 02 0b") + b"maintenance"
    assert [c.until_peer_closes for c in p.of_type("a", CloseConnection)] == [False]
    assert "Administrative Shutdown: maintenance" in p.b.last_error
    assert p.a.state is State.IDLE and p.a.next_deadline() is None  # no automatic restart


def test_cease_becomes_hard_reset_when_n_bit_negotiated():
    p = ebgp_pair(a_graceful_restart=True, b_graceful_restart=True).connect()
    p.call("a", p.a.stop, p.now, subcode=3)
    p.run()
    assert p.wire["a"][-1] == h(M + "0017 03 06 09 06 03")  # RFC 8538 Hard Reset(Peer De-configured)


# ------------------------------------------------------------------ connect retry

def test_connect_retry_is_fixed_with_small_jitter_and_never_grows():
    """FRR/GoBGP semantics: a router down for minutes is retried every ConnectRetry, so it is
    reconnected within connectRetryTime after it is back (no exponential back-off)."""
    s = Session(cfg(connect_retry=10), rng=random.Random(3))
    evs = s.start(0.0)
    assert isinstance(evs[0], ConnectRequested)
    now, delays = 0.0, []
    for _ in range(40):  # 40 refused attempts, ~6 minutes of a router that is down
        evs = s.connection_failed(now, "connection refused")
        delays.append(s.next_deadline() - now)
        assert s.state is State.IDLE and any(isinstance(e, ConnectFailed) for e in evs)
        now = s.next_deadline()
        evs = s.handle_timer(now)
        assert s.state is State.CONNECT and isinstance(evs[0], ConnectRequested)
    assert all(7.5 <= d <= 10 for d in delays), delays
    assert len({round(d, 3) for d in delays}) > 30  # jittered, not lockstep


def test_retry_after_an_established_session_drops_is_quick_then_connect_retry():
    p = ebgp_pair(a_connect_retry=4).connect()
    p.now += 60  # the session held a while
    p.call("a", p.a.connection_failed, p.now, "connection reset")
    assert 0.5 <= p.a.next_deadline() - p.now <= 1.0
    p.now = p.a.next_deadline()
    p.a.handle_timer(p.now)
    p.a.connection_failed(p.now, "connection refused")  # the router is still down
    assert 3.0 <= p.a.next_deadline() - p.now <= 4.0


def test_connect_timeout_goes_idle_and_retries():
    s = Session(cfg(connect_retry=5))
    s.start(0.0)
    assert s.next_deadline() == 5.0
    evs = s.handle_timer(5.0)
    failed = [e for e in evs if isinstance(e, ConnectFailed)]
    assert failed and failed[0].timed_out and s.state is State.IDLE
    assert 5.0 + 3.75 <= s.next_deadline() <= 5.0 + 5


def test_peer_notification_closes_and_schedules_restart():
    p = ebgp_pair().connect()
    p.call("b", p.b.stop, p.now, subcode=4)
    p.run()
    down = p.of_type("a", SessionDown)[-1]
    assert down.received == Notification(6, 4) and p.a.state is State.IDLE and p.a.next_deadline() is not None


# ------------------------------------------------------------------ more receive-side rules

def test_collision_rule_keeps_the_connection_of_the_higher_identifier():
    from agent.bgp.speaker import collision_keeps_outgoing

    assert collision_keeps_outgoing("2.2.2.2", "1.1.1.1", 65001, 65002) is True
    assert collision_keeps_outgoing("1.1.1.1", "2.2.2.2", 65001, 65002) is False
    # RFC 6286 §2.3: equal identifiers (eBGP) -> the larger AS number's connection stays
    assert collision_keeps_outgoing("1.1.1.1", "1.1.1.1", 65002, 65001) is True
    assert collision_keeps_outgoing("1.1.1.1", "1.1.1.1", 65001, 65002) is False


def test_originator_id_or_cluster_list_with_our_router_id_is_rejected_on_ibgp():
    from agent.bgp.messages import ClusterList, OriginatorId

    p = Pair(cfg(65001, "1.1.1.1", 65001), cfg(65001, "2.2.2.2", 65001)).connect()
    base = (OriginAttr(0), AsPath(()), NextHop(IPv4Address("10.0.0.2")), LocalPref(100))
    p.call("a", p.a.receive_data, encode(Update((), base + (OriginatorId(IPv4Address("1.1.1.1")),),
                                                (net("10.7.0.0/24"),)))
           + encode(Update((), base + (ClusterList((IPv4Address("9.9.9.9"), IPv4Address("1.1.1.1"))),),
                           (net("10.6.0.0/24"),)))
           + encode(Update((), base + (OriginatorId(IPv4Address("3.3.3.3")),), (net("10.5.0.0/24"),))), p.now)
    assert list(p.a.rib_in[V4].routes) == [encode_prefix(net("10.5.0.0/24"))]
    assert len(p.a.rib_in[V4].rejected) == 2


def test_as4_path_is_merged_for_loop_detection_from_a_two_octet_peer():
    s = raw_established(cfg(4200000001, "1.1.1.1", 65002), open_bytes(caps=(MultiProtocol(1, 1),)))
    looped = Update((), (OriginAttr(0), AsPath((AsSegment(2, (65002, 23456)),)), NextHop(IPv4Address("10.0.0.2")),
                         As4Path((AsSegment(2, (4200000001,)),))), (net("10.7.0.0/24"),))
    clean = Update((), (OriginAttr(0), AsPath((AsSegment(2, (65002, 23456)),)), NextHop(IPv4Address("10.0.0.2")),
                        As4Path((AsSegment(2, (4200000077,)),))), (net("10.8.0.0/24"),))
    s.receive_data(encode(looped, four_octet_as=False) + encode(clean, four_octet_as=False), 1.0)
    assert list(s.rib_in[V4].routes) == [encode_prefix(net("10.8.0.0/24"))]
    assert s.rib_in[V4].rejected == {encode_prefix(net("10.7.0.0/24"))}


def test_unknown_optional_transitive_attribute_is_kept_with_the_route():
    from agent.bgp.messages import UnknownAttribute

    p = ebgp_pair().connect()
    u = Update((), (OriginAttr(0), AsPath((AsSegment(2, (65002,)),)), NextHop(IPv4Address("10.0.0.2")),
                    UnknownAttribute(0xC0, 99, b"opaque")), (net("10.7.0.0/24"),))
    p.call("a", p.a.receive_data, encode(u), p.now)
    assert UnknownAttribute(0xC0, 99, b"opaque") in p.a.rib_in[V4].routes[encode_prefix(net("10.7.0.0/24"))]


def test_enhanced_route_refresh_from_the_peer_sweeps_stale_routes():
    p = ebgp_pair().connect()
    attrs = (OriginAttr(0), AsPath((AsSegment(2, (65002,)),)), NextHop(IPv4Address("10.0.0.2")))
    p.call("a", p.a.receive_data, encode(Update((), attrs, (net("10.7.0.0/24"), net("10.8.0.0/24")))), p.now)
    p.call("a", p.a.receive_data, encode(RouteRefresh(1, 1, 1)) + encode(Update((), attrs, (net("10.8.0.0/24"),)))
           + encode(RouteRefresh(1, 1, 2)), p.now)
    assert list(p.a.rib_in[V4].routes) == [encode_prefix(net("10.8.0.0/24"))]


def test_end_of_rib_from_the_peer_is_reported_per_family():
    p = ebgp_pair().connect()
    assert p.of_type("a", EndOfRibReceived) == [EndOfRibReceived(V4), EndOfRibReceived(V6)]


def test_a_connection_closed_before_established_is_retried_after_the_idle_hold_time():
    s = Session(cfg(connect_retry=120), rng=random.Random(5))
    s.start(0.0)
    now, delays = 0.0, []
    for _ in range(8):
        s.connection_made(now, "10.0.0.1", "10.0.0.2", outgoing=True)
        s.connection_failed(now, "closed by the peer")  # e.g. the peer is still clearing our old session
        delays.append(s.next_deadline() - now)
        now = s.next_deadline()
        s.handle_timer(now)
    # 5, 10, 20, ... s (jitter 0.75..1), never more than connectRetryTime (120 s)
    assert 3.75 <= delays[0] <= 5 and 7.5 <= delays[1] <= 10 and 15 <= delays[2] <= 20, delays
    assert max(delays) <= 120 and delays[-1] >= 90, delays


def test_a_long_lived_session_that_ends_reconnects_within_a_second():
    p = ebgp_pair().connect()
    p.advance(60)
    p.call("a", p.a.connection_failed, p.now, "connection reset")
    assert p.a.state is State.IDLE and 0.5 <= p.a.next_deadline() - p.now < 1.0


# ------------------------------------------------------------------ property: the peer sees our Adj-RIB-Out

from hypothesis import given, settings, strategies as st  # noqa: E402

_PREFIXES = [net(f"10.{i}.0.0/16") for i in range(6)] + [net(f"fd{i:02x}::/64") for i in range(6)]
_ATTRS = [PA(), PA(med=1), PA(communities=(7,)), PA(large_communities=((1, 2, 3),)), PA(next_hop="fd00::99")]
_ops = st.lists(st.tuples(st.sampled_from(["adv", "wd", "flush", "refresh"]), st.sampled_from(_PREFIXES),
                          st.sampled_from(_ATTRS)), max_size=40)


@settings(max_examples=60, deadline=None)
@given(_ops, _ops, st.booleans())
def test_after_any_sequence_of_changes_the_peer_holds_exactly_our_adj_rib_out(before, after, over_v6):
    if over_v6:  # IPv6 session: RFC 8950 carries IPv4 prefixes, so every attribute set is sendable
        p = Pair(cfg(), cfg(65002, "2.2.2.2", 65001), a_addr="fd00::1", b_addr="fd00::2")
    else:
        p = ebgp_pair()

    def apply(ops):
        for op, prefix, attrs in ops:
            fam = V4 if prefix.version == 4 else V6
            if op == "adv":
                p.a.rib_out[fam].advertise(encode_prefix(prefix), attrs)
            elif op == "wd":
                p.a.rib_out[fam].withdraw(encode_prefix(prefix))
            elif op == "flush":
                p.run()
            elif p.a.state is ESTABLISHED:
                p.call("a", p.a.receive_data, encode(RouteRefresh(fam.afi, fam.safi)), p.now)

    apply(before)  # changes before the session exists: sent as the initial table
    p.connect()
    apply(after)  # incremental changes, interleaved with flushes and refreshes
    p.run()
    for fam in (V4, V6):
        # On this IPv4 session (no RFC 8950) IPv4 prefixes need an IPv4 next hop and IPv6 prefixes
        # a configured IPv6 one; the others are never sent.
        def v6_hop(a):
            return a.next_hop is not None and ":" in a.next_hop

        sendable = {k: a for k, a in p.a.rib_out[fam].routes.items() if over_v6 or v6_hop(a) == (fam is V6)}
        got = p.b.rib_in[fam].routes
        assert set(got) == set(sendable)
        for k, a in sendable.items():
            stored = got[k]
            assert (Communities(a.communities) in stored) == bool(a.communities)
    assert p.a.state is ESTABLISHED and not p.of_type("a", SessionDown)
