"""Kernel routes: the one owner of vipd's routes (protocol ``vipd``, 241) on this node.

Two parts of the desired set, synced together through one :class:`RouteManager` (so neither
part ever deletes the other's routes):

* autoDirectNodeRoutes (``vipd run --auto-direct-node-routes``): every other Node's
  ``spec.podCIDRs`` via its InternalIP when that address is on one of this host's connected
  networks (host facts). Recomputed on each controller pass (Node objects, host changes).
* BGP import (``vipd run --bgp-import-table N``): the prefixes our peers announce, installed
  in table N with all best next hops as ECMP. Recomputed when a speaker's Adj-RIB-In changes
  (an UPDATE, a session down, a neighbor removed), debounced.

Routes of every other protocol are never read or touched (RouteManager dumps ours only).
Failures are recorded in the ErrorBook (``vipctl status``, the status file) and logged.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from agent.reconcilers.errors import ErrorBook
from agent.routing.desired import PeerNode, ReceivedPath, bgp_import_routes, direct_node_routes
from agent.routing.model import Route

__all__ = ["RouteReconciler"]

NAME = "routes"
RIB_DEBOUNCE_S = 0.1


class RouteReconciler:
    name = NAME

    def __init__(self, manager, node_name: str, *, auto_direct_node_routes: bool = False,
                 import_table: int | None = None, log=None):
        self.manager = manager
        self.node_name = node_name
        self.auto_direct_node_routes = auto_direct_node_routes
        self.import_table = import_table
        self.log = log
        self.bgp = None                        # the neighbors reconciler's BgpView: what peers sent
        self.direct: tuple[Route, ...] = ()
        self.installed: tuple[Route, ...] = ()  # read-only view: what the last sync made true
        self._host_addresses: tuple[str, ...] = ()
        self._lock = asyncio.Lock()
        self._rib_changed = asyncio.Event()

    def rib_changed(self) -> None:
        """The speakers' hook (BgpSpeaker.on_rib_in_change)."""
        self._rib_changed.set()

    async def apply(self, plan, errors: ErrorBook, now: float) -> None:
        """The controller's pass: the plan's autoDirectNodeRoutes (Node objects, host facts)."""
        if plan.facts is not None:
            self._host_addresses = tuple(a.split("/")[0] for l in plan.facts.links for a in l.addresses)
        if self.auto_direct_node_routes:
            if plan.direct_routes is None:   # could not be computed: keep the last good set
                self._fail(errors, plan.failures.get(NAME, "autoDirectNodeRoutes: not computed"), now)
                return
            self.direct = tuple(plan.direct_routes)
        await self.sync(errors, now)

    async def reconcile(self, objects, facts, errors: ErrorBook, now: float) -> None:
        """New Node objects / host facts, without a plan (tools and tests)."""
        if facts is not None:
            self._host_addresses = tuple(a.split("/")[0] for l in facts.links for a in l.addresses)
        if self.auto_direct_node_routes:
            if facts is None:
                self.direct = ()
            else:
                try:
                    nodes = [PeerNode(n.name, n.addresses(4) + n.addresses(6), n.pod_cidrs)
                             for n in objects.nodes]
                    self.direct = tuple(direct_node_routes(self.node_name, facts.connected_networks(), nodes))
                except Exception as exc:  # noqa: BLE001 - e.g. two Nodes claim one Pod CIDR: keep the last good set
                    self._fail(errors, f"autoDirectNodeRoutes: {exc}", now)
                    return
        await self.sync(errors, now)

    async def run(self, stop: asyncio.Event, errors: ErrorBook) -> None:
        """Follow the speakers' Adj-RIB-In changes (BGP import only)."""
        if self.import_table is None:
            return
        while not stop.is_set():
            await self._rib_changed.wait()
            await asyncio.sleep(RIB_DEBOUNCE_S)   # one sync per burst of UPDATEs
            self._rib_changed.clear()
            await self.sync(errors, time.monotonic())

    def imported(self) -> list[Route]:
        if self.import_table is None or self.bgp is None:
            return []
        paths = []
        for peer in self.bgp.peers():
            state = peer.state
            if state.state != "established":
                continue
            zone = state.address.partition("%")[2]   # an unnumbered peer's interface
            for family in state.families:
                for prefix, attrs in self.bgp.received(peer.instance, state.address, family).items():
                    paths.append(ReceivedPath(str(prefix), _zoned(attrs.next_hop, zone), attrs.local_pref))
        return bgp_import_routes(paths, table=self.import_table, exclude=self._host_addresses)

    async def sync(self, errors: ErrorBook, now: float) -> None:
        async with self._lock:
            try:
                result = await self.manager.sync([*self.direct, *self.imported()])
            except Exception as exc:  # noqa: BLE001 - netlink down, conflicting routes: retry later
                self._fail(errors, f"kernel routes not synced: {exc}", now)
                return
            self.installed = tuple(await self.manager.routes())
            if result.failed:
                self._fail(errors, "kernel routes failed: " + "; ".join(
                    f"{r}: {why}" for r, why in result.failed), now)
            else:
                errors.clear(NAME, "")

    def _fail(self, errors: ErrorBook, message: str, now: float) -> None:
        rec = errors.record(NAME, "", message, now)
        if self.log is not None:
            self.log.error("route reconcile failed", error=message, attempts=rec.attempts,
                           hint="see `ip route show proto vipd table all`")

    def view(self) -> dict[str, Any]:
        """For the status file: what vipd owns in the kernel now."""
        return {"autoDirectNodeRoutes": self.auto_direct_node_routes, "importTable": self.import_table,
                "installed": [str(r) for r in self.installed]}


def _zoned(next_hop: str | None, zone: str) -> str | None:
    """A link-local next hop from a link-local peer is on that peer's interface."""
    if next_hop and zone and next_hop.lower().startswith("fe80:") and "%" not in next_hop:
        return f"{next_hop}%{zone}"
    return next_hop
