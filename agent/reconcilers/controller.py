"""The controller: one reconcile pass = the pure control plane, then each effect in order.

    snapshot (store) + host facts -> LB-IPAM allocation (persisted) -> node config derivation
      -> [services: upserts into the datapath, when enabled]
      -> neighbors (speaker instances/peers) -> advertisements (Adj-RIB-Out)
      -> [services: deletions] -> [kernel routes] -> route policies, conditions -> status YAML

Passes run on every new snapshot, on every change of the host facts (links, addresses,
default gateways) and when a failed reconciler's backoff expires. Each
reconciler records its own failures (:class:`ErrorBook`) and the pass goes on with the
others; everything is idempotent, so a retry pass only changes what still differs.
"""

from __future__ import annotations

import asyncio
import json
import os
import threading
import time
from pathlib import Path
from typing import Any, Callable

import yaml

from agent.reconcilers.advertisements import AdvertisementReconciler
from agent.reconcilers.errors import ErrorBook
from agent.reconcilers.neighbors import NeighborReconciler

__all__ = ["Controller", "ConditionClock", "atomic_write_yaml"]

STATUS_FILE = "status.yaml"
LBIPAM_FILE = "lbipam-allocations.yaml"
ORDER_FILE = "cluster-config-order.yaml"  # first-seen order of ClusterConfigs (see ownership.py)
STATUS_INTERVAL = 5.0  # Cilium pushes NodeConfig status every 5 s
PROGRAMMED_CONDITION = "vipd.io/DatapathProgrammed"   # Service condition (False: not announced)


LARGE_DOCUMENT = 2000   # entries: above this, write YAML's JSON form (a 20,000-Service status
                        # file takes ~0.1 s instead of ~7 s with PyYAML's emitter)


def dump_yaml(data: Any) -> str:
    """YAML text of ``data``: block style, or for large documents the JSON form (YAML is a
    superset of JSON: every YAML parser reads it, ``yaml.safe_load`` included)."""
    size = sum(len(v) for v in data.values() if isinstance(v, (dict, list))) if isinstance(data, dict) else 0
    if size > LARGE_DOCUMENT:
        return json.dumps(data, indent=1, ensure_ascii=False) + "\n"
    return yaml.dump(data, Dumper=getattr(yaml, "CSafeDumper", yaml.SafeDumper), sort_keys=False,
                     default_flow_style=False)


def atomic_write_yaml(path: Path, data: Any) -> None:
    """Write via a temp file + rename so readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    tmp.write_text(dump_yaml(data))
    os.replace(tmp, path)


def load_allocations(state_dir: Path) -> dict[str, tuple[str, ...]]:
    """The persisted LB-IPAM allocations ({} when there are none yet)."""
    path = Path(state_dir) / LBIPAM_FILE
    if not path.exists():
        return {}
    data = yaml.safe_load(path.read_text()) or {}
    return {k: tuple(v) for k, v in (data.get("allocations") or {}).items()}


SLOW_PASS_S = 0.5   # passes slower than this are logged with their phases


class _Marks:
    """Seconds spent per phase of a pass (``vipd`` logs slow passes; benchmarks read them)."""

    def __init__(self) -> None:
        self.t0 = self.last = time.monotonic()
        self.phases: dict[str, float] = {}

    def __call__(self, phase: str) -> None:
        now = time.monotonic()
        self.phases[phase] = round(now - self.last, 3)
        self.last = now

    def done(self) -> dict[str, float]:
        return {**self.phases, "total": round(time.monotonic() - self.t0, 3)}


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
        from agent.controlplane.types import AgentOptions, Family

        self.node_name = node_name
        self.store = store
        self.state_dir = Path(state_dir)
        self.options = options or AgentOptions()
        self.log = log
        self.clock = clock
        self.errors = ErrorBook()
        self.host = host                  # HostSource: links, addresses, gateways (None: unknown)
        self.routes = routes              # RouteReconciler: vipd's kernel routes (None: off)
        if routes is not None and routes.import_table is not None:
            speaker_factory = _with_rib_hook(speaker_factory, routes.rib_changed)
        self.neighbors = NeighborReconciler(speaker_factory, log=log)
        if routes is not None:
            routes.neighbors = self.neighbors
        self.advertisements = AdvertisementReconciler(self.neighbors, None, tuple(Family), log=log,
                                                      clock=clock)
        self.services = services          # ServiceReconciler when the datapath is enabled
        self.conditions = ConditionClock(clock)
        self.started_at = clock()
        self.applied_generation = 0
        self.attempted_generation = -1
        self.attempted_host_generation = -1
        self.passes = 0
        self.objects = None
        self.effective_objects = None
        self.node_config = None
        self.lbipam = None
        self._policies: list | None = []
        self._policy_inputs: tuple | None = None
        self._status_lock = asyncio.Lock()
        self.last_pass: dict[str, float] = {}
        from agent.controlplane.memo import Memo
        self.memo = memo or Memo()   # per-Service results of unchanged objects, kept from pass to pass
        self.cluster_conditions: dict = {}
        self.peer_conditions: dict = {}
        self.allocations: dict[str, tuple[str, ...]] = self._load_allocations()
        self.cluster_config_order: tuple[str, ...] = self._load_order()
        self._status_written: Any = None
        self._issues_logged: tuple = ()
        self._unprogrammed_seen: set[str] = set()

    # -- LB-IPAM persistence --------------------------------------------------------------------
    def _load_allocations(self) -> dict[str, tuple[str, ...]]:
        return load_allocations(self.state_dir)

    def _load_order(self) -> tuple[str, ...]:
        path = self.state_dir / ORDER_FILE
        if not path.exists():
            return ()
        data = yaml.safe_load(path.read_text()) or {}
        return tuple(str(n) for n in data.get("clusterConfigs") or ())

    def _ordered(self, objects):
        """ClusterConfigs in first-seen order (files have no creationTimestamp), persisted so
        a restart or a new config with an earlier name does not move a node to another one."""
        from agent.controlplane.ownership import order_cluster_configs

        objects, order = order_cluster_configs(objects, self.cluster_config_order)
        if order != self.cluster_config_order:
            atomic_write_yaml(self.state_dir / ORDER_FILE, {"clusterConfigs": list(order)})
            self.cluster_config_order = order
        return objects

    def _save_allocations(self) -> None:
        atomic_write_yaml(self.state_dir / LBIPAM_FILE,
                          {"allocations": {k: list(v) for k, v in sorted(self.allocations.items())}})

    # -- one pass -------------------------------------------------------------------------------
    async def reconcile_once(self) -> None:
        from agent.controlplane import (all_desired_paths, cluster_config_conditions,  # noqa: F401
                                        derive_node_config, desired_paths, effective_services,
                                        lbipam, peer_config_conditions, route_policies)

        snap = self.store.current
        objects = self._ordered(self.store.objects())
        now = time.monotonic()
        self.passes += 1
        mark = _Marks()
        self.attempted_generation = snap.generation
        facts = self.host.facts if self.host is not None else None
        if self.host is not None:
            self.attempted_host_generation = self.host.generation
        host_kw = {} if facts is None else _host_inputs(facts, objects.node(self.node_name))
        interfaces = facts.up_interfaces() if facts is not None else None

        try:
            lb = lbipam.allocate(objects, self.allocations, self.memo)
            if dict(lb.allocations) != self.allocations:
                self.allocations = {k: tuple(v) for k, v in lb.allocations.items()}
                self._save_allocations()
            self.lbipam = lb
            self.errors.clear("lbipam", "")
        except Exception as exc:  # noqa: BLE001
            self._record("lbipam", "", exc, now)
            lb = self.lbipam
        effective = effective_services(objects, lb, self.memo) if lb is not None else objects
        mark("lbipam")

        try:
            node_config = derive_node_config(effective, self.node_name, self.options, **host_kw)
            self.errors.clear("node-config", "")
        except Exception as exc:  # noqa: BLE001 - keep the running state; never tear down on a bug
            self._record("node-config", "", exc, now)
            return
        self.objects, self.effective_objects, self.node_config = objects, effective, node_config
        if node_config.issues != self._issues_logged:  # log each new set once, not every pass
            self._issues_logged = node_config.issues
            for issue in node_config.issues:
                self._log("warning" if issue.severity == "warning" else "error", "node config issue",
                          issue=str(issue))

        if self.services is not None:  # program new/changed VIPs before announcing them
            await self.services.reconcile(effective, self.errors, now, phase="upsert")
            mark("services")
        await self.neighbors.reconcile(node_config, self.errors, now)

        # The announce rule: with the datapath, a Service address is announced only while every
        # desired frontend at it is programmed (ServiceReconciler.vip_ready). ``effective``
        # already carries the LB-IPAM addresses, so lbipam=None spares a second copy of every
        # Service per peer.
        vip_ready = self.services.vip_ready if self.services is not None else None

        def desired(inst, peer):
            return desired_paths(effective, self.node_name, inst, peer, None, self.options, interfaces,
                                 vip_ready=vip_ready, memo=self.memo)

        await self.advertisements.reconcile(node_config, self.errors, now, desired_paths=desired)
        mark("advertisements")
        self.memo.rotate()
        if self.services is not None:  # drop removed VIPs only after they were withdrawn
            await self.services.reconcile(effective, self.errors, now, phase="delete")
        if self.routes is not None:
            await self.routes.reconcile(effective, facts, self.errors, now)
            mark("routes")

        try:
            # route policies are for `vipctl bgp route-policies` only: computed when asked
            self._policy_inputs, self._policies = (effective, node_config, interfaces), None
            self.cluster_conditions = cluster_config_conditions(effective, self.options)
            self.peer_conditions = peer_config_conditions(effective, self.options)
            self.errors.clear("status", "")
        except Exception as exc:  # noqa: BLE001
            self._record("status", "", exc, now)
        self.applied_generation = snap.generation
        mark("rest")
        self.last_pass = mark.done()
        if self.last_pass["total"] > SLOW_PASS_S:
            self._log("info", "reconcile pass", generation=snap.generation, **self.last_pass)
        await self.write_status_async()

    def record_failed_pass(self, exc: BaseException) -> None:
        """A pass that raised (a bug or an effect failing outside the reconcilers): listed in
        vipctl status, the condition and the metrics, and retried with backoff."""
        self._record("controller", "", exc, time.monotonic())

    def _record(self, reconciler: str, instance: str, exc: BaseException, now: float) -> None:
        rec = self.errors.record(reconciler, instance, exc, now)
        self._log("error", "reconcile failed", reconciler=reconciler, instance=instance,
                  error=rec.error, attempts=rec.attempts, exc_info=exc)

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
    def peer_states(self) -> list[tuple[Any, Any]]:
        """[(RunningInstance, PeerState)] for every running peer."""
        out = []
        for run in self.neighbors.running.values():
            for st in run.speaker.peers():
                out.append((run, st))
        return out

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
                node_status = node_config_status(self.node_config, [s for _, s in self.peer_states()],
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
            doc["services"] = {
                key: {"loadBalancerIngress": list(self.lbipam.allocations.get(key, ())),
                      "conditions": [self.conditions.stamp(f"Service/{key}", cond)]}
                for key, cond in sorted(self.lbipam.service_conditions.items())}
        if self.services is not None:
            # A Service the datapath could not program: withdrawn, with a False condition saying
            # why (only these are listed: 20,000 "True" entries would bury them). Once a Service
            # failed, its condition stays listed, True again when it is programmed.
            services = doc.setdefault("services", {})
            failing = self.services.unprogrammed_services()
            existing = set(self.services.owners.values())
            for key in sorted(set(failing) | (self._unprogrammed_seen & existing)):
                items = failing.get(key)
                if items:
                    cond = {"type": PROGRAMMED_CONDITION, "status": "False", "reason": items[0][1].reason,
                            "message": "not programmed in the datapath, VIP not announced: " + "; ".join(
                                f"{k}: {f.message}" for k, f in items)}
                else:
                    cond = {"type": PROGRAMMED_CONDITION, "status": "True", "reason": "Programmed",
                            "message": "every frontend is programmed in the datapath"}
                entry = services.setdefault(key, {"conditions": []})
                entry["conditions"] = [*entry.get("conditions", []),
                                       self.conditions.stamp(f"Service/{key}", cond)]
            self._unprogrammed_seen |= set(failing)
            doc["datapath"] = {"capacity": dict(zip(
                ("maxServices", "maxBackends", "maxMemberships", "maglevSlots"),
                self.services.dp.capacity.astuple())), "reloads": self.services.dp.reloads,
                "unprogrammedFrontends": len(self.services.failed)}
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

    @property
    def policies(self) -> list:
        """Cilium's GoBGP route policies as data (``vipctl bgp route-policies``), computed on
        first use after each pass: at 20,000 Services they cost a second per peer."""
        if self._policies is None:
            from agent.controlplane import route_policies
            effective, node_config, interfaces = self._policy_inputs
            try:
                self._policies = list(route_policies(effective, node_config, None, self.options, interfaces))
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
        doc = self.status_document()
        if doc == self._status_written:
            return
        async with self._status_lock:
            await asyncio.sleep(0)   # let the speakers send what this pass queued first
            self.state_dir.mkdir(parents=True, exist_ok=True)
            await asyncio.to_thread(atomic_write_yaml, self.state_dir / STATUS_FILE, doc)
            self._status_written = doc


def _host_inputs(facts, node) -> dict:
    """What derive_node_config takes from the host (see agent.sources.host)."""
    node_addresses = (node.addresses(4) + node.addresses(6)) if node is not None else []
    return {"interfaces": facts.interfaces(), "default_gateways": facts.default_gateways(),
            "router_id_mac": facts.router_id_mac(node_addresses),
            "ipv6_routers": facts.link_local_routers()}


def _with_rib_hook(factory: Callable, hook: Callable[[], None]) -> Callable:
    """Every speaker the factory makes tells ``hook`` when its Adj-RIB-In changes."""
    def make(instance):
        speaker = factory(instance)
        speaker.on_rib_in_change = hook
        return speaker
    return make
