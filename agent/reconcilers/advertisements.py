"""Advertisements: desired paths per (instance, peer, family) -> the speaker's Adj-RIB-Out.

The desired paths are a pure function of the objects (``agent.controlplane.desired_paths``);
the current paths are what the speaker holds for the peer (``adj_rib_out``), so there is no
second copy to drift. Per peer, every withdrawal is issued before any advertisement (a
prefix that moves between families or aggregations is never briefly doubled), and an
unchanged path is not touched, so a second pass with the same inputs does nothing.

The reconciler also remembers when each path was (re)advertised, for the ``Age`` column of
``vipctl bgp routes``.
"""

from __future__ import annotations

import ipaddress
from types import MappingProxyType
from typing import Any, Callable

from agent.reconcilers.errors import ErrorBook

__all__ = ["AdvertisementReconciler", "AdvertisementsView", "canonical"]


def canonical(address: str) -> str:
    """The speaker's form of a peer address (``FD00::1`` -> ``fd00::1``)."""
    try:
        return str(ipaddress.ip_address(address))
    except ValueError:
        return address

NAME = "advertisements"


class AdvertisementsView:
    """Read-only: the loc-RIB per instance (``vipctl bgp routes available``) and when each
    path was last (re)advertised to each peer (the ``Age`` column)."""

    def __init__(self, available: dict, advertised_at: dict):
        self.available = MappingProxyType(available)     # instance -> {(family, prefix): (attrs, since)}
        self.advertised_at = MappingProxyType(advertised_at)  # (instance, peer, family, prefix) -> wall time


class AdvertisementReconciler:
    name = NAME

    def __init__(self, neighbors, desired_paths: Callable[..., dict], families: tuple, *, log=None,
                 clock: Callable[[], float] | None = None, ready: Callable[[], Any] | None = None):
        """``neighbors``: the NeighborReconciler (its running instances are the speakers).
        ``desired_paths(instance, peer) -> {Family: {prefix: PathAttributes}}`` for this pass.
        ``families``: every Family the speaker knows (to withdraw from families no longer desired).
        ``ready``: the datapath's view getter (its ``vip_ready`` is the announce rule; None:
        no datapath, every address may be announced)."""
        import time

        self.ready = ready
        self.neighbors = neighbors
        self.desired_paths = desired_paths
        self.families = families
        self.log = log
        self.clock = clock or time.time
        # (instance, peer, family, prefix) -> wall time the current attributes were advertised
        self.advertised_at: dict[tuple, float] = {}
        # instance -> {(family, prefix): (attrs, first seen)}: the instance's loc-rib view
        self.available: dict[str, dict[tuple, tuple[Any, float]]] = {}
        # (instance, peer) -> (PeerPaths serial, speaker, NeighborConfig) last applied in full:
        # a plan derived from that serial, on the same speaker and neighbor, needs only its
        # affected prefixes applied (one changed Service: O(1), not a diff of every prefix)
        self._applied: dict[tuple, tuple] = {}
        self._states: dict | None = None          # the plan's PeerPaths while apply() runs
        self._loc_rib_peers: dict[str, tuple] = {}

    async def apply(self, plan, errors: ErrorBook, now: float) -> None:
        # The announce rule: with the datapath, a Service address is announced only while every
        # desired frontend at it is programmed (the datapath view's vip_ready).
        datapath = self.ready() if self.ready is not None else None
        vip_ready = datapath.vip_ready if datapath is not None else None
        if getattr(datapath, "loading", False):
            from agent.controlplane.advertisements import nothing_ready
            vip_ready = nothing_ready
        # the held-back addresses; unknown (None) never equals a previous pass's
        token = () if datapath is None else (datapath.blocked if datapath.blocked is not None else object())
        self._states = plan.path_states
        try:
            await self.reconcile(plan.node_config, errors, now,
                                 desired_paths=lambda inst, peer: plan.paths(inst, peer, vip_ready, token))
        finally:
            self._states = None

    def view(self) -> AdvertisementsView:
        return AdvertisementsView(self.available, self.advertised_at)

    async def reconcile(self, node_config, errors: ErrorBook, now: float,
                        desired_paths: Callable[..., dict] | None = None) -> None:
        compute = desired_paths or self.desired_paths
        instances = {i.name: i for i in node_config.instances}
        errors.clear_missing(NAME, set(instances))
        for name in [n for n in self.available if n not in instances]:
            del self.available[name]
        for key in [k for k in self._applied if k[0] not in instances]:
            del self._applied[key]
        for key in [k for k in self.advertised_at if k[0] not in instances]:
            del self.advertised_at[key]
        for inst in instances.values():
            run = self.neighbors.running.get(inst.name)
            if run is None:
                continue  # the neighbor reconciler failed for it and recorded why
            try:
                self._reconcile_instance(inst, run, compute)
            except Exception as exc:  # noqa: BLE001 - recorded, retried with backoff
                rec = errors.record(NAME, inst.name, exc, now)
                self._log("error", "reconcile failed", instance=inst.name, error=rec.error,
                          attempts=rec.attempts)
            else:
                errors.clear(NAME, inst.name)

    def _reconcile_instance(self, inst, run, compute) -> None:
        speaker = run.speaker
        wall = self.clock()
        desired_of: list[dict] = []
        addresses = []
        touched: set | None = set()     # (family, prefix) that may differ (None: every one)
        for peer in inst.peers:
            address = canonical(peer.address)
            if address not in run.neighbors:
                continue
            desired = compute(inst, peer)
            state = self._states.get((inst.name, peer.address)) if self._states is not None else None
            key, cfg = (inst.name, address), run.neighbors[address]
            last = self._applied.pop(key, None)
            if state is not None and state.base is not None and last == (state.base, speaker, cfg):
                changes = self._apply_affected(inst.name, speaker, address, desired, state.affected, wall)
                if touched is not None:
                    touched |= state.affected
            else:
                changes = self._reconcile_peer(inst.name, speaker, address, desired, wall)
                touched = None
            if state is not None:
                self._applied[key] = (state.serial, speaker, cfg)
            desired_of.append(desired)
            addresses.append(address)
            if changes:
                self._log("info", "advertisements changed", instance=inst.name, peer=address,
                          withdrawn=changes[0], advertised=changes[1])
        previous = self.available.get(inst.name, {})
        if touched is not None and self._loc_rib_peers.get(inst.name) == tuple(addresses) \
                and inst.name in self.available:
            available = dict(previous)
            for key in touched:   # the first peer that has the prefix gives its attributes
                fam, prefix = key
                attrs = next((d[fam][prefix] for d in desired_of if prefix in d.get(fam, ())), None)
                if attrs is None:
                    available.pop(key, None)
                else:
                    available[key] = (attrs, previous[key][1] if key in previous else wall)
            self.available[inst.name] = available
        else:
            loc_rib: dict[tuple, Any] = {}
            for desired in desired_of:
                for fam, paths in desired.items():
                    for prefix, attrs in paths.items():
                        loc_rib.setdefault((fam, prefix), attrs)
            self.available[inst.name] = {
                key: (attrs, previous[key][1] if key in previous else wall) for key, attrs in loc_rib.items()}
        self._loc_rib_peers[inst.name] = tuple(addresses)
        # forget ages of peers that are gone
        peers = set(run.neighbors)
        for key in [k for k in self.advertised_at if k[0] == inst.name and k[1] not in peers]:
            del self.advertised_at[key]

    def _apply_affected(self, instance: str, speaker, address: str, desired: dict, affected, wall: float):
        """Only the prefixes that may have changed since the paths this peer has; the same
        order as a full diff: every withdrawal, then the advertisements."""
        withdrawn = advertised = 0
        for fam, prefix in affected:
            if prefix not in desired.get(fam, ()):
                withdrawn += speaker.withdraw_many(address, fam, (prefix,))
                self.advertised_at.pop((instance, address, fam, prefix), None)
        for fam, prefix in affected:
            attrs = desired.get(fam, {}).get(prefix)
            if attrs is not None and speaker.advertise_many(address, fam, (prefix,), attrs):
                self.advertised_at[(instance, address, fam, prefix)] = wall
                advertised += 1
            elif attrs is not None:
                self.advertised_at.setdefault((instance, address, fam, prefix), wall)
        return (withdrawn, advertised) if withdrawn or advertised else None

    def _reconcile_peer(self, instance: str, speaker, address: str, desired: dict, wall: float):
        current = {fam: dict(speaker.adj_rib_out(address, fam)) for fam in self.families}
        withdrawn = advertised = 0
        # 1. withdraw everything that is no longer desired, in every family
        for fam in self.families:
            want = desired.get(fam, {})
            gone = [p for p in current[fam] if p not in want]
            if gone:
                speaker.withdraw_many(address, fam, gone)
            for prefix in gone:
                self.advertised_at.pop((instance, address, fam, prefix), None)
            withdrawn += len(gone)
        # 2. then advertise what is new or has different attributes: one call per attribute
        # set (thousands of VIPs share one), which hands full UPDATEs to TCP as it goes
        for fam, want in desired.items():
            have = current.get(fam, {})
            todo: dict = {}
            for prefix, attrs in want.items():
                if have.get(prefix) == attrs:
                    self.advertised_at.setdefault((instance, address, fam, prefix), wall)
                    continue
                todo.setdefault(attrs, []).append(prefix)
            for attrs, prefixes in todo.items():
                speaker.advertise_many(address, fam, prefixes, attrs)
                for prefix in prefixes:
                    self.advertised_at[(instance, address, fam, prefix)] = wall
                advertised += len(prefixes)
        return (withdrawn, advertised) if withdrawn or advertised else None

    def _log(self, level: str, event: str, **kw) -> None:
        if self.log is not None:
            getattr(self.log, level)(event, reconciler=NAME, **kw)
