"""Builders for control-plane unit tests: manifests as dicts, validated by the real loader."""

from __future__ import annotations

from typing import Any

from agent.config import ObjectSet, validate_document


def objs(*docs: dict) -> ObjectSet:
    """Validate every manifest with the production loader; fail loudly on any error."""
    out = []
    for i, d in enumerate(docs):
        obj, errors, ignored = validate_document(d, "<test>", i)
        assert not errors, [str(e) for e in errors]
        assert obj is not None, ignored
        out.append(obj)
    return ObjectSet.from_objects(out)


def twice(fn, *args, **kwargs):
    """Run a pure function twice on the same input and require identical results
    (the idempotency every reconciler relies on)."""
    first = fn(*args, **kwargs)
    second = fn(*args, **kwargs)
    assert first == second, "not idempotent"
    return first


def meta(name, namespace=None, labels=None, annotations=None, ts=None, generation=None):
    m: dict[str, Any] = {"name": name}
    if namespace:
        m["namespace"] = namespace
    if labels:
        m["labels"] = labels
    if annotations:
        m["annotations"] = annotations
    if ts:
        m["creationTimestamp"] = ts
    if generation is not None:
        m["generation"] = generation
    return m


def node(name, labels=None, ipv4="10.0.0.1", ipv6=None, pod_cidrs=("10.1.0.0/24",),
         annotations=None):
    addrs = []
    if ipv4:
        addrs.append({"type": "InternalIP", "address": ipv4})
    if ipv6:
        addrs.append({"type": "InternalIP", "address": ipv6})
    return {"apiVersion": "v1", "kind": "Node",
            "metadata": meta(name, labels=labels, annotations=annotations),
            "spec": {"podCIDRs": list(pod_cidrs)}, "status": {"addresses": addrs}}


def cluster_config(name, instances, node_selector=None, ts=None, api="cilium.io/v2"):
    spec: dict[str, Any] = {"bgpInstances": instances}
    if node_selector is not None:
        spec["nodeSelector"] = node_selector
    return {"apiVersion": api, "kind": "CiliumBGPClusterConfig", "metadata": meta(name, ts=ts),
            "spec": spec}


def instance(name="i1", asn=65001, peers=(), **extra):
    d = {"name": name, "localASN": asn, "peers": list(peers)}
    d.update(extra)
    return d


def peer(name="p1", address="10.0.0.254", asn=65000, ref="pc"):
    d: dict[str, Any] = {"name": name, "peerAddress": address, "peerASN": asn}
    if ref:
        d["peerConfigRef"] = {"name": ref}
    return d


def peer_config(name="pc", families=None, **spec):
    s = dict(spec)
    if families is not None:
        s["families"] = families
    return {"apiVersion": "cilium.io/v2", "kind": "CiliumBGPPeerConfig", "metadata": meta(name),
            "spec": s}


def family(afi="ipv4", labels=None):
    d: dict[str, Any] = {"afi": afi, "safi": "unicast"}
    if labels is not None:
        d["advertisements"] = {"matchLabels": labels}
    return d


def advertisement(name, labels, entries):
    return {"apiVersion": "cilium.io/v2", "kind": "CiliumBGPAdvertisement",
            "metadata": meta(name, labels=labels), "spec": {"advertisements": entries}}


SELECT_ALL = {"matchExpressions": [{"key": "somekey", "operator": "NotIn",
                                    "values": ["never-used-value"]}]}


def service_entry(addresses=("LoadBalancerIP",), selector=SELECT_ALL, attributes=None, **svc):
    e: dict[str, Any] = {"advertisementType": "Service",
                         "service": {"addresses": list(addresses), **svc}}
    if selector is not None:
        e["selector"] = selector
    if attributes:
        e["attributes"] = attributes
    return e


def service(name, namespace="default", type_="LoadBalancer", ingress=(), cluster_ip="10.96.0.10",
            external_ips=None, labels=None, annotations=None, etp="Cluster", itp="Cluster",
            lb_class=None, ports=(80,), selector=None, ts=None, lb_ip=None, ip_families=None,
            ip_family_policy=None):
    spec: dict[str, Any] = {"type": type_, "clusterIP": cluster_ip,
                            "ports": [{"port": p} for p in ports],
                            "externalTrafficPolicy": etp, "internalTrafficPolicy": itp}
    if external_ips:
        spec["externalIPs"] = list(external_ips)
    if lb_class:
        spec["loadBalancerClass"] = lb_class
    if selector:
        spec["selector"] = selector
    if lb_ip:
        spec["loadBalancerIP"] = lb_ip
    if ip_families:
        spec["ipFamilies"] = ip_families
    if ip_family_policy:
        spec["ipFamilyPolicy"] = ip_family_policy
    return {"apiVersion": "v1", "kind": "Service",
            "metadata": meta(name, namespace, labels, annotations, ts),
            "spec": spec,
            "status": {"loadBalancer": {"ingress": [{"ip": ip} for ip in ingress]}}}


def endpoints(service_name, eps, namespace="default", name=None):
    """eps: list of (ip, node, ready, terminating)."""
    return {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": meta(name or f"{service_name}-abc", namespace,
                             {"kubernetes.io/service-name": service_name}),
            "addressType": "IPv4",
            "endpoints": [{"addresses": [ip], "nodeName": n,
                           "conditions": {"ready": r, "terminating": t}} for ip, n, r, t in eps]}


def secret(name, password=None, namespace="kube-system"):
    d: dict[str, Any] = {"apiVersion": "v1", "kind": "Secret", "metadata": meta(name, namespace)}
    if password is not None:
        d["stringData"] = {"password": password}
    return d


def pool(name, blocks, selector=None, allow_first_last=None, disabled=False, ts=None,
         labels=None):
    spec: dict[str, Any] = {"blocks": blocks, "disabled": disabled}
    if selector is not None:
        spec["serviceSelector"] = selector
    if allow_first_last is not None:
        spec["allowFirstLastIPs"] = allow_first_last
    return {"apiVersion": "cilium.io/v2", "kind": "CiliumLoadBalancerIPPool",
            "metadata": meta(name, ts=ts, labels=labels), "spec": spec}
