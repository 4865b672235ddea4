"""BGP status write-back in Kubernetes mode, as Cilium's operator and agent write it, with
server-side apply (field manager ``vipd``):

* **this node's CiliumBGPNodeConfig** (every agent, for its own node): named after the node,
  owned (ownerReference, ``controller: true``) by the CiliumBGPClusterConfig it comes from,
  spec as the operator derives it, status as the agent reports it (peeringState, timers,
  establishedTime, routeCount, the BGPReconcileError condition). Deleted when the node leaves
  every ClusterConfig (only a NodeConfig vipd wrote: one hand-written or written by Cilium's
  operator is left alone).
* **conditions** of CiliumBGPClusterConfig, CiliumBGPPeerConfig, CiliumLoadBalancerIPPool and
  the LB-IPAM condition of Services (``cilium.io/IPAMRequestSatisfied``), through the status
  subresource, by the holder of the ``vipd-lbipam`` Lease only, as Cilium's single operator
  does. CiliumBGPAdvertisement has no status in Cilium: nothing is written there.

A condition keeps its ``lastTransitionTime`` while its status stays the same, whoever wrote it
before (so a new Lease holder does not restamp every condition). An apply that conflicts with
another field manager is logged, naming the manager and fields, and retried with ``force``:
these objects are outputs that vipd owns, as the operator owns them in a Cilium cluster.

Pure part: :func:`bgp_status_inputs` and :func:`status_trigger` (the only readers of the
controller) and :func:`desired_writes`; effect: :class:`BgpStatusWriter`.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field
from urllib.parse import urlencode

from agent.log import get_logger

__all__ = ["BgpStatus", "BgpStatusWriter", "bgp_status_inputs", "desired_writes", "merge_conditions"]

log = get_logger("config")

FIELD_MANAGER = "vipd"
NODE_CONFIG = "CiliumBGPNodeConfig"
CLUSTER_CONFIG = "CiliumBGPClusterConfig"
REQUEST_SATISFIED = "cilium.io/IPAMRequestSatisfied"   # the one Service condition written
RETRY_S = 5.0


@dataclass(frozen=True)
class BgpStatus:
    """What the controller computed, in Cilium's shapes."""

    node: str
    owner: str | None = None               # the ClusterConfig this node's config comes from
    node_config: dict | None = None        # {"spec": ..., "status": ...}
    hand_written: bool = False             # the config is a CiliumBGPNodeConfig someone wrote
    # (kind, namespace or "", name) -> the conditions the Lease holder writes there
    conditions: dict[tuple[str, str, str], list[dict]] = field(default_factory=dict)


def bgp_status_inputs(controller) -> BgpStatus:
    """The controller's status, read in one place (the controller's shape may change; only
    this function follows it)."""
    doc = controller.status_document()
    source = getattr(controller.node_config, "source", None) or ""
    owner = source.split("/", 1)[1] if source.startswith(CLUSTER_CONFIG + "/") else None
    conditions: dict[tuple[str, str, str], list[dict]] = {}
    for kind, key in (("CiliumBGPClusterConfig", "ciliumBGPClusterConfigs"),
                      ("CiliumBGPPeerConfig", "ciliumBGPPeerConfigs")):
        for name, entry in (doc.get(key) or {}).items():
            conditions[(kind, "", name)] = list(entry.get("conditions") or [])
    lbipam = getattr(controller, "lbipam", None)
    for name, conds in sorted((getattr(lbipam, "pool_conditions", None) or {}).items()):
        conditions[("CiliumLoadBalancerIPPool", "", name)] = [
            controller.conditions.stamp(f"CiliumLoadBalancerIPPool/{name}", c) for c in conds]
    for key, entry in (doc.get("services") or {}).items():
        # only LB-IPAM's: the datapath condition is one node's view, not the cluster's
        ipam = [c for c in entry.get("conditions") or [] if c.get("type") == REQUEST_SATISFIED]
        if ipam:
            namespace, name = key.split("/", 1)
            conditions[("Service", namespace, name)] = ipam
    hand_written = source == f"{NODE_CONFIG}/{controller.node_name}"
    return BgpStatus(controller.node_name, owner,
                     doc.get("ciliumBGPNodeConfig") if owner or hand_written else None,
                     hand_written, conditions)


def status_trigger(controller) -> tuple | None:
    """What makes a write due before the next interval (cheap, unlike the status itself);
    None before the first pass."""
    if controller.node_config is None and not controller.errors:
        return None
    sessions = tuple(sorted((p.state.address, p.state.state) for p in controller.peer_states()))
    return controller.applied_generation, sessions


def merge_conditions(desired: list[dict], live: list[dict] | None) -> list[dict]:
    """``desired`` with the ``lastTransitionTime`` of ``live`` wherever type and status are
    unchanged (meta.SetStatusCondition's rule)."""
    before = {c.get("type"): c for c in live or []}
    out = []
    for cond in desired:
        old = before.get(cond["type"])
        if old is not None and old.get("status") == cond["status"] and old.get("lastTransitionTime"):
            cond = {**cond, "lastTransitionTime": old["lastTransitionTime"]}
        out.append(cond)
    return out


@dataclass(frozen=True)
class Write:
    """One request: a server-side apply of ``body`` to ``path``, or a DELETE (body None)."""

    path: str
    body: dict | None
    what: str                 # "CiliumBGPNodeConfig/node1 spec", for logs


def _path(api_version: str, plural: str, name: str, sub: str = "", namespace: str = "") -> str:
    prefix = f"/apis/{api_version}" if "/" in api_version else f"/api/{api_version}"
    ns = f"/namespaces/{namespace}" if namespace else ""
    return f"{prefix}{ns}/{plural}/{name}" + (f"/{sub}" if sub else "")


def desired_writes(status: BgpStatus, live, *, leader: bool, node_config_version: str = "cilium.io/v2",
                   written_services=()) -> list[Write]:
    """The writes that make the API match ``status``. ``live(kind, name, namespace="")`` ->
    (api_version, plural, object) as last seen by the watch, or None. ``written_services``:
    (namespace, name) of the Services whose status has an LB-IPAM condition now."""
    out: list[Write] = []
    found = live(NODE_CONFIG, status.node)
    if status.owner and status.node_config is not None:
        owner = live(CLUSTER_CONFIG, status.owner)
        uid = ((owner or (None, None, {}))[2].get("metadata") or {}).get("uid")
        if uid:   # the owner's uid comes with the watch; until then, nothing to own it by
            api_version, plural = node_config_version, "ciliumbgpnodeconfigs"
            meta = {"name": status.node, "ownerReferences": [{
                "apiVersion": owner[0], "kind": CLUSTER_CONFIG, "name": status.owner,
                "uid": uid, "controller": True, "blockOwnerDeletion": True}]}
            spec = {"apiVersion": api_version, "kind": NODE_CONFIG, "metadata": meta,
                    "spec": status.node_config.get("spec") or {}}
            live_obj = found[2] if found else {}
            if not found or _owned_by_us(live_obj) is not True or \
                    live_obj.get("spec") != spec["spec"] or \
                    (live_obj.get("metadata") or {}).get("ownerReferences") != meta["ownerReferences"]:
                out.append(Write(_path(api_version, plural, status.node), spec,
                                 f"{NODE_CONFIG}/{status.node} spec"))
            out += _node_status_write(status, api_version, plural, live_obj)
    elif status.hand_written and found and status.node_config is not None:
        # someone else's NodeConfig (no ClusterConfig owns it): its status only, as Cilium's
        # agent reports on whatever NodeConfig it runs
        out += _node_status_write(status, *found)
    elif found and _owned_by_us(found[2]):
        out.append(Write(_path(found[0], found[1], status.node), None,
                         f"{NODE_CONFIG}/{status.node} (the node left every ClusterConfig)"))
    if not leader:
        return out
    wanted = dict(status.conditions)
    for namespace, name in written_services:
        # LB-IPAM no longer handles it (no longer a LoadBalancer, another class): the condition
        # goes, as Cilium removes it; applying none drops the fields vipd owned
        wanted.setdefault(("Service", namespace, name), [])
    for (kind, namespace, name), conds in sorted(wanted.items()):
        seen = live(kind, name, namespace)
        if seen is None:
            continue
        api_version, plural, obj = seen
        if kind == CLUSTER_CONFIG and api_version.endswith("/v2alpha1"):
            continue      # v2alpha1 ClusterConfigs have no status (a cluster without v2)
        have = (obj.get("status") or {}).get("conditions") or []
        merged = merge_conditions(conds, have)
        if kind == "Service":     # other controllers' conditions stay; vipd's one is compared
            have = [c for c in have if c.get("type") == REQUEST_SATISFIED]
        if have != merged:
            meta = {"name": name, **({"namespace": namespace} if namespace else {})}
            out.append(Write(_path(api_version, plural, name, "status", namespace),
                             {"apiVersion": api_version, "kind": kind, "metadata": meta,
                              "status": {"conditions": merged}},
                             f"{kind}/{namespace + '/' if namespace else ''}{name} conditions"))
    return out


def _node_status_write(status: BgpStatus, api_version: str, plural: str, live_obj: dict) -> list[Write]:
    node_status = dict(status.node_config.get("status") or {})
    node_status["conditions"] = merge_conditions(list(node_status.get("conditions") or []),
                                                 (live_obj.get("status") or {}).get("conditions"))
    if api_version.endswith("/v2alpha1"):
        del node_status["conditions"]     # not in v2alpha1's schema (the server would prune it)
    if live_obj.get("status") == node_status:
        return []
    return [Write(_path(api_version, plural, status.node, "status"),
                  {"apiVersion": api_version, "kind": NODE_CONFIG, "metadata": {"name": status.node},
                   "status": node_status}, f"{NODE_CONFIG}/{status.node} status")]


def _owned_by_us(obj: dict) -> bool:
    """A NodeConfig vipd wrote: derived from a ClusterConfig and applied by our field manager."""
    meta = obj.get("metadata") or {}
    derived = any(r.get("kind") == CLUSTER_CONFIG for r in meta.get("ownerReferences") or [])
    return derived and any(m.get("manager") == FIELD_MANAGER for m in meta.get("managedFields") or [])


class BgpStatusWriter:
    """The only writer of CiliumBGPNodeConfigs and BGP / LB-IPAM pool conditions."""

    def __init__(self, client, source, controller, *, elector=None, interval_s: float = 5.0,
                 poll_s: float = 0.5):
        self.client = client
        self.source = source          # KubernetesSource: what the watches last saw
        self.controller = controller
        self.elector = elector
        self.interval_s = interval_s  # peer state (timers, route counts): Cilium's 5 s push
        self.poll_s = poll_s          # a configuration pass or a new Lease holder: at once
        self._sent: dict[str, tuple[str, float]] = {}   # path -> (body, when)
        self.written = 0

    async def write_once(self) -> None:
        if status_trigger(self.controller) is None:
            return     # no pass yet
        status = bgp_status_inputs(self.controller)
        leader = self.elector is None or self.elector.is_leader
        writes = desired_writes(status, self.source.live, leader=leader,
                                node_config_version=self.source.served_version(NODE_CONFIG),
                                written_services=self._services_with_ipam_condition())
        now = time.monotonic()
        for w in writes:
            text = json.dumps(w.body, sort_keys=True)
            sent = self._sent.get(w.path)
            if sent and sent[0] == text and now - sent[1] < RETRY_S:
                continue      # the watch has not brought our last write back yet
            self._sent[w.path] = (text, now)
            try:
                await self._write(w)
                self.written += 1
            except Exception as exc:  # noqa: BLE001 - retried after RETRY_S; the agent stays up
                log.warning("could not write BGP status; retrying", object=w.what, path=w.path,
                            error=str(exc) or repr(exc), retry_s=RETRY_S)
        due = {w.path for w in writes}
        for path in set(self._sent) - due:
            del self._sent[path]

    def _services_with_ipam_condition(self) -> list[tuple[str, str]]:
        out = []
        for obj in self.source.objects("Service"):
            if any(c.get("type") == REQUEST_SATISFIED
                   for c in (obj.get("status") or {}).get("conditions") or []):
                meta = obj.get("metadata") or {}
                out.append((meta.get("namespace") or "", meta.get("name") or ""))
        return out

    async def _write(self, w: Write) -> None:
        from agent.sources.kubernetes import ApiStatusError

        if w.body is None:
            try:
                await self.client.request_json("DELETE", w.path)
            except ApiStatusError as exc:
                if exc.code != 404:
                    raise
            log.info("CiliumBGPNodeConfig deleted", object=w.what)
            return
        query = {"fieldManager": FIELD_MANAGER}
        try:
            await self.client.request_json("PATCH", f"{w.path}?{urlencode(query)}", w.body,
                                           "application/apply-patch+yaml")
        except ApiStatusError as exc:
            if exc.code != 409:
                raise
            # another field manager set these fields (kubectl edit, an operator): the object is
            # vipd's output, so take them back, and say who had them
            log.warning("server-side apply conflict; applying again with force", object=w.what,
                        conflict=str(exc))
            query["force"] = "true"
            await self.client.request_json("PATCH", f"{w.path}?{urlencode(query)}", w.body,
                                           "application/apply-patch+yaml")
        if w.what.endswith(" spec"):
            log.info("CiliumBGPNodeConfig applied", object=w.what)

    def _trigger(self) -> tuple:
        return status_trigger(self.controller), self.elector is None or self.elector.is_leader

    async def run(self, stop: asyncio.Event | None = None) -> None:
        last, due = None, 0.0
        while stop is None or not stop.is_set():
            trigger = self._trigger()
            if trigger != last or time.monotonic() >= due:
                last, due = trigger, time.monotonic() + self.interval_s
                try:
                    await self.write_once()
                except Exception as exc:  # noqa: BLE001 - a status bug must not stop the agent
                    log.warning("BGP status write-back failed; retrying",
                                error=str(exc) or repr(exc))
            await asyncio.sleep(self.poll_s)
