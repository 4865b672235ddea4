"""Services -> the eBPF datapath (opt-in: ``vipd run --lb-interface IFACE``).

``desired_services`` is pure: Service + EndpointSlice objects (with LB-IPAM addresses already
in ``status.loadBalancer.ingress``) -> one datapath ``Service`` per frontend address x port:

* frontends: clusterIP(s) (internalTrafficPolicy), ``spec.externalIPs`` and, for type
  LoadBalancer, the ingress IPs (externalTrafficPolicy); ExternalName services have none;
* backends from the service's EndpointSlices: ready and not terminating endpoints get new
  flows; serving-but-terminating ones keep their established flows only; ``local`` when the
  endpoint's nodeName is this node; the port is the slice port with the service port's name
  (else a numeric targetPort);
* only TCP and UDP (SCTP is not in the datapath); backends of the frontend's IP family;
* ``sessionAffinity: ClientIP`` -> ``affinity_timeout`` (timeoutSeconds) on every frontend;
* ``loadBalancerSourceRanges`` (or the legacy annotation) -> ``source_ranges`` on the
  LoadBalancer ingress frontends only, as in Kubernetes: ClusterIP and externalIPs stay open.
  Each frontend is its own datapath service, so each gets the ranges of its own family; a
  frontend whose family has no range admits nobody (see ``_ranges_for``).

``ServiceReconciler`` diffs that against what the maps program (``Datapath.services()``, which
also works after adopting pinned maps from a previous agent), deletes first, then upserts what
differs; the datapath writes only changed slots. The datapath is synchronous, so this runs in a
worker thread.

Capacity and failures (docs/datapath.md "Capacity and growth"): before upserting, the maps are
grown when the desired services need more room (``plan_capacity``; a reload that keeps flows).
Each frontend is programmed on its own: one that fails (maps full and growth failed, more
backends than its Maglev table has slots, a kernel error) is recorded with a reason and the
others go on. ``blocked_vips`` is the rule the advertisement reconciler applies: an address
with a desired frontend that is not programmed is not announced.
"""

from __future__ import annotations

import asyncio
from types import MappingProxyType
from typing import Any

from agent.controlplane.frontends import (  # noqa: F401 - the pure half (agent.controlplane), re-exported
    CAPACITY, DATAPATH_ERROR, MAGLEV_TOO_SMALL, FrontendFailure, _canonical, blocked_vips, check_service,
    desired_services)
from agent.datapath.objcache import FROM_ENV
from agent.reconcilers.errors import ErrorBook

__all__ = ["desired_services", "ServiceReconciler", "FrontendFailure", "blocked_vips", "check_service"]

NAME = "services"


class ServiceReconciler:
    name = NAME

    def __init__(self, datapath, node_name: str, *, mode: str = "snat", log=None, maglev_size=None,
                 map_max: int | None = None, memo=None):
        self.dp = datapath
        self.map_max = map_max                      # --bpf-lb-map-max: frontends / backends ceiling
        self.node_name = node_name
        self.mode = mode
        self.log = log
        self.maglev_size = maglev_size
        self.last: dict = {}
        self.owners: dict = {}                      # ServiceKey -> "namespace/name"
        self.failed: dict = {}                      # ServiceKey -> FrontendFailure (desired, not programmed)
        # VIP addresses not to announce (None: only programmed ones go, see vip_ready). While the
        # datapath is still loading (``datapath`` None, see ``attach``) nothing is programmed.
        self.blocked: frozenset | None = frozenset() if datapath is not None else None
        self.programmed_vips: frozenset = frozenset()
        self.failure_counts: dict[str, int] = {}    # reason -> frontends that entered failure (metric)
        self.growth_error: str | None = None
        self.delete_failed: dict[str, str] = {}     # frontend -> error of a removal that failed
        from agent.controlplane.memo import Memo
        self.memo = memo or Memo()                  # frontends of unchanged Services
        self._last_objects = None
        self._keys_after_upsert = None              # frontends programmed before this pass's upserts
        self.deletions = ServiceDeletions(self)

    @property
    def loading(self) -> bool:
        """The datapath is still being loaded: no VIP is programmed, none is announced."""
        return self.dp is None

    def attach(self, datapath) -> None:
        """The datapath finished loading (the daemon starts the BGP sessions before that, so
        Pod CIDRs are announced at once): the next pass programs and announces the VIPs."""
        self.dp = datapath

    def vip_ready(self, address: str) -> bool:
        """The announce rule: False while a desired frontend at ``address`` is not programmed.
        After a pass that could not even compute what is desired, only addresses the maps
        program are ready."""
        address = _canonical(address)
        if self.blocked is None:
            return address in self.programmed_vips
        return address not in self.blocked

    def unprogrammed_services(self) -> dict[str, list[FrontendFailure]]:
        """"namespace/name" -> failures of its frontends (the status condition, vipctl, metric)."""
        out: dict[str, list] = {}
        for key, f in sorted(self.failed.items(), key=lambda kv: str(kv[0])):
            out.setdefault(f.service or str(key.vip), []).append((key, f))
        return out

    async def apply(self, plan, errors: ErrorBook, now: float) -> None:
        """The controller's pass, before the BGP reconcilers: program new and changed frontends
        (a VIP is programmed before it is announced). ``deletions`` runs after them."""
        await self._program(plan.frontends, plan.owners, plan.failures.get(NAME), errors, now, "upsert")

    def view(self) -> "DatapathView":
        return DatapathView(self)

    async def reconcile(self, objects, errors: ErrorBook, now: float, *, phase: str = "all") -> None:
        """Desired frontends computed from ``objects`` here (tools and tests; the daemon goes
        through the plan). ``phase``: "upsert", "delete" or "all"."""
        if phase == "delete" and objects is self._last_objects:
            desired, owners, why = self.last, self.owners, None    # the same pass's upsert computed it
        else:
            owners, why = {}, None
            try:
                desired = desired_services(objects, self.node_name, mode=self.mode,
                                           maglev_size=self.maglev_size, owners=owners, memo=self.memo)
            except Exception as exc:  # noqa: BLE001 - reported below
                desired, why = None, str(exc) or type(exc).__name__
            self.memo.rotate()
        self._last_objects = objects if desired is not None else None
        await self._program(desired, owners, why, errors, now, phase)

    async def _program(self, desired, owners, why: str | None, errors: ErrorBook, now: float,
                       phase: str) -> None:
        """``desired``: ServiceKey -> datapath Service (None: could not be computed, ``why``)."""
        if self.dp is None:       # still loading: nothing programmed, nothing announced
            return
        try:
            if desired is None:
                raise RuntimeError(f"desired services not computed: {why}")
            changed, failed = await asyncio.to_thread(self._apply, desired, phase)
        except Exception as exc:  # noqa: BLE001 - recorded, retried with backoff
            self._last_objects = None
            rec = errors.record(NAME, "", exc, now)
            if self.log is not None:
                self.log.error("reconcile failed", reconciler=NAME, error=rec.error, attempts=rec.attempts)
            if phase in ("all", "upsert"):   # what is desired is unknown: announce only what is programmed
                try:
                    self.programmed_vips = frozenset(str(k.vip) for k in self.dp.services())
                except Exception:  # noqa: BLE001
                    self.programmed_vips = frozenset()
                self.blocked = None
            return
        errors.clear(NAME, "")
        if phase in ("all", "delete"):  # a removed frontend still in the datapath: retried, visible
            if self.delete_failed:
                errors.record(NAME, "delete", "removed frontends still programmed: " + "; ".join(
                    f"{k}: {e}" for k, e in sorted(self.delete_failed.items())), now)
            else:
                errors.clear(NAME, "delete")
        self.last, self.owners = desired, owners
        if phase in ("all", "upsert"):
            failed = {k: FrontendFailure(owners.get(k, ""), f.reason, f.message) for k, f in failed.items()}
            self._report(failed, errors, now)
            self.failed = failed
            self.blocked = blocked_vips(desired, failed)
        if changed and self.log is not None:
            self.log.info("services programmed", reconciler=NAME, deleted=changed[0], upserted=changed[1],
                          services=len(desired), failed=len(self.failed))

    def _report(self, failed: dict, errors: ErrorBook, now: float) -> None:
        """Errors per Service in the ErrorBook (vipctl status, the node condition, the retry
        backoff); a log line and a counter per change, not per pass."""
        by_service: dict[str, list] = {}
        for key, f in failed.items():
            by_service.setdefault(f.service or str(key.vip), []).append((key, f))
        old_services = {f.service or str(k.vip) for k, f in self.failed.items()}
        for svc, items in by_service.items():
            text = "; ".join(f"{k}: {f.reason}: {f.message}" for k, f in sorted(items, key=lambda kv: str(kv[0])))
            errors.record(NAME, f"Service/{svc}", f"not programmed, not announced: {text}", now)
        for svc in old_services - set(by_service):
            errors.clear(NAME, f"Service/{svc}")
        for key, f in failed.items():
            prev = self.failed.get(key)
            if prev is None or prev.reason != f.reason:
                self.failure_counts[f.reason] = self.failure_counts.get(f.reason, 0) + 1
            if prev != f and self.log is not None:
                self.log.error("service not programmed; its VIP is not announced", reconciler=NAME,
                               service=f.service, frontend=str(key), reason=f.reason, error=f.message)
        for key in set(self.failed) - set(failed):
            if self.log is not None:
                self.log.info("service programmed again; its VIP may be announced", reconciler=NAME,
                              service=self.failed[key].service, frontend=str(key))

    def _apply(self, desired: dict, phase: str = "all"):
        """-> ((deleted, upserted) or None, {ServiceKey: FrontendFailure} of desired frontends
        that are not programmed as desired)."""
        from agent.datapath.api import CapacityError
        from agent.datapath.capacity import plan_capacity

        if phase == "delete" and self._keys_after_upsert is not None:
            # the same pass's upsert read the maps a moment ago and only added to them: its
            # keys are what may need deleting (reading 20,000 frontends back twice cost ~0.2 s)
            current = dict.fromkeys(self._keys_after_upsert)
        else:
            current = self.dp.services()
        self._keys_after_upsert = None
        deleted = upserted = 0
        failed: dict = {}
        delete_failed: dict[str, str] = {}
        if phase in ("all", "delete"):
            for key in [k for k in current if k not in desired]:
                try:
                    self.dp.delete_service(key)
                    deleted += 1
                except Exception as exc:  # noqa: BLE001 - one frontend must not stop the others
                    delete_failed[str(key)] = str(exc)
                    if self.log is not None:
                        self.log.error("service delete failed", reconciler=NAME, frontend=str(key), error=str(exc))
        if phase in ("all", "upsert"):
            todo = {}
            for key, svc in desired.items():
                refused = check_service(svc)
                if refused is not None:
                    failed[key] = refused
                else:
                    cur = current.get(key)
                    if cur is not svc and cur != svc:   # the memo hands back the very object
                        todo[key] = svc
            ok = {k: s for k, s in desired.items() if k not in failed}
            self._grow(plan_capacity(ok.values(), self.dp.capacity))
            retry = {}
            try:   # one batch of map writes for all of them (the first pass: 20,000 frontends)
                errors = self.dp.upsert_services(todo.values())
            except Exception as exc:  # noqa: BLE001 - the batch itself failed: every frontend says why
                errors = {key: exc for key in todo}
            upserted += len(todo) - len(errors)
            for key, exc in errors.items():
                if isinstance(exc, CapacityError):
                    retry[key] = (todo[key], exc)
                else:
                    failed[key] = FrontendFailure("", DATAPATH_ERROR, str(exc))
            if retry:   # full although the plan said it fits (fragmented slots): double and retry
                cap = self.dp.capacity
                whats = {exc.what for _, exc in retry.values()}
                bigger = cap.__class__(*(v * 2 if f in whats else v for f, v in zip(
                    ("services", "backends", "memberships", "maglev_slots"), cap.astuple())))
                self._grow(bigger)
                for key, (svc, exc) in retry.items():
                    try:
                        self.dp.upsert_service(svc)
                        upserted += 1
                    except Exception as exc2:  # noqa: BLE001
                        reason = CAPACITY if isinstance(exc2, CapacityError) else DATAPATH_ERROR
                        msg = str(exc2) + (f" (growth failed: {self.growth_error})" if self.growth_error else "")
                        failed[key] = FrontendFailure("", reason, msg)
        changed = (deleted, upserted) if deleted or upserted else None
        if phase == "upsert":
            self._keys_after_upsert = current.keys()
        if phase in ("all", "delete"):
            self.delete_failed = delete_failed
        return changed, failed

    def _grow(self, capacity) -> None:
        capacity = clamp(capacity, self.map_max)
        if self.dp.capacity.covers(capacity):
            return
        try:
            self.dp.grow(capacity)
            self.growth_error = None
            if self.log is not None:
                self.log.info("datapath maps grown", reconciler=NAME, capacity=str(self.dp.capacity))
        except Exception as exc:  # noqa: BLE001 - the frontends that do not fit are reported
            self.growth_error = str(exc)
            if self.log is not None:
                self.log.error("datapath growth failed", reconciler=NAME, error=str(exc),
                               wanted=str(capacity))


class ServiceDeletions:
    """The services reconciler's second step in a pass, after the BGP reconcilers: frontends
    no longer desired leave the datapath only once their VIPs were withdrawn."""

    name = "services-delete"

    def __init__(self, services: ServiceReconciler):
        self.services = services

    async def apply(self, plan, errors: ErrorBook, now: float) -> None:
        s = self.services
        await s._program(plan.frontends, plan.owners, plan.failures.get(NAME), errors, now, "delete")

    def view(self) -> "DatapathView":
        return self.services.view()


class DatapathView:
    """Read-only view of the services reconciler and its datapath: the announce rule
    (``vip_ready``), which Service claims each frontend, what is not programmed and why, the
    maps' capacity and counters. ``maps`` is the Datapath for *reading* (agent.datapath.inspect)."""

    def __init__(self, rec: ServiceReconciler):
        self._rec = rec
        self.vip_ready = rec.vip_ready
        self.blocked = rec.blocked        # addresses held back (None: unknown, only programmed ones go)
        self.owners = MappingProxyType(rec.owners)          # ServiceKey -> "namespace/name"
        self.failed = MappingProxyType(rec.failed)          # ServiceKey -> FrontendFailure
        self.failure_counts = MappingProxyType(rec.failure_counts)
        self.maps = rec.dp                # None while the datapath is loading
        self.loading = rec.dp is None

    def unprogrammed_services(self) -> dict[str, list]:
        return self._rec.unprogrammed_services()

    @property
    def capacity(self):
        if self.maps is None:
            from agent.datapath.capacity import Capacity
            return Capacity(0, 0, 0, 0)
        return self.maps.capacity

    @property
    def reloads(self) -> int:
        return self.maps.reloads if self.maps is not None else 0

    @property
    def maglev_builds(self) -> int:
        return getattr(self.maps, "maglev_builds", 0)

    @property
    def map_writes(self) -> int:
        """Map entries and Maglev slots this process wrote or deleted (0 after a restart that
        found the pinned maps programmed as configured)."""
        return getattr(self.maps, "entries_written", 0)


def clamp(capacity, map_max: int | None):
    """``--bpf-lb-map-max``: at most ``map_max`` frontends and backends (ids 1..map_max)."""
    if map_max is None:
        return capacity
    return capacity.__class__(min(capacity.max_services, map_max + 1),
                              min(capacity.max_backends, map_max + 1),
                              capacity.max_memberships, capacity.maglev_slots)


def plan_for(objects, node_name: str, *, mode: str = "snat", maglev_size=None, map_max: int | None = None,
             memo=None, current=None):
    """The Capacity the datapath should be created with for these (effective) objects.
    ``memo``: the ServiceReconciler's, so its first pass reuses the frontends planned here.
    ``current``: the capacity of maps already pinned (a restart): kept when it suffices."""
    desired = desired_services(objects, node_name, mode=mode, maglev_size=maglev_size, memo=memo)
    return capacity_for(desired, map_max=map_max, current=current)


def capacity_for(desired: dict, *, map_max: int | None = None, current=None):
    """The Capacity for ``desired`` frontends (a plan's ``frontends``); see :func:`plan_for`."""
    from agent.datapath.capacity import plan_capacity
    return clamp(plan_capacity((s for s in desired.values() if check_service(s) is None), current), map_max)


def start_datapath_loader(node_name: str, *, pin_root: str, bpf_cache=FROM_ENV):
    """Start getting the BPF programs now: from ``bpf_cache`` (a ProgramCache) or compiled in
    a child process (agent/datapath/child.py); ``open_datapath(..., loader=)`` finishes the
    load once the map sizes are planned."""
    from agent.datapath.api import Datapath

    return Datapath(instance=node_name, pin_root=pin_root, bpf_cache=bpf_cache).start_loading()


def open_datapath(node, node_name: str, interfaces: list[str], *, pin_root: str, log=None,
                  capacity=None, loader=None, bpf_cache=FROM_ENV) -> Any:
    """Load (or adopt) the datapath and attach it to the uplinks (:func:`load_datapath`, then
    :func:`attach_datapath`). Synchronous."""
    dp = load_datapath(node_name, pin_root=pin_root, capacity=capacity, loader=loader, bpf_cache=bpf_cache)
    attach_datapath(dp, node, interfaces, log=log)
    return dp


def load_datapath(node_name: str, *, pin_root: str, capacity=None, loader=None, bpf_cache=FROM_ENV) -> Any:
    """Load the programs and create (or adopt the pinned) maps; attaches nothing, reads no
    configuration, so a restart runs it while the configuration is still being read.
    ``capacity``: the sized maps are created (or grown) to at least this (``plan_for``).
    ``loader``: a child from ``start_datapath_loader`` (compiling since then). ``bpf_cache``:
    where compiled programs are kept (a ProgramCache; None: none; default $VIPD_BPF_CACHE_DIR)."""
    from agent.datapath.api import Datapath

    dp = Datapath(instance=node_name, pin_root=pin_root, bpf_cache=bpf_cache)
    dp.load(capacity=capacity, child=loader)
    return dp


def attach_datapath(dp, node, interfaces: list[str], *, log=None) -> None:
    """Give the loaded datapath this node's addresses and attach it to the uplinks: XDP for
    services and SNAT replies, tc ingress/egress for DSR and local-backend replies."""
    v4 = node.addresses(4) if node is not None else []
    v6 = node.addresses(6) if node is not None else []
    dp.set_node_addresses(v4=v4[0] if v4 else None, v6=v6[0] if v6 else None)
    for ifname in interfaces:
        dp.attach_xdp(ifname, mode="native")
        dp.attach_tc(ifname, "ingress")
        dp.attach_tc(ifname, "egress")
        if log is not None:
            log.info("datapath attached", interface=ifname, v4=v4[:1], v6=v6[:1])
