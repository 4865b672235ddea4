"""Advertisement selection: which prefixes go to which peer, with which attributes.

Per instance x peer x family (Cilium's v2 pipeline): the peer's PeerConfig family selects
CiliumBGPAdvertisements by label; each matching advertisement entry contributes prefixes
(PodCIDR, Service VIPs, Interface addresses). Overlapping contributions for the same prefix are
merged: communities unioned and de-duplicated by value, local preference the maximum (Cilium
>= 1.18). Legacy PeeringPolicy instances advertise per virtual router instead.

The same "selections" produce both the desired Adj-RIB-Out (``desired_paths``) and the
route-policy view (``route_policies``), so what the CLI shows is what is sent.
"""

from __future__ import annotations

import dataclasses
import functools
import ipaddress
import itertools
from dataclasses import dataclass, field
from typing import Callable

from agent.addresses import host_network, ip_address
from agent.config import ObjectSet
from agent.config.cilium import (
    BGP_LOAD_BALANCER_CLASS,
    CiliumLoadBalancerIPPool,
)
from agent.config.core import LoadBalancerIngress, LoadBalancerStatus, Node, Service
from agent.config.meta import selector_matches
from agent.controlplane.memo import Memo
from agent.controlplane.nodeconfig import communities_of
from agent.controlplane.types import (
    AgentOptions,
    BgpInstance,
    DesiredPaths,
    Family,
    LbIpamResult,
    NodeConfigResult,
    Origin,
    PathAttributes,
    PeerSpec,
    PolicyPrefix,
    PolicyStatement,
    Prefix,
    RoutePolicy,
)

_VERSION = {Family.IPV4_UNICAST: 4, Family.IPV6_UNICAST: 6}
_AFI = {Family.IPV4_UNICAST: "ipv4", Family.IPV6_UNICAST: "ipv6"}


@dataclass
class _Attrs:
    communities: set[int] = field(default_factory=set)
    large: set[tuple[int, int, int]] = field(default_factory=set)
    local_pref: int | None = None
    incomplete_origin: bool = False

    def merge(self, communities=(), large=(), local_pref=None, incomplete=False) -> None:
        self.communities |= set(communities)
        self.large |= set(large)
        if local_pref is not None:
            self.local_pref = local_pref if self.local_pref is None else max(self.local_pref,
                                                                            local_pref)
        self.incomplete_origin = self.incomplete_origin or incomplete


@dataclass(frozen=True, slots=True)
class Selection:
    """One advertisement entry's contribution to one peer/family."""

    family: Family
    advert_type: str              # PodCIDR | Service | Interface
    resource: str | None          # "<svc>-<ns>-<addrType>" for services
    prefixes: tuple[Prefix, ...]
    communities: tuple[int, ...] = ()
    large: tuple[tuple[int, int, int], ...] = ()
    local_pref: int | None = None
    incomplete_origin: bool = False


# ------------------------------------------------------------------------------ service rules


def effective_services(objects: ObjectSet, lbipam: LbIpamResult | None, memo: Memo | None = None,
                       reuse: dict | None = None) -> ObjectSet:
    """Services LB-IPAM is responsible for get status.loadBalancer.ingress = its allocations
    (possibly none: an unsatisfied Service has no VIP to advertise, whatever its YAML says).
    ``memo``: reuse the copy made for the same Service object and addresses last pass.
    ``reuse``: id(Service) -> its effective copy, for Services whose addresses are known not
    to have changed (the plan's incremental path)."""
    if lbipam is None or not (lbipam.allocations or lbipam.service_conditions):
        return objects
    out = []
    get = reuse.get if reuse else None
    for svc in objects.services:
        if get is not None:
            known = get(id(svc))
            if known is not None:
                out.append(known)
                continue
        key = f"{svc.namespace}/{svc.name}"
        ips = lbipam.allocations.get(key)
        if ips is None and key in lbipam.service_conditions:
            ips = ()
        if ips is not None:
            ips = tuple(ips)
            if memo is not None:
                svc = memo.get("effective", svc, ips, _with_ingress, svc, ips)
            else:
                svc = _with_ingress(svc, ips)
        out.append(svc)
    # the same order as ``objects`` (the copies keep their names and ages): no re-sort; and
    # the same EndpointSlices, so their per-Service index carries over
    effective = dataclasses.replace(objects, services=tuple(out))
    if "_slices_by_service" in objects.__dict__:
        effective.__dict__["_slices_by_service"] = objects.__dict__["_slices_by_service"]
    return effective


def _with_ingress(svc: Service, ips: tuple[str, ...]) -> Service:
    # the addresses come from LB-IPAM (valid): built without validation, like model_copy does
    lb = _built(LoadBalancerStatus, ingress=[_built(LoadBalancerIngress, ip=ip) for ip in ips])
    return _replaced(svc, status=_replaced(svc.status, load_balancer=lb))


# One fields-set per combination of field names, shared by the effective copies: pydantic gives
# each model its own set (~0.2 kB; 60,000 of them at 20,000 Services) and never changes one in
# place for a frozen model (model_copy copies it first).
_FIELDS_SETS: dict[frozenset, set] = {}


def _shared_fields_set(names) -> set:
    key = frozenset(names)
    found = _FIELDS_SETS.get(key)
    if found is None:
        found = _FIELDS_SETS[key] = set(key)
    return found


_EMPTY: dict[type, object] = {}   # class -> an instance with every field at its default


def _built(cls, **values):
    """``cls.model_construct(**values)`` with a shared fields-set: a copy of one all-defaults
    instance (model_construct per object cost ~20 % of the 20,000 effective copies).
    Only for models whose defaults are immutable (None, not a list or dict factory)."""
    empty = _EMPTY.get(cls)
    if empty is None:
        empty = _EMPTY[cls] = cls.model_construct()
        object.__setattr__(empty, "__pydantic_fields_set__", _shared_fields_set(()))
    return _replaced(empty, **values)


def _replaced(model, **changes):
    """``model.model_copy(update=changes)`` for frozen models, with a shared fields-set."""
    cls = type(model)
    new = cls.__new__(cls)
    fields = model.__dict__.copy()      # an exact-size copy; the updates replace existing keys
    fields.update(changes)
    object.__setattr__(new, "__dict__", fields)
    object.__setattr__(new, "__pydantic_fields_set__",
                       _shared_fields_set(model.__pydantic_fields_set__.union(changes)))
    object.__setattr__(new, "__pydantic_extra__", model.__pydantic_extra__)
    object.__setattr__(new, "__pydantic_private__", model.__pydantic_private__)
    return new


def _endpoint_counts(objects: ObjectSet, svc: Service, node_name: str) -> tuple[int, int]:
    """(active endpoints, active endpoints on this node)."""
    total = local = 0
    for eps in objects.endpoint_slices_for(svc.namespace, svc.name):
        for ep in eps.endpoints or []:
            if ep.is_active:
                total += 1
                local += ep.node_name == node_name
    return total, local


def service_vips(objects: ObjectSet, svc: Service, address_type: str, node_name: str,
                 options: AgentOptions) -> tuple[list[str], bool]:
    """(VIPs of this type that this node should advertise, is_local_policy)."""
    if address_type == "LoadBalancerIP":
        if svc.spec.type != "LoadBalancer":
            return [], False
        cls = svc.spec.load_balancer_class
        if cls is not None and cls != BGP_LOAD_BALANCER_CLASS:
            return [], False   # another controller owns this LoadBalancer
        ips, local_policy = svc.ingress_ips, svc.spec.external_traffic_policy == "Local"
    elif address_type == "ExternalIP":
        ips = [ip for ip in svc.spec.external_ips or [] if ip]
        local_policy = svc.spec.external_traffic_policy == "Local"
    elif address_type == "ClusterIP":
        if svc.spec.type == "ExternalName":
            return [], False
        ips, local_policy = svc.cluster_ips, svc.spec.internal_traffic_policy == "Local"
    else:
        return [], False
    if not ips:
        return [], local_policy
    total, local = _endpoint_counts(objects, svc, node_name)
    if local_policy and local == 0:
        return [], True        # Local: only nodes with a ready local endpoint announce
    if total == 0 and not options.no_service_endpoints_routable:
        return [], local_policy
    return ips, local_policy


@functools.lru_cache(maxsize=1 << 17)
def _host_prefix(ip: str, aggregate_v4: int | None, aggregate_v6: int | None,
                 local_policy: bool) -> Prefix:
    addr = ip_address(ip)
    agg = aggregate_v4 if addr.version == 4 else aggregate_v6
    # aggregation is ignored under Local policy
    return host_network(addr, agg if agg is not None and not local_policy else None)


def _in_family(prefixes, family: Family) -> tuple[Prefix, ...]:
    v = _VERSION[family]
    out: list[Prefix] = []
    for p in prefixes:
        if p.version == v and p not in out:
            out.append(p)
    return tuple(out)


def _interface_prefixes(addresses: list[str]) -> list[Prefix]:
    """Cilium's Interface rules: /32 or /128 per address; skip IPv4-mapped IPv6, IPv6 that is
    not global unicast, IPv4 that is neither global unicast nor link-local; de-duplicate."""
    out: list[Prefix] = []
    for a in addresses:
        ip = ipaddress.ip_interface(a).ip
        if ip.is_loopback or ip.is_multicast or ip.is_unspecified:
            continue
        if ip.version == 6 and (ip.ipv4_mapped is not None or ip.is_link_local):
            continue
        if ip.version == 4 and ip == ipaddress.IPv4Address("255.255.255.255"):
            continue
        net = ipaddress.ip_network(f"{ip}/{ip.max_prefixlen}")
        if net not in out:
            out.append(net)
    return out


# ------------------------------------------------------------------------------- selections


def selections(objects: ObjectSet, node_name: str, instance: BgpInstance, peer: PeerSpec,
               lbipam: LbIpamResult | None = None, options: AgentOptions = AgentOptions(),
               interfaces: dict[str, list[str]] | None = None,
               vip_ready: Callable[[str], bool] | None = None, memo: Memo | None = None
               ) -> list[Selection]:
    """``vip_ready``: with the datapath enabled, the announce rule — a Service address is
    selected only while ``vip_ready(address)`` (every desired frontend at it is programmed).
    None: every address is ready (BGP only, no datapath). ``memo``: reuse per-Service results
    of earlier passes for unchanged objects (see agent.controlplane.memo)."""
    objects = effective_services(objects, lbipam)
    if instance.legacy is not None:
        return _legacy_selections(objects, objects.node(node_name), node_name, instance, peer, options,
                                  vip_ready)
    return [sel for _, sel in _walk(objects, node_name, peer, options, interfaces, vip_ready, memo,
                                    objects.services, others=True)]


def _walk(objects: ObjectSet, node_name: str, peer: PeerSpec, options: AgentOptions, interfaces, vip_ready,
          memo, services, *, others: bool):
    """(owner, Selection) for a v2 instance's peer: owner "namespace/name" for the Selections
    of ``services``, None for the PodCIDR and Interface ones (only with ``others``)."""
    def vips(svc, addr_type):
        if memo is None:
            return service_vips(objects, svc, addr_type, node_name, options)
        meta = svc.metadata
        slices = tuple(objects.endpoint_slices_for(meta.namespace or "default", meta.name))
        return memo.get(addr_type, svc, (slices, node_name, options),
                        service_vips, objects, svc, addr_type, node_name, options)

    node = objects.node(node_name) if others else None
    for fam in peer.families:
        family = fam.family
        if family is None or fam.advertisements is None:
            continue           # nil selector: nothing is advertised for this family
        for adv in objects.advertisements:
            if not fam.advertisements.matches(adv.labels):
                continue
            for entry in adv.spec.advertisements:
                attrs = entry.attributes
                std, large = communities_of(attrs.communities if attrs else None)
                lp = attrs.local_preference if attrs else None
                common = dict(communities=std, large=large, local_pref=lp)
                if entry.advertisement_type == "PodCIDR" and others:
                    pods = [ipaddress.ip_network(c) for c in (node.pod_cidrs if node else [])]
                    pfx = _in_family(pods, family)
                    if pfx:
                        yield None, Selection(family, "PodCIDR", None, pfx, **common)
                elif entry.advertisement_type == "Service":
                    if entry.selector is None:
                        continue   # nil selector selects no service (Cilium's rule)
                    if vip_ready is nothing_ready:
                        continue   # the datapath is still loading: no Service address is ready
                    for svc in services:
                        owner = f"{svc.namespace}/{svc.name}"
                        for sel in _entry_service_selections(objects, svc, entry, family, common, node_name,
                                                             options, vips, vip_ready, memo):
                            yield owner, sel
                elif entry.advertisement_type == "Interface" and others:
                    addrs = (interfaces or {}).get(entry.interface.name, [])
                    pfx = _in_family(_interface_prefixes(addrs), family)
                    if pfx:
                        yield None, Selection(family, "Interface", entry.interface.name, pfx, **common)
                # CiliumPodIPPool: multi-pool IPAM does not exist in vipd; nothing to advertise.


def nothing_ready(address: str) -> bool:
    """The announce rule while the datapath is loading: no Service address is programmed (and
    none is looked at: the start-up pass announces Pod CIDRs without walking 20,000 Services)."""
    return False


def _entry_service_selections(objects, svc, entry, family, common, node_name, options, vips, vip_ready,
                              memo) -> list[Selection]:
    """The Selections one Service contributes through one Service advertisement entry."""
    def service_selections(svc, ready=None):
        """[(ips, Selection)] of one Service for this entry and family."""
        found = []
        if not entry.selector.matches(svc.selector_labels):
            return found
        for addr_type in entry.service.addresses:
            ips, local = vips(svc, addr_type)
            if ready is not None:
                ips = [ip for ip in ips if ready(ip)]
            pfx = _in_family([_host_prefix(
                ip, entry.service.aggregation_length_ipv4,
                entry.service.aggregation_length_ipv6, local) for ip in ips],
                family)
            if pfx:
                found.append((tuple(ips), Selection(
                    family, "Service", f"{svc.name}-{svc.namespace}-{addr_type}",
                    pfx, incomplete_origin=(addr_type == "LoadBalancerIP" and
                                            options.legacy_origin_attribute),
                    **common)))
        return found

    if memo is None:
        found = service_selections(svc)
    else:   # unchanged Service, entry and endpoints: the same selections
        meta = svc.metadata
        slices = tuple(objects.endpoint_slices_for(meta.namespace or "default", meta.name))
        found = memo.get(("selections", id(entry), family), svc,
                         (entry, family, slices, node_name, options), service_selections, svc)
    if vip_ready is not None and any(not vip_ready(ip) for ips, _ in found for ip in ips):
        found = service_selections(svc, vip_ready)   # some address is held back
    return [sel for _, sel in found]


def _pool_of(objects: ObjectSet, ip: str) -> CiliumLoadBalancerIPPool | None:
    addr = ipaddress.ip_address(ip)
    for pool in objects.lb_pools:
        for b in pool.spec.all_blocks:
            if b.cidr and addr in ipaddress.ip_network(b.cidr, strict=False):
                return pool
            if b.start:
                start = ipaddress.ip_address(b.start)
                stop = ipaddress.ip_address(b.stop or b.start)
                if addr.version == start.version and start <= addr <= stop:
                    return pool
    return None


def _legacy_selections(objects, node: Node | None, node_name, instance, peer, options, vip_ready=None):
    legacy = instance.legacy
    out: list[Selection] = []
    node_lbls = node.labels if node else {}
    for family in peer.speaker_families:
        if legacy.export_pod_cidr:
            pods = _in_family([ipaddress.ip_network(c) for c in (node.pod_cidrs if node else [])],
                              family)
            if pods:
                acc = _Attrs()
                for pa in peer.legacy_path_attributes:
                    if pa.selector_type == "PodCIDR" and selector_matches(
                            pa.selector, node_lbls, nil_matches=True):
                        acc.merge(pa.communities, pa.large_communities, pa.local_preference)
                out.append(Selection(family, "PodCIDR", None, pods, tuple(sorted(acc.communities)),
                                     tuple(sorted(acc.large)), acc.local_pref))
        if legacy.service_selector is None:
            continue           # v1: nil serviceSelector advertises no services
        for svc in objects.services:
            if not legacy.service_selector.matches(svc.selector_labels):
                continue
            for addr_type in legacy.service_addresses:
                ips, _local = service_vips(objects, svc, addr_type, node_name, options)
                for ip in ips:
                    if vip_ready is not None and not vip_ready(ip):
                        continue
                    pfx = _in_family([_host_prefix(ip, None, None, True)], family)
                    if not pfx:
                        continue
                    acc = _Attrs()
                    pool = _pool_of(objects, ip) if addr_type == "LoadBalancerIP" else None
                    for pa in peer.legacy_path_attributes:
                        if pa.selector_type == "CiliumLoadBalancerIPPool" and pool is not None \
                                and selector_matches(pa.selector, pool.labels, nil_matches=True):
                            acc.merge(pa.communities, pa.large_communities, pa.local_preference)
                    out.append(Selection(
                        family, "Service", f"{svc.name}-{svc.namespace}-{addr_type}", pfx,
                        tuple(sorted(acc.communities)), tuple(sorted(acc.large)), acc.local_pref,
                        addr_type == "LoadBalancerIP" and options.legacy_origin_attribute))
    return out


def _merged(sels: list[Selection]) -> dict[Family, dict[Prefix, _Attrs]]:
    merged: dict[Family, dict[Prefix, _Attrs]] = {}
    for s in sels:
        fam = merged.setdefault(s.family, {})
        for p in s.prefixes:
            fam.setdefault(p, _Attrs()).merge(s.communities, s.large, s.local_pref,
                                             s.incomplete_origin)
    return merged


def _path_attributes(acc: _Attrs, ibgp: bool | None) -> PathAttributes:
    return _path_attributes_of(tuple(sorted(acc.communities)), tuple(sorted(acc.large)), acc.local_pref,
                               acc.incomplete_origin, ibgp)


@functools.lru_cache(maxsize=4096)
def _path_attributes_of(communities: tuple, large: tuple, local_pref: int | None, incomplete: bool,
                        ibgp: bool | None) -> PathAttributes:
    # thousands of prefixes share a handful of attribute sets: build each PathAttributes once
    acc = _Attrs(set(communities), set(large), local_pref, incomplete)
    return PathAttributes(
        origin=Origin.INCOMPLETE if acc.incomplete_origin else Origin.IGP,
        # LOCAL_PREF is an iBGP attribute: dropped for known eBGP peers; kept when the peer ASN
        # is learned from OPEN (the speaker only sends it on iBGP sessions).
        local_pref=acc.local_pref if ibgp is not False else None,
        communities=tuple(sorted(acc.communities)),
        large_communities=tuple(sorted(acc.large)),
        next_hop=None)   # the session's local address (or the override localAddress)


def desired_paths(objects: ObjectSet, node_name: str, instance: BgpInstance, peer: PeerSpec,
                  lbipam: LbIpamResult | None = None, options: AgentOptions = AgentOptions(),
                  interfaces: dict[str, list[str]] | None = None,
                  vip_ready: Callable[[str], bool] | None = None, memo: Memo | None = None
                  ) -> DesiredPaths:
    """Desired Adj-RIB-Out of one peer. Every speaker family of the peer is a key (possibly
    empty), so the caller withdraws anything not listed. ``vip_ready``: see :func:`selections`."""
    merged = _merged(selections(objects, node_name, instance, peer, lbipam, options, interfaces,
                                vip_ready, memo))
    ibgp = peer.is_ibgp(instance.local_asn)
    out: DesiredPaths = {f: {} for f in peer.speaker_families}
    for family, prefixes in merged.items():
        if family not in out:
            continue
        for p in sorted(prefixes, key=_prefix_key):
            out[family][p] = _path_attributes(prefixes[p], ibgp)
    return out


@dataclass
class PeerPaths:
    """One peer's desired paths with what they were built from, so the next pass can redo
    only the Services that changed (:func:`desired_paths_changed`)."""

    inputs: tuple          # everything but the Services and their endpoints (compared with ==)
    by_service: dict       # "namespace/name" -> its Selections
    by_prefix: dict        # (family, prefix) -> every Selection contributing to it
    result: DesiredPaths
    serial: int = field(default_factory=lambda: next(_SERIALS))
    base: int | None = None          # serial of the PeerPaths this one was derived from (None: anew)
    affected: frozenset = frozenset()  # (family, prefix) whose path may differ from ``base``'s


_SERIALS = itertools.count(1)


def desired_paths_changed(objects: ObjectSet, node_name: str, instance: BgpInstance, peer: PeerSpec,
                          options: AgentOptions, interfaces, vip_ready, memo, *, inputs: tuple,
                          previous: PeerPaths | None, changed: dict | None) -> PeerPaths:
    """:func:`desired_paths` (same paths; order aside), in O(changed Services) from ``previous``.
    ``inputs``: what, besides Services and EndpointSlices, the paths depend on (the caller's
    fingerprint: peer, instance, node, advertisements, announce-rule state, interfaces);
    ``changed``: "namespace/name" -> the Service's object now (None: gone) for every Service
    whose object or EndpointSlices changed since ``previous`` (None: unknown, build anew)."""
    ibgp = peer.is_ibgp(instance.local_asn)
    if previous is None or changed is None or previous.inputs != inputs:
        by_service: dict = {}
        by_prefix: dict = {}
        for owner, sel in _walk(objects, node_name, peer, options, interfaces, vip_ready, memo,
                                objects.services, others=True):
            if owner is not None:
                by_service.setdefault(owner, []).append(sel)
            for p in sel.prefixes:
                by_prefix.setdefault((sel.family, p), []).append(sel)
        result: DesiredPaths = {f: {} for f in peer.speaker_families}
        for (family, p) in sorted(by_prefix, key=lambda k: _prefix_key(k[1])):
            if family in result:
                result[family][p] = _merge_into_attrs(by_prefix[(family, p)], ibgp)
        return PeerPaths(inputs, by_service, by_prefix, result)
    by_service = dict(previous.by_service)
    by_prefix = dict(previous.by_prefix)
    result = {f: dict(paths) for f, paths in previous.result.items()}
    affected = set()
    for owner, svc in changed.items():
        for sel in by_service.pop(owner, ()):
            for p in sel.prefixes:
                key = (sel.family, p)
                by_prefix[key] = [x for x in by_prefix[key] if x is not sel]
                affected.add(key)
        if svc is None:
            continue
        new = [sel for _, sel in _walk(objects, node_name, peer, options, interfaces, vip_ready, memo, (svc,),
                                       others=False)]
        if new:
            by_service[owner] = new
        for sel in new:
            for p in sel.prefixes:
                key = (sel.family, p)
                by_prefix[key] = [*by_prefix.get(key, ()), sel]
                affected.add(key)
    for key in affected:
        family, p = key
        sels = by_prefix.get(key)
        if not sels:
            by_prefix.pop(key, None)
            if family in result:
                result[family].pop(p, None)
        elif family in result:
            result[family][p] = _merge_into_attrs(sels, ibgp)
    return PeerPaths(inputs, by_service, by_prefix, result, base=previous.serial, affected=frozenset(affected))


def _merge_into_attrs(sels, ibgp: bool | None) -> PathAttributes:
    if len(sels) == 1:   # the common case (one Selection per VIP): nothing to merge
        s = sels[0]
        return _path_attributes_of(tuple(sorted(set(s.communities))), tuple(sorted(set(s.large))), s.local_pref,
                                   s.incomplete_origin, ibgp)
    acc = _Attrs()
    for s in sels:
        acc.merge(s.communities, s.large, s.local_pref, s.incomplete_origin)
    return _path_attributes(acc, ibgp)


def all_desired_paths(objects: ObjectSet, node_config: NodeConfigResult,
                      lbipam: LbIpamResult | None = None, options: AgentOptions = AgentOptions(),
                      interfaces: dict[str, list[str]] | None = None
                      ) -> dict[tuple[str, str], DesiredPaths]:
    return {(inst.name, peer.address): desired_paths(objects, node_config.node_name, inst, peer,
                                                     lbipam, options, interfaces)
            for inst in node_config.instances for peer in inst.peers}


def _prefix_key(p: Prefix):
    return (p.version, -p.prefixlen, int(p.network_address))


# ------------------------------------------------------------------------------ route policies


def _community_str(c: int) -> str:
    return f"{c >> 16}:{c & 0xFFFF}"


def route_policies(objects: ObjectSet, node_config: NodeConfigResult,
                   lbipam: LbIpamResult | None = None, options: AgentOptions = AgentOptions(),
                   interfaces: dict[str, list[str]] | None = None) -> list[RoutePolicy]:
    """Cilium's GoBGP policies as data: one export policy per peer x family x advertisement
    (``<peer>-<afi>-<Type>[-<resource>]``, default reject), plus the global ``allow-local`` import
    policy (every received route is rejected: vipd learns nothing)."""
    out: list[RoutePolicy] = []
    for inst in node_config.instances:
        for peer in inst.peers:
            sels = selections(objects, node_config.node_name, inst, peer, lbipam, options,
                              interfaces)
            merged = _merged(sels)
            ibgp = peer.is_ibgp(inst.local_asn)
            host = ipaddress.ip_address(peer.address)
            match_peer = f"{host}/{host.max_prefixlen}"
            groups: dict[str, tuple[Family, list[Prefix]]] = {}
            for s in sels:
                suffix = f"-{s.resource}" if s.resource else ""
                name = f"{peer.name}-{_AFI[s.family]}-{s.advert_type}{suffix}"
                fam, pfx = groups.setdefault(name, (s.family, []))
                pfx.extend(p for p in s.prefixes if p not in pfx)
            for name, (family, prefixes) in groups.items():
                # one statement per distinct (merged) attribute set, longest prefixes first
                by_attrs: dict[PathAttributes, list[Prefix]] = {}
                for p in sorted(prefixes, key=_prefix_key):
                    by_attrs.setdefault(_path_attributes(merged[family][p], ibgp), []).append(p)
                stmts = tuple(PolicyStatement(
                    match_peers=(match_peer,),
                    match_families=(f"{_AFI[family]}-unicast",),
                    match_prefixes=tuple(PolicyPrefix(str(p), p.prefixlen, p.prefixlen)
                                         for p in pfx),
                    rib_action="accept", local_preference=attrs.local_pref,
                    communities=tuple(_community_str(c) for c in attrs.communities),
                    large_communities=tuple(":".join(map(str, lc))
                                            for lc in attrs.large_communities),
                ) for attrs, pfx in by_attrs.items())
                out.append(RoutePolicy(inst.local_asn, inst.name, name, "export", stmts))
        out.append(RoutePolicy(inst.local_asn, inst.name, "allow-local", "import",
                               (PolicyStatement(rib_action="accept"),)))
    return sorted(out, key=lambda r: (r.vrouter, r.instance, r.name))
