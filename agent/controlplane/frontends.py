"""Services -> datapath frontends, as data (pure; the ServiceReconciler applies them).

``desired_services``: Service + EndpointSlice objects (with LB-IPAM addresses already in
``status.loadBalancer.ingress``) -> one datapath ``Service`` per frontend address x port; the
rules are listed in agent/reconcilers/services.py. ``check_service`` and ``blocked_vips``
are the refusals decided before touching the maps and the announce rule's address set.
"""

from __future__ import annotations

import functools
import ipaddress
from dataclasses import dataclass
from typing import Iterable, Mapping

from agent.addresses import ip_address

__all__ = ["desired_services", "desired_services_changed", "FrontendFailure", "blocked_vips", "check_service",
           "CAPACITY", "MAGLEV_TOO_SMALL", "DATAPATH_ERROR"]

# Reasons a frontend is not programmed (condition reason, metric label)
CAPACITY = "CapacityExceeded"        # a sized map is full and could not be grown
MAGLEV_TOO_SMALL = "MaglevTableTooSmall"   # more backends than the Maglev table has slots
DATAPATH_ERROR = "DatapathError"     # anything else the datapath refused


@dataclass(frozen=True)
class FrontendFailure:
    """Why one frontend (VIP:port/proto) of a Service is not programmed."""

    service: str       # "namespace/name" of the Kubernetes Service ("" if unknown)
    reason: str        # CAPACITY | MAGLEV_TOO_SMALL | DATAPATH_ERROR
    message: str


def check_service(svc) -> FrontendFailure | None:
    """Refusals decided before touching the maps (pure)."""
    n = len(svc.selectable_backends())
    if n > svc.maglev_m:
        return FrontendFailure("", MAGLEV_TOO_SMALL,
                               f"{n} backends exceed the Maglev table size {svc.maglev_m} "
                               "(raise --maglev-table-size)")
    return None


@functools.lru_cache(maxsize=1 << 16)
def _canonical(address: str) -> str:
    try:
        return str(ip_address(address))
    except ValueError:
        return address


def blocked_vips(desired: Iterable, failed: Mapping) -> frozenset:
    """Addresses not to announce: those with at least one desired frontend in ``failed`` (pure).
    ``desired``: the desired ServiceKeys; ``failed``: ServiceKey -> FrontendFailure."""
    if not isinstance(desired, (dict, set, frozenset)):
        desired = set(desired)
    return frozenset(str(k.vip) for k in failed if k in desired)


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
                key = (ip_address(addr), target)
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


def desired_services(objects, node_name: str, *, mode: str = "snat", maglev_size=None,
                     owners: dict | None = None, memo=None, contested: list | None = None) -> dict:
    """{ServiceKey: datapath Service} for every frontend of every Service (see module doc).
    ``maglev_size``: the node's ``--maglev-table-size`` (a ``MaglevSize``; default auto): M of
    each frontend from its backend count. ``owners`` (optional) is filled with ServiceKey ->
    "namespace/name". ``memo`` (an ``agent.controlplane.memo.Memo``): reuse the frontends of a
    Service whose object and EndpointSlices are unchanged since the last pass."""
    from agent.datapath.capacity import MaglevSize

    maglev_size = maglev_size or MaglevSize()
    out: dict = {}
    slices_for = objects.endpoint_slices_for
    for svc in objects.services:
        if svc.spec.type == "ExternalName":
            continue
        meta = svc.metadata
        if memo is None:
            owner, mine = _frontends(objects, svc, node_name, mode, maglev_size)
        else:
            extra = (tuple(slices_for(meta.namespace or "default", meta.name)), node_name, mode, maglev_size)
            owner, mine = memo.get("frontends", svc, extra, _frontends, objects, svc, node_name, mode, maglev_size)
        for key, service in mine:
            if key in out:  # the same VIP:port claimed twice: the older Service keeps it
                if contested is not None:
                    contested.append(key)
                continue
            out[key] = service
            if owners is not None:
                owners[key] = owner
    return out


def desired_services_changed(objects, node_name: str, previous: dict, owners: dict, changed: dict, *,
                             mode: str = "snat", maglev_size=None) -> tuple[dict, dict] | None:
    """:func:`desired_services` for ``objects`` from its result for the objects before
    (``previous`` frontends and their ``owners``, with no frontend claimed twice), redoing only
    ``changed`` ("namespace/name" -> Service now, None: gone). None when a changed Service
    claims a frontend another Service holds: which one keeps it is decided by age, so
    :func:`desired_services` must run."""
    from agent.datapath.capacity import MaglevSize

    maglev_size = maglev_size or MaglevSize()
    out, owners = dict(previous), dict(owners)
    gone = {k for k, owner in owners.items() if owner in changed} if changed else ()
    for k in gone:
        del out[k], owners[k]
    for svc in changed.values():
        if svc is None or svc.spec.type == "ExternalName":
            continue
        owner, mine = _frontends(objects, svc, node_name, mode, maglev_size)
        for key, service in mine:
            if key in out:
                return None
            out[key] = service
            owners[key] = owner
    return out, owners


def _frontends(objects, svc, node_name: str, mode: str, maglev_size) -> tuple[str, list]:
    """("namespace/name", [(ServiceKey, datapath Service)]) of one Service, in claim order."""
    from agent.datapath.capacity import choose_maglev_m
    from agent.datapath.model import Mode, Proto, Service, ServiceKey

    spec = svc.spec
    internal_local = spec.internal_traffic_policy == "Local"
    external_local = spec.external_traffic_policy == "Local"
    # (address, traffic policy Local?, source ranges apply?); LoadBalancer ingress first, so
    # an address that is also an externalIP keeps its source ranges
    frontends = [(ip, external_local, True) for ip in svc.ingress_ips] if spec.type == "LoadBalancer" else []
    frontends += [(ip, internal_local, False) for ip in svc.cluster_ips]
    frontends += [(ip, external_local, False) for ip in spec.external_ips or () if ip not in ("", "None")]
    affinity, ranges = svc.affinity_timeout, svc.source_ranges
    out: dict = {}
    for port in spec.ports:
        if port.protocol not in ("TCP", "UDP"):
            continue
        backends = _backends(objects, svc, port, node_name)
        for ip, local, filtered in frontends:
            key = ServiceKey(ip, port.port, Proto[port.protocol])
            if key in out:
                continue
            version = key.vip.version
            mine = tuple(b for b in backends if b.addr.version == version)
            out[key] = Service(key, mine, traffic_policy_local=local, mode=Mode(mode),
                               affinity_timeout=affinity,
                               source_ranges=_ranges_for(ranges, version) if filtered else (),
                               maglev_m=choose_maglev_m(len(mine), maglev_size))
    return f"{svc.namespace}/{svc.name}", list(out.items())
