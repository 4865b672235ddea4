"""Codec: byte-exact encodings, RFC 4271 §6 header/OPEN/UPDATE errors, RFC 7606 handling,
RFC 9072 extended OPEN, hypothesis round trips."""

from __future__ import annotations

from ipaddress import IPv4Address, IPv4Network, IPv6Network

import pytest
from hypothesis import given, settings, strategies as st

from agent.bgp.codec import KEEPALIVE_BYTES, MessageReader, decode, encode
from agent.bgp.errors import BgpProtocolError
from agent.bgp.messages import (
    Aggregator, As4Path, AsPath, AsSegment, AtomicAggregate, ClusterList, Communities,
    EnhancedRouteRefreshCap, ExtendedCommunities, ExtendedMessage, ExtendedNextHop, FourOctetAs,
    GracefulRestart, Keepalive, LargeCommunities, LocalPref, Med, MpReach, MpUnreach, MultiProtocol,
    NextHop, Notification, Open, OriginAttr, OriginatorId, RouteRefresh, RouteRefreshCap,
    UnknownAttribute, UnknownCapability, Update,
)

M = "ff" * 16


def h(s: str) -> bytes:
    return bytes.fromhex(s.replace(" ", ""))


def err_of(data: bytes, four=True) -> BgpProtocolError:
    with pytest.raises(BgpProtocolError) as ei:
        decode(data, four)
    return ei.value


# ------------------------------------------------------------------ byte-exact encodings

def test_keepalive_is_19_bytes():
    assert encode(Keepalive()) == KEEPALIVE_BYTES == h(M + "0013 04")


def test_open_encoding_byte_exact():
    o = Open(65001, 90, IPv4Address("1.1.1.1"), (MultiProtocol(1, 1), RouteRefreshCap(), FourOctetAs(65001)))
    # 19 header + 10 fixed + optional parameter (2 + 14 bytes of capabilities) = 45 = 0x2d
    assert encode(o) == h(M + "002d 01" + "04 fde9 005a 01010101 10"
                          + "02 0e" + "01 04 0001 00 01" + "02 00" + "41 04 0000fde9")
    assert decode(encode(o)) == o


def test_open_4_octet_asn_uses_as_trans():
    o = Open(23456, 180, IPv4Address("10.0.0.1"), (FourOctetAs(4200000001),))
    assert encode(o)[19:24] == h("04 5ba0 00b4")
    assert decode(encode(o)).asn == 4200000001


def test_graceful_restart_capability_bits():
    gr = GracefulRestart(120, restart_state=True, notification=True, families=((1, 1, True), (2, 1, False)))
    o = Open(65001, 90, IPv4Address("1.1.1.1"), (gr,))
    # flags R=0x8 N=0x4 in the top nibble, restart time 120 = 0x078; per family F bit 0x80.
    assert encode(o)[29:] == h("02 0c" + "40 0a" + "c078" + "0001 01 80" + "0002 01 00")
    assert decode(encode(o)).capabilities == (gr,)


def test_notification_and_route_refresh_encoding():
    assert encode(Notification(6, 2, b"\x03bye")) == h(M + "0019 03 06 02 03627965")
    assert encode(RouteRefresh(2, 1, 1)) == h(M + "0017 05 0002 01 01")


def test_update_encoding_byte_exact():
    u = Update(withdrawn=(IPv4Network("10.1.0.0/16"),),
               attributes=(OriginAttr(0), AsPath((AsSegment(2, (65001,)),)), NextHop(IPv4Address("10.0.0.1")),
                           Communities((0xFDE80001,))),
               nlri=(IPv4Network("10.9.0.0/24"),))
    expected = h(M + "0039 02" + "0003 100a01" + "001b"
                 + "40 01 01 00" + "40 02 06 02 01 0000fde9" + "40 03 04 0a000001" + "c0 08 04 fde80001"
                 + "18 0a0900")
    assert encode(u) == expected
    assert decode(expected) == u


def test_update_as_path_two_octet_encoding_replaces_big_asns():
    u = Update(attributes=(AsPath((AsSegment(2, (65001, 4200000001)),)),))
    assert encode(u, four_octet_as=False)[23:] == h("40 02 06 02 02 fde9 5ba0")


# ------------------------------------------------------------------ RFC 4271 §6.1 header errors

def test_bad_marker_is_connection_not_synchronized():
    e = err_of(h("fe" + "ff" * 15 + "0013 04"))
    assert (e.code, e.subcode) == (1, 1)


@pytest.mark.parametrize("length", [18, 4097])
def test_bad_length_carries_the_length(length):
    e = err_of(h(M) + length.to_bytes(2, "big") + b"\x04" + b"\x00" * max(0, length - 19))
    assert (e.code, e.subcode, e.data) == (1, 2, length.to_bytes(2, "big"))


def test_keepalive_with_body_is_bad_length():
    e = err_of(h(M + "0014 04 00"))
    assert (e.code, e.subcode, e.data) == (1, 2, h("0014"))


def test_unknown_type_is_bad_message_type():
    e = err_of(h(M + "0013 09"))
    assert (e.code, e.subcode, e.data) == (1, 3, b"\x09")


def test_route_refresh_bad_length_is_7_1():
    e = err_of(h(M + "0018 05 0001 00 01 00"))
    assert (e.code, e.subcode) == (7, 1)


def test_reader_yields_messages_split_anywhere():
    stream = encode(Keepalive()) + encode(Notification(6, 4)) + encode(RouteRefresh(1, 1))
    for cut in range(len(stream) + 1):
        r = MessageReader()
        got = []
        for part in (stream[:cut], stream[cut:]):
            r.feed(part)
            while (m := r.next_message()) is not None:
                got.append(m)
        assert got == [Keepalive(), Notification(6, 4), RouteRefresh(1, 1)]


# ------------------------------------------------------------------ OPEN errors, RFC 9072

def test_unsupported_version():
    e = err_of(h(M + "001d 01 03 fde9 005a 01010101 00"))
    assert (e.code, e.subcode, e.data) == (2, 1, h("0004"))


def test_unsupported_optional_parameter():
    e = err_of(h(M + "0020 01 04 fde9 005a 01010101 03 01 01 00"))
    assert (e.code, e.subcode) == (2, 4)


def test_unknown_capability_is_kept_as_unknown():
    o = decode(h(M + "0022 01 04 fde9 005a 01010101 05 02 03 49 01 41"))
    assert o.capabilities == (UnknownCapability(0x49, b"\x41"),)


def test_rfc9072_extended_optional_parameters_are_parsed():
    caps = h("01 04 0001 00 01" + "41 04 0000fde9")
    params = h("02") + len(caps).to_bytes(2, "big") + caps
    body = h("04 fde9 005a 01010101 ff ff") + len(params).to_bytes(2, "big") + params
    o = decode(h(M) + (19 + len(body)).to_bytes(2, "big") + b"\x01" + body)
    assert o.capabilities == (MultiProtocol(1, 1), FourOctetAs(65001))


def test_malformed_capability_is_open_error():
    e = err_of(h(M + "0021 01 04 fde9 005a 01010101 04 02 02 01 03"))  # MP cap with 3 bytes? overrun
    assert e.code == 2


# ------------------------------------------------------------------ UPDATE errors

AS_PATH_NH = "40 02 06 02 01 0000fde9" + "40 03 04 0a000001"
BASE = "40 01 01 00" + AS_PATH_NH


def upd(attrs_hex: str, nlri_hex: str = "18 0a0900", withdrawn_hex: str = "") -> bytes:
    a, n, w = h(attrs_hex), h(nlri_hex), h(withdrawn_hex)
    body = len(w).to_bytes(2, "big") + w + len(a).to_bytes(2, "big") + a + n
    return h(M) + (19 + len(body)).to_bytes(2, "big") + b"\x02" + body


def test_valid_update_has_no_findings():
    u = decode(upd(BASE))
    assert u.treat_as_withdraw is None and u.discarded == ()


def test_bad_origin_is_treat_as_withdraw():
    u = decode(upd("40 01 01 07" + AS_PATH_NH))
    assert "ORIGIN" in u.treat_as_withdraw
    assert u.nlri == (IPv4Network("10.9.0.0/24"),)


def test_wrong_flags_on_well_known_attribute_is_treat_as_withdraw():
    u = decode(upd("c0 01 01 00" + AS_PATH_NH))
    assert "flags" in u.treat_as_withdraw


def test_community_length_not_multiple_of_4_is_treat_as_withdraw():
    assert "COMMUNITIES" in decode(upd(BASE + "c0 08 03 000001")).treat_as_withdraw


def test_large_community_bad_length_is_treat_as_withdraw():
    assert "LARGE_COMMUNITY" in decode(upd(BASE + "c0 20 08 0000fde8 00000001")).treat_as_withdraw


def test_atomic_aggregate_with_value_is_discarded():
    u = decode(upd(BASE + "40 06 01 00"))
    assert u.treat_as_withdraw is None and any("ATOMIC_AGGREGATE" in d for d in u.discarded)
    assert not any(isinstance(a, AtomicAggregate) for a in u.attributes)


def test_duplicate_attribute_keeps_the_first():
    u = decode(upd(BASE + "80 04 04 00000001" + "80 04 04 00000002"))
    assert u.attribute(Med) == Med(1) and u.discarded


def test_duplicate_mp_reach_is_malformed_attribute_list():
    mp = "80 0e 09 0001 01 04 0a000001 00"
    e = err_of(upd(BASE + mp + mp, ""))
    assert (e.code, e.subcode) == (3, 1)


def test_unknown_well_known_attribute_is_3_2_with_the_attribute():
    e = err_of(upd(BASE + "40 63 01 aa"))
    assert (e.code, e.subcode, e.data) == (3, 2, h("40 63 01 aa"))


def test_unknown_optional_transitive_is_kept_non_transitive_dropped():
    u = decode(upd(BASE + "c0 63 02 abcd" + "80 64 01 01"))
    assert UnknownAttribute(0xC0, 0x63, h("abcd")) in u.attributes
    assert not any(getattr(a, "type_code", 0) == 0x64 for a in u.attributes)


def test_attribute_overrunning_the_list_is_treat_as_withdraw():
    # The last attribute claims 9 bytes but only 4 are in the attribute list (RFC 7606 §4).
    u = decode(upd(BASE + "c0 08 09 fde80001"))
    assert u.treat_as_withdraw and u.nlri == (IPv4Network("10.9.0.0/24"),)


def test_nlri_prefix_too_long_is_invalid_network_field():
    e = err_of(upd(BASE, "21 0a090000 00"))
    assert (e.code, e.subcode) == (3, 10)


def test_withdrawn_length_overrun_is_malformed_attribute_list():
    e = err_of(h(M + "0017 02 0005 0000"))
    assert (e.code, e.subcode) == (3, 1)


def test_mp_reach_bad_next_hop_length_resets():
    e = err_of(upd("80 0e 08 0002 01 03 aabbcc 00", ""))
    assert (e.code, e.subcode) == (3, 9)


@pytest.mark.parametrize("nh_hex,next_hops", [
    ("10 fe800000000000000000000000000001", ("fe80::1",)),                        # unnumbered: LL only
    ("20 fd000000000000000000000000000001 fe800000000000000000000000000001", ("fd00::1", "fe80::1")),
])
def test_rfc8950_ipv4_nlri_with_an_ipv6_next_hop_decodes_and_encodes_byte_exact(nh_hex, next_hops):
    # MP_REACH_NLRI AFI 1 / SAFI 1, next hop 16 (link-local only) or 32 bytes, NLRI 10.9.0.0/24
    value = h("0001 01" + nh_hex + "00 18 0a0900")
    raw = upd("40 01 01 00 40 02 00 80 0e " + f"{len(value):02x}" + value.hex(), "")
    reach = decode(raw).attribute(MpReach)
    assert (reach.afi, reach.safi, reach.nlri) == (1, 1, (IPv4Network("10.9.0.0/24"),))
    assert tuple(str(a) for a in reach.next_hops()) == next_hops
    assert encode(decode(raw)) == raw


def test_as4_path_with_confederation_segment_is_discarded():
    u = decode(upd(BASE + "c0 11 06 03 01 0000fde9"))
    assert u.treat_as_withdraw is None and not u.attribute(As4Path)


def test_host_bits_are_cleared():
    u = decode(upd(BASE, "18 0a0901"))  # fine: /24 has 3 significant bytes; now a /23 with a host bit:
    assert u.nlri == (IPv4Network("10.9.1.0/24"),)
    assert decode(upd(BASE, "17 0a0901")).nlri == (IPv4Network("10.9.0.0/23"),)


# ------------------------------------------------------------------ hypothesis round trips

u32 = st.integers(0, 2**32 - 1)
v4 = st.builds(IPv4Address, u32)
v4net = st.builds(lambda a, p: IPv4Network((a, p), strict=False), u32, st.integers(0, 32))
v6net = st.builds(lambda a, p: IPv6Network((a, p), strict=False), st.integers(0, 2**128 - 1), st.integers(0, 128))
segs = st.lists(st.builds(AsSegment, st.sampled_from([1, 2]), st.lists(st.integers(1, 2**32 - 1), min_size=1,
                                                                       max_size=5).map(tuple)), max_size=3).map(tuple)
attr_strategies = [
    st.builds(OriginAttr, st.integers(0, 2)),
    st.builds(AsPath, segs),
    st.builds(NextHop, v4),
    st.builds(Med, u32),
    st.builds(LocalPref, u32),
    st.just(AtomicAggregate()),
    st.builds(Aggregator, u32, v4),
    st.builds(Communities, st.lists(u32, min_size=1, max_size=5).map(tuple)),
    st.builds(OriginatorId, v4),
    st.builds(ClusterList, st.lists(v4, min_size=1, max_size=3).map(tuple)),
    st.builds(lambda nets: MpReach(2, 1, bytes(16), tuple(nets)), st.lists(v6net, max_size=5)),
    st.builds(lambda nets: MpUnreach(2, 1, tuple(nets)), st.lists(v6net, max_size=5)),
    st.builds(ExtendedCommunities, st.lists(st.binary(min_size=8, max_size=8), min_size=1, max_size=3).map(tuple)),
    st.builds(As4Path, segs),
    st.builds(LargeCommunities, st.lists(st.tuples(u32, u32, u32), min_size=1, max_size=3).map(tuple)),
    st.builds(lambda t, v: UnknownAttribute(0xC0, t, v), st.integers(40, 250), st.binary(max_size=300)),
]


@st.composite
def updates(draw):
    chosen = draw(st.lists(st.sampled_from(range(len(attr_strategies))), unique=True, max_size=8))
    attrs = tuple(draw(attr_strategies[i]) for i in sorted(chosen))
    return Update(tuple(draw(st.lists(v4net, max_size=10))), attrs, tuple(draw(st.lists(v4net, max_size=10))))


caps = st.one_of(
    st.builds(MultiProtocol, st.sampled_from([1, 2]), st.sampled_from([1, 2, 128])),
    st.just(RouteRefreshCap()), st.just(EnhancedRouteRefreshCap()), st.just(ExtendedMessage()),
    st.builds(FourOctetAs, u32),
    st.builds(ExtendedNextHop, st.lists(st.tuples(st.just(1), st.just(1), st.just(2)), min_size=1, max_size=2).map(tuple)),
    st.builds(GracefulRestart, st.integers(0, 4095), st.booleans(), st.booleans(),
              st.lists(st.tuples(st.sampled_from([1, 2]), st.just(1), st.booleans()), max_size=2).map(tuple)),
    st.builds(UnknownCapability, st.integers(71, 127), st.binary(max_size=10)),
)


@settings(max_examples=300, deadline=None)
@given(updates())
def test_update_round_trip(u):
    assert decode(encode(u)) == u


@settings(max_examples=300, deadline=None)
@given(st.integers(0, 65535), st.integers(0, 65535), v4, st.lists(caps, max_size=8).map(tuple))
def test_open_round_trip(asn, hold, rid, cs):
    o = Open(asn, hold, rid, cs)
    assert decode(encode(o)) == o


@given(st.integers(1, 255), st.integers(0, 255), st.binary(max_size=50))
def test_notification_round_trip(code, sub, data):
    assert decode(encode(Notification(code, sub, data))) == Notification(code, sub, data)
