"""The host-facts source: this node's links, addresses, default gateways and MACs, watched.

The control plane needs facts only the host knows: ``autoDiscovery: DefaultGateway`` peers
(the lowest-metric default route), ``transport.sourceInterface`` (an interface's address),
``Interface`` advertisements (the addresses of an up interface), the MAC-based router ID of
IPv6-only nodes, the connected networks autoDirectNodeRoutes needs, and the IPv6 routers on
each link (``autoDiscovery: Unnumbered``: link-local neighbours the kernel marked as routers,
from their Router Advertisements or Neighbor Advertisements). :class:`HostFacts` is pure data
built by :func:`facts_from_netlink` from netlink messages (unit-testable, no root);
:class:`HostSource` owns the netlink sockets: it dumps once, then listens to link, address,
route and IPv6 neighbour events, re-dumps after a quiet ~100 ms and publishes new facts only when
they differ, waking whoever waits in :meth:`HostSource.wait_for_change`.
"""

from __future__ import annotations

import asyncio
import ipaddress
from dataclasses import dataclass, field
from socket import AF_INET, AF_INET6
from typing import Iterable, Mapping

from agent.log import get_logger
from agent.routing.model import RTPROT_VIPD

__all__ = ["Link", "DefaultGateway", "Router", "HostFacts", "facts_from_netlink", "HostSource"]

log = get_logger("host")

MAIN_TABLE = 254
_IFF_UP = 0x1
_RTN_UNICAST = 1
_DEBOUNCE_S = 0.1
_NTF_ROUTER = 0x80
# Neighbour states in which a router still counts: FAILED / INCOMPLETE mean it stopped
# answering Neighbor Solicitations (moved or gone), so a session to it cannot work.
_NUD_USABLE = 0x02 | 0x04 | 0x08 | 0x10 | 0x80   # REACHABLE STALE DELAY PROBE PERMANENT


@dataclass(frozen=True)
class Link:
    name: str
    index: int
    mac: str | None          # None for links without an Ethernet address (lo, tunnels)
    up: bool                 # admin up and oper state up or unknown (Cilium's Interface rule)
    addresses: tuple[str, ...]   # "addr/prefixlen", kernel order


@dataclass(frozen=True)
class DefaultGateway:
    family: str              # "ipv4" | "ipv6" (Cilium's addressFamily values)
    address: str
    dev: str | None
    metric: int


@dataclass(frozen=True)
class Router:
    """An IPv6 router on a link: a link-local neighbour with the kernel's router flag."""

    dev: str
    address: str             # fe80::…, without the zone


@dataclass(frozen=True)
class HostFacts:
    links: tuple[Link, ...] = ()
    gateways: tuple[DefaultGateway, ...] = ()   # the lowest-metric default route per family
    routers: tuple[Router, ...] = ()            # sorted by (dev, address)
    _by_name: dict = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self):
        object.__setattr__(self, "_by_name", {l.name: l for l in self.links})

    def link(self, name: str) -> Link | None:
        return self._by_name.get(name)

    def interfaces(self) -> dict[str, list[str]]:
        """name -> addresses of every link (``transport.sourceInterface``)."""
        return {l.name: list(l.addresses) for l in self.links}

    def up_interfaces(self) -> dict[str, list[str]]:
        """name -> addresses of links that are up (``Interface`` advertisements: Cilium skips
        a device that is admin down or whose oper state is not up/unknown)."""
        return {l.name: list(l.addresses) for l in self.links if l.up}

    def default_gateways(self) -> dict[str, str]:
        return {g.family: g.address for g in self.gateways}

    def link_local_routers(self) -> dict[str, list[str]]:
        """interface -> link-local addresses of the IPv6 routers on it (``Unnumbered`` peers)."""
        out: dict[str, list[str]] = {}
        for r in self.routers:
            out.setdefault(r.dev, []).append(r.address)
        return out

    def connected_networks(self) -> list[str]:
        """Subnets of up links, for on-link next hops (autoDirectNodeRoutes)."""
        nets: list[str] = []
        for l in self.links:
            if not l.up:
                continue
            for a in l.addresses:
                iface = ipaddress.ip_interface(a)
                if iface.ip.is_loopback or (iface.version == 6 and iface.ip.is_link_local):
                    continue
                net = str(iface.network)
                if net not in nets:
                    nets.append(net)
        return nets

    def router_id_mac(self, node_addresses: Iterable[str] = ()) -> str | None:
        """The MAC whose low 4 bytes give an IPv6-only node its router ID. Cilium takes
        cilium_host's; vipd has no such device and takes the MAC of the link holding the
        node's address, else of the IPv6 default route's link, else of the first link with one."""
        wanted = {str(ipaddress.ip_address(a)) for a in node_addresses}
        for l in self.links:
            if l.mac and any(str(ipaddress.ip_interface(a).ip) in wanted for a in l.addresses):
                return l.mac
        for g in sorted(self.gateways, key=lambda g: g.family != "ipv6"):
            l = self.link(g.dev) if g.dev else None
            if l is not None and l.mac:
                return l.mac
        return next((l.mac for l in self.links if l.mac), None)


def _attr(msg, name):
    return msg.get(name) if hasattr(msg, "get") else None


def _usable_mac(mac: str | None) -> str | None:
    if not mac or len(mac.split(":")) != 6 or set(mac.replace(":", "")) == {"0"}:
        return None
    return mac


def facts_from_netlink(links: Iterable[Mapping], addrs: Iterable[Mapping],
                       routes: Iterable[Mapping], neighbours: Iterable[Mapping] = ()) -> HostFacts:
    """Pure: RTM_NEWLINK / RTM_NEWADDR / RTM_NEWROUTE / RTM_NEWNEIGH messages (pyroute2 dict
    view) -> facts."""
    by_index: dict[int, dict] = {}
    for m in links:
        oper = _attr(m, "operstate") or "UNKNOWN"
        by_index[m["index"]] = {"name": _attr(m, "ifname"), "mac": _usable_mac(_attr(m, "address")),
                                "up": bool(m["flags"] & _IFF_UP) and oper in ("UP", "UNKNOWN"),
                                "addresses": []}
    for m in addrs:
        link = by_index.get(m["index"])
        addr = _attr(m, "address")
        if link is None or addr is None:
            continue
        text = f"{ipaddress.ip_address(addr)}/{m['prefixlen']}"
        if text not in link["addresses"]:
            link["addresses"].append(text)
    best: dict[str, DefaultGateway] = {}
    for m in routes:
        table = _attr(m, "table") or m["table"]
        if m["dst_len"] != 0 or table != MAIN_TABLE or m["type"] != _RTN_UNICAST:
            continue
        if m.get("proto") == RTPROT_VIPD:
            continue   # a default route we imported from BGP must not pick our BGP peer
        family = "ipv6" if m["family"] == AF_INET6 else "ipv4"
        gw, oif = _attr(m, "gateway"), _attr(m, "oif")
        if gw is None and _attr(m, "multipath"):
            first = m.get("multipath")[0]
            gw = dict(first.get("attrs") or ()).get("RTA_GATEWAY")
            oif = first["oif"]
        if gw is None:
            continue   # a device-only default route names no neighbor to peer with
        metric = _attr(m, "priority") or 0
        dev = by_index.get(oif, {}).get("name")
        cur = best.get(family)
        if cur is None or metric < cur.metric:
            best[family] = DefaultGateway(family, str(ipaddress.ip_address(gw)), dev, metric)
    out = tuple(Link(v["name"], i, v["mac"], v["up"], tuple(v["addresses"]))
                for i, v in sorted(by_index.items()) if v["name"])
    return HostFacts(out, tuple(best[f] for f in sorted(best)), _routers(neighbours, by_index))


def _routers(neighbours: Iterable[Mapping], by_index: dict) -> tuple[Router, ...]:
    found = set()
    for m in neighbours:
        dst, dev = _attr(m, "dst"), by_index.get(m.get("ifindex"), {}).get("name")
        if m.get("family") != AF_INET6 or dst is None or dev is None:
            continue
        if not (m.get("flags", 0) & _NTF_ROUTER) or not (m.get("state", 0) & _NUD_USABLE):
            continue
        ip = ipaddress.IPv6Address(str(dst).split("%")[0])
        if ip.is_link_local:
            found.add((dev, ip))
    return tuple(Router(dev, str(ip)) for dev, ip in sorted(found))


class HostSource:
    """Owner of the netlink reads; see the module docstring. ``netns``: an ``ip netns`` name
    (tests); None is the agent's own namespace."""

    def __init__(self, *, netns: str | None = None, debounce: float = _DEBOUNCE_S):
        self.netns = netns
        self.debounce = debounce
        self.facts: HostFacts | None = None
        self.generation = 0
        self._changed = asyncio.Event()

    def _ipr(self):
        from pyroute2 import AsyncIPRoute

        return AsyncIPRoute(netns=self.netns) if self.netns else AsyncIPRoute()

    async def dump(self) -> HostFacts:
        async with self._ipr() as ipr:
            links = [m async for m in await ipr.link("dump")]
            addrs = [m async for m in await ipr.addr("dump")]
            routes = []
            for family in (AF_INET, AF_INET6):
                routes += [m async for m in await ipr.route("dump", family=family, table=MAIN_TABLE)]
            neighbours = [m async for m in await ipr.neigh("dump", family=AF_INET6)]
        return facts_from_netlink(links, addrs, routes, neighbours)

    async def load(self) -> bool:
        """Dump now; True (and waiters woken) when the facts changed."""
        facts = await self.dump()
        if facts == self.facts:
            return False
        previous, self.facts = self.facts, facts
        self.generation += 1
        self._changed.set()
        self._changed = asyncio.Event()
        if previous is None or previous.gateways != facts.gateways:
            log.info("host default gateways", gateways={g.family: f"{g.address} dev {g.dev} metric {g.metric}"
                                                         for g in facts.gateways})
        if (previous.routers if previous else ()) != facts.routers:
            log.info("host IPv6 routers", routers=facts.link_local_routers())
        else:
            log.debug("host facts changed", generation=self.generation)
        return True

    async def wait_for_change(self, after_generation: int) -> int:
        while self.generation <= after_generation:
            await self._changed.wait()
        return self.generation

    async def run(self, stop: asyncio.Event) -> None:
        """Watch link / address / route / IPv6 neighbour events; after each burst (quiet for ``debounce``)
        re-dump and publish. A netlink error is logged and the watch restarts after 1 s."""
        from pyroute2.netlink.rtnl import (RTMGRP_IPV4_IFADDR, RTMGRP_IPV4_ROUTE, RTMGRP_IPV6_IFADDR,
                                           RTMGRP_IPV6_ROUTE, RTMGRP_LINK, RTMGRP_NEIGH)

        groups = (RTMGRP_LINK | RTMGRP_IPV4_IFADDR | RTMGRP_IPV6_IFADDR | RTMGRP_IPV4_ROUTE | RTMGRP_IPV6_ROUTE
                  | RTMGRP_NEIGH)
        while not stop.is_set():
            try:
                async with self._ipr() as ipr:
                    await ipr.bind(groups=groups)
                    await self.load()   # anything that changed before the bind
                    dirty = asyncio.Event()
                    reader = asyncio.create_task(self._read(ipr, dirty, self._known_routers))
                    try:
                        while not stop.is_set():
                            await dirty.wait()
                            await asyncio.sleep(self.debounce)   # one re-dump per burst
                            dirty.clear()
                            await self.load()
                            if reader.done():
                                reader.result()   # re-raise the reader's error
                    finally:
                        reader.cancel()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - keep watching; the last facts stay in force
                log.error("host netlink watch failed; retrying in 1 s", error=repr(exc))
                await asyncio.sleep(1.0)

    def _known_routers(self) -> set[str]:
        return {r.address for r in self.facts.routers} if self.facts is not None else set()

    @staticmethod
    async def _read(ipr, dirty: asyncio.Event, known_routers) -> None:
        try:
            while True:
                async for msg in ipr.get():
                    if _relevant(msg, known_routers):
                        dirty.set()
        finally:
            dirty.set()   # wake the loop, which re-raises our error


def _relevant(msg, known_routers=lambda: set()) -> bool:   # known_routers(): addresses now in the facts
    """Route events matter only for default routes of the main table (our own imported
    routes in other tables, or Pod CIDR routes, must not cause re-dumps); neighbour events only
    for IPv6 routers: flagged ones, or ones we know that lost the flag (the link-local
    neighbours of every Pod veth, or ARP churn, are none of our business)."""
    event = msg.get("event")
    if event in ("RTM_NEWNEIGH", "RTM_DELNEIGH"):
        dst = msg.get("dst")
        if msg.get("family") != AF_INET6 or dst is None or not str(dst).lower().startswith("fe80:"):
            return False
        return bool(msg.get("flags", 0) & _NTF_ROUTER) or str(dst).split("%")[0] in known_routers()
    if event not in ("RTM_NEWROUTE", "RTM_DELROUTE"):
        return True
    table = msg.get("table") or msg["table"]
    return msg["dst_len"] == 0 and table == MAIN_TABLE
