"""Cheap receive path for routes that will be dropped, cheap bulk advertise/withdraw, and the
TTL hint (docs/internal/bgp-findings.md F1, F3, F4)."""

from __future__ import annotations

import asyncio
from ipaddress import IPv4Address, IPv4Network, IPv6Network

import pytest

from agent.bgp.api import BgpSpeaker, NeighborConfig, PathAttributes, SpeakerConfig
from agent.bgp.codec import decode_update, encode, encode_prefix
from agent.bgp.errors import BgpProtocolError
from agent.bgp.messages import AsPath, AsSegment, MpReach, MpUnreach, NextHop, OriginAttr, Update
from agent.bgp.rib import AdjRibOut
from agent.bgp.session import ConnectFailed
from agent.bgp.speaker import FLUSH_EVERY, _connect_hint

from sansio_pair import PA, V4, V6, ebgp_pair, net
from test_bgp_speaker_loopback import pair, state, wait_for


def body(update: Update) -> bytes:
    return encode(update)[19:]


def looped(prefixes, *, withdrawn=()) -> Update:
    """What FRR sends back: our own routes with our AS 65001 in the path."""
    return Update(tuple(withdrawn), (OriginAttr(0), AsPath((AsSegment(2, (65002, 65001)),)),
                                     NextHop(IPv4Address("10.0.0.2"))), tuple(prefixes))


# ------------------------------------------------------------------ codec: compact NLRI keys

def test_nlri_keys_decode_to_the_wire_encoding_with_host_bits_cleared():
    u = Update((net("10.1.0.0/16"),), (OriginAttr(0), AsPath(()), NextHop(IPv4Address("10.0.0.2")),
                                       MpReach(2, 1, IPv4Address("10.0.0.2").packed * 4, (IPv6Network("fd00:1::/64"),)),
                                       MpUnreach(2, 1, (IPv6Network("fd00:2::/48"),))),
               (net("10.9.0.0/24"), net("0.0.0.0/0"), net("10.9.1.128/25")))
    raw = bytearray(body(u))
    raw[-1] |= 0x7F  # host bits in 10.9.1.128/25: cleared in both decodings (RFC 4271 §4.3)
    objects = decode_update(bytes(raw))
    keys = decode_update(bytes(raw), nlri_keys=True)
    assert keys.nlri == tuple(encode_prefix(p) for p in objects.nlri) == (b"\x18\x0a\x09\x00", b"\x00",
                                                                          b"\x19\x0a\x09\x01\x80")
    assert keys.withdrawn == (b"\x10\x0a\x01",)
    assert keys.attribute(MpReach).nlri == (encode_prefix(IPv6Network("fd00:1::/64")),)
    assert keys.attribute(MpUnreach).withdrawn == (encode_prefix(IPv6Network("fd00:2::/48")),)
    assert all(type(k) is bytes for k in keys.nlri + keys.withdrawn)


@pytest.mark.parametrize("bad_nlri", [b"\x21\x0a\x00\x00\x00\x00", b"\x18\x0a\x09"])
def test_nlri_keys_reject_malformed_prefixes_exactly_like_the_object_decoder(bad_nlri):
    raw = body(looped(())) + bad_nlri  # /33, or a /24 missing an octet
    errors = []
    for keys in (False, True):
        with pytest.raises(BgpProtocolError) as exc:
            decode_update(raw, nlri_keys=keys)
        errors.append((exc.value.code, exc.value.subcode))
    assert errors[0] == errors[1] == (3, 10)  # UPDATE error, Invalid Network Field


# ------------------------------------------------------------------ session: reflected routes

def test_reflected_table_is_counted_as_received_not_accepted_and_withdrawn_again():
    p = ebgp_pair().connect()
    ours = [net(f"10.{i // 256}.{i % 256}.0/24") for i in range(3000)]
    theirs = net("10.200.0.0/24")
    wire = b"".join(encode(looped(ours[k:k + 800])) for k in range(0, 3000, 800))
    wire += encode(Update((), (OriginAttr(0), AsPath((AsSegment(2, (65002,)),)), NextHop(IPv4Address("10.0.0.2"))),
                          (theirs,)))
    p.call("a", p.a.receive_data, wire, p.now)
    rin = p.a.rib_in[V4]
    assert len(rin.routes) + len(rin.rejected) == 3001  # received
    assert list(rin.routes) == [encode_prefix(theirs)]  # accepted
    assert rin.rejected == {encode_prefix(n) for n in ours}
    assert all(type(k) is bytes for k in rin.rejected)  # stored compactly, never as networks
    # The peer withdraws half of the reflected routes: they leave the received count.
    p.call("a", p.a.receive_data, encode(Update(tuple(ours[:1500]))), p.now)
    assert len(rin.rejected) == 1500 and len(rin.routes) == 1
    assert p.a.state.value == "established" and not p.errors["a"]


# ------------------------------------------------------------------ Adj-RIB-Out: pending only while live

def test_changes_before_any_session_is_established_are_not_kept_as_pending():
    rib = AdjRibOut()
    for i in range(100):
        rib.advertise(encode_prefix(net(f"10.9.{i}.0/24")), PA())
    rib.withdraw(encode_prefix(net("10.9.0.0/24")))
    assert len(rib) == 99 and rib.pending == {} and rib.previous == {}


def test_the_first_session_still_gets_the_whole_table_and_later_changes_incrementally():
    p = ebgp_pair()
    for i in range(100):
        p.a.rib_out[V4].advertise(encode_prefix(net(f"10.9.{i}.0/24")), PA())
    p.connect()
    assert len(p.b.rib_in[V4].routes) == 100
    assert p.a.rib_out[V4].live == 1
    p.a.rib_out[V4].withdraw(encode_prefix(net("10.9.5.0/24")))
    p.a.rib_out[V4].advertise(encode_prefix(net("10.8.0.0/24")), PA(med=3))
    p.run()
    got = p.b.rib_in[V4].routes
    assert len(got) == 100 and encode_prefix(net("10.9.5.0/24")) not in got and encode_prefix(net("10.8.0.0/24")) in got
    p.call("a", p.a.stop, p.now)
    assert p.a.rib_out[V4].live == 0
    p.a.rib_out[V4].withdraw(encode_prefix(net("10.9.6.0/24")))
    assert p.a.rib_out[V4].pending == {}


# ------------------------------------------------------------------ speaker: bulk API, early flush

def test_many_changes_start_leaving_before_the_call_returns_and_all_arrive():
    n = FLUSH_EVERY * 4

    async def main():
        a, b, _, _ = await pair()
        prefixes = [IPv4Network(((10 << 24) + i * 256, 24)) for i in range(n)]
        driver = a._peers["127.0.0.2"].driver
        sent = driver.bytes_out
        assert a.advertise_many("127.0.0.2", V4, prefixes, PathAttributes(med=7)) == n
        # Handed to TCP synchronously, in several chunks: no waiting for the loop to run.
        assert driver.bytes_out - sent > FLUSH_EVERY * 4
        assert len(a._peers["127.0.0.2"].rib_out[V4].pending) < FLUSH_EVERY
        await wait_for(lambda: state(b, "127.0.0.1").families[V4].accepted == n, what="all prefixes at b")
        sent = driver.bytes_out
        for p in prefixes:  # the one-by-one API flushes early too
            a.withdraw("127.0.0.2", V4, p)
        assert driver.bytes_out - sent > FLUSH_EVERY * 4
        await wait_for(lambda: state(b, "127.0.0.1").families[V4].accepted == 0, what="all withdrawn at b")
        assert a.withdraw_many("127.0.0.2", V4, prefixes[:10]) == 0  # nothing left to withdraw
        assert state(a, "127.0.0.2").state == "established"
        await a.stop()
        await b.stop()

    asyncio.run(main())


def test_bulk_calls_check_the_family_of_every_prefix():
    async def main():
        s = BgpSpeaker(SpeakerConfig(65001, "1.1.1.1"))  # not started: the RIB only
        await s.add_neighbor(NeighborConfig("10.0.0.2", 65002))
        with pytest.raises(ValueError, match="does not belong to family"):
            s.advertise_many("10.0.0.2", V4, [net("10.9.0.0/24"), IPv6Network("fd00::/64")], PA())
        assert list(s.adj_rib_out("10.0.0.2", V4)) == [net("10.9.0.0/24")]
        with pytest.raises(ValueError, match="does not belong to family"):
            s.withdraw_many("10.0.0.2", V6, [net("10.9.0.0/24")])

    asyncio.run(main())


# ------------------------------------------------------------------ TTL hint (F3)

def test_ttl_one_towards_a_peer_behind_a_router_names_ebgp_multihop():
    cfg = NeighborConfig("10.1.0.2", 65002)
    ev = ConnectFailed("no route to host", False, 5.0)
    hint = _connect_hint(ev, cfg, ttl=1, gateway="10.0.0.2")
    assert "not directly connected (reached via 10.0.0.2)" in hint and "ebgp_multihop_ttl" in hint
    assert "no route to the peer" not in hint
    timed_out = _connect_hint(ConnectFailed("timed out", True, 5.0), cfg, ttl=1, gateway="10.0.0.2")
    assert "ebgp_multihop_ttl" in timed_out and "reached via 10.0.0.2" in timed_out
    # Unknown route: both possibilities; directly connected: the TTL is not the problem.
    assert "ebgp_multihop_ttl" in _connect_hint(ev, cfg, ttl=1, gateway=None)
    assert _connect_hint(ev, cfg, ttl=1, gateway="") == "no route to the peer: check addresses and routes"
    multihop = NeighborConfig("10.1.0.2", 65002, ebgp_multihop_ttl=2)
    assert _connect_hint(ev, multihop, ttl=2, gateway="10.0.0.2") == "no route to the peer: check addresses and routes"
