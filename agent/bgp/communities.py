"""Well-known BGP communities: the one table of names and values in vipd.

The names are GoBGP's (``WellKnownCommunityNameMap``), which is what Cilium validates
``wellKnown`` against and what ``cilium bgp routes`` prints, so manifests and output match
Cilium's. Values: RFC 1997 (no-export, no-advertise, no-export-subconfed), RFC 3765 (no-peer),
RFC 7611 (accept-own), RFC 7999 (blackhole), RFC 8326 (0xFFFF0000, named GRACEFUL_SHUTDOWN
there; GoBGP and Cilium call it planned-shut), RFC 9494 (llgr-stale, no-llgr) and IANA's
route-filter registrations.
"""

from __future__ import annotations

__all__ = ["WELL_KNOWN_COMMUNITIES", "COMMUNITY_ALIASES", "community_name", "community_value"]

WELL_KNOWN_COMMUNITIES: dict[str, int] = {
    "internet": 0x00000000,
    "planned-shut": 0xFFFF0000,
    "accept-own": 0xFFFF0001,
    "route-filter-translated-v4": 0xFFFF0002,
    "route-filter-v4": 0xFFFF0003,
    "route-filter-translated-v6": 0xFFFF0004,
    "route-filter-v6": 0xFFFF0005,
    "llgr-stale": 0xFFFF0006,
    "no-llgr": 0xFFFF0007,
    "blackhole": 0xFFFF029A,
    "no-export": 0xFFFFFF01,
    "no-advertise": 0xFFFFFF02,
    "no-export-subconfed": 0xFFFFFF03,
    "no-peer": 0xFFFFFF04,
}

# Other spellings people type, accepted where a person types a community (the standalone
# speaker's command line), never in Cilium manifests (Cilium rejects them there too).
COMMUNITY_ALIASES: dict[str, int] = {
    "graceful-shutdown": 0xFFFF0000,   # RFC 8326's name
    "local-as": 0xFFFFFF03,            # Cisco's name for no-export-subconfed
}

_NAMES = {v: k for k, v in WELL_KNOWN_COMMUNITIES.items() if k != "internet"}


def community_name(value: int) -> str:
    """A standard community as GoBGP prints it: its well-known name, else ``ASN:value``."""
    return _NAMES.get(value) or f"{value >> 16}:{value & 0xFFFF}"


def community_value(text: str) -> int:
    """``no-export`` / ``graceful-shutdown`` / ``65000:100`` / ``4259840100`` -> the 32-bit value."""
    key = text.strip().lower()
    if key in WELL_KNOWN_COMMUNITIES:
        return WELL_KNOWN_COMMUNITIES[key]
    if key in COMMUNITY_ALIASES:
        return COMMUNITY_ALIASES[key]
    if ":" in key:
        hi, _, lo = key.partition(":")
        a, b = int(hi), int(lo)
        if not (0 <= a <= 0xFFFF and 0 <= b <= 0xFFFF):
            raise ValueError(f"community {text!r}: both halves must be 0..65535")
        return a << 16 | b
    v = int(key)
    if not 0 <= v <= 0xFFFFFFFF:
        raise ValueError(f"community {text!r} is not a 32-bit value")
    return v
