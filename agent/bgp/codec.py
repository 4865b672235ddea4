"""BGP-4 wire codec: messages <-> bytes, and a message reader that takes bytes and yields messages.

Decoding turns every malformation into :class:`BgpProtocolError` with the RFC 4271 §6
code/subcode, except the UPDATE attribute errors that RFC 7606 downgrades: those come back on
the decoded :class:`Update` as ``treat_as_withdraw`` (a reason string) or ``discarded``
(attributes dropped). Dispatch is by table (h2 style), one decoder per message type.

The encoders here are the general ones (tests, OPEN, NOTIFICATION, small UPDATEs). The bulk
send path lives in :mod:`agent.bgp.rib`, which reuses the small helpers at the bottom.
"""

from __future__ import annotations

import struct
from ipaddress import IPv4Address, IPv4Network, IPv6Network

from agent.bgp.errors import BgpProtocolError, ErrorCode as E
from agent.bgp.messages import (
    AS_TRANS, Aggregator, As4Aggregator, As4Path, AsPath, AsSegment, AtomicAggregate, Attribute,
    Capability, ClusterList, Communities, EnhancedRouteRefreshCap, ExtendedCommunities,
    ExtendedMessage, ExtendedNextHop, FourOctetAs, GracefulRestart, Keepalive, LargeCommunities,
    LocalPref, Med, Message, MpReach, MpUnreach, MultiProtocol, NextHop, Notification, Open,
    OriginAttr, OriginatorId, RouteRefresh, RouteRefreshCap, UnknownAttribute, UnknownCapability,
    Update,
)

__all__ = [
    "MARKER", "HEADER_LEN", "MAX_MESSAGE_SIZE", "MAX_EXTENDED_MESSAGE_SIZE", "KEEPALIVE_BYTES",
    "encode", "encode_attribute", "encode_prefix", "prefix_from_key", "decode", "MessageReader",
    "header",
]

MARKER = b"\xff" * 16
HEADER_LEN = 19
MAX_MESSAGE_SIZE = 4096
MAX_EXTENDED_MESSAGE_SIZE = 65535  # RFC 8654

T_OPEN, T_UPDATE, T_NOTIFICATION, T_KEEPALIVE, T_ROUTE_REFRESH = 1, 2, 3, 4, 5
KEEPALIVE_BYTES = MARKER + b"\x00\x13\x04"

# Attribute flags (RFC 4271 §4.3)
F_OPTIONAL, F_TRANSITIVE, F_PARTIAL, F_EXTENDED = 0x80, 0x40, 0x20, 0x10

_H = struct.Struct(">H")
_I = struct.Struct(">I")


def header(msg_type: int, body_len: int) -> bytes:
    return MARKER + _H.pack(HEADER_LEN + body_len) + bytes((msg_type,))


def attr_bytes(flags: int, type_code: int, value: bytes) -> bytes:
    """One path attribute TLV; the extended-length bit is chosen from the value size."""
    n = len(value)
    if n > 255:
        return struct.pack(">BBH", flags | F_EXTENDED, type_code, n) + value
    return struct.pack(">BBB", flags & ~F_EXTENDED, type_code, n) + value


# --------------------------------------------------------------------------- prefixes

_LENGTH_OCTET = tuple(bytes((n,)) for n in range(129))


def encode_prefix(net) -> bytes:
    """NLRI encoding of one prefix (RFC 4271 §4.3): length octet + the significant octets.
    Also the compact key under which the RIBs store prefixes. (Called once per prefix per
    API call: kept to two attribute reads and one concatenation.)"""
    plen = net.prefixlen
    return _LENGTH_OCTET[plen] + net.network_address.packed[: (plen + 7) >> 3]


def prefix_from_key(key: bytes, afi: int):
    plen = key[0]
    width = 4 if afi == 1 else 16
    raw = key[1:].ljust(width, b"\x00")
    return (IPv4Network if afi == 1 else IPv6Network)((int.from_bytes(raw, "big"), plen))


def split_nlri(data: bytes, afi: int, code: int, subcode: int) -> list[bytes]:
    """Split an NLRI field into normalised keys (host bits cleared). Raises on malformation."""
    maxbits = 32 if afi == 1 else 128
    keys = []
    i, n = 0, len(data)
    while i < n:
        plen = data[i]
        nb = (plen + 7) >> 3
        if plen > maxbits or i + 1 + nb > n:
            raise BgpProtocolError(code, subcode, reason=f"bad prefix length {plen} in NLRI")
        key = data[i:i + 1 + nb]
        if plen & 7:  # clear host bits in the last octet
            mask = (0xFF << (8 - (plen & 7))) & 0xFF
            if key[-1] & ~mask & 0xFF:
                key = key[:-1] + bytes((key[-1] & mask,))
        keys.append(bytes(key))
        i += 1 + nb
    return keys


def _decode_prefixes(data: bytes, afi: int, code: int, subcode: int, keys: bool = False) -> tuple:
    """The prefixes of an NLRI field: network objects, or (``keys``) the compact NLRI keys,
    which is what the session stores; a received table then never becomes 100k objects."""
    split = split_nlri(data, afi, code, subcode)
    if keys:
        return tuple(split)
    return tuple(prefix_from_key(k, afi) for k in split)


# --------------------------------------------------------------------------- encoding

def _encode_caps(caps: tuple[Capability, ...]) -> bytes:
    out = []
    for c in caps:
        if isinstance(c, MultiProtocol):
            v = struct.pack(">HBB", c.afi, 0, c.safi)
        elif isinstance(c, (RouteRefreshCap, EnhancedRouteRefreshCap, ExtendedMessage)):
            v = b""
        elif isinstance(c, ExtendedNextHop):
            v = b"".join(struct.pack(">HHH", *e) for e in c.entries)
        elif isinstance(c, GracefulRestart):
            flags = (0x8 if c.restart_state else 0) | (0x4 if c.notification else 0)
            v = _H.pack((flags << 12) | (c.restart_time & 0xFFF)) + b"".join(
                struct.pack(">HBB", afi, safi, 0x80 if fwd else 0) for afi, safi, fwd in c.families)
        elif isinstance(c, FourOctetAs):
            v = _I.pack(c.asn)
        elif isinstance(c, UnknownCapability):
            v = c.value
        else:  # pragma: no cover - all Capability subclasses are listed
            raise TypeError(c)
        out.append(bytes((c.code, len(v))) + v)
    return b"".join(out)


def encode_open(m: Open) -> bytes:
    caps = _encode_caps(m.capabilities)
    params = (bytes((2, len(caps))) + caps) if caps else b""
    if len(params) > 255:
        raise ValueError("OPEN optional parameters exceed 255 bytes (RFC 9072 sending not supported)")
    body = struct.pack(">BHH4sB", m.version, m.my_as, m.hold_time, m.router_id.packed, len(params)) + params
    return header(T_OPEN, len(body)) + body


def _encode_segments(segments, four: bool) -> bytes:
    out = []
    for s in segments:
        if four:
            out.append(struct.pack(f">BB{len(s.asns)}I", s.type, len(s.asns), *s.asns))
        else:
            asns = [a if a <= 0xFFFF else AS_TRANS for a in s.asns]
            out.append(struct.pack(f">BB{len(asns)}H", s.type, len(asns), *asns))
    return b"".join(out)


def encode_attribute(a: Attribute, four_octet_as: bool = True) -> bytes:
    """One attribute with its canonical flags."""
    WT, O, OT = F_TRANSITIVE, F_OPTIONAL, F_OPTIONAL | F_TRANSITIVE
    if isinstance(a, OriginAttr):
        return attr_bytes(WT, 1, bytes((a.value,)))
    if isinstance(a, AsPath):
        return attr_bytes(WT, 2, _encode_segments(a.segments, four_octet_as))
    if isinstance(a, NextHop):
        return attr_bytes(WT, 3, a.address.packed)
    if isinstance(a, Med):
        return attr_bytes(O, 4, _I.pack(a.value))
    if isinstance(a, LocalPref):
        return attr_bytes(WT, 5, _I.pack(a.value))
    if isinstance(a, AtomicAggregate):
        return attr_bytes(WT, 6, b"")
    if isinstance(a, Aggregator):
        asn = a.asn if four_octet_as else (a.asn if a.asn <= 0xFFFF else AS_TRANS)
        v = (_I.pack(asn) if four_octet_as else _H.pack(asn)) + a.address.packed
        return attr_bytes(OT, 7, v)
    if isinstance(a, Communities):
        return attr_bytes(OT, 8, struct.pack(f">{len(a.values)}I", *a.values))
    if isinstance(a, OriginatorId):
        return attr_bytes(O, 9, a.address.packed)
    if isinstance(a, ClusterList):
        return attr_bytes(O, 10, b"".join(i.packed for i in a.ids))
    if isinstance(a, MpReach):
        nlri = a.unparsed or b"".join(encode_prefix(p) for p in a.nlri)
        v = struct.pack(">HBB", a.afi, a.safi, len(a.next_hop)) + a.next_hop + b"\x00" + nlri
        return attr_bytes(O, 14, v)
    if isinstance(a, MpUnreach):
        wd = a.unparsed or b"".join(encode_prefix(p) for p in a.withdrawn)
        return attr_bytes(O, 15, struct.pack(">HB", a.afi, a.safi) + wd)
    if isinstance(a, ExtendedCommunities):
        return attr_bytes(OT, 16, b"".join(a.values))
    if isinstance(a, As4Path):
        return attr_bytes(OT, 17, _encode_segments(a.segments, True))
    if isinstance(a, As4Aggregator):
        return attr_bytes(OT, 18, _I.pack(a.asn) + a.address.packed)
    if isinstance(a, LargeCommunities):
        return attr_bytes(OT, 32, b"".join(struct.pack(">III", *v) for v in a.values))
    if isinstance(a, UnknownAttribute):
        return attr_bytes(a.flags, a.type_code, a.value)
    raise TypeError(a)  # pragma: no cover


def encode_update(m: Update, four_octet_as: bool = True) -> bytes:
    wd = b"".join(encode_prefix(p) for p in m.withdrawn)
    attrs = b"".join(encode_attribute(a, four_octet_as) for a in m.attributes)
    nlri = b"".join(encode_prefix(p) for p in m.nlri)
    body = _H.pack(len(wd)) + wd + _H.pack(len(attrs)) + attrs + nlri
    return header(T_UPDATE, len(body)) + body


def encode(m: Message, four_octet_as: bool = True) -> bytes:
    """Encode any message. ``four_octet_as``: the AS_PATH/AGGREGATOR width negotiated (RFC 6793)."""
    if isinstance(m, Keepalive):
        return KEEPALIVE_BYTES
    if isinstance(m, Open):
        return encode_open(m)
    if isinstance(m, Update):
        return encode_update(m, four_octet_as)
    if isinstance(m, Notification):
        body = bytes((m.code, m.subcode)) + m.data
        return header(T_NOTIFICATION, len(body)) + body
    if isinstance(m, RouteRefresh):
        return header(T_ROUTE_REFRESH, 4) + struct.pack(">HBB", m.afi, m.subtype, m.safi)
    raise TypeError(m)  # pragma: no cover


# --------------------------------------------------------------------------- decoding

def _decode_caps(data: bytes) -> list[Capability]:
    caps: list[Capability] = []
    i, n = 0, len(data)
    while i < n:
        if i + 2 > n or i + 2 + data[i + 1] > n:
            raise BgpProtocolError(E.OPEN_MESSAGE, 0, reason="capability overruns its parameter")
        code, ln = data[i], data[i + 1]
        v = data[i + 2:i + 2 + ln]
        raw = data[i:i + 2 + ln]
        i += 2 + ln

        def bad(what):
            return BgpProtocolError(E.OPEN_MESSAGE, 0, raw, reason=f"malformed {what} capability")

        if code == 1:
            if ln != 4:
                raise bad("multiprotocol")
            afi, _, safi = struct.unpack(">HBB", v)
            caps.append(MultiProtocol(afi, safi))
        elif code == 2:
            caps.append(RouteRefreshCap())
        elif code == 5:
            if ln % 6:
                raise bad("extended next hop")
            caps.append(ExtendedNextHop(tuple(struct.unpack_from(">HHH", v, k) for k in range(0, ln, 6))))
        elif code == 6:
            caps.append(ExtendedMessage())
        elif code == 64:
            if ln < 2 or (ln - 2) % 4:
                raise bad("graceful restart")
            word = _H.unpack_from(v)[0]
            fams = tuple((a, s, bool(f & 0x80)) for a, s, f in
                         (struct.unpack_from(">HBB", v, k) for k in range(2, ln, 4)))
            caps.append(GracefulRestart(word & 0xFFF, bool(word & 0x8000), bool(word & 0x4000), fams))
        elif code == 65:
            if ln != 4:
                raise bad("4-octet AS")
            caps.append(FourOctetAs(_I.unpack(v)[0]))
        elif code == 70:
            caps.append(EnhancedRouteRefreshCap())
        else:
            caps.append(UnknownCapability(code, bytes(v)))  # RFC 5492: ignore what we don't know
    return caps


def decode_open(body: bytes) -> Open:
    if len(body) < 10:
        raise BgpProtocolError(E.MESSAGE_HEADER, E.BAD_MESSAGE_LENGTH, _H.pack(len(body) + 19))
    version, my_as, hold, rid, optlen = struct.unpack_from(">BHH4sB", body)
    if version != 4:
        raise BgpProtocolError(E.OPEN_MESSAGE, E.UNSUPPORTED_VERSION, _H.pack(4),
                               reason=f"peer speaks BGP version {version}")
    params: list[tuple[int, bytes]] = []
    if optlen == 255 and len(body) > 10 and body[10] == 255:
        # RFC 9072 extended optional parameters: type 255 marker, 2-octet length, 2-octet param lengths
        if len(body) < 13:
            raise BgpProtocolError(E.OPEN_MESSAGE, 0, reason="truncated extended optional parameters")
        ext_len = _H.unpack_from(body, 11)[0]
        if 13 + ext_len != len(body):
            raise BgpProtocolError(E.OPEN_MESSAGE, 0, reason="extended optional parameters length mismatch")
        i, end = 13, len(body)
        while i < end:
            if i + 3 > end:
                raise BgpProtocolError(E.OPEN_MESSAGE, 0, reason="truncated optional parameter")
            ptype, plen = body[i], _H.unpack_from(body, i + 1)[0]
            if i + 3 + plen > end:
                raise BgpProtocolError(E.OPEN_MESSAGE, 0, reason="optional parameter overruns OPEN")
            params.append((ptype, body[i + 3:i + 3 + plen]))
            i += 3 + plen
    else:
        if 10 + optlen != len(body):
            raise BgpProtocolError(E.OPEN_MESSAGE, 0, reason="optional parameters length mismatch")
        i, end = 10, len(body)
        while i < end:
            if i + 2 > end or i + 2 + body[i + 1] > end:
                raise BgpProtocolError(E.OPEN_MESSAGE, 0, reason="optional parameter overruns OPEN")
            params.append((body[i], body[i + 2:i + 2 + body[i + 1]]))
            i += 2 + body[i + 1]
    caps: list[Capability] = []
    for ptype, value in params:
        if ptype != 2:
            raise BgpProtocolError(E.OPEN_MESSAGE, E.UNSUPPORTED_OPTIONAL_PARAMETER, bytes((ptype,)),
                                   reason=f"optional parameter type {ptype}")
        caps.extend(_decode_caps(value))
    return Open(my_as, hold, IPv4Address(rid), tuple(caps), version)


class _Withdraw(Exception):
    """RFC 7606 treat-as-withdraw."""


class _Discard(Exception):
    """RFC 7606 attribute discard."""


def _segments(v: bytes, asz: int, err) -> tuple[AsSegment, ...]:
    segs = []
    i, n = 0, len(v)
    while i < n:
        if i + 2 > n:
            raise err("truncated AS_PATH segment")
        st, cnt = v[i], v[i + 1]
        if st not in (1, 2, 3, 4) or cnt == 0 or i + 2 + cnt * asz > n:
            raise err(f"malformed AS_PATH segment (type {st}, count {cnt})")
        fmt = f">{cnt}I" if asz == 4 else f">{cnt}H"
        segs.append(AsSegment(st, struct.unpack_from(fmt, v, i + 2)))
        i += 2 + cnt * asz
    return tuple(segs)


# Expected (optional, transitive) bits per known attribute type, and the RFC 7606 action when
# that attribute is malformed: "withdraw" (treat-as-withdraw), "discard", or "reset".
_KNOWN = {
    1: (0x40, "withdraw"), 2: (0x40, "withdraw"), 3: (0x40, "withdraw"), 4: (0x80, "withdraw"),
    5: (0x40, "withdraw"), 6: (0x40, "discard"), 7: (0xC0, "discard"), 8: (0xC0, "withdraw"),
    9: (0x80, "withdraw"), 10: (0x80, "withdraw"), 14: (0x80, "reset"), 15: (0x80, "reset"),
    16: (0xC0, "withdraw"), 17: (0xC0, "discard"), 18: (0xC0, "discard"), 32: (0xC0, "withdraw"),
}
_ATTR_NAMES = {1: "ORIGIN", 2: "AS_PATH", 3: "NEXT_HOP", 4: "MED", 5: "LOCAL_PREF",
               6: "ATOMIC_AGGREGATE", 7: "AGGREGATOR", 8: "COMMUNITIES", 9: "ORIGINATOR_ID",
               10: "CLUSTER_LIST", 14: "MP_REACH_NLRI", 15: "MP_UNREACH_NLRI",
               16: "EXTENDED_COMMUNITIES", 17: "AS4_PATH", 18: "AS4_AGGREGATOR", 32: "LARGE_COMMUNITY"}


def _decode_known(t: int, v: bytes, four: bool, raw: bytes, err, keys: bool = False) -> Attribute:
    n = len(v)
    if t == 1:
        if n != 1 or v[0] > 2:
            raise err("bad ORIGIN")
        return OriginAttr(v[0])
    if t == 2:
        return AsPath(_segments(v, 4 if four else 2, err))
    if t == 3:
        if n != 4:
            raise err("NEXT_HOP length is not 4")
        return NextHop(IPv4Address(v))
    if t in (4, 5):
        if n != 4:
            raise err(f"{_ATTR_NAMES[t]} length is not 4")
        return (Med if t == 4 else LocalPref)(_I.unpack(v)[0])
    if t == 6:
        if n != 0:
            raise err("ATOMIC_AGGREGATE has a value")
        return AtomicAggregate()
    if t == 7:
        if n != (8 if four else 6):
            raise err("bad AGGREGATOR length")
        asn = _I.unpack_from(v)[0] if four else _H.unpack_from(v)[0]
        return Aggregator(asn, IPv4Address(v[-4:]))
    if t == 8:
        if n == 0 or n % 4:
            raise err("COMMUNITIES length not a multiple of 4")
        return Communities(struct.unpack(f">{n // 4}I", v))
    if t == 9:
        if n != 4:
            raise err("ORIGINATOR_ID length is not 4")
        return OriginatorId(IPv4Address(v))
    if t == 10:
        if n == 0 or n % 4:
            raise err("CLUSTER_LIST length not a multiple of 4")
        return ClusterList(tuple(IPv4Address(v[k:k + 4]) for k in range(0, n, 4)))
    if t == 14:
        if n < 5 or 4 + v[3] + 1 > n:
            raise err("MP_REACH_NLRI truncated")
        afi, safi, nhl = struct.unpack_from(">HBB", v)
        nh = bytes(v[4:4 + nhl])
        rest = v[5 + nhl:]
        if (afi, safi) in ((1, 1), (2, 1)):
            ok = (4, 16, 32) if afi == 1 else (16, 32)
            if nhl not in ok:
                raise err(f"MP_REACH_NLRI next hop length {nhl} for AFI {afi}")
            nlri = _decode_prefixes(rest, afi, E.UPDATE_MESSAGE, E.OPTIONAL_ATTRIBUTE_ERROR, keys)
            return MpReach(afi, safi, nh, nlri)
        return MpReach(afi, safi, nh, (), bytes(rest))
    if t == 15:
        if n < 3:
            raise err("MP_UNREACH_NLRI truncated")
        afi, safi = struct.unpack_from(">HB", v)
        if (afi, safi) in ((1, 1), (2, 1)):
            return MpUnreach(afi, safi, _decode_prefixes(v[3:], afi, E.UPDATE_MESSAGE,
                                                         E.OPTIONAL_ATTRIBUTE_ERROR, keys))
        return MpUnreach(afi, safi, (), bytes(v[3:]))
    if t == 16:
        if n == 0 or n % 8:
            raise err("EXTENDED_COMMUNITIES length not a multiple of 8")
        return ExtendedCommunities(tuple(bytes(v[k:k + 8]) for k in range(0, n, 8)))
    if t == 17:
        segs = _segments(v, 4, err)
        if any(s.type in (3, 4) for s in segs):
            raise err("AS4_PATH carries confederation segments")
        return As4Path(segs)
    if t == 18:
        if n != 8:
            raise err("AS4_AGGREGATOR length is not 8")
        return As4Aggregator(_I.unpack_from(v)[0], IPv4Address(v[4:]))
    if t == 32:
        if n == 0 or n % 12:
            raise err("LARGE_COMMUNITY length not a multiple of 12")
        return LargeCommunities(tuple(struct.unpack_from(">III", v, k) for k in range(0, n, 12)))
    raise AssertionError(t)  # pragma: no cover


def decode_update(body: bytes, four_octet_as: bool = True, *, nlri_keys: bool = False) -> Update:
    """``nlri_keys``: withdrawn routes, NLRI and the MP_REACH/MP_UNREACH prefixes are the
    compact NLRI keys (``bytes``, see :func:`encode_prefix`) instead of network objects; the
    validation is the same. The session decodes this way (the receive path never builds
    per-prefix objects); tools and tests get networks."""
    n = len(body)
    wlen = _H.unpack_from(body)[0]
    if 4 + wlen > n:
        raise BgpProtocolError(E.UPDATE_MESSAGE, E.MALFORMED_ATTRIBUTE_LIST,
                               reason="withdrawn routes length overruns the message")
    alen = _H.unpack_from(body, 2 + wlen)[0]
    if 4 + wlen + alen > n:
        raise BgpProtocolError(E.UPDATE_MESSAGE, E.MALFORMED_ATTRIBUTE_LIST,
                               reason="total path attribute length overruns the message")
    withdrawn = _decode_prefixes(body[2:2 + wlen], 1, E.UPDATE_MESSAGE, E.INVALID_NETWORK_FIELD, nlri_keys)
    attrs: list[Attribute] = []
    seen: set[int] = set()
    withdraw_reasons: list[str] = []
    discarded: list[str] = []
    i, end = 4 + wlen, 4 + wlen + alen
    while i < end:
        if i + 3 > end or (body[i] & F_EXTENDED and i + 4 > end):
            withdraw_reasons.append("attribute header overruns the attribute list")  # RFC 7606 §4
            break
        flags, t = body[i], body[i + 1]
        if flags & F_EXTENDED:
            ln, hl = _H.unpack_from(body, i + 2)[0], 4
        else:
            ln, hl = body[i + 2], 3
        if i + hl + ln > end:
            withdraw_reasons.append(f"attribute {t} overruns the attribute list")  # RFC 7606 §4
            break
        v = body[i + hl:i + hl + ln]
        raw = body[i:i + hl + ln]
        i += hl + ln
        if t in seen:
            if t in (14, 15):  # RFC 7606 §3(g)
                raise BgpProtocolError(E.UPDATE_MESSAGE, E.MALFORMED_ATTRIBUTE_LIST,
                                       reason=f"{_ATTR_NAMES[t]} appears twice")
            discarded.append(f"duplicate attribute {t}")
            continue
        seen.add(t)
        known = _KNOWN.get(t)
        if known is None:
            if not flags & F_OPTIONAL:
                raise BgpProtocolError(E.UPDATE_MESSAGE, E.UNRECOGNIZED_WELL_KNOWN_ATTRIBUTE, raw,
                                       reason=f"unrecognized well-known attribute {t}")
            if flags & F_TRANSITIVE:
                attrs.append(UnknownAttribute(flags & ~F_EXTENDED, t, bytes(v)))
            else:
                discarded.append(f"unknown optional non-transitive attribute {t}")
            continue
        expected_flags, action = known

        def err(reason, _action=action, _t=t, _raw=raw):
            if _action == "reset":
                return BgpProtocolError(E.UPDATE_MESSAGE, E.OPTIONAL_ATTRIBUTE_ERROR, _raw,
                                        reason=f"{_ATTR_NAMES[_t]}: {reason}")
            return (_Withdraw if _action == "withdraw" else _Discard)(f"{_ATTR_NAMES[_t]}: {reason}")

        try:
            if flags & 0xC0 != expected_flags:
                if action == "reset":
                    raise BgpProtocolError(E.UPDATE_MESSAGE, E.ATTRIBUTE_FLAGS_ERROR, raw,
                                           reason=f"{_ATTR_NAMES[t]} flags 0x{flags:02x}")
                raise err(f"flags 0x{flags:02x} conflict with the attribute type")
            attrs.append(_decode_known(t, v, four_octet_as, raw, err, nlri_keys))
        except _Withdraw as exc:
            withdraw_reasons.append(str(exc))
        except _Discard as exc:
            discarded.append(str(exc))
    nlri = _decode_prefixes(body[end:], 1, E.UPDATE_MESSAGE, E.INVALID_NETWORK_FIELD, nlri_keys)
    return Update(withdrawn, tuple(attrs), nlri,
                  "; ".join(withdraw_reasons) if withdraw_reasons else None, tuple(discarded))


def decode_notification(body: bytes) -> Notification:
    return Notification(body[0], body[1], bytes(body[2:]))


def decode_route_refresh(body: bytes) -> RouteRefresh:
    afi, subtype, safi = struct.unpack(">HBB", body)
    return RouteRefresh(afi, safi, subtype)


# type -> (minimum body length, maximum body length or None, decoder)
_DECODERS = {
    T_OPEN: (10, None, lambda b, f: decode_open(b)),
    T_UPDATE: (4, None, decode_update),
    T_NOTIFICATION: (2, None, lambda b, f: decode_notification(b)),
    T_KEEPALIVE: (0, 0, lambda b, f: Keepalive()),
    T_ROUTE_REFRESH: (4, 4, lambda b, f: decode_route_refresh(b)),  # no ORF (RFC 5291)
}


def decode(data: bytes, four_octet_as: bool = True, max_size: int = MAX_EXTENDED_MESSAGE_SIZE) -> Message:
    """Decode exactly one whole message."""
    r = MessageReader(max_size)
    r.four_octet_as = four_octet_as
    r.feed(data)
    m = r.next_message()
    if m is None or r.buffered:
        raise BgpProtocolError(E.MESSAGE_HEADER, E.BAD_MESSAGE_LENGTH, reason="not exactly one message")
    return m


class MessageReader:
    """Takes bytes, yields whole decoded messages (h11 receive-buffer style).

    ``four_octet_as`` and ``max_size`` are changed by the session once the OPENs are exchanged;
    messages are decoded one at a time, so a change applies to the very next message.
    ``nlri_keys``: UPDATE prefixes come as compact keys (see :func:`decode_update`)."""

    def __init__(self, max_size: int = MAX_MESSAGE_SIZE, *, nlri_keys: bool = False):
        self.max_size = max_size
        self.four_octet_as = True
        self.nlri_keys = nlri_keys
        self._buf = bytearray()
        self._pos = 0

    @property
    def buffered(self) -> int:
        return len(self._buf) - self._pos

    def feed(self, data: bytes) -> None:
        if self._pos and self._pos >= len(self._buf) // 2:
            del self._buf[:self._pos]
            self._pos = 0
        self._buf += data

    def next_message(self) -> Message | None:
        buf, p = self._buf, self._pos
        if len(buf) - p < HEADER_LEN:
            return None
        if buf[p:p + 16] != MARKER:
            raise BgpProtocolError(E.MESSAGE_HEADER, E.CONNECTION_NOT_SYNCHRONIZED,
                                   reason="marker is not all ones")
        length = (buf[p + 16] << 8) | buf[p + 17]
        mtype = buf[p + 18]
        if length < HEADER_LEN or length > self.max_size:
            raise BgpProtocolError(E.MESSAGE_HEADER, E.BAD_MESSAGE_LENGTH, _H.pack(length),
                                   reason=f"length {length}")
        spec = _DECODERS.get(mtype)
        if spec is None:
            raise BgpProtocolError(E.MESSAGE_HEADER, E.BAD_MESSAGE_TYPE, bytes((mtype,)),
                                   reason=f"message type {mtype}")
        lo, hi, fn = spec
        blen = length - HEADER_LEN
        if blen < lo or (hi is not None and blen > hi) or (mtype == T_OPEN and length > MAX_MESSAGE_SIZE):
            if mtype == T_ROUTE_REFRESH:  # RFC 7313 §5
                raise BgpProtocolError(E.ROUTE_REFRESH, 1, bytes(buf[p:p + length]) if len(buf) - p >= length
                                       else b"", reason=f"ROUTE-REFRESH length {length}")
            raise BgpProtocolError(E.MESSAGE_HEADER, E.BAD_MESSAGE_LENGTH, _H.pack(length),
                                   reason=f"length {length} for message type {mtype}")
        if len(buf) - p < length:
            return None
        body = bytes(buf[p + HEADER_LEN:p + length])
        self._pos = p + length
        if self._pos == len(buf):
            buf.clear()
            self._pos = 0
        if mtype == T_UPDATE:
            return decode_update(body, self.four_octet_as, nlri_keys=self.nlri_keys)
        return fn(body, self.four_octet_as)
