"""Peer bytes can never raise anything but BgpProtocolError, and every such error goes out as
the matching NOTIFICATION.

100k+ random and mutated messages are streamed into sessions (a plain seeded random loop, so the
run is reproducible and fast), plus a hypothesis test on arbitrary byte strings."""

from __future__ import annotations

import random
import struct
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network

from hypothesis import given, settings, strategies as st

from agent.bgp.codec import KEEPALIVE_BYTES, encode
from agent.bgp.errors import BgpProtocolError
from agent.bgp.fsm import State
from agent.bgp.messages import (
    AsPath, AsSegment, ClusterList, Communities, GracefulRestart, LargeCommunities, LocalPref, Med, MpReach,
    MpUnreach, MultiProtocol, NextHop, Notification, OriginAttr, OriginatorId, RouteRefresh, UnknownAttribute,
    Update, FourOctetAs, ExtendedMessage, EnhancedRouteRefreshCap, RouteRefreshCap, UnknownCapability,
)
from agent.bgp.session import Session, SessionConfig

from sansio_pair import open_bytes

CFG = SessionConfig(local_asn=65001, router_id="1.1.1.1", peer_asn=65002, graceful_restart=True)
FULL_CAPS = (MultiProtocol(1, 1), MultiProtocol(2, 1), RouteRefreshCap(), EnhancedRouteRefreshCap(),
             ExtendedMessage(), FourOctetAs(65002), GracefulRestart(120, True, True, ((1, 1, True),)),
             UnknownCapability(73, b"host"))


def new_session(established: bool, four_octet: bool) -> Session:
    s = Session(CFG, rng=random.Random(0))
    s.start(0.0)
    s.connection_made(0.0, "10.0.0.1", "10.0.0.2", outgoing=True)
    if established:
        caps = FULL_CAPS if four_octet else tuple(c for c in FULL_CAPS if not isinstance(c, FourOctetAs))
        s.receive_data(open_bytes(caps=caps) + KEEPALIVE_BYTES, 0.0)
    s.data_to_send()
    return s


def seeds(four: bool) -> list[bytes]:
    path = AsPath((AsSegment(2, (65002, 65010)), AsSegment(1, (7, 8))))
    base = (OriginAttr(0), path, NextHop(IPv4Address("10.0.0.2")))
    v6 = MpReach(2, 1, IPv6Address("fd00::2").packed + IPv6Address("fe80::2").packed,
                 (IPv6Network("fd99::/64"), IPv6Network("2001:db8::/32")))
    msgs = [
        Update((), base + (Med(5), Communities((1, 2)), LargeCommunities(((1, 2, 3),))),
               (IPv4Network("10.9.0.0/24"), IPv4Network("10.10.0.0/16"))),
        Update((IPv4Network("10.9.0.0/24"),)),
        Update((), (OriginAttr(1), path, v6, UnknownAttribute(0xC0, 99, b"abc"))),
        Update((), (MpUnreach(2, 1, (IPv6Network("fd99::/64"),)),)),
        Update((), base + (LocalPref(100), OriginatorId(IPv4Address("3.3.3.3")),
                           ClusterList((IPv4Address("4.4.4.4"),))), (IPv4Network("192.0.2.0/24"),)),
        Update(), Notification(6, 2, b"\x03bye"), RouteRefresh(1, 1), RouteRefresh(2, 1, 1),
    ]
    out = [encode(m, four) for m in msgs]
    out.append(KEEPALIVE_BYTES)
    return out


def mutate(rng: random.Random, msg: bytes) -> bytes:
    b = bytearray(msg)
    kind = rng.randrange(8)
    if kind == 0:  # flip random bytes after the marker
        for _ in range(rng.randint(1, 4)):
            b[rng.randrange(16, len(b))] = rng.randrange(256)
    elif kind == 1:  # truncate, fixing the header length so the frame is complete
        cut = rng.randint(19, len(b))
        b = b[:cut]
        b[16:18] = struct.pack(">H", cut)
    elif kind == 2:  # extend with junk, header length fixed
        b += bytes(rng.randrange(256) for _ in range(rng.randint(1, 40)))
        b[16:18] = struct.pack(">H", min(len(b), 65535))
    elif kind == 3:  # wrong header length: near the real one, or anything
        n = len(b) + rng.randint(-30, 5) if rng.random() < 0.8 else rng.randrange(65536)
        b[16:18] = struct.pack(">H", max(0, min(n, 65535)))
    elif kind == 4:  # random body of a random type
        body = bytes(rng.randrange(256) for _ in range(rng.randint(0, 80)))
        b = bytearray(b"\xff" * 16 + struct.pack(">HB", 19 + len(body), rng.randint(0, 7)) + body)
    elif kind == 5 and len(b) > 23:  # poke the inner length fields of an UPDATE / OPEN
        pos = rng.choice([19, 20, 21, 22, 23, 24, 25, 28] if len(b) > 29 else [19, 20])
        b[pos] = rng.choice([0, 1, 2, 0x7F, 0xFF, b[pos] ^ 1])
    elif kind == 6:  # flip a random bit anywhere (also the marker)
        i = rng.randrange(len(b))
        b[i] ^= 1 << rng.randrange(8)
    # kind 7: unchanged (valid traffic keeps sessions alive and exercises the happy path)
    return bytes(b)


def check_one(s: Session, data: bytes, now: float) -> BgpProtocolError | None:
    """Feed data; if the session died with a protocol error, check its NOTIFICATION and return it."""
    try:
        s.receive_data(data, now)
    except BgpProtocolError as err:
        wire = s.data_to_send()
        assert wire.endswith(encode(Notification(err.code, err.subcode, err.data))), (err, wire.hex())
        assert s.state is State.IDLE
        return err
    s.data_to_send()
    return None


def test_100k_random_and_mutated_messages_only_raise_protocol_errors():
    rng = random.Random(4271)
    seed_sets = {True: seeds(True), False: seeds(False)}
    open_seeds = [open_bytes(caps=FULL_CAPS), open_bytes(asn=65002, hold=0), open_bytes(hold=3)]
    errors = sent = 0
    codes: set[tuple[int, int]] = set()
    four = True
    s = new_session(True, four)
    for i in range(100_000):
        if s.state is State.IDLE or (s._reader.buffered and rng.random() < 0.3):
            # dead, or waiting for the rest of a frame that a mutation made longer: start over
            four = rng.random() < 0.8
            s = new_session(rng.random() < 0.9, four)
        if s.state is State.OPEN_SENT:
            data = mutate(rng, rng.choice(open_seeds))
        else:
            data = mutate(rng, rng.choice(seed_sets[four]))
        err = check_one(s, data, float(i))
        sent += 1
        if err is not None:
            errors += 1
            codes.add((err.code, err.subcode))
    assert sent == 100_000
    # The mutations must reach many different error paths, not just bounce off the header check.
    assert errors > 10_000
    assert {(1, 1), (1, 2), (1, 3), (3, 1), (3, 10)} <= codes and len(codes) >= 10, codes


@settings(max_examples=500, deadline=None)
@given(st.binary(min_size=0, max_size=200), st.booleans())
def test_arbitrary_bytes_after_a_valid_header(body, four):
    s = new_session(True, four)
    data = b"\xff" * 16 + struct.pack(">HB", min(19 + len(body), 65535), body[0] % 6 if body else 2) + body[1:]
    check_one(s, data, 1.0)


@settings(max_examples=300, deadline=None)
@given(st.binary(min_size=0, max_size=120))
def test_arbitrary_open_bodies(body):
    s = new_session(False, True)
    data = b"\xff" * 16 + struct.pack(">HB", 19 + len(body), 1) + body
    check_one(s, data, 1.0)
