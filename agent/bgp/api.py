"""The speaker's public API, the contract in docs/internal/speaker-api.md.

The control plane imports only this module (re-exported by :mod:`agent.bgp`)::

    from agent.bgp.api import (BgpSpeaker, SpeakerConfig, NeighborConfig, PathAttributes,
                               Family, Origin, PeerState, FamilyCounts)
"""

from __future__ import annotations

from dataclasses import dataclass
from ipaddress import IPv4Address, ip_address

from agent.bgp.messages import Family, Origin, PathAttributes

__all__ = ["BgpSpeaker", "SpeakerConfig", "NeighborConfig", "PathAttributes", "Family", "Origin",
           "PeerState", "FamilyCounts"]


@dataclass(frozen=True)
class NeighborConfig:
    address: str  # peer IP (v4 or v6)
    peer_asn: int  # 0 = accept any, learn from OPEN
    port: int = 179
    local_address: str | None = None  # bind + next hop
    password: str | None = None  # TCP MD5
    ebgp_multihop_ttl: int | None = None  # None: 1 for eBGP, 255 for iBGP (and for peer_asn 0)
    hold_time: int = 90
    keepalive: int = 30
    connect_retry: int = 120
    passive: bool = False
    families: tuple[Family, ...] = (Family.IPV4_UNICAST, Family.IPV6_UNICAST)
    graceful_restart: bool = False
    restart_time: int = 120
    name: str = ""
    # Extension (not in the original contract, defaults keep it compatible): add our IPv6
    # link-local address to IPv6 next hops towards directly connected peers (RFC 2545 §3).
    # FRR without zebra (bgpd -Z) cannot use it and resets the session: set False there.
    link_local_next_hop: bool = True
    # Extension: RFC 5082 GTSM. Send with TTL 255 and accept only segments whose TTL shows at
    # most this many hops (1 = directly connected). Replaces ebgp_multihop_ttl.
    ttl_security_hops: int | None = None
    # Extension: single-hop BFD (agent.bfd.BfdTimers) protecting this session (RFC 5882).
    bfd: object | None = None

    def __post_init__(self):
        object.__setattr__(self, "address", str(ip_address(self.address)))
        if self.local_address is not None:
            object.__setattr__(self, "local_address", str(ip_address(self.local_address)))
            if ip_address(self.local_address).version != ip_address(self.address).version:
                raise ValueError(f"local_address {self.local_address} and peer {self.address} "
                                 "are of different IP versions")
        if not (0 <= self.peer_asn <= 0xFFFFFFFF):
            raise ValueError(f"peer_asn {self.peer_asn} out of range")
        if not (1 <= self.port <= 65535):
            raise ValueError(f"port {self.port} out of range")
        if self.ebgp_multihop_ttl is not None and not (1 <= self.ebgp_multihop_ttl <= 255):
            raise ValueError("ebgp_multihop_ttl must be 1..255")
        if self.ttl_security_hops is not None:
            if not (1 <= self.ttl_security_hops <= 254):
                raise ValueError("ttl_security_hops must be 1..254")
            if self.ebgp_multihop_ttl is not None:
                raise ValueError("ttl_security_hops and ebgp_multihop_ttl exclude each other")
        if self.hold_time in (1, 2) or not (0 <= self.hold_time <= 65535):
            raise ValueError(f"hold_time must be 0 or 3..65535, got {self.hold_time}")
        if self.password is not None and len(self.password.encode()) > 80:
            raise ValueError("password (TCP MD5 key) longer than 80 bytes")
        fams = tuple(Family(f) if not isinstance(f, Family) else f for f in self.families)
        if not fams:
            raise ValueError("families must not be empty")
        object.__setattr__(self, "families", fams)


@dataclass(frozen=True)
class SpeakerConfig:
    asn: int
    router_id: str
    listen_port: int | None = None  # None: no listener (Cilium's default)
    listen_addresses: tuple[str, ...] = ("0.0.0.0", "::")

    def __post_init__(self):
        if not (1 <= self.asn <= 0xFFFFFFFF):
            raise ValueError(f"asn {self.asn} out of range")
        if IPv4Address(self.router_id) == IPv4Address(0):
            raise ValueError("router_id must be a non-zero IPv4 address")
        if self.listen_port is not None and not (0 <= self.listen_port <= 65535):
            raise ValueError(f"listen_port {self.listen_port} out of range")


@dataclass(frozen=True)
class FamilyCounts:
    received: int
    accepted: int
    advertised: int


@dataclass(frozen=True)
class PeerState:
    address: str
    port: int
    local_address: str | None
    local_asn: int
    peer_asn: int
    state: str  # idle connect active open_sent open_confirm established (Cilium's strings)
    uptime_seconds: float | None
    established_at: float | None  # unix time
    hold_time: int | None  # negotiated, None until Established
    keepalive: int | None
    local_capabilities: tuple[str, ...]
    remote_capabilities: tuple[str, ...]
    families: dict[Family, FamilyCounts]
    last_error: str | None


def __getattr__(name: str):
    """``BgpSpeaker`` (the asyncio implementation) is imported on first use, so the control
    plane can import the API's types without loading asyncio, sockets and the speaker."""
    if name == "BgpSpeaker":
        from agent.bgp.speaker import BgpSpeaker

        return BgpSpeaker
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
