"""One pure step from inputs to everything the effects need: ``plan() -> NodePlan``.

    plan(objects, host facts, settings, previous plan, memos) -> NodePlan
        ClusterConfigs in first-seen order -> LB-IPAM allocations -> effective Services
        -> node config (instances, peers, issues) -> datapath frontends -> kernel routes
        -> conditions

No I/O, no clock, no event loop: the controller calls it once per pass and hands the result
to the reconcilers (agent/reconcilers), each of which owns one effect. A part that raises is
reported in ``NodePlan.failures`` (part -> message) and, where the previous pass had a
result, that result is kept (LB-IPAM, kernel routes), so a bug never tears down what runs.

Desired BGP paths depend on one effect's outcome, the announce rule (a VIP is announced only
while the datapath programs it): :meth:`NodePlan.paths` takes the datapath's ready set and
is itself pure. ``memo`` (agent.controlplane.memo.Memo) keeps per-object results of earlier
passes, so one changed Service costs little at 20,000; see :mod:`agent.controlplane.memo`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

from agent.controlplane.types import AgentOptions, LbIpamResult, NodeConfigResult

__all__ = ["PlanSettings", "DatapathSettings", "NodePlan", "plan"]


@dataclass(frozen=True)
class DatapathSettings:
    """``vipd run --lb-interface``'s flags that shape the frontends."""

    mode: str = "snat"
    maglev_size: Any = None     # agent.datapath.capacity.MaglevSize (None: auto)


@dataclass(frozen=True)
class PlanSettings:
    """What the agent's flags fix for the life of the process."""

    node_name: str
    options: AgentOptions = AgentOptions()
    datapath: DatapathSettings | None = None     # None: no eBPF datapath on this node
    auto_direct_node_routes: bool = False


@dataclass(frozen=True, eq=False)
class NodePlan:
    """The desired state of this node for one (config generation, host facts) pair.

    Immutable by convention: the mappings are built fresh by :func:`plan` and never changed
    afterwards; the reconcilers only read them."""

    settings: PlanSettings
    generation: int
    objects: Any                                  # ObjectSet, ClusterConfigs oldest first
    cluster_config_order: tuple[str, ...]         # first-seen order to persist
    lbipam: LbIpamResult | None                   # None: no allocation yet
    effective: Any                                # ObjectSet with LB-IPAM addresses in Services
    node_config: NodeConfigResult | None          # None: derivation failed (see failures)
    facts: Any = None                             # HostFacts the plan was made from (None: unknown)
    interfaces: Mapping[str, list[str]] | None = None  # up interfaces -> addresses (Interface adverts)
    frontends: Mapping | None = None              # ServiceKey -> datapath Service (None: not computed)
    owners: Mapping = field(default_factory=dict)  # ServiceKey -> "namespace/name"
    direct_routes: tuple | None = None            # autoDirectNodeRoutes (None: keep the last good set)
    cluster_conditions: Mapping = field(default_factory=dict)
    peer_conditions: Mapping = field(default_factory=dict)
    failures: Mapping[str, str] = field(default_factory=dict)   # part -> what went wrong
    memo: Any = None
    # Services ("namespace/name" -> object now, None: gone) whose effective object or
    # EndpointSlices differ from the previous plan's (None: no previous plan)
    changed_services: Mapping | None = None
    previous_paths: Mapping | None = None          # the previous plan's path_states
    frontends_contested: bool = False              # a frontend claimed by two Services (age decides)
    path_states: dict = field(default_factory=dict)  # (instance, peer) -> PeerPaths, filled by paths()
    # (instance, peer) -> PeerPaths the next plan starts from instead of path_states (see
    # anticipate_paths)
    next_paths: dict = field(default_factory=dict)
    # (instance, peer) -> PeerPaths from the start-up memo (agent.controlplane.startmemo), used
    # by anticipate_paths when they were built from the same inputs
    stored_paths: Mapping = field(default_factory=dict)
    from_memo: bool = False                        # LB-IPAM and frontends came from the memo

    @property
    def allocations(self) -> dict[str, tuple[str, ...]]:
        return dict(self.lbipam.allocations) if self.lbipam is not None else {}

    @property
    def issues(self) -> tuple:
        return self.node_config.issues if self.node_config is not None else ()

    def paths(self, instance, peer, vip_ready: Callable[[str], bool] | None = None,
              ready_token: Any = ()) -> dict:
        """Desired Adj-RIB-Out of one peer: {Family: {prefix: PathAttributes}}. ``vip_ready``:
        the datapath's announce rule (None: no datapath, every address is ready);
        ``ready_token``: a value equal from pass to pass exactly while ``vip_ready`` answers
        the same (the set of held-back addresses). Redoes only the changed Services' part of
        the previous plan's paths when nothing else changed."""
        from agent.controlplane.advertisements import desired_paths, desired_paths_changed

        name, options = self.settings.node_name, self.settings.options
        if instance.legacy is not None:
            # ``effective`` already carries the LB-IPAM addresses: lbipam=None spares a second
            # copy of every Service per peer
            return desired_paths(self.effective, name, instance, peer, None, options, self.interfaces,
                                 vip_ready=vip_ready, memo=self.memo)
        key = (instance.name, peer.address)
        state = desired_paths_changed(
            self.effective, name, instance, peer, options, self.interfaces, vip_ready, self.memo,
            inputs=self._paths_inputs(instance, peer, ready_token), previous=(self.previous_paths or {}).get(key),
            changed=self.changed_services)
        self.path_states[key] = state
        return state.result

    def _paths_inputs(self, instance, peer, ready_token) -> tuple:
        """What a peer's paths depend on besides the Services and EndpointSlices."""
        return (instance, peer, self.effective.node(self.settings.node_name), tuple(self.effective.advertisements),
                self.settings, self.interfaces, ready_token)

    def anticipate_paths(self) -> None:
        """Every peer's paths for when every desired frontend is programmed (the announce rule
        holding nothing back: ``ready_token`` ``frozenset()``), kept for the next plan. At
        start-up the pass that runs while the datapath loads announces no VIP; the pass after
        it then finds its 20,000 VIPs' paths made (in the worker thread, while the kernel
        loads the programs) and only applies them. Pure; if something was held back after
        all, the next plan's inputs differ and it builds the paths anew."""
        from agent.controlplane.advertisements import desired_paths_changed

        if self.node_config is None:
            return
        name, options = self.settings.node_name, self.settings.options
        for instance in self.node_config.instances:
            if instance.legacy is not None:
                continue
            for peer in instance.peers:
                key, inputs = (instance.name, peer.address), self._paths_inputs(instance, peer, frozenset())
                stored = self.stored_paths.get(key)
                if stored is not None and stored.inputs == inputs:
                    self.next_paths[key] = stored
                    continue
                self.next_paths[key] = desired_paths_changed(
                    self.effective, name, instance, peer, options, self.interfaces, None, self.memo,
                    inputs=inputs, previous=None, changed=None)

    def policies(self) -> list:
        """Cilium's GoBGP route policies as data (``vipctl bgp route-policies``); costly at
        scale (a second per peer at 20,000 Services), so computed only when asked."""
        from agent.controlplane import route_policies

        if self.node_config is None:
            return []
        return list(route_policies(self.effective, self.node_config, None, self.settings.options,
                                   self.interfaces))


def plan(objects, facts, settings: PlanSettings, previous: NodePlan | None = None, *,
         generation: int = 0, cluster_config_order: tuple[str, ...] = (),
         allocations: Mapping[str, tuple[str, ...]] | None = None, memo=None,
         frontends_memo=None, start_memo=None) -> NodePlan:
    """The NodePlan for ``objects`` (a Store snapshot's ObjectSet) and ``facts`` (HostFacts or
    None). ``previous``: the last plan (its LB-IPAM result and routes are kept when this
    pass's computation fails). ``cluster_config_order`` / ``allocations``: the persisted
    state the first plan starts from (later plans take them from ``previous``).
    ``start_memo``: a first plan's LB-IPAM result, frontends and paths kept by the previous
    agent for exactly these inputs (agent.controlplane.startmemo; the caller checked the
    digest), used instead of computing them."""
    from agent.controlplane import effective_services, lbipam as lbipam_mod
    from agent.controlplane.conditions import cluster_config_conditions, peer_config_conditions
    from agent.controlplane.nodeconfig import derive_node_config
    from agent.controlplane.ownership import order_cluster_configs

    failures: dict[str, str] = {}
    node_name, options = settings.node_name, settings.options
    if previous is not None:
        cluster_config_order = previous.cluster_config_order
        allocations = previous.allocations if previous.lbipam is not None else allocations
    objects, order = order_cluster_configs(objects, tuple(cluster_config_order))

    # What changed since the previous plan, by object identity (the sources hand out the very
    # same objects for what did not change): one changed Service then costs O(1), not O(all).
    delta = _service_delta(previous.objects, objects) if previous is not None else None
    lb = previous.lbipam if previous is not None else None
    incremental = False
    if previous is not None or (start_memo is not None and start_memo.frontends is None
                                and settings.datapath is not None):
        start_memo = None
    try:
        new = None
        if start_memo is not None:
            new = start_memo.lbipam
        elif (delta is not None and lb is not None and "lbipam" not in previous.failures
                and _same(previous.objects.lb_pools, objects.lb_pools)):
            new = lbipam_mod.allocate_changed(objects, lb, delta[0], delta[1], memo)
            incremental = new is not None
        lb = new if new is not None else lbipam_mod.allocate(objects, dict(allocations or {}), memo)
    except Exception as exc:  # noqa: BLE001 - keep the previous allocations
        failures["lbipam"] = _text(exc)
    reuse = None
    if incremental and previous.effective is not previous.objects:
        # unchanged Services kept their addresses: their effective copies are still right
        reuse = dict(zip(map(id, previous.objects.services), previous.effective.services))
    effective = effective_services(objects, lb, memo, reuse=reuse) if lb is not None else objects

    interfaces = facts.up_interfaces() if facts is not None else None
    node_config = None
    try:
        host_kw = {} if facts is None else _host_inputs(facts, objects.node(node_name))
        node_config = derive_node_config(effective, node_name, options, **host_kw)
    except Exception as exc:  # noqa: BLE001 - the controller keeps the running state
        failures["node-config"] = _text(exc)

    changed = _effective_delta(previous.effective, effective) if previous is not None else None
    frontends, owners, contested = None, {}, []
    if settings.datapath is not None:
        from agent.controlplane.frontends import desired_services, desired_services_changed
        dp = settings.datapath
        try:
            done = None
            if start_memo is not None:
                done = dict(start_memo.frontends), dict(start_memo.owners)
                if start_memo.contested:
                    contested.append(None)
            elif (changed is not None and previous.frontends is not None and not previous.frontends_contested
                    and previous.settings == settings):
                done = desired_services_changed(effective, node_name, previous.frontends, previous.owners,
                                                changed, mode=dp.mode, maglev_size=dp.maglev_size)
            if done is None:
                frontends = desired_services(effective, node_name, mode=dp.mode, maglev_size=dp.maglev_size,
                                             owners=owners, memo=frontends_memo, contested=contested)
            else:
                frontends, owners = done
        except Exception as exc:  # noqa: BLE001 - the services reconciler announces only what runs
            failures["services"] = _text(exc)
            frontends, owners = None, {}
        if frontends_memo is not None:
            frontends_memo.rotate()

    direct = None
    if settings.auto_direct_node_routes:
        direct = ()
        if facts is not None:
            from agent.routing.desired import PeerNode, direct_node_routes
            try:
                nodes = [PeerNode(n.name, n.addresses(4) + n.addresses(6), n.pod_cidrs) for n in effective.nodes]
                direct = tuple(direct_node_routes(node_name, facts.connected_networks(), nodes))
            except Exception as exc:  # noqa: BLE001 - e.g. two Nodes claim one Pod CIDR
                failures["routes"] = f"autoDirectNodeRoutes: {_text(exc)}"
                direct = None

    cluster_conditions: Mapping = previous.cluster_conditions if previous is not None else {}
    peer_conditions: Mapping = previous.peer_conditions if previous is not None else {}
    try:
        cluster_conditions = cluster_config_conditions(effective, options)
        peer_conditions = peer_config_conditions(effective, options)
    except Exception as exc:  # noqa: BLE001
        failures["status"] = _text(exc)

    return NodePlan(settings=settings, generation=generation, objects=objects, cluster_config_order=order,
                    lbipam=lb, effective=effective, node_config=node_config, facts=facts,
                    interfaces=interfaces, frontends=frontends, owners=owners, direct_routes=direct,
                    cluster_conditions=cluster_conditions, peer_conditions=peer_conditions,
                    failures=failures, memo=memo,
                    changed_services=changed, frontends_contested=bool(contested),
                    previous_paths={**previous.path_states, **previous.next_paths} if previous is not None else None,
                    stored_paths=start_memo.paths if start_memo is not None else {},
                    from_memo=start_memo is not None)


def _same(a, b) -> bool:
    """The very same objects, in the same order."""
    return len(a) == len(b) and all(x is y for x, y in zip(a, b))


def _service_delta(before, after) -> tuple[list, set[str]]:
    """(Services of ``after`` that are new or changed, in object order; keys of those gone)."""
    old = {id(s): s for s in before.services}
    changed = [s for s in after.services if old.pop(id(s), None) is None]
    keys = {f"{s.namespace}/{s.name}" for s in changed}
    return changed, {f"{s.namespace}/{s.name}" for s in old.values()} - keys


def _effective_delta(before, after) -> dict:
    """"namespace/name" -> the Service now (None: gone) for each Service whose effective
    object or any of whose EndpointSlices is not the very same object as before."""
    old = {id(s): s for s in before.services}
    out = {}
    for s in after.services:
        if old.pop(id(s), None) is None:
            out[f"{s.namespace}/{s.name}"] = s
    for s in old.values():
        out.setdefault(f"{s.namespace}/{s.name}", None)
    old_slices = {id(e): e for e in before.endpoint_slices}
    added = [e for e in after.endpoint_slices if old_slices.pop(id(e), None) is None]
    touched = {(e.namespace, e.service_name) for e in added} | {(e.namespace, e.service_name)
                                                                 for e in old_slices.values()}
    _carry_slice_index(before, after, added, old_slices, touched)
    index = None
    for ns, name in touched:
        key = f"{ns}/{name}"
        if not name or key in out:
            continue
        if index is None:
            index = {f"{s.namespace}/{s.name}": s for s in after.services}
        out[key] = index.get(key)
    return out


def _carry_slice_index(before, after, added: list, removed: dict, touched: set) -> None:
    """Give ``after`` the EndpointSlices-per-Service index of ``before`` patched for the
    Services whose slices changed (building it anew walks every slice)."""
    index = before.__dict__.get("_slices_by_service")
    if index is None or "_slices_by_service" in after.__dict__:
        return
    from agent.config.loader import _age_key

    index = dict(index)
    added_to: dict = {}
    for e in added:
        added_to.setdefault((e.namespace, e.service_name), []).append(e)
    for key in touched:
        if not key[1]:
            continue
        kept = [e for e in index.get(key, ()) if id(e) not in removed]
        new = sorted(kept + added_to.get(key, []), key=_age_key)
        if new:
            index[key] = new
        else:
            index.pop(key, None)
    after.__dict__["_slices_by_service"] = index


def _text(exc: BaseException) -> str:
    return str(exc) or type(exc).__name__


def _host_inputs(facts, node) -> dict:
    """What derive_node_config takes from the host (see agent.sources.host)."""
    node_addresses = (node.addresses(4) + node.addresses(6)) if node is not None else []
    return {"interfaces": facts.interfaces(), "default_gateways": facts.default_gateways(),
            "router_id_mac": facts.router_id_mac(node_addresses),
            "ipv6_routers": facts.link_local_routers()}
