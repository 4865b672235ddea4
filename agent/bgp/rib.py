"""Per-peer Adj-RIB-In / Adj-RIB-Out and the bulk UPDATE encoder.

Storage is compact: a prefix is kept as its NLRI wire encoding (``bytes``: length octet +
significant octets, see :func:`agent.bgp.codec.encode_prefix`), which is also what goes on
the wire, so sending needs no per-prefix conversion.

The Adj-RIB-Out is grouped by attribute set: ``groups[attrs]`` is an insertion-ordered set of
prefixes sharing one :class:`PathAttributes`. :class:`UpdateEncoder` encodes each attribute
set's attribute block once per session and packs as many prefixes as fit into each UPDATE
(4096 bytes, or 65535 with RFC 8654) with one ``bytes.join`` per message.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv6Address, ip_address
from typing import Iterable, Iterator

from agent.bgp.codec import AS_TRANS, MARKER, attr_bytes
from agent.bgp.messages import Family, PathAttributes

__all__ = ["AdjRibOut", "AdjRibIn", "UpdateEncoder", "SentPath", "end_of_rib"]

_H = struct.Struct(">H")
_I = struct.Struct(">I")


class AdjRibOut:
    """Desired routes towards one peer in one family (kept across sessions), plus the changes
    not yet sent on the current session (``pending``: prefix -> attrs, or None to withdraw).

    ``live`` counts the Established sessions that use this RIB. While it is 0 no change is
    recorded as pending: the next session starts with the whole table anyway, and a table
    added before the session comes up (a restarting agent) then costs no second and third
    100k-entry dict."""

    __slots__ = ("routes", "groups", "pending", "previous", "_canon", "version", "live")

    def __init__(self) -> None:
        self.version = 0  # bumped on every change (lets readers cache derived views)
        self.live = 0
        self.routes: dict[bytes, PathAttributes] = {}
        self.groups: dict[PathAttributes, dict[bytes, None]] = {}
        self.pending: dict[bytes, PathAttributes | None] = {}
        # For each pending prefix: its attributes when the session last caught up (None: it did
        # not exist), i.e. what the peer may hold now. Decides whether a withdrawal is needed.
        self.previous: dict[bytes, PathAttributes | None] = {}
        self._canon: dict[PathAttributes, PathAttributes] = {}  # one shared object per attribute set

    def __len__(self) -> int:
        return len(self.routes)

    def advertise(self, key: bytes, attrs: PathAttributes) -> bool:
        old = self.routes.get(key)
        if old is not None and (old is attrs or old == attrs):
            return False
        attrs = self._canon.setdefault(attrs, attrs)
        if old is not None:
            self._ungroup(key, old)
        self.routes[key] = attrs
        group = self.groups.get(attrs)
        if group is None:
            group = self.groups[attrs] = {}
        group[key] = None
        if self.live:
            if key not in self.pending:
                self.previous[key] = old
            self.pending[key] = attrs
        self.version += 1
        return True

    def withdraw(self, key: bytes) -> bool:
        old = self.routes.pop(key, None)
        if old is None:
            return False
        self._ungroup(key, old)
        if self.live:
            if key not in self.pending:
                self.previous[key] = old
            self.pending[key] = None
        self.version += 1
        return True

    def _ungroup(self, key: bytes, attrs: PathAttributes) -> None:
        group = self.groups[attrs]
        del group[key]
        if not group:
            del self.groups[attrs]
            del self._canon[attrs]

    def snapshot(self, clear_pending: bool = True) -> list[tuple[PathAttributes, list[bytes]]]:
        """The whole table as (attrs, prefixes) pairs. ``clear_pending``: the table replaces the
        pending changes (new session); keep them for a refresh (pending withdrawals must still go)."""
        if clear_pending:
            self.pending = {}
            self.previous = {}
        else:  # the peer is about to get the current state of the pending prefixes too
            for key in self.pending:
                if self.previous.get(key) is None:
                    self.previous[key] = self.routes.get(key)
        return [(a, list(g)) for a, g in self.groups.items()]

    def take_pending(self) -> tuple[list[bytes], list[tuple[PathAttributes, list[bytes]]],
                                    dict[bytes, PathAttributes | None]]:
        """(withdrawn prefixes, [(attrs, announced prefixes)], previous attrs) changed since the
        last call."""
        pending, self.pending = self.pending, {}
        previous, self.previous = self.previous, {}
        withdrawn: list[bytes] = []
        by_attrs: dict[PathAttributes, list[bytes]] = {}
        for key, attrs in pending.items():
            if attrs is None:
                withdrawn.append(key)
            else:
                by_attrs.setdefault(attrs, []).append(key)
        return withdrawn, list(by_attrs.items()), previous


class AdjRibIn:
    """Routes received from one peer in one family that passed validation.

    ``routes``: prefix key -> decoded attribute tuple (one shared tuple per UPDATE).
    ``rejected``: prefixes the peer announced that we refused (AS_PATH loop, ORIGINATOR_ID or
    CLUSTER_LIST loop); counted as received, not accepted. ``stale``: prefixes marked by an
    RFC 7313 Beginning-of-RIB-Refresh and not re-announced yet."""

    __slots__ = ("routes", "rejected", "stale")

    def __init__(self) -> None:
        self.routes: dict[bytes, tuple] = {}
        self.rejected: set[bytes] = set()
        self.stale: set[bytes] | None = None

    def announce(self, keys: Iterable[bytes], attrs: tuple, accepted: bool) -> None:
        # Set/dict operations over the whole batch run in C: a reflected 100k-route table
        # (all rejected) costs a few milliseconds here.
        keys = keys if isinstance(keys, (tuple, list)) else tuple(keys)
        if accepted:
            self.routes.update(dict.fromkeys(keys, attrs))
            if self.rejected:
                self.rejected.difference_update(keys)
        else:
            routes = self.routes
            if routes:
                for k in keys:
                    routes.pop(k, None)
            self.rejected.update(keys)
        if self.stale:
            self.stale.difference_update(keys)

    def withdraw(self, keys: Iterable[bytes]) -> None:
        keys = keys if isinstance(keys, (tuple, list, set)) else tuple(keys)
        routes = self.routes
        if routes:
            for k in keys:
                routes.pop(k, None)
        if self.rejected:
            self.rejected.difference_update(keys)

    def begin_refresh(self) -> None:
        self.stale = set(self.routes) | set(self.rejected)

    def end_refresh(self) -> int:
        stale, self.stale = self.stale or set(), None
        self.withdraw(stale)
        return len(stale)

    def clear(self) -> None:
        self.routes.clear()
        self.rejected.clear()
        self.stale = None


def end_of_rib(family: Family) -> bytes:
    """RFC 4724 §2: End-of-RIB marker."""
    if family is Family.IPV4_UNICAST:
        return MARKER + b"\x00\x17\x02\x00\x00\x00\x00"
    body = b"\x00\x00\x00\x06" + b"\x80\x0f\x03" + struct.pack(">HB", family.afi, family.safi)
    return MARKER + _H.pack(19 + len(body)) + b"\x02" + body


def _chunks(keys: Iterable[bytes], room: int) -> Iterator[list[bytes]]:
    batch: list[bytes] = []
    size = 0
    for k in keys:
        n = len(k)
        if size + n > room:
            yield batch
            batch = [k]
            size = n
        else:
            batch.append(k)
            size += n
    if batch:
        yield batch


@dataclass(frozen=True)
class SentPath:
    """One attribute set as it went on the wire to a peer, decoded back from the UPDATE bytes
    (``vipctl bgp routes advertised``): AS_PATH with our ASN on eBGP, the NEXT_HOP sent,
    LOCAL_PREF only on iBGP."""

    origin: int
    as_path: tuple[int, ...]
    next_hop: str
    med: int | None
    local_pref: int | None
    communities: tuple[int, ...]
    large_communities: tuple[tuple[int, int, int], ...]


class UpdateEncoder:
    """Builds UPDATE messages for one established session.

    The attribute block of each (family, attribute set) is encoded once and cached;
    ``None`` in the cache means "cannot be sent on this session" (e.g. an IPv6 prefix without
    an IPv6 next hop on an IPv4 session: we never send IPv4-mapped or ``::`` next hops)."""

    def __init__(self, *, local_asn: int, ibgp: bool, four_octet_as: bool, max_size: int,
                 local_address: str | None, link_local: str | None = None,
                 extended_next_hop_ipv4: bool = False) -> None:
        self.local_asn = local_asn
        self.ibgp = ibgp
        self.four_octet_as = four_octet_as
        self.max_size = max_size
        self.local = ip_address(local_address) if local_address else None
        self.link_local = IPv6Address(link_local) if link_local else None
        self.ext_nh_ipv4 = extended_next_hop_ipv4
        self._cache: dict[tuple[Family, PathAttributes], tuple[bytes, bytes, bytes] | None] = {}
        self.unsendable: dict[Family, str] = {}  # why some prefixes were not sent (for logs)

    # -- attribute blocks

    def _as_path(self) -> tuple[bytes, bytes]:
        """(AS_PATH attribute, AS4_PATH attribute or b"") for a locally originated route."""
        if self.ibgp:
            return attr_bytes(0x40, 2, b""), b""
        if self.four_octet_as:
            return attr_bytes(0x40, 2, b"\x02\x01" + _I.pack(self.local_asn)), b""
        if self.local_asn > 0xFFFF:  # RFC 6793 §4.2.2: AS_TRANS + AS4_PATH towards an OLD speaker
            return (attr_bytes(0x40, 2, b"\x02\x01" + _H.pack(AS_TRANS)),
                    attr_bytes(0xC0, 17, b"\x02\x01" + _I.pack(self.local_asn)))
        return attr_bytes(0x40, 2, b"\x02\x01" + _H.pack(self.local_asn)), b""

    def _next_hop(self, family: Family, attrs: PathAttributes) -> bytes | None:
        """Raw next hop bytes: 4 (classic IPv4), 16 or 32 (IPv6 global [+ link-local])."""
        configured = ip_address(attrs.next_hop) if attrs.next_hop else None
        nh = configured or self.local
        if nh is None:
            return None
        if family is Family.IPV4_UNICAST:
            if isinstance(nh, IPv4Address):
                return nh.packed
            if not self.ext_nh_ipv4:
                self.unsendable[family] = ("IPv4 prefixes need an IPv4 next hop or the extended "
                                           "next hop capability (RFC 8950) on this IPv6 session")
                return None
        elif isinstance(nh, IPv4Address):
            self.unsendable[family] = ("IPv6 prefixes need an IPv6 next hop on this IPv4 session "
                                       "(set next_hop; IPv4-mapped next hops are never sent)")
            return None
        if nh.is_link_local:
            return nh.packed  # only a link-local address exists: send it, never "::"
        if configured is None and self.link_local is not None:
            return nh.packed + self.link_local.packed  # directly connected: global + link-local
        return nh.packed

    def _block(self, family: Family, attrs: PathAttributes) -> tuple[bytes, bytes, bytes] | None:
        """(attributes, MP_REACH value prefix or b"", classic NEXT_HOP-free flag) cached."""
        ck = (family, attrs)
        if ck in self._cache:
            return self._cache[ck]
        nh = self._next_hop(family, attrs)
        if nh is None:
            self._cache[ck] = None
            return None
        as_path, as4_path = self._as_path()
        parts = [attr_bytes(0x40, 1, bytes((int(attrs.origin),))), as_path]
        mp_prefix = b""
        if len(nh) == 4:
            parts.append(attr_bytes(0x40, 3, nh))
        else:
            mp_prefix = struct.pack(">HBB", family.afi, family.safi, len(nh)) + nh + b"\x00"
        if attrs.med is not None:
            parts.append(attr_bytes(0x80, 4, _I.pack(attrs.med)))
        if self.ibgp:  # LOCAL_PREF: iBGP only (RFC 4271 §5.1.5)
            parts.append(attr_bytes(0x40, 5, _I.pack(100 if attrs.local_pref is None else attrs.local_pref)))
        if attrs.communities:
            parts.append(attr_bytes(0xC0, 8, struct.pack(f">{len(attrs.communities)}I", *attrs.communities)))
        if as4_path:
            parts.append(as4_path)
        if attrs.large_communities:
            parts.append(attr_bytes(0xC0, 32, b"".join(struct.pack(">III", *lc)
                                                        for lc in attrs.large_communities)))
        block = (b"".join(parts), mp_prefix, nh)
        self._cache[ck] = block
        return block

    def sendable(self, family: Family, attrs: PathAttributes) -> bool:
        return self._block(family, attrs) is not None

    def sent_path(self, family: Family, attrs: PathAttributes) -> SentPath | None:
        """``attrs`` as this session puts them on the wire: one UPDATE encoded exactly as
        :meth:`announce` does, then decoded (None: not sendable on this session)."""
        ck = ("sent", family, attrs)
        if ck in self._cache:
            return self._cache[ck]
        from agent.bgp import messages as m
        from agent.bgp.codec import decode

        msg = next(self.announce(family, attrs, [b"\x00"]), None)   # the default route as a stand-in
        sent = None
        if msg is not None:
            upd = decode(msg, self.four_octet_as)
            four = upd.attribute(m.As4Path)
            path = upd.attribute(m.AsPath)
            mp = upd.attribute(m.MpReach)
            nh = upd.attribute(m.NextHop)
            med, lp = upd.attribute(m.Med), upd.attribute(m.LocalPref)
            comms, large = upd.attribute(m.Communities), upd.attribute(m.LargeCommunities)
            sent = SentPath(
                origin=upd.attribute(m.OriginAttr).value,
                as_path=tuple((four or path).asns()) if (four or path) else (),
                next_hop=str(nh.address) if nh else str(mp.next_hops()[0]),
                med=med.value if med else None, local_pref=lp.value if lp else None,
                communities=comms.values if comms else (), large_communities=large.values if large else ())
        self._cache[ck] = sent
        return sent

    # -- messages

    def announce(self, family: Family, attrs: PathAttributes, keys: Iterable[bytes]) -> Iterator[bytes]:
        block = self._block(family, attrs)
        if block is None:
            return
        attrs_bytes, mp_prefix, _ = block
        max_size = self.max_size
        if not mp_prefix:  # classic IPv4 NLRI + NEXT_HOP
            head_len = 23 + len(attrs_bytes)
            alen = _H.pack(len(attrs_bytes))
            for batch in _chunks(keys, max_size - head_len):
                nlri = b"".join(batch)
                yield b"".join((MARKER, _H.pack(head_len + len(nlri)), b"\x02\x00\x00", alen,
                                attrs_bytes, nlri))
            return
        # MP_REACH_NLRI first (RFC 7606 §5.1), extended length, then the other attributes.
        head_len = 23 + 4 + len(mp_prefix) + len(attrs_bytes)
        for batch in _chunks(keys, max_size - head_len):
            nlri = b"".join(batch)
            mp_len = len(mp_prefix) + len(nlri)
            yield b"".join((MARKER, _H.pack(head_len + len(nlri)), b"\x02\x00\x00",
                            _H.pack(4 + mp_len + len(attrs_bytes)), b"\x90\x0e", _H.pack(mp_len),
                            mp_prefix, nlri, attrs_bytes))

    def withdraw(self, family: Family, keys: Iterable[bytes]) -> Iterator[bytes]:
        max_size = self.max_size
        if family is Family.IPV4_UNICAST:
            for batch in _chunks(keys, max_size - 23):
                wd = b"".join(batch)
                yield b"".join((MARKER, _H.pack(23 + len(wd)), b"\x02", _H.pack(len(wd)), wd, b"\x00\x00"))
            return
        afs = struct.pack(">HB", family.afi, family.safi)
        for batch in _chunks(keys, max_size - 23 - 4 - 3):
            wd = b"".join(batch)
            yield b"".join((MARKER, _H.pack(30 + len(wd)), b"\x02\x00\x00", _H.pack(7 + len(wd)),
                            b"\x90\x0f", _H.pack(3 + len(wd)), afs, wd))
