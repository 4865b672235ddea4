"""The daemon's answers to the API, rendered from read-only views: the controller's last
NodePlan and each reconciler's ``view()`` (BGP sessions and what they sent, the loc-RIB, the
datapath). Nothing here changes a speaker or the store, except ``vipctl bgp reset``, an
operator action the neighbors reconciler carries out."""

from __future__ import annotations

import ipaddress
import time

from agent.api.model import peer_message, route_message, rfc3339, vipd_pb2
from agent.controlplane.types import Family

__all__ = ["ControllerProvider", "DatapathProvider", "DatapathOff", "AnswerTooLarge"]

_FAMILY = {"ipv4": Family.IPV4_UNICAST, "ipv6": Family.IPV6_UNICAST}


class ControllerProvider:
    def __init__(self, controller, *, version: str = ""):
        self.c = controller
        self.version = version
        self.lb = DatapathProvider(controller)

    # -- peers ----------------------------------------------------------------------------------
    def list_peers(self) -> vipd_pb2.ListPeersResponse:
        resp = vipd_pb2.ListPeersResponse(node=self.c.node_name)
        for p in self.c.peer_states():
            cfg = p.config
            resp.peers.append(peer_message(
                p.state, node=self.c.node_name, instance=p.instance, name=cfg.name if cfg else "",
                families=cfg.families if cfg else None))
        return resp

    # -- BFD ------------------------------------------------------------------------------------
    def list_bfd_peers(self) -> vipd_pb2.ListBfdPeersResponse:
        from agent.bfd.transport import existing_manager

        resp = vipd_pb2.ListBfdPeersResponse(node=self.c.node_name)
        manager = existing_manager()
        if manager is None:
            return resp
        for v in manager.peers():
            resp.peers.append(vipd_pb2.BfdPeer(
                node=self.c.node_name, peer_address=v.peer, local_address=v.local, state=v.state,
                remote_state=v.remote_state, local_discriminator=v.local_discriminator,
                remote_discriminator=v.remote_discriminator, diagnostic=v.diagnostic,
                remote_diagnostic=v.remote_diagnostic, transmit_interval_ms=v.tx_interval_ms,
                receive_interval_ms=v.rx_interval_ms, detect_multiplier=v.detect_mult,
                remote_detect_multiplier=v.remote_detect_mult, detection_time_ms=v.detection_time_ms,
                configured_transmit_interval_ms=v.configured_tx_ms,
                configured_receive_interval_ms=v.configured_rx_ms, passive=v.passive,
                uptime_seconds=v.uptime_seconds or 0.0, up_transitions=v.up_transitions,
                down_transitions=v.down_transitions, last_down_diagnostic=v.last_down_diagnostic,
                packets_in=v.packets_in, packets_out=v.packets_out,
                dropped=[vipd_pb2.BfdDropped(reason=r, packets=n) for r, n in sorted(v.dropped.items())]))
        for r, n in sorted(manager.dropped.items()):
            resp.unmatched_dropped.append(vipd_pb2.BfdDropped(reason=r, packets=n))
        return resp

    async def reset_peers(self, request: vipd_pb2.ResetPeersRequest) -> vipd_pb2.ResetPeersResponse:
        """``vipctl bgp reset``: the one write the API offers, an operator action on sessions
        (the configuration still comes only from the sources)."""
        resp = vipd_pb2.ResetPeersResponse(node=self.c.node_name)
        wanted = _normalise(request.peer) if request.peer else None
        targets = [(p.instance, p.state.address) for p in self.c.peer_states()
                   if (wanted is None or _normalise(p.state.address) == wanted)
                   and (not request.vrouter or p.local_asn == request.vrouter)]
        if not targets:
            what = f"peer {request.peer}" if request.peer else "BGP peer"
            raise LookupError(f"no {what} on node {self.c.node_name}"
                              + (f" in vrouter {request.vrouter}" if request.vrouter else "")
                              + " (see vipctl bgp peers)")
        for instance, address in targets:
            action = await self.c.neighbors.reset_peer(instance, address, soft=request.soft)
            resp.resets.append(vipd_pb2.PeerReset(instance=instance, peer_address=address, action=action))
        return resp

    # -- routes ---------------------------------------------------------------------------------
    def _instances(self, vrouter: int) -> list[tuple[str, int]]:
        """[(instance, local ASN)] of the running instances (of ``vrouter`` if set)."""
        return [(name, asn) for name, asn in self.c.neighbors.view().instances() if not vrouter or asn == vrouter]

    def list_routes(self, request: vipd_pb2.ListRoutesRequest) -> vipd_pb2.ListRoutesResponse:
        fam = _FAMILY[request.afi]
        resp = vipd_pb2.ListRoutesResponse(node=self.c.node_name)
        runs = self._instances(request.vrouter)
        now = self.c.clock()
        adverts = self.c.advertisements.view()
        if request.table == vipd_pb2.AVAILABLE:
            unspecified = "0.0.0.0" if request.afi == "ipv4" else "::"
            for name, asn in runs:
                for (f, prefix), (attrs, since) in adverts.available.get(name, {}).items():
                    if f != fam:
                        continue
                    resp.routes.append(route_message(
                        node=self.c.node_name, instance=name, vrouter=asn, prefix=prefix,
                        attrs=attrs, next_hop=attrs.next_hop or unspecified, afi=request.afi,
                        age_seconds=now - since))
            return resp
        if request.peer and not request.vrouter and len(runs) > 1:
            raise LookupError("multiple virtual routers configured, router ASN must be specified")
        peer_filter = _normalise(request.peer) if request.peer else None
        found = False
        bgp = self.c.neighbors.view()
        wanted = {name for name, _ in runs}
        for p in bgp.peers():
            state = p.state
            if p.instance not in wanted:
                continue
            if peer_filter is not None and _normalise(state.address) != peer_filter:
                continue
            found = True
            # the Adj-RIB-Out as sent: attributes decoded from the session's UPDATE bytes
            for prefix, sent in bgp.sent(p.instance, state.address, fam).items():
                since = adverts.advertised_at.get((p.instance, state.address, fam, prefix), now)
                resp.routes.append(route_message(
                    node=self.c.node_name, instance=p.instance, vrouter=p.local_asn, peer=state.address,
                    prefix=prefix, attrs=sent, afi=request.afi, next_hop=sent.next_hop,
                    as_path=sent.as_path, age_seconds=now - since))
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


# -- load balancer (read from the BPF maps; callers run these off the event loop) ------------------

class DatapathOff(LookupError):
    """The agent runs without the datapath (no --lb-interface)."""


class AnswerTooLarge(RuntimeError):
    """The answer would exceed what one gRPC message carries."""


CT_DEFAULT_LIMIT = 10000
MAGLEV_ALL_MAX_SLOTS = 2_000_000   # one answer must fit gRPC's message limit; ask per service beyond


def _hostport(addr, port: int) -> str:
    return f"[{addr}]:{port}" if addr.version == 6 else f"{addr}:{port}"


class DatapathProvider:
    """Answers of ``vipctl service list`` and ``vipctl bpf ...``: the kernel maps decoded, plus the
    Service that claims each frontend (from the reconciler's last pass)."""

    def __init__(self, controller):
        self.c = controller

    def _dp(self):
        svc = getattr(self.c, "services", None)
        if svc is None or getattr(svc, "dp", None) is None:
            raise DatapathOff("the eBPF datapath is off on this node (vipd run without --lb-interface)")
        return svc.view().maps

    def _service_types(self) -> dict:
        """frontend address -> (namespace/name -> type) from the Services in the store."""
        out: dict = {}
        objects = self.c.effective_objects   # Services with their LB-IPAM addresses
        for svc in objects.services if objects is not None else ():
            name = f"{svc.namespace}/{svc.name}"
            for ip in svc.cluster_ips:
                out[(name, str(ipaddress.ip_address(ip)))] = "ClusterIP"
            for ip in svc.spec.external_ips or ():
                if ip not in ("", "None"):
                    out[(name, str(ipaddress.ip_address(ip)))] = "ExternalIP"
            if svc.spec.type == "LoadBalancer":
                for ip in svc.ingress_ips:
                    out[(name, str(ipaddress.ip_address(ip)))] = "LoadBalancer"
        return out

    def list_lb_services(self) -> vipd_pb2.ListLbServicesResponse:
        from agent.datapath import inspect

        dp = self._dp()
        owners = self.c.services.view().owners
        types = self._service_types()
        backends = inspect.read_backends(dp)
        fronts = inspect.read_frontends(dp)
        counters = inspect.read_service_counters(dp, [f.svc_id for f in fronts if not f.wildcard])
        resp = vipd_pb2.ListLbServicesResponse(node=self.c.node_name)
        for f in fronts:
            owner = "" if f.wildcard else owners.get(f.key, "")
            msg = vipd_pb2.LbFrontend(
                id=f.svc_id, address=str(f.addr), port=f.port,
                protocol="ANY" if f.wildcard else f.proto.name, service=owner,
                type=types.get((owner, str(f.addr)), ""), flags=inspect.svc_flag_names(f.flags),
                maglev_size=f.table_size, wildcard=f.wildcard)
            if not f.wildcard:
                table = inspect.read_maglev(dp, f)
                share: dict[int, int] = {}
                for bid in table:
                    share[bid] = share.get(bid, 0) + 1
                for slot, bid in enumerate(f.members, 1):
                    b = backends.get(bid)
                    if b is None:
                        continue
                    msg.backends.append(vipd_pb2.LbBackend(
                        id=bid, address=str(b.addr), port=b.port, state=inspect.backend_state(b.flags),
                        slot=slot, maglev_slots=share.get(bid, 0)))
                msg.packets, msg.bytes = counters.get(f.svc_id, (0, 0))
            resp.frontends.append(msg)
        return resp

    def list_maglev(self, request) -> vipd_pb2.ListMaglevResponse:
        from agent.datapath import inspect

        dp = self._dp()
        fronts = [f for f in inspect.read_frontends(dp) if not f.wildcard]
        if request.id:
            fronts = [f for f in fronts if f.svc_id == request.id]
            if not fronts:
                raise LookupError(f"no service with id {request.id} in the datapath (see vipctl service list)")
        elif request.frontend:
            want = request.frontend.upper()
            fronts = [f for f in fronts if str(f.key).upper() == want or str(f.key).upper().startswith(want + "/")]
            if not fronts:
                raise LookupError(f"no frontend {request.frontend} in the datapath (see vipctl service list)")
        elif sum(f.table_size for f in fronts) > MAGLEV_ALL_MAX_SLOTS:
            raise AnswerTooLarge(f"{len(fronts)} services hold more than {MAGLEV_ALL_MAX_SLOTS} Maglev slots; "
                             "ask for one: vipctl bpf lb maglev get <id>")
        resp = vipd_pb2.ListMaglevResponse(node=self.c.node_name)
        for f in fronts:
            resp.tables.append(vipd_pb2.MaglevTable(
                id=f.svc_id, family=f"v{f.family}", frontend=str(f.key), table=inspect.read_maglev(dp, f)))
        return resp

    def list_conntrack(self, request) -> vipd_pb2.ListConntrackResponse:
        from agent.datapath import inspect
        from agent.datapath.abi import CtFlag

        rows, total = inspect.read_conntrack(self._dp(), request.limit or CT_DEFAULT_LIMIT)
        resp = vipd_pb2.ListConntrackResponse(node=self.c.node_name, total=total)
        for r in rows:
            snat_service = r.direction == "service" and r.flags & CtFlag.SNAT
            resp.entries.append(vipd_pb2.CtEntry(
                direction=r.direction, protocol=r.proto.name, source=_hostport(r.saddr, r.sport),
                destination=_hostport(r.daddr, r.dport), service_id=r.service_id, backend_id=r.backend_id,
                flags=inspect.ct_flag_names(r.flags),
                rewrite_source=_hostport(r.rewrite_saddr, r.rewrite_sport) if r.rewrite_saddr else "",
                nat_port=r.nat_port if snat_service else 0))
        return resp

    def get_datapath_counters(self) -> vipd_pb2.GetDatapathCountersResponse:
        from agent.datapath import inspect
        from agent.datapath.abi import DropReason

        dp = self._dp()
        resp = vipd_pb2.GetDatapathCountersResponse(node=self.c.node_name)
        for reason, packets in inspect.read_drops(dp).items():
            resp.drops.append(vipd_pb2.DropCounter(reason=reason, code=int(DropReason[reason]), packets=packets))
        for (hook, outcome), packets in inspect.read_stats(dp).items():
            resp.counters.append(vipd_pb2.DatapathCounter(hook=hook, outcome=outcome, packets=packets))
        return resp
