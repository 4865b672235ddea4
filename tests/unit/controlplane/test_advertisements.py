"""Advertisement rules per instance x peer x family, and route policies as data.
Every case is computed twice (idempotency)."""

from __future__ import annotations

from ipaddress import ip_network as net

import pytest

from agent.controlplane import (AgentOptions, LbIpamResult, derive_node_config, desired_paths,
                                route_policies)
from agent.controlplane.types import Family, Origin
from cp_builders import (SELECT_ALL, advertisement, cluster_config, endpoints, family, instance,
                         node, objs, peer, peer_config, service, service_entry, twice)

V4, V6 = Family.IPV4_UNICAST, Family.IPV6_UNICAST
ADV = {"advertise": "bgp"}


def setup(*extra, peer_asn=65000, local_asn=65001, families=None, node_kw=None):
    fams = families if families is not None else [family("ipv4", ADV), family("ipv6", ADV)]
    return objs(node("n1", **(node_kw or {"pod_cidrs": ("10.1.0.0/24", "fd00:1::/64")})),
                cluster_config("cc", [instance(asn=local_asn, peers=[peer(asn=peer_asn)])]),
                peer_config(families=fams), *extra)


def paths(o, node_name="n1", lbipam=None, options=AgentOptions(), interfaces=None):
    nc = twice(derive_node_config, o, node_name)
    inst = nc.instances[0]
    return twice(desired_paths, o, node_name, inst, inst.peers[0], lbipam, options, interfaces)


def prefixes(p, fam=V4):
    return sorted(str(x) for x in p.get(fam, {}))


def test_pod_cidr_goes_to_the_matching_family_only():
    p = paths(setup(advertisement("a", ADV, [{"advertisementType": "PodCIDR"}])))
    assert prefixes(p, V4) == ["10.1.0.0/24"]
    assert prefixes(p, V6) == ["fd00:1::/64"]
    attrs = p[V4][net("10.1.0.0/24")]
    assert attrs.origin == Origin.IGP and attrs.next_hop is None


def test_nil_family_selector_advertises_nothing():
    o = setup(advertisement("a", ADV, [{"advertisementType": "PodCIDR"}]),
              families=[family("ipv4"), family("ipv6")])
    assert paths(o) == {V4: {}, V6: {}}


def test_advertisement_not_matching_the_family_selector_is_ignored():
    o = setup(advertisement("a", {"advertise": "other"}, [{"advertisementType": "PodCIDR"}]))
    assert paths(o) == {V4: {}, V6: {}}


def test_family_only_ipv4_keeps_ipv6_prefixes_out():
    o = setup(advertisement("a", ADV, [{"advertisementType": "PodCIDR"}]),
              families=[family("ipv4", ADV)])
    assert paths(o) == {V4: {net("10.1.0.0/24"): paths(o)[V4][net("10.1.0.0/24")]}}


LB = dict(ingress=("192.0.2.10",))


@pytest.mark.parametrize("case,svc_kw,selector,expected", [
    ("NotIn trick selects all", LB, SELECT_ALL, ["192.0.2.10/32"]),
    ("nil selector selects none", LB, None, []),
    ("label match", dict(LB, labels={"bgp": "blue"}), {"matchLabels": {"bgp": "blue"}},
     ["192.0.2.10/32"]),
    ("label mismatch", dict(LB, labels={"bgp": "red"}), {"matchLabels": {"bgp": "blue"}}, []),
    ("synthetic name label", LB, {"matchLabels": {"io.kubernetes.service.name": "web"}},
     ["192.0.2.10/32"]),
    ("synthetic namespace label", LB,
     {"matchLabels": {"io.kubernetes.service.namespace": "other"}}, []),
    ("class unset", LB, SELECT_ALL, ["192.0.2.10/32"]),
    ("class bgp", dict(LB, lb_class="io.cilium/bgp-control-plane"), SELECT_ALL,
     ["192.0.2.10/32"]),
    ("class other never", dict(LB, lb_class="io.cilium/l2-announcer"), SELECT_ALL, []),
    ("not a LoadBalancer", dict(LB, type_="ClusterIP"), SELECT_ALL, []),
    ("no ingress yet", {}, SELECT_ALL, []),
])
def test_service_selection(case, svc_kw, selector, expected):
    o = setup(advertisement("a", ADV, [service_entry(selector=selector)]),
              service("web", **svc_kw))
    assert prefixes(paths(o)) == expected, case


EP_LOCAL_READY = [("10.1.0.5", "n1", True, False)]
EP_REMOTE_READY = [("10.1.1.5", "n2", True, False)]
EP_LOCAL_NOT_READY = [("10.1.0.5", "n1", False, False)]
EP_LOCAL_TERMINATING = [("10.1.0.5", "n1", True, True)]
EP_LOCAL_UNKNOWN = [("10.1.0.5", "n1", None, None)]


@pytest.mark.parametrize("case,etp,eps,expected", [
    ("Local with ready local endpoint", "Local", EP_LOCAL_READY, True),
    ("Local with remote endpoint only", "Local", EP_REMOTE_READY, False),
    ("Local with not-ready local endpoint", "Local", EP_LOCAL_NOT_READY, False),
    ("Local with terminating local endpoint", "Local", EP_LOCAL_TERMINATING, False),
    ("Local, ready unknown counts as ready", "Local", EP_LOCAL_UNKNOWN, True),
    ("Local with zero endpoints", "Local", [], False),
    ("Cluster with remote endpoint only", "Cluster", EP_REMOTE_READY, True),
    ("Cluster with zero endpoints (default option)", "Cluster", [], True),
])
def test_external_traffic_policy_for_load_balancer_and_external_ips(case, etp, eps, expected):
    entry = service_entry(addresses=("LoadBalancerIP", "ExternalIP"))
    o = setup(advertisement("a", ADV, [entry]),
              service("web", etp=etp, external_ips=["198.51.100.7"], **LB),
              endpoints("web", eps))
    want = ["192.0.2.10/32", "198.51.100.7/32"] if expected else []
    assert prefixes(paths(o)) == want, case


def test_zero_endpoints_withdrawn_when_option_disabled():
    o = setup(advertisement("a", ADV, [service_entry()]), service("web", **LB))
    opts = AgentOptions(no_service_endpoints_routable=False)
    assert prefixes(paths(o, options=opts)) == []
    o2 = setup(advertisement("a", ADV, [service_entry()]), service("web", **LB),
               endpoints("web", EP_REMOTE_READY))
    assert prefixes(paths(o2, options=opts)) == ["192.0.2.10/32"]


@pytest.mark.parametrize("itp,eps,expected", [
    ("Local", EP_LOCAL_READY, ["10.96.0.10/32"]),
    ("Local", EP_REMOTE_READY, []),
    ("Cluster", EP_REMOTE_READY, ["10.96.0.10/32"]),
])
def test_cluster_ip_uses_internal_traffic_policy_only(itp, eps, expected):
    o = setup(advertisement("a", ADV, [service_entry(addresses=("ClusterIP",))]),
              service("web", type_="ClusterIP", itp=itp, etp="Local"),
              endpoints("web", eps))
    assert prefixes(paths(o)) == expected


def test_cluster_ip_none_and_external_name_are_not_advertised():
    o = setup(advertisement("a", ADV, [service_entry(addresses=("ClusterIP",))]),
              service("headless", type_="ClusterIP", cluster_ip="None"),
              service("ext", type_="ExternalName", cluster_ip=None))
    assert prefixes(paths(o)) == []


def test_dual_stack_cluster_ips_go_to_their_families():
    svc = service("web", type_="ClusterIP")
    svc["spec"]["clusterIPs"] = ["10.96.0.10", "fd00:96::10"]
    o = setup(advertisement("a", ADV, [service_entry(addresses=("ClusterIP",))]), svc)
    p = paths(o)
    assert prefixes(p, V4) == ["10.96.0.10/32"] and prefixes(p, V6) == ["fd00:96::10/128"]


@pytest.mark.parametrize("case,etp,agg4,agg6,expected4,expected6", [
    ("host routes", "Cluster", None, None, ["192.0.2.10/32", "192.0.2.77/32"],
     ["2001:db8::10/128"]),
    ("aggregated", "Cluster", 24, 64, ["192.0.2.0/24"], ["2001:db8::/64"]),
    ("aggregation ignored under Local", "Local", 24, 64, ["192.0.2.10/32", "192.0.2.77/32"],
     ["2001:db8::10/128"]),
])
def test_aggregation(case, etp, agg4, agg6, expected4, expected6):
    svc_kw = {}
    if agg4 is not None:
        svc_kw["aggregationLengthIPv4"] = agg4
    if agg6 is not None:
        svc_kw["aggregationLengthIPv6"] = agg6
    o = setup(advertisement("a", ADV, [service_entry(**svc_kw)]),
              service("web", etp=etp, ingress=("192.0.2.10", "2001:db8::10")),
              service("api", etp=etp, ingress=("192.0.2.77",)),
              endpoints("web", EP_LOCAL_READY), endpoints("api", EP_LOCAL_READY))
    p = paths(o)
    assert (prefixes(p, V4), prefixes(p, V6)) == (expected4, expected6), case


def test_communities_merged_and_deduplicated_and_local_pref_max_for_ibgp():
    a1 = advertisement("a1", ADV, [{"advertisementType": "PodCIDR", "attributes": {
        "communities": {"standard": ["65535:65281", "65000:99"], "large": ["1:2:3"]},
        "localPreference": 100}}])
    a2 = advertisement("a2", ADV, [{"advertisementType": "PodCIDR", "attributes": {
        "communities": {"wellKnown": ["no-export"], "standard": ["4259840099"],
                        "large": ["1:2:3", "4:5:6"]},
        "localPreference": 200}}])
    p = paths(setup(a1, a2, peer_asn=65001))        # iBGP
    attrs = p[V4][net("10.1.0.0/24")]
    # 65535:65281 == no-export, 4259840099 == 65000:99: deduplicated by value
    assert attrs.communities == ((65000 << 16) | 99, 0xFFFFFF01)
    assert attrs.large_communities == ((1, 2, 3), (4, 5, 6))
    assert attrs.local_pref == 200


@pytest.mark.parametrize("peer_asn,expected", [(65001, 150), (65000, None), (0, 150)])
def test_local_preference_only_towards_ibgp(peer_asn, expected):
    a = advertisement("a", ADV, [{"advertisementType": "PodCIDR",
                                  "attributes": {"localPreference": 150}}])
    p = paths(setup(a, peer_asn=peer_asn))
    assert p[V4][net("10.1.0.0/24")].local_pref == expected


def test_lbipam_allocations_replace_object_ingress():
    o = setup(advertisement("a", ADV, [service_entry()]), service("web", **LB))
    lb = LbIpamResult(allocations={"default/web": ("203.0.113.5",)})
    assert prefixes(paths(o, lbipam=lb)) == ["203.0.113.5/32"]


def test_unsatisfied_lbipam_service_has_no_vip_even_with_ingress_in_yaml():
    from agent.controlplane.types import Condition
    o = setup(advertisement("a", ADV, [service_entry()]), service("web", **LB))
    cond = Condition("cilium.io/IPAMRequestSatisfied", "False", "no_pool", "")
    lb = LbIpamResult(service_conditions={"default/web": cond})
    assert prefixes(paths(o, lbipam=lb)) == []


def test_legacy_origin_option_marks_load_balancer_routes_incomplete():
    o = setup(advertisement("a", ADV, [service_entry(), {"advertisementType": "PodCIDR"}]),
              service("web", **LB))
    p = paths(o, options=AgentOptions(legacy_origin_attribute=True))
    assert p[V4][net("192.0.2.10/32")].origin == Origin.INCOMPLETE
    assert p[V4][net("10.1.0.0/24")].origin == Origin.IGP


def test_interface_advertisement():
    o = setup(advertisement("a", ADV, [{"advertisementType": "Interface",
                                        "interface": {"name": "lo"}}]))
    p = paths(o, interfaces={"lo": ["127.0.0.1/8", "10.255.0.1/32", "10.255.0.1/32",
                                    "fe80::1/64", "2001:db8:ff::1/128", "::ffff:1.2.3.4/128"]})
    assert prefixes(p, V4) == ["10.255.0.1/32"] and prefixes(p, V6) == ["2001:db8:ff::1/128"]


def test_route_policies_as_data():
    o = setup(advertisement("a", ADV, [
        {"advertisementType": "PodCIDR",
         "attributes": {"communities": {"standard": ["65000:99"]}}},
        service_entry()]), service("web", **LB))
    nc = derive_node_config(o, "n1")
    pols = twice(route_policies, o, nc)
    by_name = {p.name: p for p in pols}
    assert sorted(by_name) == ["allow-local", "p1-ipv4-PodCIDR", "p1-ipv4-Service-web-default-"
                               "LoadBalancerIP", "p1-ipv6-PodCIDR"]
    pod = by_name["p1-ipv4-PodCIDR"]
    assert pod.vrouter == 65001 and pod.type == "export"
    (st,) = pod.statements
    assert st.match_peers == ("10.0.0.254/32",)
    assert [str(x) for x in st.match_prefixes] == ["10.1.0.0/24 (24..24)"]
    assert st.rib_action == "accept" and st.path_actions == ("AddCommunities: [65000:99]",)
    svc = by_name["p1-ipv4-Service-web-default-LoadBalancerIP"].statements[0]
    assert [str(x) for x in svc.match_prefixes] == ["192.0.2.10/32 (32..32)"]
    imp = by_name["allow-local"]
    assert imp.type == "import" and imp.statements[0].rib_action == "accept"


def test_every_peer_family_key_present_so_stale_routes_get_withdrawn():
    o = setup()
    assert paths(o) == {V4: {}, V6: {}}


def test_merge_does_not_depend_on_advertisement_order():
    def attrs(lp, comm):
        return {"communities": {"standard": [comm]}, "localPreference": lp}

    def build(first, second):
        return setup(advertisement(first, ADV, [service_entry(attributes=attrs(10, "1:1"))]),
                     advertisement(second, ADV, [service_entry(attributes=attrs(20, "2:2"))]),
                     service("web", **LB), peer_asn=65001)

    a, b = paths(build("aa", "zz")), paths(build("zz", "aa"))
    assert a == b
    pa = a[V4][net("192.0.2.10/32")]
    assert pa.communities == ((1 << 16) | 1, (2 << 16) | 2) and pa.local_pref == 20


def test_with_a_datapath_only_programmed_vips_are_announced():
    """The announce rule: ``vip_ready`` (the ServiceReconciler's view) keeps a Service address
    out while a desired frontend at it is not programmed; other Services and PodCIDRs stay."""
    o = setup(advertisement("a", ADV, [service_entry(addresses=("LoadBalancerIP", "ExternalIP")),
                                       {"advertisementType": "PodCIDR"}]),
              service("web", external_ips=["198.51.100.7"], **LB),
              service("db", ingress=("192.0.2.11",), cluster_ip="10.96.0.11"),
              endpoints("web", EP_REMOTE_READY), endpoints("db", EP_REMOTE_READY))
    nc = derive_node_config(o, "n1")
    inst = nc.instances[0]
    everything = ["10.1.0.0/24", "192.0.2.10/32", "192.0.2.11/32", "198.51.100.7/32"]
    assert prefixes(desired_paths(o, "n1", inst, inst.peers[0])) == everything      # no datapath
    ready = lambda ip: ip != "192.0.2.10"                                            # noqa: E731
    assert prefixes(desired_paths(o, "n1", inst, inst.peers[0], vip_ready=ready)) == [
        "10.1.0.0/24", "192.0.2.11/32", "198.51.100.7/32"]
    assert prefixes(desired_paths(o, "n1", inst, inst.peers[0], vip_ready=lambda ip: True)) == everything


def test_the_memo_gives_the_same_paths_as_a_fresh_computation_and_sees_changes():
    from agent.controlplane.memo import Memo

    def world(eps):
        return setup(advertisement("a", ADV, [service_entry(), {"advertisementType": "PodCIDR"}]),
                     service("web", **LB), service("db", ingress=("192.0.2.11",), cluster_ip="10.96.0.11"),
                     endpoints("web", EP_REMOTE_READY), endpoints("db", eps))
    memo = Memo()
    o = world(EP_REMOTE_READY)
    inst = derive_node_config(o, "n1").instances[0]
    for _ in range(3):                                   # passes over the same objects: all hits after the first
        assert desired_paths(o, "n1", inst, inst.peers[0], memo=memo) == desired_paths(o, "n1", inst, inst.peers[0])
        memo.rotate()
    assert memo.hits > 0
    ready = lambda ip: ip != "192.0.2.11"                                            # noqa: E731
    assert prefixes(desired_paths(o, "n1", inst, inst.peers[0], memo=memo, vip_ready=ready)) == [
        "10.1.0.0/24", "192.0.2.10/32"]
    opts = AgentOptions(no_service_endpoints_routable=False)
    o2 = world([])                                      # db loses its endpoints: new objects, recomputed
    inst2 = derive_node_config(o2, "n1").instances[0]
    assert prefixes(desired_paths(o2, "n1", inst2, inst2.peers[0], None, opts, memo=memo)) == [
        "10.1.0.0/24", "192.0.2.10/32"]
