"""Legacy PeeringPolicy advertisement rules, and migration to v2 with a round trip: the
advertisements (and session settings) every node sends are the same before and after."""

from __future__ import annotations

import dataclasses
from ipaddress import ip_network as net
from pathlib import Path

import pytest
import yaml

from agent.config import ObjectSet, load_documents
from agent.controlplane import desired_paths, derive_node_config, lbipam
from agent.controlplane.migrate import migrate
from agent.controlplane.types import Family
from cp_builders import endpoints, node, objs, pool, service, twice

SEEDS = Path(__file__).resolve().parents[2] / "golden" / "seeds"
V4, V6 = Family.IPV4_UNICAST, Family.IPV6_UNICAST


def announcements(o: ObjectSet, node_name: str):
    """(local ASN, peer address) -> (session settings, desired paths) for one node."""
    nc = derive_node_config(o, node_name)
    assert not nc.errors, nc.errors
    lb = lbipam.allocate(o)
    out = {}
    for inst in nc.instances:
        for p in inst.peers:
            session = dataclasses.replace(p.neighbor_config(), name="")
            key = (inst.local_asn, inst.router_id, inst.local_port, p.address)
            assert key not in out
            out[key] = (session, desired_paths(o, node_name, inst, p, lb))
    return out


def round_trip(docs: list[dict]):
    legacy = ObjectSet.from_objects(objs(*docs).all())
    result = twice(migrate, docs)
    context = [d for d in docs if d["kind"] not in ("CiliumBGPPeeringPolicy", "ConfigMap")]
    migrated_text = result.to_yaml()
    loaded = load_documents(migrated_text, "migrated.yaml")
    assert not loaded.errors, [str(e) for e in loaded.errors]
    migrated = ObjectSet.from_objects(loaded.objects.all() + objs(*context).all())
    return legacy, migrated, result


def policy(name, selector, routers):
    spec = {"virtualRouters": routers}
    if selector is not None:
        spec["nodeSelector"] = selector
    return {"apiVersion": "cilium.io/v2alpha1", "kind": "CiliumBGPPeeringPolicy",
            "metadata": {"name": name}, "spec": spec}


SEED_002_NODES = [
    node("cilium-bgp-control-plane", {"rack": "rack0"}, "10.0.5.11", pod_cidrs=("10.1.0.0/24",)),
    node("cilium-bgp-worker", {"rack": "rack0"}, "10.0.5.12", pod_cidrs=("10.1.3.0/24",)),
    node("cilium-bgp-worker2", {"rack": "rack1"}, "10.0.10.11", pod_cidrs=("10.1.2.0/24",)),
    node("cilium-bgp-worker3", {"rack": "rack1"}, "10.0.10.12", pod_cidrs=("10.1.1.0/24",)),
]


def test_seed_002_policies_advertise_each_nodes_pod_cidr_to_its_leaf():
    docs = list(yaml.safe_load_all((SEEDS / "002" / "peering-policies.yaml").read_text()))
    o = objs(*docs, *SEED_002_NODES)
    got = {n["metadata"]["name"]: {k[3]: sorted(str(x) for x in v[1][V4])
                                   for k, v in announcements(o, n["metadata"]["name"]).items()}
           for n in SEED_002_NODES}
    assert got == {"cilium-bgp-control-plane": {"10.0.5.1": ["10.1.0.0/24"]},
                   "cilium-bgp-worker": {"10.0.5.1": ["10.1.3.0/24"]},
                   "cilium-bgp-worker2": {"10.0.10.1": ["10.1.2.0/24"]},
                   "cilium-bgp-worker3": {"10.0.10.1": ["10.1.1.0/24"]}}


def test_seed_002_round_trip():
    docs = list(yaml.safe_load_all((SEEDS / "002" / "peering-policies.yaml").read_text()))
    legacy, migrated, result = round_trip(docs + SEED_002_NODES)
    assert result.warnings == []
    kinds = sorted(d["kind"] for d in result.documents)
    assert kinds == ["CiliumBGPAdvertisement"] * 2 + ["CiliumBGPClusterConfig"] * 2 + \
        ["CiliumBGPPeerConfig"] * 2
    for n in SEED_002_NODES:
        name = n["metadata"]["name"]
        before, after = announcements(legacy, name), announcements(migrated, name)
        assert before and before == after, name


RICH_POLICY = policy("edge", {"matchLabels": {"bgp": "on"}}, [{
    "localASN": 65001, "exportPodCIDR": True,
    "serviceSelector": {"matchExpressions": [{"key": "expose", "operator": "In",
                                              "values": ["bgp"]}]},
    "serviceAdvertisements": ["LoadBalancerIP", "ClusterIP"],
    "neighbors": [
        {"peerAddress": "10.0.0.254/32", "peerASN": 65001, "holdTimeSeconds": 9,
         "keepAliveTimeSeconds": 3, "gracefulRestart": {"enabled": True,
                                                        "restartTimeSeconds": 30},
         "families": [{"afi": "ipv4", "safi": "unicast"}],
         "advertisedPathAttributes": [
             {"selectorType": "PodCIDR",
              "communities": {"standard": ["65001:1"], "wellKnown": ["no-export"]},
              "localPreference": 150},
             {"selectorType": "CiliumLoadBalancerIPPool",
              "selector": {"matchLabels": {"tier": "gold"}},
              "communities": {"large": ["65001:2:3"]}, "localPreference": 300}]},
        {"peerAddress": "fd00::fe/128", "peerASN": 65099, "peerPort": 1790,
         "eBGPMultihopTTL": 3}],
}])


def rich_context():
    return [
        node("a", {"bgp": "on"}, "10.0.0.1", "fd00::1", ("10.1.0.0/24", "fd00:1::/64"),
             annotations={"cilium.io/bgp-virtual-router.65001": "router-id=9.9.9.9,"
                                                                 "local-port=1790"}),
        node("b", {"bgp": "on"}, "10.0.0.2", pod_cidrs=("10.1.1.0/24",)),
        node("c", {"bgp": "off"}, "10.0.0.3"),
        pool("gold", [{"cidr": "192.0.2.0/28"}], labels={"tier": "gold"}, ts="1"),
        pool("plain", [{"cidr": "198.51.100.0/28"}], ts="2",
             selector={"matchLabels": {"pool": "plain"}}),
        service("web", labels={"expose": "bgp"}, ingress=("192.0.2.1",), etp="Local",
                selector={"app": "web"}),
        service("api", labels={"expose": "bgp", "pool": "plain"}, ingress=("198.51.100.1",),
                cluster_ip="10.96.0.20"),
        service("hidden", ingress=("192.0.2.2",)),
        endpoints("web", [("10.1.0.9", "a", True, False)]),
    ]


def test_legacy_rules_path_attributes_and_traffic_policy():
    o = objs(RICH_POLICY, *rich_context())
    a = announcements(o, "a")
    ibgp = a[(65001, "9.9.9.9", 1790, "10.0.0.254")][1]
    assert set(ibgp) == {V4}
    assert sorted(map(str, ibgp[V4])) == ["10.1.0.0/24", "10.96.0.10/32", "10.96.0.20/32",
                                          "192.0.2.1/32", "198.51.100.1/32"]
    pod = ibgp[V4][net("10.1.0.0/24")]
    assert pod.communities == ((65001 << 16) | 1, 0xFFFFFF01) and pod.local_pref == 150
    gold = ibgp[V4][net("192.0.2.1/32")]
    assert gold.large_communities == ((65001, 2, 3),) and gold.local_pref == 300
    plain = ibgp[V4][net("198.51.100.1/32")]
    assert plain.communities == () and plain.local_pref is None
    ebgp = a[(65001, "9.9.9.9", 1790, "fd00::fe")][1]
    assert sorted(map(str, ebgp[V6])) == ["fd00:1::/64"]
    assert ebgp[V4][net("10.1.0.0/24")].local_pref is None   # eBGP: no LOCAL_PREF
    # node b has no local endpoint of the eTP=Local service "web"
    b = announcements(o, "b")
    assert "192.0.2.1/32" not in map(str, b[(65001, "10.0.0.2", None, "10.0.0.254")][1][V4])
    assert announcements(o, "c") == {}


def test_rich_policy_round_trip():
    legacy, migrated, result = round_trip([RICH_POLICY, *rich_context()])
    for name in ("a", "b", "c"):
        assert announcements(legacy, name) == announcements(migrated, name), name
    assert any("not by CiliumLoadBalancerIPPool" in w for w in result.warnings)
    overrides = [d for d in result.documents if d["kind"] == "CiliumBGPNodeConfigOverride"]
    assert overrides == [{"apiVersion": "cilium.io/v2", "kind": "CiliumBGPNodeConfigOverride",
                          "metadata": {"name": "a"},
                          "spec": {"bgpInstances": [{"name": "instance-65001",
                                                     "routerID": "9.9.9.9",
                                                     "localPort": 1790}]}}]


def test_metallb_config_map_seed_003():
    docs = list(yaml.safe_load_all((SEEDS / "003" / "bgp-config.yaml").read_text()))
    result = twice(migrate, docs)
    assert result.warnings == []
    loaded = load_documents(result.to_yaml(), "migrated.yaml")
    assert not loaded.errors, [str(e) for e in loaded.errors]
    nodes = [node("plain", {}, "10.4.94.10", pod_cidrs=("10.5.113.0/24",)),
             node("edge", {"kubernetes/route": "bgp-peer-83"}, "10.4.83.10",
                  pod_cidrs=("10.5.114.0/24",))]
    o = ObjectSet.from_objects(loaded.objects.all() + objs(*nodes, service("web")).all())
    assert [p.name for p in o.lb_pools] == ["default"]
    assert lbipam.allocate(o).allocations == {"default/web": ("10.5.112.0",)}
    expected_peers = {
        "plain": {(64513, "10.4.36.239"), (64513, "10.4.36.238")},
        "edge": {(64513, "10.4.36.239"), (64513, "10.4.36.238"), (64512, "10.4.36.250"),
                 (64512, "10.4.36.251")},
    }
    for n in nodes:
        name = n["metadata"]["name"]
        ann = announcements(o, name)
        assert {(k[0], k[3]) for k in ann} == expected_peers[name]
        for _key, (session, paths) in ann.items():
            assert session.hold_time == 90 and session.port == 179
            assert sorted(map(str, paths[V4])) == sorted([n["spec"]["podCIDRs"][0],
                                                          "10.5.112.0/32"])


@pytest.mark.parametrize("value,seconds", [("90s", 90), ("1m30s", 90), (30, 30), ("3s", 3)])
def test_metallb_hold_time_conversion(value, seconds):
    cm = {"apiVersion": "v1", "kind": "ConfigMap",
          "metadata": {"name": "bgp-config", "namespace": "kube-system"},
          "data": {"config.yaml": yaml.safe_dump({"peers": [
              {"peer-address": "10.0.0.1", "peer-asn": 65000, "my-asn": 65001,
               "hold-time": value, "password": "s3cret"}]})}}
    docs = migrate([cm]).documents
    pc = next(d for d in docs if d["kind"] == "CiliumBGPPeerConfig")
    if seconds != 90:
        assert pc["spec"]["timers"]["holdTimeSeconds"] == seconds
        assert pc["spec"]["timers"]["keepAliveTimeSeconds"] == max(1, seconds // 3)
    secret = next(d for d in docs if d["kind"] == "Secret")
    assert secret["stringData"] == {"password": "s3cret"}
    assert pc["spec"]["authSecretRef"] == secret["metadata"]["name"]
