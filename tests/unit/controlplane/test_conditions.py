"""Status conditions with Cilium's types, reasons and messages; NodeConfig status as data."""

from __future__ import annotations

from dataclasses import dataclass, field

from agent.controlplane import (AgentOptions, cluster_config_conditions, derive_node_config,
                                node_config_object, node_config_status, peer_config_conditions,
                                reconcile_error_condition)
from agent.controlplane.types import Family
from cp_builders import cluster_config, instance, node, objs, peer, peer_config, secret, twice


def by_type(conds):
    return {c.type: (c.status, c.reason, c.message) for c in conds}


def test_no_matching_node():
    o = objs(node("n1", {"rack": "rack0"}),
             cluster_config("none", [instance()], {"matchLabels": {"rack": "rack9"}}),
             cluster_config("some", [instance()], {"matchLabels": {"rack": "rack0"}}))
    c = twice(cluster_config_conditions, o)
    assert by_type(c["none"])["cilium.io/NoMatchingNode"] == (
        "True", "NoMatchingNode", "No node matches spec.nodeSelector")
    # the message is set even when False (as Cilium does)
    assert by_type(c["some"])["cilium.io/NoMatchingNode"] == (
        "False", "NoMatchingNode", "No node matches spec.nodeSelector")
    assert [x.type for x in c["some"]] == sorted(x.type for x in c["some"])


def test_missing_peer_configs_sorted_and_deduplicated():
    o = objs(node("n1"), peer_config("present"),
             cluster_config("cc", [instance("a", peers=[peer("p1", ref="zeta"),
                                                        peer("p2", ref="alpha"),
                                                        peer("p3", ref="present")]),
                                   instance("b", peers=[peer("p1", ref="zeta")])]))
    c = twice(cluster_config_conditions, o)["cc"]
    assert by_type(c)["cilium.io/MissingPeerConfigs"] == (
        "True", "MissingPeerConfigs",
        "Referenced CiliumBGPPeerConfig(s) are missing: [alpha zeta]")


def test_conflicting_cluster_config_is_reported_on_the_later_one():
    o = objs(node("n1"), node("n2", {"x": "y"}),
             cluster_config("first", [instance()], ts="2024-01-01T00:00:00Z"),
             cluster_config("second", [instance()], {"matchLabels": {"x": "y"}},
                            ts="2024-02-01T00:00:00Z"))
    c = twice(cluster_config_conditions, o)
    assert by_type(c["second"])["cilium.io/ConflictingClusterConfig"] == (
        "True", "ConflictingClusterConfigs",
        "Selecting the same node(s) with ClusterConfig(s): [first]")
    assert by_type(c["first"])["cilium.io/ConflictingClusterConfig"][0] == "False"


def test_missing_auth_secret():
    o = objs(peer_config("with", authSecretRef="gone"), peer_config("ok", authSecretRef="here"),
             peer_config("none"), secret("here", "pw"))
    c = twice(peer_config_conditions, o)
    assert by_type(c["with"])["cilium.io/MissingAuthSecret"] == (
        "True", "MissingAuthSecret", 'Referenced Auth Secret "gone" is missing')
    assert by_type(c["ok"])["cilium.io/MissingAuthSecret"][0] == "False"
    assert by_type(c["none"])["cilium.io/MissingAuthSecret"][0] == "False"


def test_status_report_disabled_removes_conditions():
    o = objs(node("n1"), cluster_config("cc", [instance()]), peer_config("p"))
    opts = AgentOptions(status_report=False)
    assert cluster_config_conditions(o, opts) == {"cc": ()}
    assert peer_config_conditions(o, opts) == {"p": ()}


def test_reconcile_error_condition():
    c = reconcile_error_condition({"i2": ["boom"], "i1": ["b", "a"]})
    assert (c.type, c.status, c.reason) == ("cilium.io/BGPReconcileError", "True",
                                             "BGPReconcileError")
    assert c.message == "i1: b\ni1: a\ni2: boom\n"
    assert reconcile_error_condition({}).status == "False"
    big = reconcile_error_condition({"i": ["x" * 40000]})
    assert len(big.message.encode()) == 32 * 1024


@dataclass
class Counts:
    received: int
    accepted: int
    advertised: int


@dataclass
class State:   # shape of agent.bgp.api.PeerState (the speaker contract)
    address: str
    state: str
    peer_asn: int = 65000
    local_asn: int = 65001
    hold_time: int | None = None
    keepalive: int | None = None
    established_at: float | None = None
    uptime_seconds: float | None = None
    families: dict = field(default_factory=dict)


def test_node_config_status():
    o = objs(node("n1"), cluster_config("cc", [instance(peers=[peer("up", ref=None),
                                                               peer("down", "10.0.0.9", ref=None),
                                                               peer("gone", "10.0.0.8", 0,
                                                                    ref=None)])]))
    nc = derive_node_config(o, "n1")
    states = {"i1": [
        State("10.0.0.254", "established", hold_time=9, keepalive=3, established_at=1700000000,
              families={Family.IPV6_UNICAST: Counts(0, 0, 0),
                        Family.IPV4_UNICAST: Counts(6, 0, 1)}),
        State("10.0.0.9", "active"),
    ]}
    st = twice(node_config_status, nc, states, {"i1": ["dial failed"]})
    peers = {p["name"]: p for p in st["bgpInstances"][0]["peers"]}
    assert peers["up"] == {
        "name": "up", "peerAddress": "10.0.0.254", "peerASN": 65000,
        "peeringState": "established",
        "timers": {"appliedHoldTimeSeconds": 9, "appliedKeepaliveSeconds": 3},
        "establishedTime": "2023-11-14T22:13:20Z",
        "routeCount": [{"afi": "ipv4", "safi": "unicast", "received": 6, "advertised": 1},
                       {"afi": "ipv6", "safi": "unicast", "received": 0, "advertised": 0}]}
    assert peers["down"]["peeringState"] == "active" and "establishedTime" not in peers["down"]
    assert peers["gone"]["peeringState"] == "unknown"
    assert st["bgpInstances"][0]["localASN"] == 65001
    assert st["conditions"][0]["message"] == "i1: dial failed\n"
    # a flat list of states (all instances' speakers) gives the same status
    assert node_config_status(nc, states["i1"], {"i1": ["dial failed"]}) == st


def test_node_config_object_carries_owner_and_peers():
    o = objs(node("n1"), cluster_config("cc", [instance(peers=[peer(ref="pc")])]),
             peer_config("pc"))
    obj = node_config_object(derive_node_config(o, "n1"))
    assert obj["metadata"]["ownerReferences"][0]["name"] == "cc"
    assert obj["spec"]["bgpInstances"][0]["peers"][0] == {
        "name": "p1", "peerAddress": "10.0.0.254", "peerASN": 65000,
        "peerConfigRef": {"name": "pc"}}


def test_validate_objects_reports_what_the_schema_cannot_see():
    from agent.controlplane import validate_objects

    rt = [{"localASN": 65005, "neighbors": [{"peerAddress": "10.0.5.1/32", "peerASN": 65005}]}]
    pp = [{"apiVersion": "cilium.io/v2alpha1", "kind": "CiliumBGPPeeringPolicy",
           "metadata": {"name": n}, "spec": {"virtualRouters": rt}} for n in ("a", "b")]
    o = objs(node("n1"), *pp, cluster_config("cc", [instance(peers=[peer(ref="gone")])]),
             peer_config("pc", authSecretRef="nope"))
    issues = twice(validate_objects, o)
    text = [str(i) for i in issues]
    assert issues[0].severity == "error" and "more then one CiliumBGPPeeringPolicy" in text[0]
    assert any("MissingPeerConfigs" in t and "[gone]" in t for t in text)
    assert any('Referenced Auth Secret "nope" is missing' in t for t in text)
