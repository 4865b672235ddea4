"""Kernel routes as values, and the pure desired-vs-current plan.

A :class:`Route` is what vipd wants in a routing table: a prefix, one or more next hops
(multipath) or a blackhole. Routes are identified the way the kernel identifies them —
(family, table, prefix, metric) — so "replace" on that identity is idempotent and a route
whose next hops changed is replaced in place, never deleted and re-added.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from typing import Iterable

__all__ = ["RTPROT_VIPD", "MAIN_TABLE", "NextHop", "Route", "RoutePlan", "plan", "satisfied", "default_metric"]

# Our route protocol number: marks every route vipd owns, so a dump filtered on it is exactly
# our routes (and `ip route` shows "proto vipd" with /etc/iproute2/rt_protos.d/vipd.conf).
# Not 0xc1: FRR's rt_protos.d already names 186..197 (193 is "ldp"). 241 is unassigned.
RTPROT_VIPD = 241
MAIN_TABLE = 254

RouteType = str  # "unicast" | "blackhole"


def default_metric(version: int) -> int:
    """The kernel's priority for a route added without one (IPv6 gets 1024)."""
    return 1024 if version == 6 else 0


@dataclass(frozen=True, order=True)
class NextHop:
    """One path: a gateway address and/or an output device; ``weight`` 1..256 (multipath share)."""

    gateway: ipaddress.IPv4Address | ipaddress.IPv6Address | None = None
    dev: str | None = None
    weight: int = 1

    def __post_init__(self):
        if self.gateway is not None and not isinstance(self.gateway, (ipaddress.IPv4Address, ipaddress.IPv6Address)):
            object.__setattr__(self, "gateway", ipaddress.ip_address(self.gateway))
        gw = self.gateway
        if gw is not None and gw.version == 6 and gw.scope_id:
            # "fe80::1%eth0": the zone is the device (the kernel wants the interface, not a zone)
            if self.dev is None:
                object.__setattr__(self, "dev", gw.scope_id)
            object.__setattr__(self, "gateway", ipaddress.IPv6Address(gw.packed))
        if self.gateway is not None and self.gateway.version == 6 and self.gateway.is_link_local and self.dev is None:
            raise ValueError(f"link-local next hop {self.gateway} needs its device")
        if self.gateway is None and self.dev is None:
            raise ValueError("a next hop needs a gateway, a device, or both")
        if not isinstance(self.weight, int) or not 1 <= self.weight <= 256:
            raise ValueError(f"next-hop weight must be 1..256, got {self.weight!r}")

    def __str__(self) -> str:
        parts = []
        if self.gateway is not None:
            parts.append(f"via {self.gateway}")
        if self.dev:
            parts.append(f"dev {self.dev}")
        if self.weight != 1:
            parts.append(f"weight {self.weight}")
        return " ".join(parts)


def _hop_order(h: NextHop) -> tuple:
    """IPv4 before IPv6 next hops (an IPv4 route may have both), then by address and device."""
    gw = h.gateway
    return (gw is None, gw.version if gw else 0, int(gw) if gw else 0, h.dev or "", h.weight)


@dataclass(frozen=True)
class Route:
    prefix: ipaddress.IPv4Network | ipaddress.IPv6Network
    nexthops: tuple[NextHop, ...] = ()
    table: int = MAIN_TABLE
    metric: int | None = None      # None = the kernel default for the family
    type: RouteType = "unicast"
    key: tuple = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        prefix = self.prefix
        if not isinstance(prefix, (ipaddress.IPv4Network, ipaddress.IPv6Network)):
            prefix = ipaddress.ip_network(prefix, strict=True)
        object.__setattr__(self, "prefix", prefix)
        hops = tuple(sorted((NextHop(**h) if isinstance(h, dict) else h for h in self.nexthops),
                            key=_hop_order))
        object.__setattr__(self, "nexthops", hops)
        if self.metric is None:
            object.__setattr__(self, "metric", default_metric(prefix.version))
        if self.type not in ("unicast", "blackhole"):
            raise ValueError(f"route {prefix}: type must be unicast or blackhole, got {self.type!r}")
        if self.type == "unicast" and not hops:
            raise ValueError(f"route {prefix}: a unicast route needs at least one next hop")
        if self.type == "blackhole" and hops:
            raise ValueError(f"route {prefix}: a blackhole route has no next hops")
        for h in hops:
            # an IPv4 route via an IPv6 next hop is fine (RFC 8950 routes; `via inet6` in iproute2)
            if h.gateway is not None and h.gateway.version != prefix.version and prefix.version == 6:
                raise ValueError(f"route {prefix}: next hop {h.gateway} is IPv{h.gateway.version}")
        if len(set((h.gateway, h.dev) for h in hops)) != len(hops):
            raise ValueError(f"route {prefix}: duplicate next hop")
        object.__setattr__(self, "key", (prefix.version, self.table, prefix, self.metric))

    @property
    def family(self) -> int:
        return self.prefix.version

    def __str__(self) -> str:
        head = f"{'blackhole ' if self.type == 'blackhole' else ''}{self.prefix}"
        hops = " ".join(f"nexthop {h}" if len(self.nexthops) > 1 else str(h) for h in self.nexthops)
        tail = f" table {self.table}" if self.table != MAIN_TABLE else ""
        return f"{head} {hops}{tail} metric {self.metric}".replace("  ", " ")


@dataclass(frozen=True)
class RoutePlan:
    """What to do: routes to replace (missing or different) and routes to delete (not desired)."""

    replace: tuple[Route, ...] = ()
    delete: tuple[Route, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.replace or self.delete)


def plan(desired: Iterable[Route], current: Iterable[Route]) -> RoutePlan:
    """The changes that turn ``current`` (our routes in the kernel) into ``desired``.

    Replacements come first and deletions last when applied (make before break).
    """
    want: dict[tuple, Route] = {}
    for r in desired:
        if r.key in want and want[r.key] != r:
            raise ValueError(f"conflicting desired routes for {r.prefix} (table {r.table}, metric {r.metric}): "
                             f"{want[r.key]} / {r}")
        want[r.key] = r
    have = {r.key: r for r in current}
    replace = tuple(r for k, r in sorted(want.items(), key=_order) if not satisfied(r, have.get(k)))
    delete = tuple(r for k, r in sorted(have.items(), key=_order) if k not in want)
    return RoutePlan(replace, delete)


def satisfied(want: Route, have: Route | None) -> bool:
    """Does the kernel's ``have`` implement ``want``? A desired next hop without a device
    matches any device (the kernel always reports the one it resolved the gateway to)."""
    if have is None or (want.type, want.table, want.metric, want.prefix) != (have.type, have.table,
                                                                            have.metric, have.prefix):
        return False
    if len(want.nexthops) != len(have.nexthops):
        return False
    left = list(have.nexthops)
    for hop in want.nexthops:
        match = next((h for h in left if h.gateway == hop.gateway and h.weight == hop.weight
                      and (hop.dev is None or h.dev == hop.dev)), None)
        if match is None:
            return False
        left.remove(match)
    return True


def _order(item):
    (version, table, prefix, metric), _ = item
    return (version, table, int(prefix.network_address), prefix.prefixlen, metric)
