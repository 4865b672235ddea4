"""BGP instances and neighbors: the node config's instances/peers -> running speakers.

Runs before the advertisement reconciler (Cilium gives the Neighbor reconciler the higher
priority): on a (re)start, every neighbor and then every path is configured in the same pass,
before any session can reach Established, so the first UPDATEs carry the full table and
End-of-RIB follows it.

Running state per instance (the speaker, its identity, the NeighborConfig last applied per
peer) is updated step by step, so a failure halfway keeps what was applied and the next
attempt only does the rest.

Reset rules (Cilium ``pkg/bgp/gobgp/peer.go``): an identity change of the instance (ASN,
router ID, listen port) re-creates the speaker (Cease to the peers); a change of peer ASN is
delete + add; other neighbor changes go through ``update_neighbor``, which only resets when an
OPEN-affecting field changed. ``NeighborConfig`` carries nothing about advertisements, so a
change to advertisements alone never touches this reconciler's effects.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any, Callable

from agent.reconcilers.errors import ErrorBook

__all__ = ["NeighborReconciler", "RunningInstance", "instance_identity", "BgpView", "PeerView"]

NAME = "neighbors"


def instance_identity(instance) -> tuple:
    """What forces a new speaker when it changes (each instance is its own BGP server)."""
    return (instance.local_asn, instance.router_id, instance.local_port)


@dataclass
class RunningInstance:
    name: str
    identity: tuple
    speaker: Any
    local_asn: int
    neighbors: dict[str, Any] = field(default_factory=dict)   # address -> NeighborConfig applied


@dataclass(frozen=True)
class PeerView:
    """One configured peer of a running instance, with its session state (agent.bgp.api.PeerState)."""

    instance: str
    local_asn: int
    config: Any          # the NeighborConfig applied (None while being re-created)
    state: Any


class BgpView:
    """Read-only view of the running BGP instances for the API, metrics, status and the
    routes reconciler: sessions, what was sent (the Adj-RIB-Out as on the wire) and what was
    received. Nothing here changes a speaker."""

    def __init__(self, running: dict[str, RunningInstance]):
        self._running = running

    def instances(self) -> list[tuple[str, int]]:
        """[(instance name, local ASN)]"""
        return [(r.name, r.local_asn) for r in list(self._running.values())]

    def peers(self) -> list[PeerView]:
        out = []
        for run in list(self._running.values()):
            for st in run.speaker.peers():
                out.append(PeerView(run.name, run.local_asn, run.neighbors.get(st.address), st))
        return out

    def sent(self, instance: str, address: str, family) -> dict:
        """{network: SentPath}: the paths the Established session sent (empty otherwise)."""
        run = self._running.get(instance)
        return run.speaker.adj_rib_out_sent(address, family) if run is not None else {}

    def received(self, instance: str, address: str, family) -> dict:
        """{network: PathAttributes} accepted from the peer (its Adj-RIB-In)."""
        run = self._running.get(instance)
        return run.speaker.adj_rib_in(address, family) if run is not None else {}


class NeighborReconciler:
    name = NAME

    def __init__(self, speaker_factory: Callable[[Any], Any], *, log=None, settle_seconds: float = 1.0):
        """``speaker_factory(instance)`` returns an un-started speaker for a BgpInstance."""
        self.speaker_factory = speaker_factory
        self.settle_seconds = settle_seconds
        self.running: dict[str, RunningInstance] = {}
        self.log = log
        # While True, new speakers hold End-of-RIB (the daemon's start-up while the datapath
        # loads: the VIPs are not in the table yet); release_end_of_rib() ends it.
        self.hold_end_of_rib = False

    def release_end_of_rib(self) -> None:
        """The table is complete (every programmed VIP is in it): End-of-RIB to the peers."""
        self.hold_end_of_rib = False
        for run in list(self.running.values()):
            release = getattr(run.speaker, "release_end_of_rib", None)
            if release is not None:
                release()

    async def apply(self, plan, errors: ErrorBook, now: float) -> None:
        await self.reconcile(plan.node_config, errors, now)

    def view(self) -> BgpView:
        return BgpView(self.running)

    async def reset_peer(self, instance: str, address: str, *, soft: bool = False) -> str:
        """``vipctl bgp reset``: an operator action on one session (hard or soft)."""
        return await self.running[instance].speaker.reset_neighbor(address, soft=soft)

    async def reconcile(self, node_config, errors: ErrorBook, now: float) -> None:
        desired = {inst.name: inst for inst in node_config.instances}
        self._adopt_renamed(desired)
        stopped_any = False
        for name in [n for n in self.running if n not in desired]:
            run = self.running[name]
            try:
                # The node is no longer selected (or the instance was deleted): Cease, peers withdraw.
                await run.speaker.stop(notify=True, message="BGP instance removed from configuration")
            except Exception as exc:  # noqa: BLE001 - the speaker is dropped either way
                self._log("warning", "speaker stop failed", instance=name, error=str(exc))
            del self.running[name]
            stopped_any = stopped_any or bool(run.neighbors)
            self._log("info", "instance removed", instance=name)
        errors.clear_missing(NAME, set(desired))
        if stopped_any and any(n not in self.running for n in desired):
            await self._settle()
        for inst in desired.values():
            try:
                await self._reconcile_instance(inst)
            except Exception as exc:  # noqa: BLE001 - recorded, retried with backoff
                rec = errors.record(NAME, inst.name, exc, now)
                self._log("error", "reconcile failed", instance=inst.name, error=rec.error,
                          attempts=rec.attempts)
            else:
                errors.clear(NAME, inst.name)

    async def _reconcile_instance(self, inst) -> None:
        identity = instance_identity(inst)
        run = self.running.get(inst.name)
        if run is not None and run.identity != identity:
            self._log("info", "instance identity changed; re-creating speaker", instance=inst.name,
                      old=run.identity, new=identity)
            del self.running[inst.name]
            await run.speaker.stop(notify=True, message="BGP instance configuration changed")
            run = None
            await self._settle()
        if run is None:
            speaker = self.speaker_factory(inst)
            if self.hold_end_of_rib:
                speaker.hold_end_of_rib = True
            try:
                await speaker.start()
            except BaseException:
                # e.g. localPort in use: release whatever it did bind; the retry starts afresh
                await speaker.stop(notify=False)
                raise
            run = RunningInstance(inst.name, identity, speaker, inst.local_asn)
            self.running[inst.name] = run
            self._log("info", "instance started", instance=inst.name, asn=inst.local_asn,
                      router_id=inst.router_id, listen_port=inst.local_port)
        # keyed by the speaker's canonical address (NeighborConfig normalises e.g. IPv6 case)
        desired = {cfg.address: cfg for cfg in (p.neighbor_config() for p in inst.peers)}
        for address in [a for a in run.neighbors if a not in desired]:
            await run.speaker.remove_neighbor(address, "Peer de-configured")
            del run.neighbors[address]
            self._log("info", "neighbor removed", instance=inst.name, peer=address)
        for address, cfg in desired.items():
            current = run.neighbors.get(address)
            if current == cfg:
                continue
            if current is None:
                await run.speaker.add_neighbor(cfg)
                self._log("info", "neighbor added", instance=inst.name, peer=address, peer_asn=cfg.peer_asn)
            elif current.peer_asn != cfg.peer_asn or current.port != cfg.port:
                # The neighbor's identity changed: delete + add, as Cilium does.
                await run.speaker.remove_neighbor(address, "Peer configuration changed")
                run.neighbors.pop(address, None)
                await run.speaker.add_neighbor(cfg)
                self._log("info", "neighbor re-created", instance=inst.name, peer=address)
            else:
                await run.speaker.update_neighbor(cfg)
                self._log("info", "neighbor updated", instance=inst.name, peer=address)
            run.neighbors[address] = cfg

    def _adopt_renamed(self, desired: dict) -> None:
        """A running instance whose name disappeared and a new instance with the same identity
        (ASN, router ID, port): the same BGP server under a new name, so keep the speaker and
        its sessions. Migrating a CiliumBGPPeeringPolicy to v2 resources then resets nothing."""
        orphans = {n: r for n, r in self.running.items() if n not in desired}
        for name, inst in desired.items():
            if name in self.running:
                continue
            match = next((n for n, r in orphans.items() if r.identity == instance_identity(inst)), None)
            if match is None:
                continue
            run = orphans.pop(match)
            del self.running[match]
            run.name = name
            self.running[name] = run
            self._log("info", "instance renamed; sessions kept", old=match, instance=name)

    async def _settle(self) -> None:
        # The peer needs a moment to clear a session we just ended with a Cease; connecting again
        # at once races with that and the retry would only come after connectRetryTime.
        if self.settle_seconds:
            await asyncio.sleep(self.settle_seconds)

    async def stop_all(self, *, graceful: bool) -> None:
        """Agent shutdown. ``graceful``: close TCP without NOTIFICATION (graceful restart: peers
        keep our routes for restartTime while the datapath keeps forwarding)."""
        for name, run in list(self.running.items()):
            try:
                if graceful:
                    await run.speaker.stop(notify=False)
                else:
                    await run.speaker.stop(notify=True, message="vipd shutting down")
            except Exception as exc:  # noqa: BLE001 - keep stopping the others
                self._log("warning", "speaker stop failed", instance=name, error=str(exc))
        self.running.clear()

    def _log(self, level: str, event: str, **kw) -> None:
        if self.log is not None:
            getattr(self.log, level)(event, reconciler=NAME, **kw)
