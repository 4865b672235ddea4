"""Immutable BGP value types: messages, capabilities, path attributes, API value types.

Messages and attributes are frozen, slotted dataclasses (h11 ``_events.py`` style). They are
the *decoded* form; :mod:`agent.bgp.codec` turns them into bytes and back. The speaker's send
path does not build these objects per prefix (see :mod:`agent.bgp.rib`): they exist for the
receive path, tests and tools.

Everything in ``__all__`` is re-exported by :mod:`agent.bgp`.
"""

from __future__ import annotations

import enum
import ipaddress
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network

__all__ = [
    "Family", "Origin", "PathAttributes", "AS_TRANS",
    # messages
    "Open", "Update", "Keepalive", "Notification", "RouteRefresh", "Message",
    # capabilities
    "Capability", "MultiProtocol", "RouteRefreshCap", "EnhancedRouteRefreshCap", "ExtendedNextHop",
    "ExtendedMessage", "GracefulRestart", "FourOctetAs", "UnknownCapability",
    # attributes
    "Attribute", "AsSegment", "OriginAttr", "AsPath", "NextHop", "Med", "LocalPref",
    "AtomicAggregate", "Aggregator", "Communities", "OriginatorId", "ClusterList", "MpReach",
    "MpUnreach", "ExtendedCommunities", "As4Path", "As4Aggregator", "LargeCommunities",
    "UnknownAttribute",
]

AS_TRANS = 23456  # RFC 6793: the 2-octet stand-in for a 4-octet ASN


class Family(enum.Enum):
    """Address family; value = (AFI, SAFI)."""

    IPV4_UNICAST = (1, 1)
    IPV6_UNICAST = (2, 1)

    # Members are singletons compared by identity: hash them by identity too (C speed; Enum's
    # own __hash__ is Python code, paid on every per-prefix RIB lookup keyed by family).
    __hash__ = object.__hash__

    @property
    def afi(self) -> int:
        return self.value[0]

    @property
    def safi(self) -> int:
        return self.value[1]

    @property
    def short(self) -> str:
        return "ipv4-unicast" if self is Family.IPV4_UNICAST else "ipv6-unicast"


class Origin(enum.IntEnum):
    IGP = 0
    EGP = 1
    INCOMPLETE = 2


def _u32(name: str, v: int | None) -> None:
    if v is not None and not (0 <= v <= 0xFFFFFFFF):
        raise ValueError(f"{name} must be in 0..4294967295, got {v}")


@dataclass(frozen=True)
class PathAttributes:
    """What the control plane asks the speaker to attach to a prefix.

    ``communities`` and ``large_communities`` are normalised (sorted, deduplicated), so two
    equal attribute sets compare and hash equal and share one encoded attribute block."""

    origin: Origin = Origin.IGP
    med: int | None = None
    local_pref: int | None = None  # sent to iBGP peers only
    communities: tuple[int, ...] = ()
    large_communities: tuple[tuple[int, int, int], ...] = ()
    next_hop: str | None = None  # None = the session's local address

    def __post_init__(self):
        object.__setattr__(self, "origin", Origin(self.origin))
        _u32("med", self.med)
        _u32("local_pref", self.local_pref)
        comms = tuple(sorted(set(int(c) for c in self.communities)))
        for c in comms:
            _u32("community", c)
        object.__setattr__(self, "communities", comms)
        large = tuple(sorted(set(tuple(int(x) for x in lc) for lc in self.large_communities)))
        for lc in large:
            if len(lc) != 3:
                raise ValueError(f"large community must have 3 parts, got {lc}")
            for x in lc:
                _u32("large community part", x)
        object.__setattr__(self, "large_communities", large)
        if self.next_hop is not None:
            addr = ipaddress.ip_address(self.next_hop)
            if addr.is_unspecified or addr.is_multicast:
                raise ValueError(f"next_hop {self.next_hop} is not a usable next hop")
            object.__setattr__(self, "next_hop", str(addr))
        # The RIB hashes attribute sets per prefix: compute the hash once.
        object.__setattr__(self, "_hash", hash((self.origin, self.med, self.local_pref, self.communities,
                                                self.large_communities, self.next_hop)))

    def __hash__(self) -> int:
        return self._hash


# --------------------------------------------------------------------------- capabilities

class Capability:
    """Base of the OPEN capabilities (RFC 5492)."""

    __slots__ = ()
    code: int = -1


@dataclass(frozen=True, slots=True)
class MultiProtocol(Capability):
    afi: int
    safi: int
    code = 1


@dataclass(frozen=True, slots=True)
class RouteRefreshCap(Capability):
    code = 2


@dataclass(frozen=True, slots=True)
class ExtendedNextHop(Capability):
    """RFC 8950: entries of (NLRI AFI, NLRI SAFI, next hop AFI)."""

    entries: tuple[tuple[int, int, int], ...]
    code = 5


@dataclass(frozen=True, slots=True)
class ExtendedMessage(Capability):
    code = 6


@dataclass(frozen=True, slots=True)
class GracefulRestart(Capability):
    """RFC 4724 / RFC 8538. ``families``: (AFI, SAFI, forwarding state preserved)."""

    restart_time: int = 120
    restart_state: bool = False  # R bit
    notification: bool = False  # N bit (RFC 8538)
    families: tuple[tuple[int, int, bool], ...] = ()
    code = 64


@dataclass(frozen=True, slots=True)
class FourOctetAs(Capability):
    asn: int
    code = 65


@dataclass(frozen=True, slots=True)
class EnhancedRouteRefreshCap(Capability):
    code = 70


@dataclass(frozen=True, slots=True)
class UnknownCapability(Capability):
    """Any capability we do not implement; kept so it can be shown, otherwise ignored."""

    code: int
    value: bytes = b""


# --------------------------------------------------------------------------- attributes

class Attribute:
    __slots__ = ()
    type_code: int = -1


@dataclass(frozen=True, slots=True)
class AsSegment:
    """AS_PATH segment: type 1 AS_SET, 2 AS_SEQUENCE, 3 AS_CONFED_SEQUENCE, 4 AS_CONFED_SET."""

    type: int
    asns: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class OriginAttr(Attribute):
    value: int
    type_code = 1


@dataclass(frozen=True, slots=True)
class AsPath(Attribute):
    segments: tuple[AsSegment, ...] = ()
    type_code = 2

    def asns(self) -> list[int]:
        return [a for s in self.segments for a in s.asns]


@dataclass(frozen=True, slots=True)
class NextHop(Attribute):
    address: IPv4Address
    type_code = 3


@dataclass(frozen=True, slots=True)
class Med(Attribute):
    value: int
    type_code = 4


@dataclass(frozen=True, slots=True)
class LocalPref(Attribute):
    value: int
    type_code = 5


@dataclass(frozen=True, slots=True)
class AtomicAggregate(Attribute):
    type_code = 6


@dataclass(frozen=True, slots=True)
class Aggregator(Attribute):
    asn: int
    address: IPv4Address
    type_code = 7


@dataclass(frozen=True, slots=True)
class Communities(Attribute):
    values: tuple[int, ...]
    type_code = 8


@dataclass(frozen=True, slots=True)
class OriginatorId(Attribute):
    address: IPv4Address
    type_code = 9


@dataclass(frozen=True, slots=True)
class ClusterList(Attribute):
    ids: tuple[IPv4Address, ...]
    type_code = 10


@dataclass(frozen=True, slots=True)
class MpReach(Attribute):
    """RFC 4760 MP_REACH_NLRI. ``next_hop`` is the raw next-hop field (4, 16 or 32 bytes for
    unicast); ``nlri`` holds networks for IPv4/IPv6 unicast, ``unparsed`` the NLRI bytes of any
    other AFI/SAFI (kept only so the message can be skipped correctly)."""

    afi: int
    safi: int
    next_hop: bytes
    nlri: tuple[IPv4Network | IPv6Network, ...] = ()
    unparsed: bytes = b""
    type_code = 14

    def next_hops(self) -> tuple[IPv4Address | IPv6Address, ...]:
        nh = self.next_hop
        if len(nh) == 4:
            return (IPv4Address(nh),)
        if len(nh) == 16:
            return (IPv6Address(nh),)
        if len(nh) == 32:
            return (IPv6Address(nh[:16]), IPv6Address(nh[16:]))
        return ()


@dataclass(frozen=True, slots=True)
class MpUnreach(Attribute):
    afi: int
    safi: int
    withdrawn: tuple[IPv4Network | IPv6Network, ...] = ()
    unparsed: bytes = b""
    type_code = 15


@dataclass(frozen=True, slots=True)
class ExtendedCommunities(Attribute):
    values: tuple[bytes, ...]  # 8 bytes each, opaque
    type_code = 16


@dataclass(frozen=True, slots=True)
class As4Path(Attribute):
    segments: tuple[AsSegment, ...] = ()
    type_code = 17


@dataclass(frozen=True, slots=True)
class As4Aggregator(Attribute):
    asn: int
    address: IPv4Address
    type_code = 18


@dataclass(frozen=True, slots=True)
class LargeCommunities(Attribute):
    values: tuple[tuple[int, int, int], ...]
    type_code = 32


@dataclass(frozen=True, slots=True)
class UnknownAttribute(Attribute):
    """An attribute we do not implement. Optional transitive ones are kept (RFC 4271 §5)."""

    flags: int = 0xC0
    type_code: int = 0
    value: bytes = b""


# --------------------------------------------------------------------------- messages

@dataclass(frozen=True, slots=True)
class Open:
    """OPEN (RFC 4271 §4.2). ``my_as`` is the 2-octet field (AS_TRANS for 4-octet ASNs);
    :attr:`asn` is the speaker's real ASN (RFC 6793)."""

    my_as: int
    hold_time: int
    router_id: IPv4Address
    capabilities: tuple[Capability, ...] = ()
    version: int = 4
    type = 1

    @property
    def asn(self) -> int:
        for c in self.capabilities:
            if isinstance(c, FourOctetAs):
                return c.asn
        return self.my_as

    def capability(self, cls):
        return next((c for c in self.capabilities if isinstance(c, cls)), None)


@dataclass(frozen=True, slots=True)
class Update:
    """UPDATE (RFC 4271 §4.3). ``treat_as_withdraw`` and ``discarded`` are what decoding found
    under RFC 7606 (never encoded, not compared)."""

    withdrawn: tuple[IPv4Network, ...] = ()
    attributes: tuple[Attribute, ...] = ()
    nlri: tuple[IPv4Network, ...] = ()
    treat_as_withdraw: str | None = field(default=None, compare=False)
    discarded: tuple[str, ...] = field(default=(), compare=False)
    type = 2

    def attribute(self, cls):
        return next((a for a in self.attributes if isinstance(a, cls)), None)


@dataclass(frozen=True, slots=True)
class Notification:
    code: int
    subcode: int = 0
    data: bytes = b""
    type = 3


@dataclass(frozen=True, slots=True)
class Keepalive:
    type = 4


@dataclass(frozen=True, slots=True)
class RouteRefresh:
    """RFC 2918 / RFC 7313 (subtype 0 normal, 1 BoRR, 2 EoRR)."""

    afi: int
    safi: int
    subtype: int = 0
    type = 5


Message = Open | Update | Notification | Keepalive | RouteRefresh
