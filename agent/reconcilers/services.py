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
"""

from __future__ import annotations

import asyncio
import ipaddress
from typing import Any

from agent.reconcilers.errors import ErrorBook

__all__ = ["desired_services", "ServiceReconciler"]

NAME = "services"


def _slice_port(slice_, port) -> int | None:
    for p in slice_.ports or ():
        if (p.name or None) == (port.name or None) and (p.protocol or "TCP") == port.protocol and p.port:
            return p.port
    if isinstance(port.target_port, int):
        return port.target_port
    if port.target_port is None and not slice_.ports:
        return port.port
    return None


def _backends(objects, svc, port, node_name: str):
    from agent.datapath.model import Backend

    found: dict[tuple, Backend] = {}
    for slice_ in objects.endpoint_slices_for(svc.namespace, svc.name):
        if slice_.address_type not in ("IPv4", "IPv6"):
            continue
        target = _slice_port(slice_, port)
        if target is None:
            continue
        for ep in slice_.endpoints or ():
            c = ep.conditions
            active = c.ready is not False and c.terminating is not True
            draining = not active and c.terminating is True and c.serving is True
            if not (active or draining):
                continue
            for addr in ep.addresses:
                key = (ipaddress.ip_address(addr), target)
                if key in found and not found[key].terminating:
                    continue
                found[key] = Backend(addr, target, local=ep.node_name == node_name, terminating=draining)
    return sorted(found.values(), key=lambda b: (b.addr.version, int(b.addr), b.port))


# The datapath reads an empty allow list as "allow everyone" and has no "allow no one". A
# Service whose ranges are all of the other family must still shut this family out (Cilium
# does; kube-proxy ignores them, failing open), so such a frontend gets the unspecified
# address as its only range: no TCP/UDP client can send from 0.0.0.0 or ::.
NOBODY = {4: ipaddress.ip_network("0.0.0.0/32"), 6: ipaddress.ip_network("::/128")}


def _ranges_for(ranges: tuple, version: int) -> tuple:
    if not ranges:
        return ()
    return tuple(r for r in ranges if r.version == version) or (NOBODY[version],)


def desired_services(objects, node_name: str, *, mode: str = "snat") -> dict:
    """{ServiceKey: datapath Service} for every frontend of every Service (see module doc)."""
    from agent.datapath.model import Mode, Proto, Service, ServiceKey

    out: dict = {}
    for svc in objects.services:
        spec = svc.spec
        if spec.type == "ExternalName":
            continue
        internal_local = spec.internal_traffic_policy == "Local"
        external_local = spec.external_traffic_policy == "Local"
        # (address, traffic policy Local?, source ranges apply?); LoadBalancer ingress first, so
        # an address that is also an externalIP keeps its source ranges
        frontends = [(ip, external_local, True) for ip in svc.ingress_ips] if spec.type == "LoadBalancer" else []
        frontends += [(ip, internal_local, False) for ip in svc.cluster_ips]
        frontends += [(ip, external_local, False) for ip in spec.external_ips or () if ip not in ("", "None")]
        affinity, ranges = svc.affinity_timeout, svc.source_ranges
        for port in spec.ports:
            if port.protocol not in ("TCP", "UDP"):
                continue
            backends = _backends(objects, svc, port, node_name)
            for ip, local, filtered in frontends:
                key = ServiceKey(ip, port.port, Proto[port.protocol])
                if key in out:  # the same VIP:port claimed twice: the older Service keeps it
                    continue
                version = key.vip.version
                out[key] = Service(key, tuple(b for b in backends if b.addr.version == version),
                                   traffic_policy_local=local, mode=Mode(mode), affinity_timeout=affinity,
                                   source_ranges=_ranges_for(ranges, version) if filtered else ())
    return out


class ServiceReconciler:
    name = NAME

    def __init__(self, datapath, node_name: str, *, mode: str = "snat", log=None):
        self.dp = datapath
        self.node_name = node_name
        self.mode = mode
        self.log = log
        self.last: dict = {}

    async def reconcile(self, objects, errors: ErrorBook, now: float, *, phase: str = "all") -> None:
        """``phase="upsert"`` before the BGP reconcilers (a VIP is programmed before it is
        announced), ``phase="delete"`` after them (withdrawn before it stops working)."""
        try:
            desired = desired_services(objects, self.node_name, mode=self.mode)
            changed = await asyncio.to_thread(self._apply, desired, phase)
        except Exception as exc:  # noqa: BLE001 - recorded, retried with backoff
            rec = errors.record(NAME, "", exc, now)
            if self.log is not None:
                self.log.error("reconcile failed", reconciler=NAME, error=rec.error, attempts=rec.attempts)
            return
        errors.clear(NAME, "")
        self.last = desired
        if changed and self.log is not None:
            self.log.info("services programmed", reconciler=NAME, deleted=changed[0], upserted=changed[1],
                          services=len(desired))

    def _apply(self, desired: dict, phase: str = "all") -> tuple[int, int] | None:
        current = self.dp.services()
        deleted = upserted = 0
        if phase in ("all", "delete"):
            for key in [k for k in current if k not in desired]:
                self.dp.delete_service(key)
                deleted += 1
        if phase in ("all", "upsert"):
            for key, svc in desired.items():
                if current.get(key) != svc:
                    self.dp.upsert_service(svc)
                    upserted += 1
        return (deleted, upserted) if deleted or upserted else None


def open_datapath(node, node_name: str, interfaces: list[str], *, pin_root: str, log=None) -> Any:
    """Load (or adopt) the datapath and attach it to the uplinks: XDP for services and SNAT
    replies, tc ingress/egress for DSR and local-backend replies. Synchronous."""
    from agent.datapath.api import Datapath

    dp = Datapath(instance=node_name, pin_root=pin_root)
    dp.load()
    v4 = node.addresses(4) if node is not None else []
    v6 = node.addresses(6) if node is not None else []
    dp.set_node_addresses(v4=v4[0] if v4 else None, v6=v6[0] if v6 else None)
    for ifname in interfaces:
        dp.attach_xdp(ifname, mode="native")
        dp.attach_tc(ifname, "ingress")
        dp.attach_tc(ifname, "egress")
        if log is not None:
            log.info("datapath attached", interface=ifname, v4=v4[:1], v6=v6[:1])
    return dp
