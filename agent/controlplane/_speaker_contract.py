"""Fallback copy of the value types in docs/internal/speaker-api.md, used only while
``agent.bgp.api`` does not exist yet. Same names, fields and defaults as the contract."""

from __future__ import annotations

import enum
from dataclasses import dataclass


class Family(enum.Enum):
    IPV4_UNICAST = (1, 1)
    IPV6_UNICAST = (2, 1)


class Origin(enum.IntEnum):
    IGP = 0
    EGP = 1
    INCOMPLETE = 2


@dataclass(frozen=True)
class PathAttributes:
    origin: Origin = Origin.IGP
    med: int | None = None
    local_pref: int | None = None
    communities: tuple[int, ...] = ()
    large_communities: tuple[tuple[int, int, int], ...] = ()
    next_hop: str | None = None


@dataclass(frozen=True)
class NeighborConfig:
    address: str
    peer_asn: int
    port: int = 179
    local_address: str | None = None
    password: str | None = None
    ebgp_multihop_ttl: int | None = None
    hold_time: int = 90
    keepalive: int = 30
    connect_retry: int = 120
    passive: bool = False
    families: tuple[Family, ...] = (Family.IPV4_UNICAST, Family.IPV6_UNICAST)
    graceful_restart: bool = False
    restart_time: int = 120
    name: str = ""
