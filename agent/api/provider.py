"""The daemon's answers to the API: reads the controller's state, builds API messages.

Read-only: nothing here changes the speaker or the store.
"""

from __future__ import annotations

import ipaddress
import time

from agent.api.model import peer_message, route_message, rfc3339, vipd_pb2
from agent.controlplane.types import Family

__all__ = ["ControllerProvider"]

_FAMILY = {"ipv4": Family.IPV4_UNICAST, "ipv6": Family.IPV6_UNICAST}


class ControllerProvider:
    def __init__(self, controller, *, version: str = ""):
        self.c = controller
        self.version = version

    # -- peers ----------------------------------------------------------------------------------
    def list_peers(self) -> vipd_pb2.ListPeersResponse:
        resp = vipd_pb2.ListPeersResponse(node=self.c.node_name)
        for run, state in self.c.peer_states():
            cfg = run.neighbors.get(state.address)
            resp.peers.append(peer_message(
                state, node=self.c.node_name, instance=run.name, name=cfg.name if cfg else "",
                families=cfg.families if cfg else None))
        return resp

    async def reset_peers(self, request: vipd_pb2.ResetPeersRequest) -> vipd_pb2.ResetPeersResponse:
        """``vipctl bgp reset``: the one write the API offers, an operator action on sessions
        (the configuration still comes only from the sources)."""
        resp = vipd_pb2.ResetPeersResponse(node=self.c.node_name)
        wanted = _normalise(request.peer) if request.peer else None
        targets = [(run, st.address) for run, st in self.c.peer_states()
                   if (wanted is None or _normalise(st.address) == wanted)
                   and (not request.vrouter or run.local_asn == request.vrouter)]
        if not targets:
            what = f"peer {request.peer}" if request.peer else "BGP peer"
            raise LookupError(f"no {what} on node {self.c.node_name}"
                              + (f" in vrouter {request.vrouter}" if request.vrouter else "")
                              + " (see vipctl bgp peers)")
        for run, address in targets:
            action = await run.speaker.reset_neighbor(address, soft=request.soft)
            resp.resets.append(vipd_pb2.PeerReset(instance=run.name, peer_address=address, action=action))
        return resp

    # -- routes ---------------------------------------------------------------------------------
    def _instances(self, vrouter: int):
        runs = list(self.c.neighbors.running.values())
        if vrouter:
            runs = [r for r in runs if r.local_asn == vrouter]
        return runs

    def list_routes(self, request: vipd_pb2.ListRoutesRequest) -> vipd_pb2.ListRoutesResponse:
        fam = _FAMILY[request.afi]
        resp = vipd_pb2.ListRoutesResponse(node=self.c.node_name)
        runs = self._instances(request.vrouter)
        now = self.c.clock()
        if request.table == vipd_pb2.AVAILABLE:
            unspecified = "0.0.0.0" if request.afi == "ipv4" else "::"
            for run in runs:
                for (f, prefix), (attrs, since) in self.c.advertisements.available.get(run.name, {}).items():
                    if f != fam:
                        continue
                    resp.routes.append(route_message(
                        node=self.c.node_name, instance=run.name, vrouter=run.local_asn, prefix=prefix,
                        attrs=attrs, next_hop=attrs.next_hop or unspecified, afi=request.afi,
                        age_seconds=now - since))
            return resp
        if request.peer and not request.vrouter and len(runs) > 1:
            raise LookupError("multiple virtual routers configured, router ASN must be specified")
        peer_filter = _normalise(request.peer) if request.peer else None
        found = False
        for run in runs:
            for state in run.speaker.peers():
                if peer_filter is not None and _normalise(state.address) != peer_filter:
                    continue
                found = True
                ebgp = state.peer_asn != run.local_asn
                for prefix, attrs in run.speaker.adj_rib_out(state.address, fam).items():
                    since = self.c.advertisements.advertised_at.get((run.name, state.address, fam, prefix), now)
                    resp.routes.append(route_message(
                        node=self.c.node_name, instance=run.name, vrouter=run.local_asn, peer=state.address,
                        prefix=prefix, attrs=attrs, afi=request.afi,
                        next_hop=attrs.next_hop or state.local_address or "",
                        as_path=[run.local_asn] if ebgp else [], age_seconds=now - since,
                        send_local_pref=not ebgp))
        if peer_filter is not None and not found:
            raise LookupError(f"no peer {request.peer} on this node")
        return resp

    # -- route policies -------------------------------------------------------------------------
    def list_route_policies(self, request) -> vipd_pb2.ListRoutePoliciesResponse:
        resp = vipd_pb2.ListRoutePoliciesResponse(node=self.c.node_name)
        for pol in self.c.policies:
            if request.vrouter and pol.vrouter != request.vrouter:
                continue
            msg = vipd_pb2.RoutePolicy(vrouter=pol.vrouter, name=pol.name, type=pol.type,
                                       instance=pol.instance)
            for st in pol.statements:
                msg.statements.append(vipd_pb2.RoutePolicyStatement(
                    match_peers=list(st.match_peers), match_families=list(st.match_families),
                    match_prefixes=[str(p) for p in st.match_prefixes], rib_action=st.rib_action,
                    path_actions=list(st.path_actions)))
            resp.policies.append(msg)
        return resp

    # -- status ---------------------------------------------------------------------------------
    def get_status(self) -> vipd_pb2.GetStatusResponse:
        c = self.c
        snap = c.store.current
        resp = vipd_pb2.GetStatusResponse(
            node=c.node_name, config_dir=snap.source, config_generation=snap.generation,
            uptime_seconds=c.clock() - c.started_at, version=self.version)
        for err in snap.errors:
            obj = getattr(err, "object", "")
            field = getattr(err, "field", "")
            message = getattr(err, "message", str(err))
            resp.config_errors.append(vipd_pb2.ConfigError(
                file=getattr(err, "file", ""), object=obj,
                message=f"{field}: {message}" if field else message))
        for key in snap.kept:
            resp.config_errors.append(vipd_pb2.ConfigError(
                object=key, message="invalid edit rejected: the previous valid version stays applied"))
        if c.node_config is not None:
            for issue in c.node_config.issues:
                resp.config_errors.append(vipd_pb2.ConfigError(object=issue.object,
                                                               message=f"{issue.severity}: {issue.message}"))
        doc = c.status_document()

        def add(kind: str, entries: dict, split_ns: bool = False):
            for key, body in entries.items():
                ns, name = key.split("/", 1) if split_ns and "/" in key else ("", key)
                res = vipd_pb2.ResourceStatus(kind=kind, namespace=ns, name=name)
                for cond in body.get("conditions", []):
                    res.conditions.append(vipd_pb2.Condition(
                        type=cond["type"], status=cond["status"], reason=cond.get("reason", ""),
                        message=cond.get("message", ""),
                        last_transition_time=cond.get("lastTransitionTime", "")))
                resp.resources.append(res)

        add("CiliumBGPClusterConfig", doc.get("ciliumBGPClusterConfigs", {}))
        add("CiliumBGPPeerConfig", doc.get("ciliumBGPPeerConfigs", {}))
        add("CiliumLoadBalancerIPPool", doc.get("ciliumLoadBalancerIPPools", {}))
        add("Service", doc.get("services", {}), split_ns=True)
        if "ciliumBGPNodeConfig" in doc:
            add("CiliumBGPNodeConfig", {c.node_name: doc["ciliumBGPNodeConfig"]["status"]})
        for rec in c.errors.records():
            resp.reconcile_errors.append(vipd_pb2.ReconcileError(
                reconciler=rec.reconciler, instance=rec.instance, error=rec.error, attempts=rec.attempts,
                since=rfc3339(time.time() - (time.monotonic() - rec.since))))
        return resp


def _normalise(address: str) -> str:
    try:
        return str(ipaddress.ip_address(address.split("/")[0]))
    except ValueError:
        return address
