"""Differential tests against an independent BGP implementation: scapy.contrib.bgp.

Both directions: messages we encode are decoded by scapy, and messages scapy builds are decoded
by us; the fields must agree."""

from __future__ import annotations

from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network

from hypothesis import given, settings, strategies as st

import scapy.contrib.bgp as sbgp
from agent.bgp.codec import decode, encode
from agent.bgp.messages import (
    AsPath, AsSegment, Communities, FourOctetAs, GracefulRestart, LargeCommunities, LocalPref, Med,
    MpReach, MultiProtocol, NextHop, Open, OriginAttr, RouteRefreshCap, Update,
)

sbgp.bgp_module_conf.use_2_bytes_asn = False  # we negotiate 4-octet ASNs

u32 = st.integers(0, 2**32 - 1)
# scapy mis-parses some degenerate prefixes (0.0.0.0/1 comes back as /0), so the oracle sees
# ordinary ones: a non-zero first octet/hextet and lengths >= 8 / 16. Our own round-trip tests
# (test_codec.py) cover every length.
v4net = st.builds(lambda a, p: IPv4Network((a, p), strict=False), st.integers(1 << 24, 2**32 - 1), st.integers(8, 32))
v6net = st.builds(lambda a, p: IPv6Network((a, p), strict=False), st.integers(1 << 112, 2**128 - 1),
                  st.integers(16, 128))


@st.composite
def updates(draw):
    attrs = [OriginAttr(draw(st.integers(0, 2))),
             AsPath((AsSegment(2, tuple(draw(st.lists(st.integers(1, 2**32 - 1), min_size=1, max_size=6)))),)),
             NextHop(IPv4Address(draw(u32)))]
    if draw(st.booleans()):
        attrs.append(Med(draw(u32)))
    if draw(st.booleans()):
        attrs.append(LocalPref(draw(u32)))
    if draw(st.booleans()):
        attrs.append(Communities((draw(u32),)))  # scapy's COMMUNITIES layer holds one value
    if draw(st.booleans()):
        attrs.append(MpReach(2, 1, IPv6Address(draw(st.integers(1, 2**128 - 1))).packed,
                             tuple(draw(st.lists(v6net, min_size=1, max_size=5)))))
    if draw(st.booleans()):
        attrs.append(LargeCommunities((draw(st.tuples(u32, u32, u32)),)))  # scapy: one value
    return Update(tuple(draw(st.lists(v4net, max_size=8))), tuple(attrs), tuple(draw(st.lists(v4net, max_size=8))))


@settings(max_examples=200, deadline=None)
@given(updates())
def test_scapy_decodes_what_we_encode(u):
    pkt = sbgp.BGPHeader(encode(u))
    s = pkt[sbgp.BGPUpdate]
    assert [IPv4Network(w.prefix) for w in s.withdrawn_routes] == list(u.withdrawn)
    assert [IPv4Network(n.prefix) for n in s.nlri] == list(u.nlri)
    by_type = {a.type_code: a.attribute for a in s.path_attr}
    assert set(by_type) == {a.type_code for a in u.attributes}
    for a in u.attributes:
        got = by_type[a.type_code]
        if isinstance(a, OriginAttr):
            assert got.origin == a.value
        elif isinstance(a, AsPath):
            assert [(g.segment_type, list(g.segment_value)) for g in got.segments] == \
                   [(seg.type, list(seg.asns)) for seg in a.segments]
        elif isinstance(a, NextHop):
            assert got.next_hop == str(a.address)
        elif isinstance(a, Med):
            assert got.med == a.value
        elif isinstance(a, LocalPref):
            assert got.local_pref == a.value
        elif isinstance(a, Communities):
            assert got.community == a.values[0]
        elif isinstance(a, LargeCommunities):
            assert [(g.global_administrator, g.local_data_part1, g.local_data_part2) for g in got.segments] == \
                   list(a.values)
        elif isinstance(a, MpReach):
            assert (got.afi, got.safi, got.nh_addr_len) == (2, 1, 16)
            assert IPv6Address(got.nh_v6_addr) == IPv6Address(a.next_hop)
            assert [IPv6Network(n.prefix) for n in got.nlri] == list(a.nlri)


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 65535), st.sampled_from([0, 3, 9, 90, 180, 65535]), st.integers(1, 2**32 - 1),
       st.integers(1, 2**32 - 1), st.integers(0, 4095), st.booleans())
def test_we_decode_what_scapy_builds(my_as, hold, rid, asn4, restart_time, r_bit):
    params = [
        sbgp.BGPOptParam(param_type=2, param_value=sbgp.BGPCapMultiprotocol(afi=1, safi=1)),
        sbgp.BGPOptParam(param_type=2, param_value=sbgp.BGPCapMultiprotocol(afi=2, safi=1)),
        sbgp.BGPOptParam(param_type=2, param_value=sbgp.BGPCapGeneric(code=2)),
        sbgp.BGPOptParam(param_type=2, param_value=sbgp.BGPCapFourBytesASN(asn=asn4)),
        sbgp.BGPOptParam(param_type=2, param_value=sbgp.BGPCapGracefulRestart(
            restart_flags=0x8 if r_bit else 0, restart_time=restart_time,
            entries=[sbgp.BGPCapGracefulRestart.GRTuple(afi=1, safi=1, flags=0x80)])),
    ]
    raw = bytes(sbgp.BGPHeader(type=1) / sbgp.BGPOpen(my_as=my_as, hold_time=hold, bgp_id=str(IPv4Address(rid)),
                                                      opt_params=params))
    o = decode(raw)
    assert o == Open(my_as, hold, IPv4Address(rid), (
        MultiProtocol(1, 1), MultiProtocol(2, 1), RouteRefreshCap(), FourOctetAs(asn4),
        GracefulRestart(restart_time, r_bit, False, ((1, 1, True),))))


@settings(max_examples=100, deadline=None)
@given(st.lists(v4net, max_size=10), st.lists(v4net, min_size=1, max_size=10), st.integers(0, 2),
       st.integers(1, 2**32 - 1), u32)
def test_we_decode_scapy_updates(withdrawn, nlri, origin, asn, nh):
    attrs = [
        sbgp.BGPPathAttr(type_flags="Transitive", type_code="ORIGIN", attribute=sbgp.BGPPAOrigin(origin=origin)),
        sbgp.BGPPathAttr(type_flags="Transitive", type_code="AS_PATH", attribute=sbgp.BGPPAAS4BytesPath(
            segments=[sbgp.BGPPAAS4BytesPath.ASPathSegment(segment_type=2, segment_value=[asn])])),
        sbgp.BGPPathAttr(type_flags="Transitive", type_code="NEXT_HOP",
                         attribute=sbgp.BGPPANextHop(next_hop=str(IPv4Address(nh)))),
    ]
    pkt = sbgp.BGPHeader(type=2) / sbgp.BGPUpdate(
        withdrawn_routes=[sbgp.BGPNLRI_IPv4(prefix=str(w)) for w in withdrawn],
        path_attr=attrs, nlri=[sbgp.BGPNLRI_IPv4(prefix=str(n)) for n in nlri])
    u = decode(bytes(pkt))
    assert u.withdrawn == tuple(withdrawn) and u.nlri == tuple(nlri)
    assert u.attributes == (OriginAttr(origin), AsPath((AsSegment(2, (asn,)),)), NextHop(IPv4Address(nh)))
    assert u.treat_as_withdraw is None
