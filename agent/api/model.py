"""Pure conversions from the speaker's / control plane's state into API messages.

Kept apart from the server so they are unit-testable with plain values, and so the daemon's
provider is a few lines of glue.
"""

from __future__ import annotations

import datetime as _dt
import ipaddress
from typing import Iterable, Mapping

from agent.api.gen import ensure_generated

ensure_generated()
from agent.api import vipd_pb2  # noqa: E402
from agent.api.printers import format_attrs  # noqa: E402
from agent.bgp.communities import community_name  # noqa: E402

__all__ = ["vipd_pb2", "peer_message", "route_message", "community_str", "large_community_str",
           "family_names", "rfc3339", "SESSION_STATES"]

SESSION_STATES = ("idle", "connect", "active", "open_sent", "open_confirm", "established", "unknown")

_AFI = {1: "ipv4", 2: "ipv6"}
_SAFI = {1: "unicast", 2: "multicast"}

def family_names(family) -> tuple[str, str]:
    """``Family.IPV4_UNICAST`` (value (1, 1)) or a tuple (1, 1) -> ("ipv4", "unicast")."""
    afi, safi = getattr(family, "value", family)
    return _AFI.get(afi, str(afi)), _SAFI.get(safi, str(safi))


def community_str(value: int | str) -> str:
    """As GoBGP (and so `cilium bgp routes`) prints it: a well-known name, else ASN:value."""
    return value if isinstance(value, str) else community_name(value)


def large_community_str(value) -> str:
    if isinstance(value, str):
        return value
    return ":".join(str(v) for v in value)


def rfc3339(unix_time: float | None) -> str:
    if not unix_time:
        return ""
    return _dt.datetime.fromtimestamp(unix_time, _dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def peer_message(state, *, node: str, instance: str = "", name: str = "",
                 families: Iterable | None = None) -> "vipd_pb2.Peer":
    """A speaker ``PeerState`` -> ``vipd_pb2.Peer``.

    ``families`` lists the configured families in display order (Cilium prints every
    configured family, with zero counts until routes flow); default: the state's own.
    """
    established = state.state == "established"
    counts: Mapping = state.families or {}
    fams = list(families) if families is not None else list(counts)
    msg = vipd_pb2.Peer(
        node=node, instance=instance, name=name, local_asn=state.local_asn, peer_asn=state.peer_asn,
        peer_address=state.address, peer_port=state.port, local_address=state.local_address or "",
        session_state=state.state if state.state in SESSION_STATES else "unknown",
        uptime_seconds=float(state.uptime_seconds or 0.0) if established else 0.0,
        established_time=rfc3339(state.established_at) if established else "",
        timers=vipd_pb2.Timers(applied_hold_time_seconds=state.hold_time or 0,
                               applied_keepalive_seconds=state.keepalive or 0),
        local_capabilities=list(state.local_capabilities or ()),
        remote_capabilities=list(state.remote_capabilities or ()),
        last_error=state.last_error or "",
    )
    for fam in fams:
        afi, safi = family_names(fam)
        c = counts.get(fam)
        msg.families.append(vipd_pb2.FamilyRouteCount(
            afi=afi, safi=safi, received=c.received if c else 0, accepted=c.accepted if c else 0,
            advertised=c.advertised if c else 0))
    return msg


def route_message(*, node: str, instance: str, vrouter: int, prefix, attrs, next_hop: str,
                  afi: str, peer: str = "", as_path: Iterable[int] = (), age_seconds: float = 0.0,
                  send_local_pref: bool = True) -> "vipd_pb2.Route":
    """One path -> ``vipd_pb2.Route``; ``attrs`` is a speaker ``PathAttributes``.

    ``send_local_pref`` is False for eBGP peers: LOCAL_PREF never leaves the AS, so the
    advertised view must not show it either.
    """
    origin = {0: "i", 1: "e", 2: "?"}.get(int(getattr(attrs, "origin", 0)), "?")
    communities = [community_str(c) for c in getattr(attrs, "communities", ())]
    large = [large_community_str(c) for c in getattr(attrs, "large_communities", ())]
    local_pref = getattr(attrs, "local_pref", None) if send_local_pref else None
    med = getattr(attrs, "med", None)
    prefix = str(ipaddress.ip_network(prefix, strict=False))
    as_path = list(as_path)
    text = format_attrs(origin=origin, as_path=as_path, next_hop=next_hop, afi=afi, prefix=prefix,
                        local_pref=local_pref, med=med, communities=communities,
                        large_communities=large)
    return vipd_pb2.Route(
        node=node, instance=instance, vrouter=vrouter, peer=peer, prefix=prefix, next_hop=next_hop,
        age_seconds=float(age_seconds), origin=origin, as_path=as_path,
        local_pref=local_pref or 0, has_local_pref=local_pref is not None,
        communities=communities, large_communities=large, attrs=text, afi=afi, safi="unicast")
