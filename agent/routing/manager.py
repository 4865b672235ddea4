"""The owner of vipd's kernel routes: dump (ours only) -> plan -> replace / delete.

Every route vipd installs carries protocol :data:`RTPROT_VIPD`; routes of any other protocol
(kernel, static, FRR's zebra, DHCP) are never read into the plan and so never touched: a
desired route whose identity (table, prefix, metric) another protocol's route already holds
is reported as failed instead of replacing it.
Works in a given network namespace (``netns="name"``, an ``ip netns`` name).

Used by the daemon for native Pod CIDR routes (autoDirectNodeRoutes) and VIP blackholes;
one :class:`RouteManager` per namespace, called with the *whole* desired set each time.
"""

from __future__ import annotations

import errno
import ipaddress
from dataclasses import dataclass
from socket import AF_INET, AF_INET6
from typing import Iterable

from pyroute2 import AsyncIPRoute
from pyroute2.netlink.exceptions import NetlinkError

from agent.log import get_logger
from agent.routing.model import RTPROT_VIPD, NextHop, Route, RoutePlan, plan

__all__ = ["RouteManager", "SyncResult", "RouteError"]

log = get_logger("routes")

_RTN_UNICAST, _RTN_BLACKHOLE = 1, 6


class RouteError(RuntimeError):
    """A route could not be programmed; the message names the route and the kernel's reason."""


@dataclass(frozen=True)
class SyncResult:
    replaced: tuple[Route, ...]
    deleted: tuple[Route, ...]
    failed: tuple[tuple[Route, str], ...]   # (route, reason): the rest of the plan still ran

    def raise_for_failures(self) -> None:
        if self.failed:
            raise RouteError("; ".join(f"{r}: {why}" for r, why in self.failed))


class RouteManager:
    """Reconciles the kernel's vipd-owned routes with a desired set (see module docstring)."""

    def __init__(self, *, netns: str | None = None, proto: int = RTPROT_VIPD):
        if not 5 <= proto <= 255:
            raise ValueError("route protocol must be 5..255 (0-4 are the kernel's own)")
        self.netns = netns
        self.proto = proto

    def _ipr(self) -> AsyncIPRoute:
        return AsyncIPRoute(netns=self.netns) if self.netns else AsyncIPRoute()

    async def routes(self) -> list[Route]:
        """The routes with our protocol, in every table, both families."""
        async with self._ipr() as ipr:
            names = await _link_names(ipr)
            return (await self._dump(ipr, names))[0]

    async def sync(self, desired: Iterable[Route]) -> SyncResult:
        """Make our routes equal ``desired``: replace what is missing or different, then delete
        what is no longer wanted. A failing route is reported and does not stop the others."""
        desired = list(desired)
        async with self._ipr() as ipr:
            names = await _link_names(ipr)
            current, foreign = await self._dump(ipr, names)
            todo: RoutePlan = plan(desired, current)
            index = {name: idx for idx, name in names.items()}
            replaced, deleted, failed = [], [], []
            for route in todo.replace:
                if route.key in foreign:   # "replace" would overwrite another owner's route
                    failed.append((route, f"a route of protocol {foreign[route.key]} to {route.prefix} "
                                          f"(table {route.table}, metric {route.metric}) exists; not replaced"))
                    continue
                try:
                    await ipr.route("replace", **self._request(route, index))
                    replaced.append(route)
                except (NetlinkError, RouteError) as exc:
                    failed.append((route, _reason(exc)))
            for route in todo.delete:
                try:
                    await ipr.route("del", **_identity(route, self.proto))
                    deleted.append(route)
                except NetlinkError as exc:
                    if exc.code != errno.ESRCH:  # already gone: that is what we wanted
                        failed.append((route, _reason(exc)))
        result = SyncResult(tuple(replaced), tuple(deleted), tuple(failed))
        if replaced or deleted or failed:
            log.info("routes synced", netns=self.netns, replaced=len(replaced), deleted=len(deleted),
                     failed=[f"{r}: {why}" for r, why in failed])
        return result

    async def flush(self) -> SyncResult:
        """Remove every route we own (agent uninstall; not on restart, routes outlive the agent)."""
        return await self.sync(())

    # -- netlink translation ---------------------------------------------------------------------
    async def _dump(self, ipr, names: dict[int, str]) -> tuple[list[Route], dict[tuple, int]]:
        """(our routes, {route key: protocol} of other owners' routes of kinds we install)."""
        out, foreign = [], {}
        for family in (AF_INET, AF_INET6):
            async for msg in await ipr.route("dump", family=family, table=None):
                if msg["type"] not in (_RTN_UNICAST, _RTN_BLACKHOLE):
                    continue   # local, broadcast, ...: not a kind of route we ever install
                if msg["proto"] != self.proto:
                    foreign[_key(msg)] = msg["proto"]
                    continue
                route = _from_msg(msg, names)
                if route is not None:
                    out.append(route)
        return out, foreign

    def _request(self, route: Route, index: dict[str, int]) -> dict:
        req = _identity(route, self.proto)
        if route.type == "blackhole":
            req["type"] = "blackhole"
            return req
        hops = [_hop_request(h, index, route) for h in route.nexthops]
        if len(hops) == 1 and route.nexthops[0].weight == 1:
            req.update({k: v for k, v in hops[0].items() if k != "hops"})  # plain gateway/oif
        else:
            req["multipath"] = hops
        return req


async def _link_names(ipr) -> dict[int, str]:
    return {link["index"]: link.get("ifname") async for link in await ipr.link("dump")}


def _identity(route: Route, proto: int) -> dict:
    return {"dst": str(route.prefix), "table": route.table, "priority": route.metric, "proto": proto,
            "family": AF_INET6 if route.family == 6 else AF_INET}


def _hop_request(hop: NextHop, index: dict[str, int], route: Route) -> dict:
    req: dict = {"hops": hop.weight - 1}
    if hop.gateway is not None and hop.gateway.version != route.family:
        req["via"] = {"family": AF_INET6, "addr": str(hop.gateway)}   # IPv4 route via IPv6 (RTA_VIA)
    elif hop.gateway is not None:
        req["gateway"] = str(hop.gateway)
    if hop.dev is not None:
        if hop.dev not in index:
            raise RouteError(f"device {hop.dev} does not exist")
        req["oif"] = index[hop.dev]
    return req


def _key(msg) -> tuple:
    """The kernel's identity of a route message, as :attr:`Route.key`."""
    family = 6 if msg["family"] == AF_INET6 else 4
    dst = msg.get("dst") or ("::" if family == 6 else "0.0.0.0")
    prefix = ipaddress.ip_network(f"{dst}/{msg['dst_len']}")
    table = msg.get("table") or msg["table"]  # RTA_TABLE carries ids > 255; the header byte otherwise
    metric = msg.get("priority")
    return (family, table, prefix, 0 if metric is None else metric)


def _from_msg(msg, names: dict[int, str]) -> Route | None:
    rtype = msg["type"]
    if rtype not in (_RTN_UNICAST, _RTN_BLACKHOLE):
        return None  # not a kind of route we ever install
    _, table, prefix, metric = _key(msg)
    if rtype == _RTN_BLACKHOLE:
        return Route(prefix, (), table=table, metric=metric, type="blackhole")
    multipath = msg.get("multipath")
    if multipath:
        hops = []
        for nh in multipath:
            attrs = dict(nh.get("attrs") or ())
            gw = attrs.get("RTA_GATEWAY") or (attrs.get("RTA_VIA") or {}).get("addr")
            hops.append(NextHop(gateway=gw, dev=names.get(nh["oif"]), weight=nh["hops"] + 1))
    else:
        gw = msg.get("gateway") or (msg.get("via") or {}).get("addr")
        hops = [NextHop(gateway=gw, dev=names.get(msg.get("oif")))]
    return Route(prefix, tuple(hops), table=table, metric=metric)


def _reason(exc: Exception) -> str:
    if isinstance(exc, NetlinkError):
        return f"{errno.errorcode.get(exc.code, exc.code)}: {exc.args[1] if len(exc.args) > 1 else exc}"
    return str(exc)
