"""Node config derivation rules (Cilium's operator role). Every case is derived twice."""

from __future__ import annotations

import hashlib
import ipaddress

import pytest

from agent.controlplane import AgentOptions, derive_node_config
from agent.controlplane.nodeconfig import MULTIPLE_POLICIES_ERROR
from agent.controlplane.types import Family
from cp_builders import (cluster_config, family, instance, node, objs, peer, peer_config,
                         secret, twice)


def derive(objects, name="n1", **kw):
    return twice(derive_node_config, objects, name, **kw)


def override(name, instances):
    return {"apiVersion": "cilium.io/v2", "kind": "CiliumBGPNodeConfigOverride",
            "metadata": {"name": name}, "spec": {"bgpInstances": instances}}


def policy(name, selector, routers, ts=None):
    meta = {"name": name}
    if ts:
        meta["creationTimestamp"] = ts
    spec = {"virtualRouters": routers}
    if selector is not None:
        spec["nodeSelector"] = selector
    return {"apiVersion": "cilium.io/v2alpha1", "kind": "CiliumBGPPeeringPolicy",
            "metadata": meta, "spec": spec}


def test_peer_without_peer_config_ref_gets_ciliums_builtin_defaults():
    o = objs(node("n1"), cluster_config("cc", [instance(peers=[peer(ref=None)])]))
    nc = derive(o)
    (inst,) = nc.instances
    (p,) = inst.peers
    assert (p.hold_time, p.keepalive, p.connect_retry, p.port, p.ebgp_multihop) == \
        (90, 30, 120, 179, 1)
    assert p.graceful_restart is False and p.restart_time == 120
    assert [(f.afi, f.safi) for f in p.families] == [("ipv6", "unicast"), ("ipv4", "unicast")]
    assert all(f.advertisements is None for f in p.families)   # -> nothing advertised
    assert inst.local_port is None                              # -> no listener
    n = p.neighbor_config()
    assert n.families == (Family.IPV6_UNICAST, Family.IPV4_UNICAST)
    assert n.ebgp_multihop_ttl is None and n.passive is False


def test_peer_config_values_are_applied():
    o = objs(node("n1"), cluster_config("cc", [instance(peers=[peer()])]),
             peer_config(timers={"holdTimeSeconds": 9, "keepAliveTimeSeconds": 3,
                                 "connectRetryTimeSeconds": 5},
                         transport={"peerPort": 1790}, ebgpMultihop=4,
                         gracefulRestart={"enabled": True, "restartTimeSeconds": 15},
                         families=[family("ipv4", {"advertise": "bgp"})]))
    (p,) = derive(o).instances[0].peers
    assert (p.hold_time, p.keepalive, p.connect_retry, p.port, p.ebgp_multihop) == \
        (9, 3, 5, 1790, 4)
    assert p.graceful_restart and p.restart_time == 15
    assert p.speaker_families == (Family.IPV4_UNICAST,)
    assert p.neighbor_config().ebgp_multihop_ttl == 4


def test_missing_peer_config_skips_the_peer_with_an_error():
    o = objs(node("n1"), cluster_config("cc", [instance(peers=[peer("a", ref="nope"),
                                                               peer("b", "10.0.0.9", ref=None)])]))
    nc = derive(o)
    assert [p.name for p in nc.instances[0].peers] == ["b"]
    assert any("'nope' does not exist; peer skipped" in e.message for e in nc.errors)


@pytest.mark.parametrize("selector,labels,selected", [
    (None, {}, True),                                   # nil selects all nodes
    ({}, {"x": "y"}, True),                             # empty selects all nodes
    ({"matchLabels": {"rack": "rack0"}}, {"rack": "rack0"}, True),
    ({"matchLabels": {"rack": "rack0"}}, {"rack": "rack1"}, False),
])
def test_cluster_config_node_selector(selector, labels, selected):
    o = objs(node("n1", labels), cluster_config("cc", [instance()], node_selector=selector))
    nc = derive(o)
    assert bool(nc.instances) is selected
    assert nc.source == ("CiliumBGPClusterConfig/cc" if selected else None)


@pytest.mark.parametrize("case,node_kw,override_rid,mac,expected", [
    ("override wins", dict(ipv4="10.0.0.5"), "192.168.10.1", None, "192.168.10.1"),
    ("node IPv4", dict(ipv4="10.0.0.5", ipv6="fd00::5"), None, None, "10.0.0.5"),
    ("IPv6-only: MAC", dict(ipv4=None, ipv6="fd00::5"), None, "02:42:ac:11:00:02", "172.17.0.2"),
    ("IPv6-only: hash of the address", dict(ipv4=None, ipv6="fd00:10::2"), None, None,
     str(ipaddress.IPv4Address(hashlib.sha256(ipaddress.IPv6Address("fd00:10::2").packed)
                               .digest()[:4]))),
])
def test_router_id_rules(case, node_kw, override_rid, mac, expected):
    docs = [node("n1", **node_kw), cluster_config("cc", [instance()])]
    if override_rid:
        docs.append(override("n1", [{"name": "i1", "routerID": override_rid}]))
    nc = derive(objs(*docs), router_id_mac=mac)
    assert nc.instances[0].router_id == expected, case


def test_ipv6_only_nodes_get_distinct_router_ids_and_a_warning():
    cc = cluster_config("cc", [instance()])
    a = derive(objs(node("n1", ipv4=None, ipv6="fd00:10:0:1::2"), cc))
    b = derive(objs(node("n1", ipv4=None, ipv6="fd00:11:0:1::2"), cc))
    assert a.instances[0].router_id != b.instances[0].router_id
    assert "IPv6-only node" in a.issues[0].message


def test_no_router_id_possible_is_an_error():
    nc = derive(objs(node("n1", ipv4=None), cluster_config("cc", [instance()])))
    assert nc.instances == ()
    assert "cannot choose a router ID" in nc.errors[0].message


def test_override_local_port_asn_and_local_address():
    o = objs(node("n1"), cluster_config("cc", [instance(peers=[peer("p1"), peer("p2",
                                                                                  "10.0.1.1")])]),
             peer_config(),
             override("n1", [{"name": "i1", "localPort": 1790, "localASN": 65099,
                              "peers": [{"name": "p1", "localAddress": "10.0.0.77"}]}]))
    inst = derive(o).instances[0]
    assert (inst.local_port, inst.local_asn) == (1790, 65099)
    assert inst.peer("p1").local_address == "10.0.0.77"
    assert inst.peer("p2").local_address is None
    assert inst.peer("p1").neighbor_config().local_address == "10.0.0.77"


def test_override_for_another_node_does_not_apply():
    o = objs(node("n1"), cluster_config("cc", [instance(local_port=179)]),
             override("n2", [{"name": "i1", "localPort": 1790}]))
    assert derive(o).instances[0].local_port == 179


def test_missing_local_asn_is_an_error():
    o = objs(node("n1"), cluster_config("cc", [{"name": "i1"}]))
    nc = derive(o)
    assert nc.instances == () and "missing ASN in desired config" in nc.errors[0].message


def test_two_cluster_configs_first_keeps_the_node():
    o = objs(node("n1"),
             cluster_config("zz-old", [instance(asn=65001)], ts="2024-01-01T00:00:00Z"),
             cluster_config("aa-new", [instance(asn=65002)], ts="2024-06-01T00:00:00Z"))
    nc = derive(o)
    assert nc.source == "CiliumBGPClusterConfig/zz-old"
    assert [i.local_asn for i in nc.instances] == [65001]
    assert any("ConflictingClusterConfig" in e.message and e.object.endswith("aa-new")
               for e in nc.errors)


def test_peering_policy_wins_over_cluster_config():
    o = objs(node("n1"), cluster_config("cc", [instance(asn=65001)]),
             policy("pp", None, [{"localASN": 65005, "exportPodCIDR": True,
                                  "neighbors": [{"peerAddress": "10.0.5.1/32",
                                                 "peerASN": 65005}]}]))
    nc = derive(o)
    assert nc.source == "CiliumBGPPeeringPolicy/pp"
    assert [i.local_asn for i in nc.instances] == [65005]
    assert any("takes precedence" in i.message for i in nc.issues)


def test_two_peering_policies_selecting_the_node_apply_none():
    rt = [{"localASN": 65005, "neighbors": [{"peerAddress": "10.0.5.1/32", "peerASN": 65005}]}]
    o = objs(node("n1", {"rack": "rack0"}), policy("a", None, rt),
             policy("b", {"matchLabels": {"rack": "rack0"}}, rt),
             cluster_config("cc", [instance()]))
    nc = derive(o)
    assert nc.instances == () and nc.source is None
    assert MULTIPLE_POLICIES_ERROR in nc.errors[0].message


def test_seed_002_peer_address_with_prefix_length_uses_the_address():
    o = objs(node("n1", {"rack": "rack0"}, ipv4="10.0.5.11"),
             policy("rack0-65005", {"matchLabels": {"rack": "rack0"}}, [
                 {"localASN": 65005, "exportPodCIDR": True,
                  "neighbors": [{"peerAddress": "10.0.5.1/24", "peerASN": 65005}]}]))
    inst = derive(o).instances[0]
    assert inst.peers[0].address == "10.0.5.1"
    assert inst.router_id == "10.0.5.11" and inst.local_port is None
    assert inst.legacy.export_pod_cidr and inst.legacy.service_addresses == ("LoadBalancerIP",)
    assert [(f.afi, f.safi) for f in inst.peers[0].families] == [("ipv4", "unicast"),
                                                                 ("ipv6", "unicast")]


def test_legacy_node_annotation_sets_router_id_and_local_port():
    ann = {"cilium.io/bgp-virtual-router.65005": "router-id=1.2.3.4,local-port=1790,"
                                                  "router-id=5.6.7.8"}
    o = objs(node("n1", annotations=ann),
             policy("pp", None, [{"localASN": 65005, "neighbors": [
                 {"peerAddress": "10.0.5.1/32", "peerASN": 65005,
                  "gracefulRestart": {"enabled": True}}]}]))
    inst = derive(o).instances[0]
    assert (inst.router_id, inst.local_port) == ("5.6.7.8", 1790)   # last duplicate key wins
    assert inst.peers[0].graceful_restart and inst.peers[0].restart_time == 120


@pytest.mark.parametrize("docs,password,severity,peers", [
    ([secret("s", "hunter2")], "hunter2", None, 1),
    ([], None, "warning", 1),                   # no Secret: continue with empty password
    ([secret("s")], None, "error", 0),          # Secret without "password": peer not configured
    ([secret("s", "x", namespace="default")], None, "warning", 1),   # wrong namespace
])
def test_auth_secret_resolution(docs, password, severity, peers):
    o = objs(node("n1"), cluster_config("cc", [instance(peers=[peer()])]),
             peer_config(authSecretRef="s"), *docs)
    nc = derive(o)
    assert len(nc.instances[0].peers) == peers
    if peers:
        assert nc.instances[0].peers[0].password == password
    assert [i.severity for i in nc.issues] == ([severity] if severity else [])


def test_secrets_namespace_option():
    o = objs(node("n1"), cluster_config("cc", [instance(peers=[peer()])]),
             peer_config(authSecretRef="s"), secret("s", "pw", namespace="bgp"))
    nc = derive(o, options=AgentOptions(secrets_namespace="bgp"))
    assert nc.instances[0].peers[0].password == "pw"


@pytest.mark.parametrize("mode_block,gateways,address,error", [
    ({"mode": "DefaultGateway", "defaultGateway": {"addressFamily": "ipv4"}},
     {"ipv4": "10.0.0.1"}, "10.0.0.1", None),
    ({"mode": "DefaultGateway", "defaultGateway": {"addressFamily": "ipv6"}},
     {"ipv4": "10.0.0.1"}, None, "no ipv6 default gateway"),
    ({"mode": "DefaultGateway", "defaultGateway": {"addressFamily": "ipv6"}},
     {"ipv6": "fe80::1"}, None, "link-local gateway fe80::1 is not supported"),
])
def test_auto_discovery(mode_block, gateways, address, error):
    cc = cluster_config("cc", [instance(peers=[{"name": "gw", "autoDiscovery": mode_block}])])
    nc = derive(objs(node("n1"), cc), default_gateways=gateways)
    if address:
        assert nc.instances[0].peers[0].address == address and not nc.issues
    else:
        assert nc.instances[0].peers == ()
        assert error in nc.errors[0].message


UNNUMBERED = {"mode": "Unnumbered", "unnumbered": {"interface": "eth0"}}


@pytest.mark.parametrize("interfaces,routers,address,severity,message", [
    ({"eth0": []}, {"eth0": ["fe80::1"]}, "fe80::1%eth0", None, None),
    ({"eth0": []}, {"eth0": ["fe80::1", "fe80::2"]}, "fe80::1%eth0", "warning",
     "several IPv6 routers on 'eth0' (fe80::1, fe80::2); peering with fe80::1"),
    ({"eth0": []}, {"eth1": ["fe80::1"]}, None, "error", "no IPv6 router heard on 'eth0' yet"),
    ({"eth1": []}, {}, None, "error", "interface 'eth0' does not exist on this node"),
    (None, None, None, "warning", "discovered at run time from IPv6 Router Advertisements"),
])
def test_unnumbered_peer_is_the_ipv6_router_heard_on_the_interface(interfaces, routers, address, severity,
                                                                    message):
    cc = cluster_config("cc", [instance(peers=[{"name": "tor", "autoDiscovery": UNNUMBERED}])])
    nc = derive(objs(node("n1"), cc), interfaces=interfaces, ipv6_routers=routers)
    assert [p.address for p in nc.instances[0].peers] == ([address] if address else [])
    assert [(i.severity, message in i.message) for i in nc.issues] == ([(severity, True)] if severity else [])


@pytest.mark.parametrize("peer_fields,address,error", [
    ({"peerInterface": "eth0", "autoDiscovery": UNNUMBERED}, "fe80::1%eth0", None),  # discovered
    ({"peerInterface": "eth0", "peerAddress": "fe80::9"}, "fe80::9%eth0", None),  # given
    ({"peerAddress": "fe80::9%eth0"}, "fe80::9%eth0", None),                     # zone in the address
    ({"peerAddress": "fe80::9"}, None, "needs its interface"),
    ({"peerAddress": "fd00::9%eth0"}, None, "only meaningful on a link-local"),
])
def test_node_config_link_local_peers(peer_fields, address, error):
    nc_obj = {"apiVersion": "cilium.io/v2", "kind": "CiliumBGPNodeConfig", "metadata": {"name": "n1"},
              "spec": {"bgpInstances": [{"name": "i", "localASN": 65001,
                                         "peers": [{"name": "p", "peerASN": 65000, **peer_fields}]}]}}
    nc = derive(objs(node("n1"), nc_obj), interfaces={"eth0": ["fe80::2/64"]}, ipv6_routers={"eth0": ["fe80::1"]})
    assert [p.address for p in nc.instances[0].peers] == ([address] if address else [])
    assert [error in e.message for e in nc.errors] == ([True] if error else [])
    # the session is on the link: ``neighbor_config`` keeps the zone the speaker connects with
    if address:
        assert nc.instances[0].peers[0].neighbor_config().address == address


def test_bfd_is_off_with_a_warning_for_link_local_peers():
    pc = peer_config()
    pc["metadata"]["annotations"] = {"vipd.io/bfd": ""}
    cc = cluster_config("cc", [instance(peers=[{**peer(), "peerAddress": None, "autoDiscovery": UNNUMBERED}])])
    nc = derive(objs(node("n1"), cc, pc), interfaces={"eth0": []}, ipv6_routers={"eth0": ["fe80::1"]})
    assert nc.instances[0].peers[0].bfd is None
    assert "BFD (vipd.io/bfd) is not supported for the link-local peer fe80::1%eth0" in nc.issues[0].message


def test_source_interface_is_ignored_for_link_local_peers():
    cc = cluster_config("cc", [instance(peers=[{**peer(), "peerAddress": None, "autoDiscovery": UNNUMBERED}])])
    o = objs(node("n1"), cc, peer_config(transport={"sourceInterface": "eth1"}))
    nc = derive(o, interfaces={"eth0": [], "eth1": ["10.0.0.5/24"]}, ipv6_routers={"eth0": ["fe80::1"]})
    [p] = nc.instances[0].peers
    assert (p.address, p.local_address) == ("fe80::1%eth0", None)
    assert "sourceInterface 'eth1' is ignored for the link-local peer" in nc.issues[0].message


@pytest.mark.parametrize("addrs,expected", [
    (["10.0.0.5/24", "fe80::1/64"], "10.0.0.5"),
    (["10.0.0.5/24", "10.0.0.6/24"], None),     # ambiguous -> peer skipped
    ([], None),
])
def test_source_interface(addrs, expected):
    o = objs(node("n1"), cluster_config("cc", [instance(peers=[peer()])]),
             peer_config(transport={"sourceInterface": "eth1"}))
    nc = derive(o, interfaces={"eth1": addrs})
    peers = nc.instances[0].peers
    if expected:
        assert peers[0].local_address == expected
    else:
        assert peers == () and "sourceInterface 'eth1'" in nc.errors[0].message


def test_explicit_node_config_is_used_when_nothing_else_selects_the_node():
    nc_obj = {"apiVersion": "cilium.io/v2", "kind": "CiliumBGPNodeConfig",
              "metadata": {"name": "n1"},
              "spec": {"bgpInstances": [{"name": "i", "localASN": 65001, "localPort": 179,
                                         "peers": [{"name": "p", "peerAddress": "10.0.0.9",
                                                    "peerASN": 65000,
                                                    "localAddress": "10.0.0.1"}]}]}}
    nc = derive(objs(node("n1"), nc_obj))
    assert nc.source == "CiliumBGPNodeConfig/n1"
    assert nc.instances[0].local_port == 179
    assert nc.instances[0].peers[0].local_address == "10.0.0.1"


def test_neighbor_config_does_not_depend_on_advertisement_selectors():
    a = objs(node("n1"), cluster_config("cc", [instance(peers=[peer()])]),
             peer_config(families=[family("ipv4", {"a": "1"})]))
    b = objs(node("n1"), cluster_config("cc", [instance(peers=[peer()])]),
             peer_config(families=[family("ipv4", {"a": "2"})]))
    pa = derive(a).instances[0].peers[0]
    pb = derive(b).instances[0].peers[0]
    assert pa != pb and pa.neighbor_config() == pb.neighbor_config()


def test_password_is_not_in_repr():
    o = objs(node("n1"), cluster_config("cc", [instance(peers=[peer()])]),
             peer_config(authSecretRef="s"), secret("s", "hunter2"))
    assert "hunter2" not in repr(derive(o))


def test_missing_node_object_warns_and_still_uses_override_router_id():
    o = objs(cluster_config("cc", [instance()]),
             override("n1", [{"name": "i1", "routerID": "1.1.1.1"}]))
    nc = derive(o)
    assert nc.instances[0].router_id == "1.1.1.1"
    assert nc.issues[0].severity == "warning" and "no Node object" in nc.issues[0].message
