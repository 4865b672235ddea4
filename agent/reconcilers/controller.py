"""The controller: one pass = one pure plan, then each reconciler applies its part in order.

    store snapshot + host facts --plan()--> NodePlan (agent/controlplane/plan.py, no I/O)
      -> services     (datapath upserts, when enabled: a VIP is programmed before it is announced)
      -> neighbors    (speaker instances and peers)
      -> advertisements (Adj-RIB-Out per peer, withdraw before advertise; announce rule)
      -> services-delete (removed VIPs leave the datapath only after they were withdrawn)
      -> routes       (kernel routes, when enabled)
      -> state        (LB-IPAM allocations, ClusterConfig order -> state dir)
      -> status file, API and metrics render from the reconcilers' read-only views

Every reconciler has the same interface: ``name``, ``async apply(plan, errors, now)`` and
``view()``. Passes run on every new snapshot, on every change of the host facts (links,
addresses, default gateways) and when a failed reconciler's backoff expires. Each reconciler
records its own failures (:class:`ErrorBook`) and the pass goes on with the others;
everything is idempotent, so a retry pass only changes what still differs.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any, Callable

from agent.memory import trim_heap
from agent.reconcilers.advertisements import AdvertisementReconciler
from agent.reconcilers.errors import ErrorBook
from agent.reconcilers.neighbors import NeighborReconciler
from agent.reconcilers.state import (LBIPAM_FILE, ORDER_FILE, StateReconciler, atomic_write_yaml,  # noqa: F401
                                     dump_yaml, load_allocations)

__all__ = ["Controller", "ConditionClock", "atomic_write_yaml", "DurationHistogram"]

STATUS_FILE = "status.yaml"
STATUS_INTERVAL = 5.0  # Cilium pushes NodeConfig status every 5 s
PROGRAMMED_CONDITION = "vipd.io/DatapathProgrammed"   # Service condition (False: not announced)


class _Marks:
    """Seconds spent per phase of a pass (``vipd`` logs each pass; benchmarks read them)."""

    def __init__(self) -> None:
        self.t0 = self.last = time.monotonic()
        self.phases: dict[str, float] = {}

    def __call__(self, phase: str) -> float:
        now = time.monotonic()
        spent = now - self.last
        self.phases[phase] = round(spent, 3)
        self.last = now
        return spent

    def done(self) -> dict[str, float]:
        return {**self.phases, "total": round(time.monotonic() - self.t0, 3)}


class DurationHistogram:
    """``vipd_reconcile_duration_seconds{reconciler}``: cumulative bucket counts per name."""

    BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

    def __init__(self) -> None:
        self.series: dict[str, list] = {}   # name -> [bucket counts..., +Inf count, sum]

    def observe(self, name: str, seconds: float) -> None:
        s = self.series.get(name)
        if s is None:
            s = self.series[name] = [0] * (len(self.BUCKETS) + 1) + [0.0]
        for i, bound in enumerate(self.BUCKETS):
            if seconds <= bound:
                s[i] += 1
        s[len(self.BUCKETS)] += 1
        s[-1] += seconds

    def samples(self):
        """[(name, [(le, cumulative count)], sum)] in the shape prometheus_client takes."""
        out = []
        for name, s in sorted(self.series.items()):
            buckets = [(str(b), s[i]) for i, b in enumerate(self.BUCKETS)] + [("+Inf", s[len(self.BUCKETS)])]
            out.append((name, buckets, s[-1]))
        return out


class ConditionClock:
    """lastTransitionTime bookkeeping: the time a condition's status last changed."""

    def __init__(self, clock: Callable[[], float] = time.time):
        self.clock = clock
        self._seen: dict[tuple[str, str], tuple[str, float]] = {}

    def stamp(self, obj: str, cond) -> dict:
        d = cond.to_dict() if hasattr(cond, "to_dict") else dict(cond)
        key = (obj, d["type"])
        prev = self._seen.get(key)
        if prev is None or prev[0] != d["status"]:
            prev = (d["status"], self.clock())
            self._seen[key] = prev
        d["lastTransitionTime"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(prev[1]))
        return d


class Controller:
    def __init__(self, node_name: str, store, *, state_dir: str | Path, speaker_factory: Callable,
                 options=None, log=None, clock: Callable[[], float] = time.time, services=None,
                 host=None, routes=None, memo=None):
        from agent.controlplane.memo import Memo
        from agent.controlplane.types import AgentOptions, Family

        self.node_name = node_name
        self.store = store
        self.state_dir = Path(state_dir)
        self.options = options or AgentOptions()
        self.log = log
        self.clock = clock
        self.errors = ErrorBook()
        self.host = host                  # HostSource: links, addresses, gateways (None: unknown)
        self.state = StateReconciler(self.state_dir, log=log)
        self.routes = routes              # RouteReconciler: vipd's kernel routes (None: off)
        if routes is not None and routes.import_table is not None:
            speaker_factory = _with_rib_hook(speaker_factory, routes.rib_changed)
        self.neighbors = NeighborReconciler(speaker_factory, log=log)
        if routes is not None:
            routes.bgp = self.neighbors.view()
        self.services = services          # ServiceReconciler when the datapath is enabled
        self.advertisements = AdvertisementReconciler(
            self.neighbors, None, tuple(Family), log=log, clock=clock,
            ready=lambda: self.services.view() if self.services is not None else None)
        self.conditions = ConditionClock(clock)
        self.durations = DurationHistogram()
        self.started_at = clock()
        self.applied_generation = 0
        self.attempted_generation = -1
        self.attempted_host_generation = -1
        self.passes = 0
        self.plan = None                  # the NodePlan last applied (a read-only view itself)
        self._policies: list | None = None
        self._status_lock = asyncio.Lock()
        self.last_pass: dict[str, float] = {}
        self.memo = memo or Memo()   # per-Service results of unchanged objects, kept from pass to pass
        self._status_written: Any = None
        self._issues_logged: tuple = ()
        self._unprogrammed_seen: set[str] = set()
        self._entries: dict = {}   # status document: Service -> (condition, addresses, entry)
        self._condition_lists: dict[tuple, list] = {}   # see _shared_conditions
        self.last_plan_seconds = 0.0   # the last make_plan()'s duration
        self._planned_after = -1   # passes done when make_plan() last ran

    @property
    def reconcilers(self) -> list:
        """The effects in the order a pass applies them (see the module docstring)."""
        out: list = []
        if self.services is not None:
            out.append(self.services)
        out += [self.neighbors, self.advertisements]
        if self.services is not None:
            out.append(self.services.deletions)
        if self.routes is not None:
            out.append(self.routes)
        # last: announcing does not wait for a 20,000-entry file; a restart recomputes the same
        # allocations from the previous file and the objects (LB-IPAM is deterministic). Not
        # in the start-up pass while the datapath loads: it would take CPU from the loader,
        # and the next pass writes the same allocations.
        if not self._datapath_loading:
            out.append(self.state)
        return out

    @property
    def _datapath_loading(self) -> bool:
        return bool(getattr(self.services, "loading", False))

    def settings(self):
        from agent.controlplane.plan import DatapathSettings, PlanSettings

        dp = None
        if self.services is not None:
            dp = DatapathSettings(mode=self.services.mode, maglev_size=self.services.maglev_size)
        return PlanSettings(node_name=self.node_name, options=self.options, datapath=dp,
                            auto_direct_node_routes=bool(self.routes is not None
                                                         and self.routes.auto_direct_node_routes))

    # -- views of the last plan (read-only) -------------------------------------------------------
    @property
    def node_config(self):
        return self.plan.node_config if self.plan is not None else None

    @property
    def effective_objects(self):
        return self.plan.effective if self.plan is not None else None

    @property
    def objects(self):
        return self.plan.objects if self.plan is not None else None

    @property
    def lbipam(self):
        return self.plan.lbipam if self.plan is not None else None

    @property
    def allocations(self) -> dict[str, tuple[str, ...]]:
        """LB-IPAM allocations (as persisted in the state dir)."""
        return dict(self.state.view().allocations)

    @property
    def cluster_conditions(self) -> dict:
        return dict(self.plan.cluster_conditions) if self.plan is not None else {}

    @property
    def peer_conditions(self) -> dict:
        return dict(self.plan.peer_conditions) if self.plan is not None else {}

    # -- one pass -------------------------------------------------------------------------------
    def make_plan(self):
        """The pure step of a pass (no effects) for the store's snapshot and host facts now.
        The daemon runs the start-up one in a worker thread and hands it to
        :meth:`reconcile_once` (the datapath's map sizes come from the same plan)."""
        from agent.controlplane.plan import plan as make_plan

        snap = self.store.current
        state = self.state.view()
        t0 = time.monotonic()
        settings = self.settings()
        start_memo = self._load_start_memo(snap, state, settings) if self.plan is None else None
        plan = make_plan(self.store.objects(), self.host.facts if self.host is not None else None,
                         settings, self.plan, generation=snap.generation,
                         cluster_config_order=state.cluster_config_order, allocations=dict(state.allocations),
                         memo=self.memo, frontends_memo=self.services.memo if self.services is not None else None,
                         start_memo=start_memo)
        self.last_plan_seconds = time.monotonic() - t0
        self._planned_after = self.passes
        return plan

    def _load_start_memo(self, snap, state, settings):
        """The previous agent's memo of the first plan's costly parts, if made for exactly
        these inputs (agent.controlplane.startmemo); None: compute them."""
        from agent.controlplane import startmemo

        t0 = time.monotonic()
        digest = startmemo.inputs_digest(config_fingerprint=snap.fingerprint, kept=snap.kept,
                                         allocations=state.allocations,
                                         cluster_config_order=state.cluster_config_order, settings=settings)
        memo = startmemo.load(self.state_dir, digest)
        self._log("info", "start-up plan memo", used=memo is not None, seconds=round(time.monotonic() - t0, 3),
                  reason=None if memo is not None else ("not applicable" if digest is None
                                                        else "no memo for these inputs"))
        return memo

    def save_start_memo(self) -> bool:
        """Keep the applied plan's LB-IPAM result, frontends and paths for the next start
        (the daemon calls it when it stops), under the digest of the inputs that start will
        read: this plan's configuration and the state files as written. Nothing is kept
        (and an older memo is removed) when the plan is not a clean one for those inputs."""
        from agent.controlplane import startmemo

        plan, snap, state = self.plan, self.store.current, self.state.view()
        digest = None
        if (plan is not None and not plan.failures and plan.lbipam is not None
                and plan.generation == snap.generation and not plan.frontends_contested
                and plan.cluster_config_order == state.cluster_config_order
                and plan.lbipam.allocations == state.allocations):
            digest = startmemo.inputs_digest(config_fingerprint=snap.fingerprint, kept=snap.kept,
                                             allocations=state.allocations,
                                             cluster_config_order=state.cluster_config_order,
                                             settings=plan.settings)
        if digest is None:
            startmemo.discard(self.state_dir)
            return False
        paths = {**plan.path_states, **plan.next_paths}
        size = startmemo.save(self.state_dir, startmemo.PlanMemo(
            digest=digest, lbipam=plan.lbipam, frontends=plan.frontends, owners=plan.owners,
            contested=plan.frontends_contested, paths=paths))
        self._log("info", "start-up plan memo written", path=str(self.state_dir / startmemo.FILE), bytes=size)
        return True

    def sessions_config(self):
        """The node's BGP instances and peers alone (no Services, so no LB-IPAM and no
        frontends: milliseconds at 20,000 Services), for :meth:`start_sessions`. Pure."""
        from dataclasses import replace

        from agent.controlplane.nodeconfig import derive_node_config
        from agent.controlplane.ownership import order_cluster_configs
        from agent.controlplane.plan import _host_inputs

        objects, _ = order_cluster_configs(self.store.objects(), tuple(self.state.view().cluster_config_order))
        objects = replace(objects, services=())
        facts = self.host.facts if self.host is not None else None
        host_kw = {} if facts is None else _host_inputs(facts, objects.node(self.node_name))
        return derive_node_config(objects, self.node_name, self.options, **host_kw)

    async def start_sessions(self, node_config) -> None:
        """Start the BGP sessions before the first pass (the daemon, at start-up): the TCP and
        OPEN exchange then runs while the start-up plan is made. The first pass applies the
        full plan; the peers are the same, so it changes nothing here. Nothing is announced
        until that pass."""
        await self.neighbors.reconcile(node_config, self.errors, time.monotonic())

    async def reconcile_once(self, planned=None) -> None:
        """One pass. ``planned``: a plan from :meth:`make_plan` made since the last pass; used
        when the snapshot and host facts are still the ones it was made from."""
        snap = self.store.current
        now = time.monotonic()
        self.passes += 1
        mark = _Marks()
        self.attempted_generation = snap.generation
        facts = self.host.facts if self.host is not None else None
        if self.host is not None:
            self.attempted_host_generation = self.host.generation
        fresh = (planned is not None and self._planned_after == self.passes - 1
                 and planned.generation == snap.generation and planned.facts is facts)
        plan = planned if fresh else self.make_plan()
        mark("plan")
        mark.phases["plan"] = round(self.last_plan_seconds, 3)   # made here or ahead of the pass
        self.durations.observe("plan", self.last_plan_seconds)
        for part in ("lbipam", "node-config", "status"):   # the others: their reconcilers record them
            if part in plan.failures:
                self._record(part, "", plan.failures[part], now)
            else:
                self.errors.clear(part, "")
        if plan.node_config is None:
            await self._apply(self.state, plan, now, mark)   # allocations are still persisted
            return   # keep the running state; never tear down on a bug (the failure is recorded)
        self.plan, self._policies = plan, None
        if plan.issues != self._issues_logged:  # log each new set once, not every pass
            self._issues_logged = plan.issues
            for issue in plan.issues:
                self._log("warning" if issue.severity == "warning" else "error", "node config issue",
                          issue=str(issue))
        for rec in self.reconcilers:
            await self._apply(rec, plan, now, mark)
        self.memo.rotate()
        self.applied_generation = snap.generation
        self.last_pass = mark.done()
        # one line per pass (passes follow changes): its phases are the one-change timeline
        self._log("info", "reconcile pass", generation=snap.generation, **self.last_pass)
        if not self._datapath_loading:    # the pass after the datapath loaded writes it
            await self.write_status_async()

    async def _apply(self, reconciler, plan, now: float, mark: _Marks) -> None:
        await reconciler.apply(plan, self.errors, now)
        self.durations.observe(reconciler.name, mark(reconciler.name))

    def record_failed_pass(self, exc: BaseException) -> None:
        """A pass that raised (a bug or an effect failing outside the reconcilers): listed in
        vipctl status, the condition and the metrics, and retried with backoff."""
        self._record("controller", "", exc, time.monotonic())

    def _record(self, reconciler: str, instance: str, exc: BaseException | str, now: float) -> None:
        rec = self.errors.record(reconciler, instance, exc, now)
        self._log("error", "reconcile failed", reconciler=reconciler, instance=instance,
                  error=rec.error, attempts=rec.attempts,
                  **({"exc_info": exc} if isinstance(exc, BaseException) else {}))

    def _log(self, level: str, event: str, **kw) -> None:
        if self.log is not None:
            getattr(self.log, level)(event, **kw)

    # -- loop -----------------------------------------------------------------------------------
    async def run(self, stop: asyncio.Event) -> None:
        status_task = asyncio.create_task(self._status_loop(stop))
        side_tasks = [status_task]
        if self.routes is not None:
            side_tasks.append(asyncio.create_task(self.routes.run(stop, self.errors)))
        try:
            while not stop.is_set():
                generation = self.store.current.generation
                host_generation = self.host.generation if self.host is not None else -1
                retry_at = self.errors.next_retry()
                # Skip the pass only when the daemon's initial pass already covered this generation.
                if (generation != self.attempted_generation
                        or (self.host is not None and host_generation != self.attempted_host_generation)
                        or (retry_at is not None and retry_at <= time.monotonic())):
                    try:
                        await self.reconcile_once()
                        self.errors.clear("controller", "")
                    except Exception as exc:  # noqa: BLE001 - a bug in one pass must not stop the agent
                        self.record_failed_pass(exc)
                    # what the reload and the pass dropped goes back to the kernel before the
                    # next change piles on it (agent/memory.py; ~0-30 ms, off the loop)
                    await asyncio.to_thread(trim_heap)
                retry_at = self.errors.next_retry()
                timeout = None if retry_at is None else max(0.05, retry_at - time.monotonic())
                waiters = [asyncio.ensure_future(self.store.wait_for_change(generation)),
                           asyncio.ensure_future(stop.wait())]
                if self.host is not None:   # a gateway moved, an address came: reconcile
                    waiters.append(asyncio.ensure_future(self.host.wait_for_change(host_generation)))
                await asyncio.wait(waiters, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
                for w in waiters:
                    w.cancel()
        finally:
            for task in side_tasks:
                task.cancel()

    async def _status_loop(self, stop: asyncio.Event) -> None:
        # Peer states change without config changes; refresh the status file like Cilium's 5 s push.
        while not stop.is_set():
            await asyncio.sleep(STATUS_INTERVAL)
            try:
                await self.write_status_async()
            except Exception as exc:  # noqa: BLE001
                self._log("warning", "status write failed", error=str(exc))

    async def shutdown(self, *, graceful: bool = True) -> None:
        await self.neighbors.stop_all(graceful=graceful)

    # -- status ---------------------------------------------------------------------------------
    def peer_states(self) -> list:
        """[PeerView] of every running peer (the neighbors reconciler's view)."""
        return self.neighbors.view().peers()

    def reconcile_error_condition(self) -> dict:
        lines = sorted(f"{r.instance or self.node_name}: {r.reconciler}: {r.error}"
                       for r in self.errors.records())
        text = "\n".join(lines)[:32 * 1024]
        from agent.controlplane.types import Condition

        cond = Condition("cilium.io/BGPReconcileError", "True" if lines else "False",
                         "BGPReconcileError", text)
        return self.conditions.stamp("CiliumBGPNodeConfig/" + self.node_name, cond)

    def status_document(self) -> dict:
        from agent.controlplane import node_config_object, node_config_status

        snap = self.store.current
        doc: dict[str, Any] = {
            "node": self.node_name,
            "configDir": snap.source,
            "configGeneration": snap.generation,
            "appliedGeneration": self.applied_generation,
            "configErrors": [str(e) for e in snap.errors],
        }
        if self.node_config is not None:
            node_status: dict = {}
            try:
                node_status = node_config_status(self.node_config, [p.state for p in self.peer_states()],
                                                 self.errors.by_instance(), self.clock())
            except Exception as exc:  # noqa: BLE001 - status must not fail on a partial state
                node_status = {"error": str(exc)}
            node_status = dict(node_status)
            node_status["conditions"] = [self.reconcile_error_condition()]
            doc["ciliumBGPNodeConfig"] = {"spec": node_config_object(self.node_config).get("spec", {}),
                                          "status": node_status}
            doc["nodeConfigIssues"] = [str(i) for i in self.node_config.issues]
        elif self.errors:  # no pass got as far as a node config: the failure still has its condition
            doc["ciliumBGPNodeConfig"] = {"spec": {}, "status": {"conditions": [self.reconcile_error_condition()]}}
        doc["ciliumBGPClusterConfigs"] = {
            name: {"conditions": [self.conditions.stamp(f"CiliumBGPClusterConfig/{name}", c) for c in conds]}
            for name, conds in sorted(self.cluster_conditions.items())}
        doc["ciliumBGPPeerConfigs"] = {
            name: {"conditions": [self.conditions.stamp(f"CiliumBGPPeerConfig/{name}", c) for c in conds]}
            for name, conds in sorted(self.peer_conditions.items())}
        if self.lbipam is not None:
            doc["services"] = self._service_entries(self.lbipam)
        if self.services is not None:
            dp = self.services.view()
            # A Service the datapath could not program: withdrawn, with a False condition saying
            # why (only these are listed: 20,000 "True" entries would bury them). Once a Service
            # failed, its condition stays listed, True again when it is programmed.
            services = doc.setdefault("services", {})
            failing = dp.unprogrammed_services()
            existing = set(dp.owners.values())
            for key in sorted(set(failing) | (self._unprogrammed_seen & existing)):
                items = failing.get(key)
                if items:
                    cond = {"type": PROGRAMMED_CONDITION, "status": "False", "reason": items[0][1].reason,
                            "message": "not programmed in the datapath, VIP not announced: " + "; ".join(
                                f"{k}: {f.message}" for k, f in items)}
                else:
                    cond = {"type": PROGRAMMED_CONDITION, "status": "True", "reason": "Programmed",
                            "message": "every frontend is programmed in the datapath"}
                entry = services[key] = dict(services.get(key, {"conditions": []}))   # cached: copy
                entry["conditions"] = [*entry.get("conditions", []),
                                       self.conditions.stamp(f"Service/{key}", cond)]
            self._unprogrammed_seen |= set(failing)
            doc["datapath"] = {"capacity": dict(zip(
                ("maxServices", "maxBackends", "maxMemberships", "maglevSlots"),
                dp.capacity.astuple())), "reloads": dp.reloads,
                "unprogrammedFrontends": len(dp.failed)}
            if dp.maps is None:   # vipd started its sessions; no VIP is announced until this is over
                doc["datapath"]["loading"] = True
        if self.lbipam is not None:   # pools have conditions with or without a datapath
            doc["ciliumLoadBalancerIPPools"] = {
                name: {"conditions": [self.conditions.stamp(f"CiliumLoadBalancerIPPool/{name}", c)
                                      for c in conds]}
                for name, conds in sorted(self.lbipam.pool_conditions.items())}
        if self.host is not None and self.host.facts is not None:
            doc["host"] = {"defaultGateways": {g.family: f"{g.address} dev {g.dev}" for g in self.host.facts.gateways},
                           "ipv6Routers": self.host.facts.link_local_routers()}   # Unnumbered peers
        if self.routes is not None:
            doc["kernelRoutes"] = self.routes.view()
        doc["reconcileErrors"] = [
            {"reconciler": r.reconciler, "instance": r.instance, "error": r.error, "attempts": r.attempts}
            for r in self.errors.records()]
        return doc

    def _service_entries(self, lb) -> dict:
        """"namespace/name" -> {loadBalancerIngress, conditions} of the LB-IPAM Services. An
        entry whose condition object and addresses are those of the last call is reused (its
        lastTransitionTime cannot have moved): 20,000 entries cost a lookup each, not a stamp."""
        cache, fresh = self._entries, {}
        allocations = lb.allocations
        for key, cond in lb.service_conditions.items():
            ips = allocations.get(key, ())
            hit = cache.get(key)
            if hit is None or hit[0] is not cond or hit[1] != ips:
                hit = (cond, ips, {"loadBalancerIngress": list(ips),
                                   "conditions": self._shared_conditions(self.conditions.stamp(f"Service/{key}", cond))})
            fresh[key] = hit
        self._entries = fresh
        return {key: fresh[key][2] for key in sorted(fresh)}

    def _shared_conditions(self, stamped: dict) -> list:
        """``[stamped]``, or an equal list already in the document: 20,000 Services whose
        condition and transition time are the same share one (~7 MB less). Entries are
        never changed in place (status_document copies before adding a condition)."""
        key = tuple(stamped.items())
        try:
            shared = self._condition_lists.get(key)
        except TypeError:   # an unhashable value: not shared
            return [stamped]
        if shared is None:
            if len(self._condition_lists) >= 4096:
                self._condition_lists.clear()
            shared = self._condition_lists[key] = [stamped]
        return shared

    @property
    def policies(self) -> list:
        """Cilium's GoBGP route policies as data (``vipctl bgp route-policies``), computed on
        first use after each pass: at 20,000 Services they cost a second per peer."""
        if self._policies is None:
            try:
                self._policies = self.plan.policies() if self.plan is not None else []
            except Exception as exc:  # noqa: BLE001
                self._record("status", "", exc, time.monotonic())
                self._policies = []
        return self._policies

    def write_status(self) -> None:
        doc = self.status_document()
        if doc == self._status_written:
            return
        self.state_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_yaml(self.state_dir / STATUS_FILE, doc)
        self._status_written = doc

    async def write_status_async(self) -> None:
        """write_status with the file written by a worker thread: the event loop (BGP sessions,
        the updates just queued) is not held up by a large status file."""
        await asyncio.sleep(0)   # let the speakers send what this pass queued first
        doc = self.status_document()
        if doc == self._status_written:
            return
        async with self._status_lock:
            self.state_dir.mkdir(parents=True, exist_ok=True)
            await asyncio.to_thread(atomic_write_yaml, self.state_dir / STATUS_FILE, doc)
            self._status_written = doc


def _with_rib_hook(factory: Callable, hook: Callable[[], None]) -> Callable:
    """Every speaker the factory makes tells ``hook`` when its Adj-RIB-In changes."""
    def make(instance):
        speaker = factory(instance)
        speaker.on_rib_in_change = hook
        return speaker
    return make
