"""Migration of legacy BGP configuration to Cilium's v2 BGP resources.

Inputs (as parsed YAML documents):

* ``CiliumBGPPeeringPolicy`` (cilium.io/v2alpha1, removed in Cilium 1.19): each policy becomes a
  ClusterConfig with the same nodeSelector, one PeerConfig + one Advertisement per neighbor (v1
  path attributes are per neighbor), and a NodeConfigOverride per Node carrying a
  ``cilium.io/bgp-virtual-router.<asn>`` annotation.
* Cilium 1.11's MetalLB-format ``bgp-config`` ConfigMap (``config.yaml`` with ``peers`` and
  ``address-pools``): ClusterConfigs partitioned by the peers' node-selectors (v2 allows one
  ClusterConfig per node), PeerConfigs, one Advertisement (PodCIDR + LoadBalancer IPs) and a
  CiliumLoadBalancerIPPool per BGP address pool.

Anything that cannot be expressed exactly is reported in ``MigrationResult.warnings``.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field
from itertools import combinations
from typing import Any

import yaml

from agent.config import validate_document
from agent.config.cilium import CiliumBGPPeeringPolicy, CiliumLoadBalancerIPPool
from agent.config.core import SERVICE_NAME_LABEL, SERVICE_NAMESPACE_LABEL, Node, Service
from agent.controlplane.nodeconfig import (
    VIRTUAL_ROUTER_ANNOTATION,
    parse_virtual_router_annotation,
)

ADVERTISE_LABEL = "bgp.vipd.io/advertise"
API = "cilium.io/v2"
# Cilium's documented "select everything" selector (a nil selector selects nothing).
SELECT_ALL = {"matchExpressions": [{"key": "bgp.vipd.io/never-used", "operator": "NotIn",
                                    "values": ["never-used-value"]}]}


@dataclass
class MigrationResult:
    documents: list[dict[str, Any]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def to_yaml(self) -> str:
        head = "".join(f"# WARNING: {w}\n" for w in self.warnings)
        return head + yaml.safe_dump_all(self.documents, sort_keys=False, explicit_start=True)


def dns_name(*parts: Any) -> str:
    """A DNS-1123 object name from parts ("rack0-65005", "10.0.5.1" -> "rack0-65005-10-0-5-1")."""
    s = "-".join(str(p) for p in parts).lower()
    s = re.sub(r"[^a-z0-9-]+", "-", s).strip("-")
    return re.sub(r"-{2,}", "-", s)[:253] or "x"


def _obj(kind: str, name: str, spec: dict, labels: dict | None = None,
         namespace: str | None = None) -> dict:
    meta: dict[str, Any] = {"name": name}
    if namespace:
        meta["namespace"] = namespace
    if labels:
        meta["labels"] = labels
    return {"apiVersion": API, "kind": kind, "metadata": meta, "spec": spec}


def migrate(documents: list[dict], *, announce_pod_cidr: bool = True,
            announce_lb_ips: bool = True) -> MigrationResult:
    """Convert every legacy object in ``documents``; other objects are used as context (Nodes for
    annotations, Services and pools for pool-based path attributes) and not echoed."""
    result = MigrationResult()
    parsed = []
    for i, doc in enumerate(documents):
        if not isinstance(doc, dict):
            continue
        obj, errors, _ = validate_document(doc, "<migrate>", i)
        if errors:
            result.warnings.extend(f"skipped invalid input: {e}" for e in errors)
        if obj is not None:
            parsed.append(obj)
    nodes = [o for o in parsed if isinstance(o, Node)]
    services = [o for o in parsed if isinstance(o, Service)]
    pools = [o for o in parsed if isinstance(o, CiliumLoadBalancerIPPool)]
    for obj in parsed:
        if isinstance(obj, CiliumBGPPeeringPolicy):
            _policy(obj, nodes, services, pools, result)
        elif obj.KIND == "ConfigMap" and obj.data and "config.yaml" in obj.data:
            _metallb(obj, result, announce_pod_cidr, announce_lb_ips)
    return result


# ------------------------------------------------------------------------------ PeeringPolicy


def _sel(selector) -> dict | None:
    return None if selector is None else selector.to_dict()


def _attrs(communities, local_pref) -> dict | None:
    out: dict[str, Any] = {}
    if communities is not None:
        c = communities.model_dump(by_alias=True, exclude_none=True)
        if c:
            out["communities"] = c
    if local_pref is not None:
        out["localPreference"] = local_pref
    return out or None


def _merge_attr_dicts(items: list[dict]) -> dict | None:
    std, wk, large, lp = [], [], [], None
    for a in items:
        c = a.get("communities", {})
        std += [x for x in c.get("standard", []) if x not in std]
        wk += [x for x in c.get("wellKnown", []) if x not in wk]
        large += [x for x in c.get("large", []) if x not in large]
        if a.get("localPreference") is not None:
            lp = a["localPreference"] if lp is None else max(lp, a["localPreference"])
    comm = {k: v for k, v in (("standard", std), ("wellKnown", wk), ("large", large)) if v}
    out: dict[str, Any] = {}
    if comm:
        out["communities"] = comm
    if lp is not None:
        out["localPreference"] = lp
    return out or None


def _pool_contains(pool: CiliumLoadBalancerIPPool, ip: str) -> bool:
    addr = ipaddress.ip_address(ip)
    for b in pool.spec.all_blocks:
        if b.cidr and addr in ipaddress.ip_network(b.cidr, strict=False):
            return True
        if b.start:
            lo, hi = ipaddress.ip_address(b.start), ipaddress.ip_address(b.stop or b.start)
            if lo.version == addr.version and lo <= addr <= hi:
                return True
    return False


def _policy(policy: CiliumBGPPeeringPolicy, nodes, services, pools, result: MigrationResult):
    where = f"CiliumBGPPeeringPolicy/{policy.name}"
    instances, peer_configs, adverts = [], [], []
    for vr in policy.spec.virtual_routers:
        asn = vr.local_asn
        peers = []
        if vr.pod_ip_pool_selector is not None:
            result.warnings.append(f"{where}: podIPPoolSelector (multi-pool IPAM) is not "
                                   "supported by vipd; not migrated")
        for n in vr.neighbors:
            key = dns_name(policy.name, asn, n.address)
            peers.append({"name": f"peer-{n.address}", "peerAddress": n.address,
                          "peerASN": n.peer_asn, "peerConfigRef": {"name": key}})
            spec: dict[str, Any] = {}
            if n.peer_port != 179:
                spec["transport"] = {"peerPort": n.peer_port}
            spec["timers"] = {"connectRetryTimeSeconds": n.connect_retry_time_seconds,
                              "holdTimeSeconds": n.hold_time_seconds,
                              "keepAliveTimeSeconds": n.keep_alive_time_seconds}
            if n.auth_secret_ref:
                spec["authSecretRef"] = n.auth_secret_ref
            if n.graceful_restart is not None:
                spec["gracefulRestart"] = {
                    "enabled": n.graceful_restart.enabled,
                    "restartTimeSeconds": n.graceful_restart.restart_time_seconds or 120}
            if n.e_bgp_multihop_ttl != 1:
                spec["ebgpMultihop"] = n.e_bgp_multihop_ttl
            fams = [(f.afi, f.safi) for f in n.families] if n.families else \
                [("ipv4", "unicast"), ("ipv6", "unicast")]
            spec["families"] = [{"afi": a, "safi": s,
                                 "advertisements": {"matchLabels": {ADVERTISE_LABEL: key}}}
                                for a, s in fams]
            peer_configs.append(_obj("CiliumBGPPeerConfig", key, spec))

            entries = []
            pattrs = n.advertised_path_attributes or []
            if vr.export_pod_cidr:
                pod_attrs = []
                for pa in pattrs:
                    if pa.selector_type != "PodCIDR":
                        continue
                    if pa.selector is not None:
                        result.warnings.append(
                            f"{where}: neighbor {n.address}: PodCIDR path attributes with a node "
                            "selector cannot be expressed in v2 (an Advertisement applies to all "
                            "selected nodes); applied to every node")
                    a = _attrs(pa.communities, pa.local_preference)
                    if a:
                        pod_attrs.append(a)
                e: dict[str, Any] = {"advertisementType": "PodCIDR"}
                merged = _merge_attr_dicts(pod_attrs)
                if merged:
                    e["attributes"] = merged
                entries.append(e)
            if vr.service_selector is not None:
                entries.append({"advertisementType": "Service",
                                "service": {"addresses": list(vr.service_advertisements)},
                                "selector": _sel(vr.service_selector)})
                for pa in pattrs:
                    if pa.selector_type == "CiliumPodIPPool":
                        result.warnings.append(f"{where}: CiliumPodIPPool path attributes are "
                                               "not supported by vipd; not migrated")
                    if pa.selector_type != "CiliumLoadBalancerIPPool" or \
                            "LoadBalancerIP" not in vr.service_advertisements:
                        continue
                    a = _attrs(pa.communities, pa.local_preference)
                    if not a:
                        continue
                    matching = [p for p in pools
                                if pa.selector is None or pa.selector.matches(p.labels)]
                    hits = [s for s in services if vr.service_selector.matches(s.selector_labels)
                            and any(_pool_contains(p, ip) for p in matching
                                    for ip in s.ingress_ips)]
                    result.warnings.append(
                        f"{where}: neighbor {n.address}: v2 selects path attributes by Service, "
                        "not by CiliumLoadBalancerIPPool; translated for the "
                        f"{len(hits)} Service(s) given as input whose LoadBalancer IP is in a "
                        "matching pool. Label new Services and select them instead")
                    for s in sorted(hits, key=lambda s: (s.namespace, s.name)):
                        sel = _sel(vr.service_selector) or {}
                        sel = dict(sel)
                        sel["matchLabels"] = {**sel.get("matchLabels", {}),
                                              SERVICE_NAME_LABEL: s.name,
                                              SERVICE_NAMESPACE_LABEL: s.namespace}
                        entries.append({"advertisementType": "Service",
                                        "service": {"addresses": ["LoadBalancerIP"]},
                                        "selector": sel, "attributes": a})
            if entries:
                adverts.append(_obj("CiliumBGPAdvertisement", key, {"advertisements": entries},
                                    labels={ADVERTISE_LABEL: key}))
        instances.append({"name": f"instance-{asn}", "localASN": asn, "peers": peers})
    cc_spec: dict[str, Any] = {}
    if policy.spec.node_selector is not None:
        cc_spec["nodeSelector"] = _sel(policy.spec.node_selector)
    cc_spec["bgpInstances"] = instances
    result.documents.append(_obj("CiliumBGPClusterConfig", policy.name, cc_spec))
    result.documents.extend(peer_configs)
    result.documents.extend(adverts)
    for node in nodes:
        if not (policy.spec.node_selector is None or policy.spec.node_selector.matches(
                node.labels)):
            continue
        ov_instances = []
        for vr in policy.spec.virtual_routers:
            ann = node.metadata.annotations.get(f"{VIRTUAL_ROUTER_ANNOTATION}{vr.local_asn}")
            if not ann:
                continue
            kv = parse_virtual_router_annotation(ann)
            inst: dict[str, Any] = {"name": f"instance-{vr.local_asn}"}
            if "router-id" in kv:
                inst["routerID"] = kv["router-id"]
            if "local-port" in kv:
                inst["localPort"] = int(kv["local-port"])
            ov_instances.append(inst)
        if ov_instances:
            result.documents.append(_obj("CiliumBGPNodeConfigOverride", node.name,
                                         {"bgpInstances": ov_instances}))


# ------------------------------------------------------------------------------------ MetalLB


def _duration_seconds(value: Any) -> int:
    """MetalLB durations ("90s", "1m30s", 90) -> seconds."""
    if isinstance(value, (int, float)):
        return int(value)
    total = 0.0
    for num, unit in re.findall(r"(\d+(?:\.\d+)?)(h|m|s|ms)?", str(value)):
        total += float(num) * {"h": 3600, "m": 60, "s": 1, "ms": 0.001, "": 1}[unit]
    return int(total)


def _metallb_selector(sel: dict) -> dict:
    out: dict[str, Any] = {}
    if sel.get("match-labels"):
        out["matchLabels"] = {str(k): str(v) for k, v in sel["match-labels"].items()}
    if sel.get("match-expressions"):
        out["matchExpressions"] = [
            {"key": e["key"], "operator": e["operator"],
             **({"values": [str(v) for v in e["values"]]} if e.get("values") else {})}
            for e in sel["match-expressions"]]
    return out


_NEGATE = {"In": "NotIn", "NotIn": "In", "Exists": "DoesNotExist", "DoesNotExist": "Exists"}


def _requirements(sel: dict) -> list[dict]:
    reqs = [{"key": k, "operator": "In", "values": [v]}
            for k, v in sel.get("matchLabels", {}).items()]
    return reqs + list(sel.get("matchExpressions", []))


def _negation(sel: dict) -> dict | None:
    """A selector matching exactly the nodes ``sel`` does not match, if one exists."""
    reqs = _requirements(sel)
    if len(reqs) != 1:
        return None
    r = dict(reqs[0])
    r["operator"] = _NEGATE[r["operator"]]
    if r["operator"] in ("Exists", "DoesNotExist"):
        r.pop("values", None)
    return r


def _metallb(cm, result: MigrationResult, announce_pod_cidr: bool, announce_lb_ips: bool):
    where = f"ConfigMap/{cm.namespace}/{cm.name}"
    try:
        config = yaml.safe_load(cm.data["config.yaml"]) or {}
    except yaml.YAMLError as exc:
        result.warnings.append(f"{where}: config.yaml is not valid YAML: {exc}")
        return
    peers = config.get("peers") or []
    base = dns_name(cm.name)
    adv_label = {ADVERTISE_LABEL: base}
    pools = [p for p in config.get("address-pools") or [] if p.get("protocol", "bgp") == "bgp"]
    families = {"ipv4"}
    for p in pools:
        for a in p.get("addresses") or []:
            first = str(a).split("-")[0].strip().split("/")[0]
            if ipaddress.ip_address(first).version == 6:
                families.add("ipv6")

    # Peer configs: one per distinct session setting.
    peer_configs: dict[tuple, str] = {}
    secrets: list[dict] = []
    docs_pc: list[dict] = []

    def peer_config_for(p: dict) -> str:
        hold = _duration_seconds(p.get("hold-time", "90s"))
        port = int(p.get("peer-port", 179))
        multihop = 255 if p.get("ebgp-multihop") else 1
        pw = p.get("password")
        sig = (hold, port, multihop, pw)
        if sig in peer_configs:
            return peer_configs[sig]
        name = base if not peer_configs else f"{base}-{len(peer_configs) + 1}"
        peer_configs[sig] = name
        spec: dict[str, Any] = {}
        if port != 179:
            spec["transport"] = {"peerPort": port}
        if hold != 90:
            # MetalLB sends keepalives every hold/3, as Cilium's defaults do (90/30)
            spec["timers"] = {"holdTimeSeconds": max(3, hold),
                              "keepAliveTimeSeconds": max(1, max(3, hold) // 3)}
        if pw:
            secret = dns_name(name, "auth")
            spec["authSecretRef"] = secret
            secrets.append({"apiVersion": "v1", "kind": "Secret",
                            "metadata": {"name": secret, "namespace": "kube-system"},
                            "type": "Opaque", "stringData": {"password": str(pw)}})
        if multihop != 1:
            spec["ebgpMultihop"] = multihop
        spec["families"] = [{"afi": f, "safi": "unicast", "advertisements": {
            "matchLabels": adv_label}} for f in sorted(families)]
        docs_pc.append(_obj("CiliumBGPPeerConfig", name, spec))
        return name

    for p in peers:
        if p.get("router-id"):
            result.warnings.append(f"{where}: peer {p.get('peer-address')}: router-id applies to "
                                   "one node in v2; set it per node with a "
                                   "CiliumBGPNodeConfigOverride")
        if p.get("source-address"):
            result.warnings.append(f"{where}: peer {p.get('peer-address')}: source-address is "
                                   "per node in v2 (CiliumBGPNodeConfigOverride "
                                   "peers[].localAddress); not migrated")

    # Partition nodes by which conditional peer groups select them (one ClusterConfig per node).
    groups: list[dict] = []      # distinct single selectors of conditional peers
    peer_group: list[int | None] = []
    for p in peers:
        sels = p.get("node-selectors") or []
        if not sels:
            peer_group.append(None)
            continue
        if len(sels) > 1:
            result.warnings.append(f"{where}: peer {p.get('peer-address')}: several "
                                   "node-selectors (OR) are not expressible; using the first")
        s = _metallb_selector(sels[0])
        if s not in groups:
            groups.append(s)
        peer_group.append(groups.index(s))
    if len(groups) > 4:
        result.warnings.append(f"{where}: more than 4 distinct node-selectors; not migrated")
        return
    cluster_configs = []
    for size in range(len(groups) + 1):
        for subset in combinations(range(len(groups)), size):
            chosen = [p for p, g in zip(peers, peer_group) if g is None or g in subset]
            if not chosen:
                continue
            match_labels: dict[str, str] = {}
            exprs: list[dict] = []
            ok = True
            for g in subset:
                match_labels.update(groups[g].get("matchLabels", {}))
                exprs.extend(groups[g].get("matchExpressions", []))
            for g in range(len(groups)):
                if g in subset:
                    continue
                neg = _negation(groups[g])
                if neg is None:
                    result.warnings.append(f"{where}: node-selector {groups[g]} has several "
                                           "requirements and cannot be negated; nodes it does "
                                           "not select may get no ClusterConfig")
                    ok = False
                    break
                exprs.append(neg)
            if not ok:
                continue
            instances: dict[int, list] = {}
            for p in chosen:
                addr = str(ipaddress.ip_address(str(p["peer-address"])))
                instances.setdefault(int(p["my-asn"]), []).append({
                    "name": f"peer-{addr}", "peerAddress": addr, "peerASN": int(p["peer-asn"]),
                    "peerConfigRef": {"name": peer_config_for(p)}})
            spec: dict[str, Any] = {}
            sel: dict[str, Any] = {}
            if match_labels:
                sel["matchLabels"] = match_labels
            if exprs:
                sel["matchExpressions"] = exprs
            if sel:
                spec["nodeSelector"] = sel
            spec["bgpInstances"] = [{"name": f"instance-{asn}", "localASN": asn, "peers": ps}
                                    for asn, ps in instances.items()]
            cluster_configs.append(spec)
    for i, spec in enumerate(cluster_configs):
        name = base if len(cluster_configs) == 1 else f"{base}-{i + 1}"
        result.documents.append(_obj("CiliumBGPClusterConfig", name, spec))
    result.documents.extend(docs_pc)

    entries = []
    if announce_pod_cidr:
        entries.append({"advertisementType": "PodCIDR"})
    if announce_lb_ips and pools:
        entries.append({"advertisementType": "Service",
                        "service": {"addresses": ["LoadBalancerIP"]}, "selector": SELECT_ALL})
    if entries:
        result.documents.append(_obj("CiliumBGPAdvertisement", base, {"advertisements": entries},
                                     labels=adv_label))
    result.documents.extend(secrets)
    for p in pools:
        blocks = []
        for a in p.get("addresses") or []:
            a = str(a).strip()
            if "-" in a:
                start, stop = (x.strip() for x in a.split("-", 1))
                blocks.append({"start": start, "stop": stop})
            else:
                blocks.append({"cidr": str(ipaddress.ip_network(a, strict=False))})
        spec: dict[str, Any] = {"blocks": blocks}
        if p.get("avoid-buggy-ips"):
            spec["allowFirstLastIPs"] = "No"
        if p.get("auto-assign") is False:
            result.warnings.append(f"{where}: pool {p.get('name')}: auto-assign: false has no "
                                   "LB-IPAM equivalent; use spec.serviceSelector")
        if p.get("bgp-advertisements"):
            result.warnings.append(f"{where}: pool {p.get('name')}: bgp-advertisements "
                                   "(aggregation/communities/localpref) must be set on a "
                                   "CiliumBGPAdvertisement selecting the Services; not migrated")
        result.documents.append(_obj("CiliumLoadBalancerIPPool", dns_name(p.get("name", base)),
                                     spec))
