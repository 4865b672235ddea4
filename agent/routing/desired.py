"""Which routes a node wants: pure functions from cluster state to :class:`Route` values.

``direct_node_routes`` is native routing's autoDirectNodeRoutes (Cilium's
``--auto-direct-node-routes``): every *other* node's Pod CIDRs via that node's address, but
only when that address is on a subnet this node is directly attached to (the next hop must be
on-link; a routed underlay is left to BGP). The daemon passes the result, together with any
other wanted routes, to :meth:`agent.routing.manager.RouteManager.sync`.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Iterable, Sequence

from agent.routing.model import MAIN_TABLE, NextHop, Route

__all__ = ["PeerNode", "ReceivedPath", "direct_node_routes", "blackhole_routes", "bgp_import_routes"]


@dataclass(frozen=True)
class PeerNode:
    """Another node, as far as routing needs it: its addresses and its Pod CIDRs."""

    name: str
    addresses: Sequence[str]          # InternalIP(s), v4 and/or v6
    pod_cidrs: Sequence[str]


def direct_node_routes(local_name: str, local_networks: Iterable[str], nodes: Iterable[PeerNode]) -> list[Route]:
    """Routes to other nodes' Pod CIDRs via their on-link node address (one per family).

    ``local_networks``: the subnets of this node's interfaces (e.g. ``10.20.0.0/24``).
    A CIDR that overlaps one of ``local_networks`` is skipped (it is already connected), as is
    any node whose address of the CIDR's family is not on-link. Two nodes claiming the same
    CIDR is a configuration error and raises (the route would flap between them).
    """
    nets = [ipaddress.ip_network(n, strict=False) for n in local_networks]
    routes: dict = {}  # prefix -> (node name, route)
    for node in sorted(nodes, key=lambda n: n.name):
        if node.name == local_name:
            continue
        addrs = [ipaddress.ip_address(a) for a in node.addresses]
        for cidr in node.pod_cidrs:
            prefix = ipaddress.ip_network(cidr, strict=True)
            if any(prefix.version == n.version and prefix.overlaps(n) for n in nets):
                continue
            via = next((a for a in addrs if a.version == prefix.version
                        and any(a in n for n in nets if n.version == a.version)), None)
            if via is None:
                continue
            if prefix in routes:
                other = routes[prefix][0]
                raise ValueError(f"Pod CIDR {prefix} is claimed by nodes {other} and {node.name}")
            routes[prefix] = (node.name, Route(prefix, [NextHop(via)]))
    return [r for _, r in routes.values()]


def blackhole_routes(prefixes: Iterable[str]) -> list[Route]:
    """Blackholes for address ranges this node answers for but must never forward elsewhere
    (e.g. a LoadBalancer IP pool announced by BGP: no routing loop back to the upstream)."""
    return [Route(ipaddress.ip_network(p, strict=True), type="blackhole") for p in prefixes]


@dataclass(frozen=True)
class ReceivedPath:
    """One path a BGP peer gave us (from the speaker's Adj-RIB-In)."""

    prefix: str
    next_hop: str | None
    local_pref: int | None = None    # None: not sent (eBGP); counts as 100, BGP's default


# The metric of imported routes: zebra's for BGP. A replace with metric 0 could overwrite another
# protocol's route to the same prefix (a connected subnet, a static route); at 20 it sits beside
# them, and the kernel prefers the lower metric.
IMPORT_METRIC = 20


def bgp_import_routes(paths: Iterable[ReceivedPath], *, table: int = MAIN_TABLE,
                      exclude: Iterable[str] = (), metric: int = IMPORT_METRIC) -> list[Route]:
    """BGP-learned prefixes as kernel routes in ``table``: per prefix, the paths with the
    highest LOCAL_PREF, all of them as equal-cost next hops (ECMP across the peers that
    announce it). IPv4 prefixes may have IPv6 next hops (RFC 8950: ``via inet6``); a
    link-local next hop needs its zone (``fe80::1%eth0``, from an unnumbered peer) to name the
    device. Skipped: IPv6 prefixes with IPv4 next hops, link-local next hops without a zone,
    and next hops in ``exclude`` (our own addresses: a route via ourselves loops). Every route
    gets ``metric`` (see IMPORT_METRIC)."""
    own = {ipaddress.ip_address(a) for a in exclude}
    best: dict = {}   # prefix -> (local_pref, {next hops})
    for p in paths:
        if p.next_hop is None:
            continue
        prefix = ipaddress.ip_network(p.prefix, strict=True)
        hop = ipaddress.ip_address(p.next_hop)
        bare = ipaddress.ip_address(hop.packed)
        if (hop.version == 4 and prefix.version == 6) or bare in own or (
                hop.version == 6 and hop.is_link_local and not hop.scope_id):
            continue
        pref = 100 if p.local_pref is None else p.local_pref
        cur = best.get(prefix)
        if cur is None or pref > cur[0]:
            best[prefix] = (pref, {hop})
        elif pref == cur[0]:
            cur[1].add(hop)
    return [Route(prefix, tuple(NextHop(h) for h in sorted(hops, key=lambda h: (h.version, h, str(h)))),
                  table=table, metric=metric)
            for prefix, (_, hops) in sorted(best.items(), key=lambda kv: (kv[0].version, kv[0]))]
