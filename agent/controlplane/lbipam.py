"""LB-IPAM: allocate status.loadBalancer.ingress IPs from CiliumLoadBalancerIPPools.

A pure re-statement of Cilium's operator/pkg/lbipam for one snapshot of objects:

* dormant (no result at all) until the first pool exists;
* handles ``type: LoadBalancer`` Services whose loadBalancerClass is unset or one Cilium handles;
* pools are processed oldest first; a pool whose block overlaps an earlier pool's block is marked
  ``cilium.io/PoolConflict`` and never allocated from;
* previous allocations (persisted by the daemon) and existing ingress IPs are restored first when
  still valid, so allocations are stable across restarts and re-computation;
* requested IPs (``lbipam.cilium.io/ips`` / ``io.cilium/lb-ipam-ips``, ``spec.loadBalancerIP``)
  and sharing keys follow Cilium's compatibility rules and condition reasons.
"""

from __future__ import annotations

import functools
import ipaddress
from dataclasses import dataclass, field

from agent.addresses import ip_address
from agent.config import ObjectSet
from agent.config.cilium import BGP_LOAD_BALANCER_CLASS, L2_LOAD_BALANCER_CLASS
from agent.config.core import Service
from agent.controlplane.types import Condition, LbIpamResult

# Addresses are parsed again on every pass (twice per Service); parsed objects are immutable,
# so a cache makes a 20,000-Service allocation ~3x cheaper. Unparsable input raises as before.
_ip_address = ip_address   # parsed once per process (agent.addresses)

IPS_ANNOTATIONS = ("lbipam.cilium.io/ips", "io.cilium/lb-ipam-ips")
SHARING_KEY_ANNOTATIONS = ("lbipam.cilium.io/sharing-key", "io.cilium/lb-ipam-sharing-key")
SHARING_NS_ANNOTATIONS = ("lbipam.cilium.io/sharing-cross-namespace",
                          "io.cilium/lb-ipam-sharing-cross-namespace")
HANDLED_CLASSES = (BGP_LOAD_BALANCER_CLASS, L2_LOAD_BALANCER_CLASS)

REQUEST_SATISFIED = "cilium.io/IPAMRequestSatisfied"
POOL_CONFLICT = "cilium.io/PoolConflict"
IPS_TOTAL, IPS_AVAILABLE, IPS_USED = "cilium.io/IPsTotal", "cilium.io/IPsAvailable", \
    "cilium.io/IPsUsed"
NO_POOL_MSG = "There are no enabled CiliumLoadBalancerIPPools that match this service"
OUT_OF_IPS_MSG = ("All enabled CiliumLoadBalancerIPPools that match this service ran out of "
                  "allocatable IPs")


def _annotation(svc: Service, keys: tuple[str, ...]) -> str:
    for k in keys:
        v = svc.metadata.annotations.get(k, "")
        if v:
            return v
    return ""


@dataclass
class _Range:
    pool: str
    text: str          # as shown in conflict messages
    version: int
    first: int
    last: int
    reserved: frozenset[int]
    disabled: bool     # pool.spec.disabled: no new allocations
    pool_labels: object = None   # the pool's serviceSelector

    def contains(self, ip: int, version: int) -> bool:
        return version == self.version and self.first <= ip <= self.last

    def overlaps(self, other: "_Range") -> bool:
        return self.version == other.version and self.first <= other.last and \
            other.first <= self.last

    @property
    def size(self) -> int:
        return self.last - self.first + 1 - len(self.reserved)


@dataclass
class _View:
    key: str
    namespace: str
    labels: dict[str, str]
    sharing_key: str
    cross_ns: list[str]
    etp: str
    ports: set[int]
    selector: dict[str, str]
    requested: list[str]
    want_v4: bool
    want_v6: bool
    allocated: list[str] = field(default_factory=list)
    condition: Condition | None = None

    def fail(self, reason: str, message: str) -> None:
        self.condition = Condition(REQUEST_SATISFIED, "False", reason, message)

    def satisfied(self) -> bool:
        if self.requested:
            return all(ip in self.allocated for ip in self.requested)
        have4 = any(_ip_address(i).version == 4 for i in self.allocated)
        have6 = any(_ip_address(i).version == 6 for i in self.allocated)
        return not ((self.want_v4 and not have4) or (self.want_v6 and not have6))


def is_compatible(a: _View, b: _View) -> tuple[bool, str]:
    """Cilium's ServiceView.isCompatible: may ``a`` share an IP with ``b``?"""
    if a.sharing_key != b.sharing_key:
        return False, "different sharing key"
    if a.namespace != b.namespace:
        if (b.namespace not in a.cross_ns and "*" not in a.cross_ns) or \
                (a.namespace not in b.cross_ns and "*" not in b.cross_ns):
            return False, "different and not permitted namespace"
    if a.ports & b.ports:   # protocol ignored: the datapath cannot tell them apart
        return False, "same port"
    if a.etp != b.etp:
        return False, "different ExternalTrafficPolicy"
    if a.etp == "Local" and (not a.selector or not b.selector or a.selector != b.selector):
        return False, "compatible ExternalTrafficPolicy local but selecting different set of pods"
    return True, ""


def is_handled(svc: Service) -> bool:
    if svc.spec.type != "LoadBalancer":
        return False
    cls = svc.spec.load_balancer_class
    return cls is None or cls in HANDLED_CLASSES


def _view(svc: Service, memo=None) -> _View:
    """The allocator's view of one Service (fresh: the allocator fills ``allocated``); with
    ``memo`` the parsing is reused for an unchanged Service object."""
    if memo is None:
        return _View(**_view_fields(svc))
    fields = memo.get("lbipam-view", svc, (), _view_fields, svc)
    return _View(**{**fields, "requested": list(fields["requested"])})


def _view_fields(svc: Service) -> dict:
    requested: list[str] = []
    for raw in [svc.spec.load_balancer_ip or ""] + _annotation(svc, IPS_ANNOTATIONS).split(","):
        raw = raw.strip()
        if not raw:
            continue
        try:
            ip = str(_ip_address(raw))
        except ValueError:
            continue   # Cilium logs and ignores unparsable requests
        if ip not in requested:
            requested.append(ip)
    families = svc.spec.ip_families or ["IPv4"]
    policy = svc.spec.ip_family_policy or "SingleStack"
    if policy == "SingleStack":
        want = {families[0]}
    else:
        want = {"IPv4", "IPv6"}
    cross = [x.strip() for x in _annotation(svc, SHARING_NS_ANNOTATIONS).split(",") if x.strip()]
    return dict(
        key=f"{svc.namespace}/{svc.name}", namespace=svc.namespace, labels=svc.selector_labels,
        sharing_key=_annotation(svc, SHARING_KEY_ANNOTATIONS), cross_ns=cross,
        etp=svc.spec.external_traffic_policy, ports={p.port for p in svc.spec.ports},
        selector=dict(svc.spec.selector or {}), requested=requested,
        want_v4="IPv4" in want, want_v6="IPv6" in want)


def _ranges(objects: ObjectSet) -> tuple[list[_Range], dict[str, str]]:
    """All ranges of non-conflicting pools, and pool -> conflict message."""
    accepted: list[_Range] = []
    conflicts: dict[str, str] = {}
    for pool in objects.lb_pools:
        mine: list[_Range] = []
        for b in pool.spec.all_blocks:
            if b.cidr:
                net = ipaddress.ip_network(b.cidr, strict=False)
                first, last = int(net.network_address), int(net.broadcast_address)
                reserved: frozenset[int] = frozenset()
                # allowFirstLastIPs: unset means Yes (Cilium >= 1.16); /31,/32,/127,/128 exempt
                if pool.spec.allow_first_last_ips == "No" and net.prefixlen < net.max_prefixlen - 1:
                    reserved = frozenset({first, last})
                mine.append(_Range(pool.name, str(net), net.version, first, last, reserved,
                                   pool.spec.disabled, pool.spec.service_selector))
            else:
                start = _ip_address(b.start)
                stop = _ip_address(b.stop or b.start)
                mine.append(_Range(pool.name, f"{start} - {stop}", start.version, int(start),
                                   int(stop), frozenset(), pool.spec.disabled,
                                   pool.spec.service_selector))
        clash = next(((r, o) for r in mine for o in accepted if r.overlaps(o)), None)
        if clash:
            r, o = clash
            conflicts[pool.name] = (f"Pool conflicts since range '{r.text}' overlaps range "
                                    f"'{o.text}' from IP Pool '{o.pool}'")
            continue
        accepted.extend(mine)
    return accepted, conflicts


class _Allocator:
    def __init__(self, ranges: list[_Range]):
        self.ranges = ranges
        self.clusters: dict[str, list[_View]] = {}   # ip -> services sharing it
        self.origin: dict[str, _Range] = {}
        self.by_key: dict[str, list[str]] = {}       # sharing key -> ips
        self.hint: dict[int, int] = {}                # range -> lowest possibly free address

    def find_range(self, view: _View, ip: str, *, allow_disabled: bool) -> tuple[_Range | None,
                                                                                  bool]:
        addr = _ip_address(ip)
        found_pool = False
        for r in self.ranges:
            if (r.disabled and not allow_disabled) or not r.contains(int(addr), addr.version):
                continue
            found_pool = True
            if r.pool_labels is not None and not r.pool_labels.matches(view.labels):
                continue
            if int(addr) in r.reserved:
                continue
            return r, False
        return None, found_pool

    def take(self, view: _View, ip: str, r: _Range) -> None:
        self.clusters.setdefault(ip, []).append(view)
        self.origin[ip] = r
        view.allocated.append(ip)
        if view.sharing_key and ip not in self.by_key.setdefault(view.sharing_key, []):
            self.by_key[view.sharing_key].append(ip)

    def compatible_with_cluster(self, view: _View, ip: str) -> tuple[bool, str]:
        for other in self.clusters[ip]:
            ok, reason = is_compatible(view, other)
            if not ok:
                return False, reason
        return True, ""

    def alloc_any(self, view: _View, version: int) -> tuple[str | None, bool]:
        full = False
        for r in self.ranges:
            if r.disabled or r.version != version:
                continue
            if r.pool_labels is not None and not r.pool_labels.matches(view.labels):
                continue
            # Nothing is freed during one allocation pass, so the lowest free address of a
            # range never moves backwards: resume the scan where the previous one stopped.
            n = self.hint.get(id(r), r.first)
            while n <= r.last:
                ip = str(_ip_address(n))
                if n not in r.reserved and ip not in self.clusters:
                    self.hint[id(r)] = n + 1
                    self.take(view, ip, r)
                    return ip, False
                n += 1
            self.hint[id(r)] = n
            full = True
        return None, full


def allocate(objects: ObjectSet, previous_allocations: dict[str, tuple[str, ...]] | None = None,
             memo=None) -> LbIpamResult:
    """``memo`` (agent.controlplane.memo.Memo): reuse each unchanged Service's parsed view."""
    if not objects.lb_pools:
        return LbIpamResult()    # dormant until the first pool exists
    previous = previous_allocations or {}
    ranges, conflicts = _ranges(objects)
    alloc = _Allocator(ranges)
    views = [_view(s, memo) for s in objects.services if is_handled(s)]
    ingress = {f"{s.namespace}/{s.name}": s.ingress_ips for s in objects.services}

    # 1. restore: previous allocations first, then ingress IPs already in the object
    for v in views:
        for ip in list(previous.get(v.key, ())) + ingress.get(v.key, []):
            try:
                ip = str(_ip_address(ip))
            except ValueError:
                continue
            if ip in v.allocated:
                continue
            if v.requested and ip not in v.requested:
                continue   # not in a changed request list
            version = _ip_address(ip).version
            if (version == 4 and not v.want_v4 and not v.requested) or \
                    (version == 6 and not v.want_v6 and not v.requested):
                continue   # family no longer requested
            r, _ = alloc.find_range(v, ip, allow_disabled=True)   # disabled keeps existing
            if r is None or ip in alloc.clusters:
                continue   # pool gone / selector no longer matches / in use: regular logic
            alloc.take(v, ip, r)

    # 2. satisfy
    for v in views:
        if v.requested:
            for ip in v.requested:
                if ip in v.allocated:
                    continue
                r, found_pool = alloc.find_range(v, ip, allow_disabled=False)
                if r is None:
                    if found_pool:
                        v.fail("pool_selector_mismatch",
                               f"The pool with the CIDR containing '{ip}', doesn't select this "
                               "service")
                    else:
                        v.fail("no_pool", f"No pool exists with a CIDR containing '{ip}'")
                    continue
                if ip in alloc.clusters:
                    if not v.sharing_key:
                        v.fail("already_allocated",
                               f"The IP '{ip}' is already allocated to another service")
                        continue
                    ok, reason = alloc.compatible_with_cluster(v, ip)
                    if not ok:
                        v.fail("already_allocated_incompatible_service",
                               f"The IP '{ip}' is already allocated to an incompatible service. "
                               f"Reason: {reason}")
                        continue
                alloc.take(v, ip, r)
        else:
            for version, wanted in ((4, v.want_v4), (6, v.want_v6)):
                if not wanted or any(_ip_address(i).version == version
                                     for i in v.allocated):
                    continue
                shared = False
                for ip in alloc.by_key.get(v.sharing_key, []) if v.sharing_key else []:
                    if _ip_address(ip).version == version and \
                            alloc.compatible_with_cluster(v, ip)[0]:
                        alloc.take(v, ip, alloc.origin[ip])
                        shared = True
                        break
                if shared:
                    continue
                ip, full = alloc.alloc_any(v, version)
                if ip is None:
                    if full:
                        v.fail("out_of_ips", OUT_OF_IPS_MSG)
                    else:
                        v.fail("no_pool", NO_POOL_MSG)
        if v.satisfied():
            v.condition = _SATISFIED

    allocations = {v.key: tuple(sorted(v.allocated, key=_ip_sort)) for v in views if v.allocated}
    service_conditions = {v.key: v.condition for v in views if v.condition is not None}
    used: dict[str, int] = {}
    for r in alloc.origin.values():
        used[r.pool] = used.get(r.pool, 0) + 1
    return LbIpamResult(allocations, service_conditions, _pool_conditions(objects, ranges, conflicts, used),
                        {(r.pool, r.text): alloc.hint[id(r)] for r in ranges if id(r) in alloc.hint})


def allocate_changed(objects: ObjectSet, previous: LbIpamResult, changed: list[Service], removed: set[str],
                     memo=None) -> LbIpamResult | None:
    """What :func:`allocate` returns for ``objects``, computed from ``previous`` (its result for
    the objects before) in O(changed): ``changed`` are the Services that are new or differ
    (in object order), ``removed`` the keys of those gone; the pools must be the very same.
    None when this shortcut cannot promise the same answer (then call :func:`allocate`): a
    Service of the previous pass was waiting for an address (a freed one may now be its), or
    a changed Service asks for specific addresses, shares an address or already has some."""
    if not objects.lb_pools or any(c is not _SATISFIED for c in previous.service_conditions.values()):
        return None
    views = []
    for svc in changed:
        if not is_handled(svc):
            continue
        v = _view(svc, memo)
        if v.requested or v.sharing_key or svc.ingress_ips:
            return None
        views.append(v)
    ranges, conflicts = _ranges(objects)
    allocations = dict(previous.allocations)
    conditions = dict(previous.service_conditions)
    freed: dict[str, tuple[str, ...]] = {}
    for key in removed | {f"{svc.namespace}/{svc.name}" for svc in changed}:
        freed[key] = allocations.pop(key, ())
        conditions.pop(key, None)
    alloc = _Allocator(ranges)
    alloc.clusters = dict.fromkeys((ip for ips in allocations.values() for ip in ips), ())
    for r in ranges:
        if (r.pool, r.text) in previous.free_from:
            alloc.hint[id(r)] = previous.free_from[(r.pool, r.text)]
    delta: dict[str, int] = {}
    for ips in freed.values():
        for ip in ips:
            addr = _ip_address(ip)
            r = next((r for r in ranges if r.contains(int(addr), addr.version)), None)
            if r is not None:
                delta[r.pool] = delta.get(r.pool, 0) - 1
                if id(r) in alloc.hint:   # a freed address lies below the hint again
                    alloc.hint[id(r)] = min(alloc.hint[id(r)], int(addr))
    for v in views:   # the two steps of allocate() for one Service: restore, then satisfy
        for ip in freed.get(v.key, ()):
            version = _ip_address(ip).version
            if (version == 4 and not v.want_v4) or (version == 6 and not v.want_v6) or ip in v.allocated:
                continue
            r, _ = alloc.find_range(v, ip, allow_disabled=True)
            if r is not None and ip not in alloc.clusters:
                alloc.take(v, ip, r)
        for version, wanted in ((4, v.want_v4), (6, v.want_v6)):
            if wanted and not any(_ip_address(i).version == version for i in v.allocated):
                ip, full = alloc.alloc_any(v, version)
                if ip is None and full:
                    v.fail("out_of_ips", OUT_OF_IPS_MSG)
                elif ip is None:
                    v.fail("no_pool", NO_POOL_MSG)
        if v.satisfied():
            v.condition = _SATISFIED
        if v.allocated:
            allocations[v.key] = tuple(sorted(v.allocated, key=_ip_sort))
        if v.condition is not None:
            conditions[v.key] = v.condition
    for r in alloc.origin.values():
        delta[r.pool] = delta.get(r.pool, 0) + 1
    used = {}
    for pool, conds in previous.pool_conditions.items():
        before = next((int(c.message) for c in conds if c.type == IPS_USED), 0)
        used[pool] = before + delta.get(pool, 0)
    return LbIpamResult(allocations, conditions, _pool_conditions(objects, ranges, conflicts, used),
                        {(r.pool, r.text): alloc.hint[id(r)] for r in ranges if id(r) in alloc.hint})


def _pool_conditions(objects: ObjectSet, ranges: list[_Range], conflicts: dict[str, str],
                     used_by_pool: dict[str, int]) -> dict[str, tuple[Condition, ...]]:
    pool_conditions: dict[str, tuple[Condition, ...]] = {}
    for pool in objects.lb_pools:
        mine = [r for r in ranges if r.pool == pool.name]
        total = sum(r.size for r in mine)
        used = used_by_pool.get(pool.name, 0)
        conds = [
            Condition(IPS_AVAILABLE, "Unknown", "noreason", str(total - used)),
            Condition(IPS_TOTAL, "Unknown", "noreason", str(total)),
            Condition(IPS_USED, "Unknown", "noreason", str(used)),
        ]
        if pool.name in conflicts:
            conds.append(Condition(POOL_CONFLICT, "True", "cidr_overlap", conflicts[pool.name]))
        else:
            conds.append(Condition(POOL_CONFLICT, "False", "resolved", ""))
        pool_conditions[pool.name] = tuple(sorted(conds, key=lambda c: c.type))
    return pool_conditions


_SATISFIED = Condition(REQUEST_SATISFIED, "True", "satisfied", "")


def _ip_sort(ip: str):
    a = _ip_address(ip)
    return (a.version, int(a))
