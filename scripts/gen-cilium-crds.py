#!/usr/bin/env python3
"""Writes deploy/kubernetes/cilium-crds.yaml: the CustomResourceDefinitions of the cilium.io
kinds vipd reads and writes, for clusters without Cilium (docs/kubernetes.md).

Schemas follow Cilium's (the fields, bounds, defaults and CEL rules of
/work/shared/reference/cilium-bgp.md §1 and §7), as structural OpenAPI v3: a real API server
prunes every field a schema does not name, so each field vipd reads must be here.
v2 is the storage version; v2alpha1 is served and deprecated, as in Cilium 1.18.

    python3 scripts/gen-cilium-crds.py > deploy/kubernetes/cilium-crds.yaml
(tests/unit/daemon/test_deploy_manifests.py fails when the file is not what this writes)
"""

import sys

import yaml

U32 = 4294967295


def s(type_, **kw):
    return {"type": type_, **kw}


def obj(properties: dict, required=(), **kw):
    out = {"type": "object", "properties": properties}
    if required:
        out["required"] = list(required)
    out.update(kw)
    return out


def arr(items, **kw):
    return {"type": "array", "items": items, **kw}


def keyed(items, key="name", **kw):
    """A list that is a map keyed by ``key`` (server-side apply merges it item by item)."""
    return arr(items, **{"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": [key]}, **kw)


def name255():
    return s("string", minLength=1, maxLength=255)


LABEL_SELECTOR = obj({
    "matchLabels": {"type": "object", "additionalProperties": s("string")},
    "matchExpressions": arr(obj({
        "key": s("string"),
        "operator": s("string", enum=["In", "NotIn", "Exists", "DoesNotExist"]),
        "values": arr(s("string"))}, ["key", "operator"]))},
    **{"x-kubernetes-map-type": "atomic"})

CONDITIONS = keyed(obj({
    "type": s("string", maxLength=316),
    "status": s("string", enum=["True", "False", "Unknown"]),
    "observedGeneration": s("integer", format="int64", minimum=0),
    "lastTransitionTime": s("string", format="date-time"),
    "reason": s("string", maxLength=1024),
    "message": s("string", maxLength=32768)},
    ["type", "status", "lastTransitionTime", "reason", "message"]), key="type")

ASN = s("integer", format="int64", minimum=1, maximum=U32)
PORT = s("integer", format="int32", minimum=1, maximum=65535)

AUTO_DISCOVERY = obj({
    "mode": s("string", enum=["DefaultGateway", "Unnumbered"]),
    "defaultGateway": obj({"addressFamily": s("string", enum=["ipv4", "ipv6"])}, ["addressFamily"]),
    "unnumbered": obj({"interface": name255()}, ["interface"])},
    ["mode"], **{"x-kubernetes-validations": [
        {"rule": "self.mode != 'DefaultGateway' || has(self.defaultGateway)",
         "message": "defaultGateway is required when mode is DefaultGateway"},
        {"rule": "self.mode != 'Unnumbered' || has(self.unnumbered)",
         "message": "unnumbered is required when mode is Unnumbered"}]})


def peer_config_ref(v2: bool):
    props = {"name": s("string")}
    if not v2:
        props |= {"group": s("string", default="cilium.io"),
                  "kind": s("string", default="CiliumBGPPeerConfig")}
    return obj(props, ["name"])


def cluster_config(v2: bool):
    peer = obj({"name": name255(), "peerAddress": s("string"),
                "peerASN": s("integer", format="int64", minimum=0, maximum=U32, default=0) if v2
                else ASN,
                "autoDiscovery": AUTO_DISCOVERY, "peerConfigRef": peer_config_ref(v2)}, ["name"])
    instance = {"name": name255(), "localASN": ASN, "peers": keyed(peer)}
    if v2:
        instance["localPort"] = PORT
    spec = obj({"nodeSelector": LABEL_SELECTOR,
                "bgpInstances": keyed(obj(instance, ["name"]), minItems=1, maxItems=16)},
               ["bgpInstances"])
    return spec, obj({"conditions": CONDITIONS}) if v2 else None


FAMILY_AFI = ["ipv4", "ipv6", "l2vpn", "ls", "opaque"]
FAMILY_SAFI = ["unicast", "multicast", "mpls_label", "encapsulation", "vpls", "evpn", "ls",
               "sr_policy", "mup", "mpls_vpn", "mpls_vpn_multicast", "route_target_constraints",
               "flowspec_unicast", "flowspec_vpn", "key_value"]
TIMERS = {"connectRetryTimeSeconds": s("integer", format="int32", minimum=1, maximum=2147483647,
                                       default=120),
          "holdTimeSeconds": s("integer", format="int32", minimum=3, maximum=65535, default=90),
          "keepAliveTimeSeconds": s("integer", format="int32", minimum=1, maximum=65535, default=30)}
GRACEFUL_RESTART = obj({"enabled": s("boolean"),
                        "restartTimeSeconds": s("integer", format="int32", minimum=1, maximum=4095,
                                                default=120)}, ["enabled"])


def families(with_advertisements: bool):
    props = {"afi": s("string", enum=FAMILY_AFI), "safi": s("string", enum=FAMILY_SAFI)}
    if with_advertisements:
        props["advertisements"] = LABEL_SELECTOR
    return arr(obj(props, ["afi", "safi"]))


def peer_config(v2: bool):
    transport = {"peerPort": s("integer", format="int32", minimum=1, maximum=65535, default=179),
                 "sourceInterface": s("string")}
    if not v2:
        transport["localPort"] = s("integer", format="int32", minimum=1, maximum=65535)
    spec = obj({
        "transport": obj(transport),
        "timers": obj(TIMERS, **{"x-kubernetes-validations": [{
            "rule": "!has(self.keepAliveTimeSeconds) || !has(self.holdTimeSeconds) || "
                    "self.keepAliveTimeSeconds <= self.holdTimeSeconds",
            "message": "keepAliveTimeSeconds can not be larger than holdTimeSeconds"}]}),
        "authSecretRef": s("string"),
        "gracefulRestart": GRACEFUL_RESTART,
        "ebgpMultihop": s("integer", format="int32", minimum=1, maximum=255, default=1),
        "families": families(True)})
    return spec, obj({"conditions": CONDITIONS})


WELL_KNOWN = ["internet", "planned-shut", "accept-own", "route-filter-translated-v4",
              "route-filter-v4", "route-filter-translated-v6", "route-filter-v6", "llgr-stale",
              "no-llgr", "blackhole", "no-export", "no-advertise", "no-export-subconfed", "no-peer"]
COMMUNITIES = obj({
    "standard": arr(s("string", pattern=r"^([0-9]|[1-9][0-9]{1,8}|[1-3][0-9]{9}|4[01][0-9]{8}"
                                        r"|42[0-8][0-9]{7}|429[0-3][0-9]{6}|4294[0-8][0-9]{5}"
                                        r"|42949[0-5][0-9]{4}|429496[0-6][0-9]{3}|4294967[01][0-9]{2}"
                                        r"|42949672[0-8][0-9]|429496729[0-5])$|^([0-9]{1,5}):([0-9]{1,5})$")),
    "wellKnown": arr(s("string", enum=WELL_KNOWN)),
    "large": arr(s("string", pattern=r"^([0-9]{1,10}):([0-9]{1,10}):([0-9]{1,10})$"))})


def advertisement(v2: bool):
    item = obj({
        "advertisementType": s("string", enum=["PodCIDR", "CiliumPodIPPool", "Service",
                                               "Interface"]),
        "selector": LABEL_SELECTOR,
        "service": obj({"addresses": arr(s("string", enum=["LoadBalancerIP", "ClusterIP",
                                                          "ExternalIP"]), minItems=1),
                        "aggregationLengthIPv4": s("integer", minimum=0, maximum=31),
                        "aggregationLengthIPv6": s("integer", minimum=0, maximum=127)},
                       ["addresses"]),
        "interface": obj({"name": s("string")}, ["name"]),
        "attributes": obj({"communities": COMMUNITIES,
                           "localPreference": s("integer", format="int64")})},
        ["advertisementType"], **{"x-kubernetes-validations": [
            {"rule": "self.advertisementType != 'Service' || has(self.service)",
             "message": "service field is required for the 'Service' advertisementType"},
            {"rule": "self.advertisementType != 'Interface' || has(self.interface)",
             "message": "interface field is required for the 'Interface' advertisementType"},
            {"rule": "self.advertisementType != 'PodCIDR' || !has(self.selector)",
             "message": "selector field is not allowed for the 'PodCIDR' advertisementType"}]})
    return obj({"advertisements": arr(item)}, ["advertisements"]), None


def node_config_override(v2: bool):
    peer = obj({"name": name255(), "localAddress": s("string"),
                "localPort": s("integer", format="int32")}, ["name"])
    instance = obj({"name": name255(), "routerID": s("string", format="ipv4"),
                    "localPort": s("integer", format="int32"), "localASN": ASN,
                    "peers": keyed(peer)}, ["name"])
    return obj({"bgpInstances": keyed(instance, minItems=1)}, ["bgpInstances"]), None


def node_config(v2: bool):
    peer = obj({"name": name255(), "peerAddress": s("string"),
                "peerASN": s("integer", format="int64", minimum=0, maximum=U32),
                "autoDiscovery": AUTO_DISCOVERY, "localAddress": s("string"),
                "peerInterface": name255(), "peerConfigRef": peer_config_ref(v2)}, ["name"])
    instance = obj({"name": name255(), "localASN": ASN, "routerID": s("string", format="ipv4"),
                    "localPort": PORT, "peers": keyed(peer)}, ["name"])
    spec = obj({"bgpInstances": keyed(instance, minItems=1, maxItems=16)}, ["bgpInstances"])
    peer_status = obj({
        "name": s("string"), "peerAddress": s("string"), "peerASN": s("integer", format="int64"),
        "peeringState": s("string"),
        "timers": obj({"appliedHoldTimeSeconds": s("integer", format="int32"),
                       "appliedKeepaliveSeconds": s("integer", format="int32")}),
        "establishedTime": s("string"),
        "routeCount": arr(obj({"afi": s("string", enum=FAMILY_AFI),
                               "safi": s("string", enum=FAMILY_SAFI),
                               "received": s("integer"), "advertised": s("integer")}))},
        ["name"])
    status = {"bgpInstances": keyed(obj({"name": s("string"), "localASN": s("integer", format="int64"),
                                         "peers": keyed(peer_status)}, ["name"]))}
    if v2:
        status["conditions"] = CONDITIONS
    return spec, obj(status)


def neighbor():
    return obj({
        "peerAddress": s("string", format="cidr"), "peerPort": s("integer", format="int32",
                                                                 minimum=1, maximum=65535, default=179),
        "peerASN": s("integer", format="int64", minimum=0, maximum=U32),
        "authSecretRef": s("string"),
        "eBGPMultihopTTL": s("integer", format="int32", minimum=1, maximum=255, default=1),
        **TIMERS, "gracefulRestart": GRACEFUL_RESTART, "families": families(False),
        "advertisedPathAttributes": arr(obj({
            "selectorType": s("string", enum=["PodCIDR", "CiliumLoadBalancerIPPool",
                                              "CiliumPodIPPool"]),
            "selector": LABEL_SELECTOR, "communities": COMMUNITIES,
            "localPreference": s("integer", format="int64", minimum=0, maximum=U32)},
            ["selectorType"]))}, ["peerAddress", "peerASN"])


def peering_policy(v2: bool):
    router = obj({
        "localASN": s("integer", format="int64", minimum=0, maximum=U32),
        "exportPodCIDR": s("boolean", default=False),
        "podIPPoolSelector": LABEL_SELECTOR, "serviceSelector": LABEL_SELECTOR,
        "serviceAdvertisements": arr(s("string", enum=["LoadBalancerIP", "ClusterIP", "ExternalIP"]),
                                     default=["LoadBalancerIP"]),
        "neighbors": arr(neighbor(), minItems=1)}, ["localASN", "neighbors"])
    return obj({"nodeSelector": LABEL_SELECTOR, "virtualRouters": arr(router, minItems=1)},
               ["virtualRouters"]), None


def lb_pool(v2: bool):
    block = obj({"cidr": s("string", format="cidr"), "start": s("string"), "stop": s("string")})
    spec = obj({"blocks": arr(block), "cidrs": arr(block),
                "serviceSelector": LABEL_SELECTOR,
                "allowFirstLastIPs": s("string", enum=["Yes", "No"]),
                "disabled": s("boolean", default=False)})
    return spec, obj({"conditions": CONDITIONS})


# kind, plural, short names, schema(v2: bool) -> (spec, status or None), served versions
KINDS = [
    ("CiliumBGPClusterConfig", "ciliumbgpclusterconfigs", ["cbgpcluster"], cluster_config, ("v2", "v2alpha1")),
    ("CiliumBGPPeerConfig", "ciliumbgppeerconfigs", ["cbgppeer"], peer_config, ("v2", "v2alpha1")),
    ("CiliumBGPAdvertisement", "ciliumbgpadvertisements", ["cbgpadvert"], advertisement, ("v2", "v2alpha1")),
    ("CiliumBGPNodeConfigOverride", "ciliumbgpnodeconfigoverrides", ["cbgpnodeoverride"],
     node_config_override, ("v2", "v2alpha1")),
    ("CiliumBGPNodeConfig", "ciliumbgpnodeconfigs", ["cbgpnode"], node_config, ("v2", "v2alpha1")),
    ("CiliumBGPPeeringPolicy", "ciliumbgppeeringpolicies", ["bgpp"], peering_policy, ("v2alpha1",)),
    ("CiliumLoadBalancerIPPool", "ciliumloadbalancerippools", ["ippools", "ippool", "lbippool", "lbippools"],
     lb_pool, ("v2", "v2alpha1")),
]


def crd(kind, plural, short, schema, versions) -> dict:
    out_versions = []
    for v in versions:
        spec, status = schema(v == "v2")
        props = {"apiVersion": s("string"), "kind": s("string"), "metadata": s("object"), "spec": spec}
        if status is not None:
            props["status"] = status
        version = {"name": v, "served": True, "storage": v == versions[0],
                   "schema": {"openAPIV3Schema": obj(props, ["metadata", "spec"])},
                   "additionalPrinterColumns": [{"name": "Age", "type": "date",
                                                 "jsonPath": ".metadata.creationTimestamp"}]}
        if v == "v2alpha1" and len(versions) > 1:
            version["deprecated"] = True
        if status is not None:
            version["subresources"] = {"status": {}}
        out_versions.append(version)
    return {"apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
            "metadata": {"name": f"{plural}.cilium.io",
                         "labels": {"app.kubernetes.io/part-of": "vipd"}},
            "spec": {"group": "cilium.io", "scope": "Cluster",
                     "names": {"kind": kind, "listKind": f"{kind}List", "plural": plural,
                               "singular": kind.lower(), "shortNames": short,
                               "categories": ["cilium", "ciliumbgp"]},
                     "versions": out_versions}}


HEADER = """\
# The cilium.io CRDs vipd reads and writes, for clusters without Cilium (docs/kubernetes.md).
# Generated by scripts/gen-cilium-crds.py (do not edit here). In a cluster with Cilium >= 1.18
# these already exist: do not apply this file there.
"""


class _NoAliases(yaml.SafeDumper):
    def ignore_aliases(self, data):   # shared sub-schemas written out in full, no &anchors
        return True


def main() -> None:
    docs = [crd(*k) for k in KINDS]
    sys.stdout.write(HEADER + "---\n".join(yaml.dump(d, Dumper=_NoAliases, sort_keys=False,
                                                     width=100) for d in docs))


if __name__ == "__main__":
    main()
