"""Schema validation: Cilium's defaults and bounds, and errors that name file, object, field and
what is allowed. Every case loads twice to prove loading is deterministic."""

from __future__ import annotations

import copy

import pytest
import yaml

from agent.config import load_dir, load_documents, validate_document
from agent.config.meta import LabelSelector


def _load(doc: dict, filename="f.yaml"):
    text = yaml.safe_dump(doc)
    first = load_documents(text, filename)
    second = load_documents(text, filename)
    assert [str(e) for e in first.errors] == [str(e) for e in second.errors]
    assert first.objects == second.objects
    return first


def peer_config(**spec):
    return {"apiVersion": "cilium.io/v2", "kind": "CiliumBGPPeerConfig",
            "metadata": {"name": "pc"}, "spec": spec}


def cluster(instances, api="cilium.io/v2"):
    return {"apiVersion": api, "kind": "CiliumBGPClusterConfig", "metadata": {"name": "cc"},
            "spec": {"bgpInstances": instances}}


def advert(*entries):
    return {"apiVersion": "cilium.io/v2", "kind": "CiliumBGPAdvertisement",
            "metadata": {"name": "ad"}, "spec": {"advertisements": list(entries)}}


def svc_entry(**service):
    return {"advertisementType": "Service", "service": {"addresses": ["LoadBalancerIP"],
                                                        **service},
            "selector": {"matchLabels": {"a": "b"}}}


INVALID = [
    # (case, manifest, field path, words the message must contain)
    ("hold below 3", peer_config(timers={"holdTimeSeconds": 2, "keepAliveTimeSeconds": 1}),
     "spec.timers.holdTimeSeconds", "3..65535"),
    ("hold above 65535", peer_config(timers={"holdTimeSeconds": 65536}),
     "spec.timers.holdTimeSeconds", "3..65535"),
    ("keepalive 0", peer_config(timers={"keepAliveTimeSeconds": 0}),
     "spec.timers.keepAliveTimeSeconds", "1..65535"),
    ("keepalive > hold", peer_config(timers={"holdTimeSeconds": 9, "keepAliveTimeSeconds": 10}),
     "spec.timers", "keepAliveTimeSeconds can not be larger than holdTimeSeconds"),
    ("connect retry 0", peer_config(timers={"connectRetryTimeSeconds": 0}),
     "spec.timers.connectRetryTimeSeconds", "1..2147483647"),
    ("restart time 0", peer_config(gracefulRestart={"enabled": True, "restartTimeSeconds": 0}),
     "spec.gracefulRestart.restartTimeSeconds", "1..4095"),
    ("restart time 4096", peer_config(gracefulRestart={"enabled": True,
                                                       "restartTimeSeconds": 4096}),
     "spec.gracefulRestart.restartTimeSeconds", "1..4095"),
    ("gracefulRestart without enabled", peer_config(gracefulRestart={"restartTimeSeconds": 5}),
     "spec.gracefulRestart.enabled", "required"),
    ("multihop 0", peer_config(ebgpMultihop=0), "spec.ebgpMultihop", "1..255"),
    ("multihop 256", peer_config(ebgpMultihop=256), "spec.ebgpMultihop", "1..255"),
    ("peer port 0", peer_config(transport={"peerPort": 0}), "spec.transport.peerPort",
     "1..65535"),
    ("peer port 65536", peer_config(transport={"peerPort": 65536}), "spec.transport.peerPort",
     "1..65535"),
    ("v2 transport.localPort", peer_config(transport={"localPort": 179}),
     "spec.transport.localPort", "removed in cilium.io/v2"),
    ("bad afi", peer_config(families=[{"afi": "ipv5", "safi": "unicast"}]),
     "spec.families[0].afi", "'ipv4', 'ipv6'"),
    ("unknown field", peer_config(holdTime=3), "spec.holdTime",
     "allowed here: transport, timers, authSecretRef, gracefulRestart, ebgpMultihop, families"),
    ("aggregation v4 32", advert(svc_entry(aggregationLengthIPv4=32)),
     "spec.advertisements[0].service.aggregationLengthIPv4", "0..31"),
    ("aggregation v6 128", advert(svc_entry(aggregationLengthIPv6=128)),
     "spec.advertisements[0].service.aggregationLengthIPv6", "0..127"),
    ("service advert without service",
     advert({"advertisementType": "Service", "selector": {"matchLabels": {"a": "b"}}}),
     "spec.advertisements[0]", 'required with advertisementType "Service"'),
    ("empty addresses", advert(svc_entry(addresses=[])),
     "spec.advertisements[0].service.addresses", "at least 1"),
    ("bad address type", advert(svc_entry(addresses=["NodeIP"])),
     "spec.advertisements[0].service.addresses[0]", "'LoadBalancerIP', 'ClusterIP'"),
    ("bad standard community", advert({"advertisementType": "PodCIDR", "attributes": {
        "communities": {"standard": ["65536:1"]}}}),
     "spec.advertisements[0].attributes.communities.standard", "<0-65535>:<0-65535>"),
    ("bad large community", advert({"advertisementType": "PodCIDR", "attributes": {
        "communities": {"large": ["1:2"]}}}),
     "spec.advertisements[0].attributes.communities.large", "<0-4294967295>"),
    ("bad well-known", advert({"advertisementType": "PodCIDR", "attributes": {
        "communities": {"wellKnown": ["no-exports"]}}}),
     "spec.advertisements[0].attributes.communities.wellKnown[0]", "'no-export'"),
    ("zero instances", cluster([]), "spec.bgpInstances", "at least 1"),
    ("17 instances", cluster([{"name": f"i{i}", "localASN": 65000} for i in range(17)]),
     "spec.bgpInstances", "allowed: 1..16"),
    ("instance name 256 chars", cluster([{"name": "x" * 256, "localASN": 1}]),
     "spec.bgpInstances[0].name", "1..255"),
    ("duplicate instance names", cluster([{"name": "a", "localASN": 1},
                                          {"name": "a", "localASN": 2}]),
     "spec.bgpInstances", "duplicate bgpInstances name 'a'"),
    ("localASN 0", cluster([{"name": "a", "localASN": 0}]), "spec.bgpInstances[0].localASN",
     "1..4294967295"),
    ("peerASN too big", cluster([{"name": "a", "localASN": 1, "peers": [
        {"name": "p", "peerAddress": "10.0.0.1", "peerASN": 4294967296}]}]),
     "spec.bgpInstances[0].peers[0].peerASN", "0..4294967295"),
    ("bad peer address", cluster([{"name": "a", "localASN": 1, "peers": [
        {"name": "p", "peerAddress": "10.0.0.300"}]}]),
     "spec.bgpInstances[0].peers[0].peerAddress", "not an IPv4 or IPv6 address"),
    ("v2alpha1 peerASN 0", cluster([{"name": "a", "localASN": 1, "peers": [
        {"name": "p", "peerAddress": "10.0.0.1", "peerASN": 0}]}], api="cilium.io/v2alpha1"),
     "spec.bgpInstances[0].peers[0].peerASN", "1..4294967295 in cilium.io/v2alpha1"),
    ("autoDiscovery without block", cluster([{"name": "a", "localASN": 1, "peers": [
        {"name": "p", "autoDiscovery": {"mode": "DefaultGateway"}}]}]),
     "spec.bgpInstances[0].peers[0].autoDiscovery", "requires the defaultGateway block"),
    ("override routerID not IPv4", {
        "apiVersion": "cilium.io/v2", "kind": "CiliumBGPNodeConfigOverride",
        "metadata": {"name": "n"},
        "spec": {"bgpInstances": [{"name": "a", "routerID": "fd00::1"}]}},
     "spec.bgpInstances[0].routerID", "not an IPv4 address"),
    ("pool block cidr and start", {
        "apiVersion": "cilium.io/v2", "kind": "CiliumLoadBalancerIPPool",
        "metadata": {"name": "p"},
        "spec": {"blocks": [{"cidr": "10.0.0.0/24", "start": "10.0.0.1"}]}},
     "spec.blocks[0]", "either cidr or start/stop"),
    ("pool allowFirstLastIPs", {
        "apiVersion": "cilium.io/v2", "kind": "CiliumLoadBalancerIPPool",
        "metadata": {"name": "p"},
        "spec": {"blocks": [{"cidr": "10.0.0.0/24"}], "allowFirstLastIPs": "maybe"}},
     "spec.allowFirstLastIPs", "'Yes' or 'No'"),
    ("policy keepalive > hold", {
        "apiVersion": "cilium.io/v2alpha1", "kind": "CiliumBGPPeeringPolicy",
        "metadata": {"name": "p"},
        "spec": {"virtualRouters": [{"localASN": 1, "neighbors": [{
            "peerAddress": "10.0.0.1/32", "peerASN": 2, "holdTimeSeconds": 3,
            "keepAliveTimeSeconds": 4}]}]}},
     "spec.virtualRouters[0].neighbors[0]", "keepAliveTimeSeconds can not be larger"),
    ("policy served only as v2alpha1", {
        "apiVersion": "cilium.io/v2", "kind": "CiliumBGPPeeringPolicy",
        "metadata": {"name": "p"}, "spec": {}},
     "apiVersion", "cilium.io/v2alpha1"),
    ("selector NotIn without values", advert({"advertisementType": "Service",
                                              "service": {"addresses": ["ClusterIP"]},
                                              "selector": {"matchExpressions": [
                                                  {"key": "a", "operator": "NotIn"}]}}),
     "spec.advertisements[0].selector.matchExpressions[0]", "requires a non-empty values"),
    ("service bad eTP", {"apiVersion": "v1", "kind": "Service",
                         "metadata": {"name": "s", "namespace": "ns"},
                         "spec": {"externalTrafficPolicy": "Nearest"}},
     "spec.externalTrafficPolicy", "'Cluster' or 'Local'"),
    ("secret data not base64", {"apiVersion": "v1", "kind": "Secret",
                                "metadata": {"name": "s", "namespace": "kube-system"},
                                "data": {"password": "not base64!"}},
     "data", "not base64"),
]


@pytest.mark.parametrize("case,doc,field,allowed", INVALID, ids=[c[0] for c in INVALID])
def test_invalid_manifest_is_reported_with_field_and_allowed_values(case, doc, field, allowed):
    result = _load(doc, "bad.yaml")
    assert result.objects.all() == []
    assert result.errors, case
    err = next((e for e in result.errors if e.field == field), None)
    assert err is not None, [str(e) for e in result.errors]
    assert allowed in err.message, str(err)
    assert err.file == "bad.yaml"
    assert err.kind == doc["kind"] and err.name == doc["metadata"]["name"]
    assert str(err).startswith(f"bad.yaml: {doc['kind']}/")


def test_error_string_names_file_object_field_and_bounds():
    r = _load(peer_config(timers={"holdTimeSeconds": 2, "keepAliveTimeSeconds": 1}), "x.yaml")
    assert str(r.errors[0]) == ("x.yaml: CiliumBGPPeerConfig/pc: spec.timers.holdTimeSeconds: "
                                "Input should be greater than or equal to 3 (got 2); "
                                "allowed: 3..65535")


def test_namespaced_object_is_named_with_namespace():
    r = _load({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "s",
                                                                   "namespace": "web"},
               "spec": {"type": "Balanced"}})
    assert str(r.errors[0]).startswith("f.yaml: Service/web/s: spec.type:")


def test_one_bad_object_does_not_stop_the_others():
    good = peer_config()
    bad = copy.deepcopy(good)
    bad["metadata"]["name"] = "bad"
    bad["spec"]["ebgpMultihop"] = 0
    other = cluster([{"name": "a", "localASN": 65000}])
    text = yaml.safe_dump_all([bad, good, other])
    r = load_documents(text, "multi.yaml")
    assert [e.name for e in r.errors] == ["bad"]
    assert r.errors[0].document == 0
    assert [o.key for o in r.objects.all()] == ["CiliumBGPClusterConfig/cc",
                                                "CiliumBGPPeerConfig/pc"]


def test_peer_config_defaults_are_ciliums():
    r = _load(peer_config())
    pc = r.objects.peer_configs[0]
    assert pc.spec.ebgp_multihop == 1
    assert pc.spec.timers is None and pc.spec.transport is None   # filled at resolution
    r = _load(peer_config(timers={}, transport={}, gracefulRestart={"enabled": True}))
    spec = r.objects.peer_configs[0].spec
    assert (spec.timers.connect_retry_time_seconds, spec.timers.hold_time_seconds,
            spec.timers.keep_alive_time_seconds) == (120, 90, 30)
    assert spec.transport.peer_port == 179
    assert spec.graceful_restart.restart_time_seconds == 120


def test_v2_peer_asn_defaults_to_zero_learn_from_open():
    r = _load(cluster([{"name": "a", "localASN": 1, "peers": [
        {"name": "p", "peerAddress": "10.0.0.1"}]}]))
    assert r.objects.cluster_configs[0].spec.bgp_instances[0].peers[0].peer_asn == 0


def test_duplicate_object_is_an_error_naming_the_first_definition():
    text = yaml.safe_dump_all([peer_config(), peer_config(ebgpMultihop=3)])
    r = load_documents(text, "dup.yaml")
    assert len(r.objects.peer_configs) == 1 and r.objects.peer_configs[0].spec.ebgp_multihop == 1
    assert "already defined in dup.yaml#1" in r.errors[0].message


def test_invalid_yaml_names_line():
    r = load_documents("apiVersion: v1\nkind: [\n", "broken.yaml")
    assert "invalid YAML" in r.errors[0].message and "line" in r.errors[0].message


def test_unknown_kinds_are_ignored_not_errors_and_lists_are_flattened():
    text = yaml.safe_dump_all([
        {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "d"}},
        {"apiVersion": "v1", "kind": "List", "items": [peer_config()]},
    ])
    r = load_documents(text, "mixed.yaml")
    assert not r.errors
    assert r.ignored == ["mixed.yaml: apps/v1 Deployment d: kind not used by vipd"]
    assert r.objects.peer_configs[0].name == "pc"


def test_load_dir_reads_yaml_and_yml_only(tmp_path):
    (tmp_path / "a.yaml").write_text(yaml.safe_dump(peer_config()))
    (tmp_path / "b.yml").write_text(yaml.safe_dump(cluster([{"name": "a", "localASN": 1}])))
    (tmp_path / "c.txt").write_text("not: yaml: [")
    r = load_dir(tmp_path)
    assert not r.errors and len(r.objects.all()) == 2


def test_v2alpha1_and_v2_load_into_the_same_model():
    a = _load(cluster([{"name": "a", "localASN": 1}], api="cilium.io/v2alpha1"))
    b = _load(cluster([{"name": "a", "localASN": 1}]))
    assert a.objects.cluster_configs[0].spec == b.objects.cluster_configs[0].spec


SELECTOR_CASES = [
    ({"matchLabels": {"a": "1"}}, {"a": "1", "b": "2"}, True),
    ({"matchLabels": {"a": "1"}}, {"a": "2"}, False),
    ({"matchExpressions": [{"key": "somekey", "operator": "NotIn", "values": ["never"]}]}, {},
     True),
    ({"matchExpressions": [{"key": "a", "operator": "In", "values": ["1", "2"]}]}, {"a": "2"},
     True),
    ({"matchExpressions": [{"key": "a", "operator": "Exists"}]}, {"b": "1"}, False),
    ({"matchExpressions": [{"key": "a", "operator": "DoesNotExist"}]}, {"b": "1"}, True),
    ({}, {"x": "y"}, True),   # empty (non-nil) selector matches everything
    ({"matchLabels": {"a": "1"}, "matchExpressions": [
        {"key": "b", "operator": "NotIn", "values": ["2"]}]}, {"a": "1", "b": "2"}, False),
]


@pytest.mark.parametrize("selector,labels,expected", SELECTOR_CASES)
def test_label_selector_semantics(selector, labels, expected):
    sel = LabelSelector.model_validate(selector)
    assert sel.matches(labels) is expected
    assert sel.matches(labels) is expected


def test_validate_document_rejects_non_mapping():
    obj, errors, _ = validate_document(["a"], "x.yaml", 3)
    assert obj is None and errors[0].document == 3 and "mapping" in errors[0].message
