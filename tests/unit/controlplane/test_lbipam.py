"""LB-IPAM allocation rules and conditions. Each case runs twice, and the result fed back as
``previous_allocations`` must reproduce itself (allocations stable across restarts)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.controlplane import lbipam
from cp_builders import objs, pool, service


def allocate(o, previous=None):
    first = lbipam.allocate(o, previous)
    assert lbipam.allocate(o, previous) == first
    # a restarted agent that persisted the allocations gets the same answer
    assert lbipam.allocate(o, first.allocations).allocations == first.allocations
    return first


def cond(result, key):
    c = result.service_conditions[key]
    return c.status, c.reason, c.message


def test_dormant_without_pools():
    r = allocate(objs(service("web")))
    assert r.allocations == {} and r.service_conditions == {} and r.pool_conditions == {}


def test_allocates_first_ip_of_a_cidr_and_reports_satisfied():
    r = allocate(objs(pool("p", [{"cidr": "10.5.112.0/30"}]), service("web")))
    assert r.allocations == {"default/web": ("10.5.112.0",)}
    assert cond(r, "default/web") == ("True", "satisfied", "")
    by_type = {c.type: c for c in r.pool_conditions["p"]}
    assert by_type["cilium.io/IPsTotal"].message == "4"
    assert by_type["cilium.io/IPsUsed"].message == "1"
    assert by_type["cilium.io/IPsAvailable"].message == "3"
    assert by_type["cilium.io/IPsTotal"].status == "Unknown"
    assert by_type["cilium.io/IPsTotal"].reason == "noreason"
    assert by_type["cilium.io/PoolConflict"].status == "False"


@pytest.mark.parametrize("cidr,allow,first", [
    ("10.0.0.0/30", "No", "10.0.0.1"),     # network address reserved
    ("10.0.0.0/30", "Yes", "10.0.0.0"),
    ("10.0.0.0/30", None, "10.0.0.0"),     # unset means Yes
    ("10.0.0.8/31", "No", "10.0.0.8"),     # /31 exempt
    ("10.0.0.9/32", "No", "10.0.0.9"),     # /32 exempt
])
def test_allow_first_last_ips(cidr, allow, first):
    r = allocate(objs(pool("p", [{"cidr": cidr}], allow_first_last=allow), service("web")))
    assert r.allocations["default/web"] == (first,)


def test_first_last_reserved_reduces_capacity():
    o = objs(pool("p", [{"cidr": "10.0.0.0/30"}], allow_first_last="No"),
             service("a", ts="2024-01-01T00:00:00Z"), service("b", ts="2024-01-02T00:00:00Z"),
             service("c", ts="2024-01-03T00:00:00Z"))
    r = allocate(o)
    assert r.allocations == {"default/a": ("10.0.0.1",), "default/b": ("10.0.0.2",)}
    assert cond(r, "default/c") == ("False", "out_of_ips", lbipam.OUT_OF_IPS_MSG)


def test_start_stop_range_and_single_start():
    r = allocate(objs(pool("p", [{"start": "10.0.0.10", "stop": "10.0.0.11"},
                                 {"start": "10.0.0.20"}], allow_first_last="No"),
                      service("a", ts="1"), service("b", ts="2"), service("c", ts="3")))
    assert [r.allocations[f"default/{n}"][0] for n in "abc"] == \
        ["10.0.0.10", "10.0.0.11", "10.0.0.20"]


def test_service_selector_and_no_pool_reason():
    o = objs(pool("blue", [{"cidr": "10.0.0.0/24"}], selector={"matchLabels": {"color": "blue"}}),
             service("web", labels={"color": "blue"}), service("db", labels={"color": "red"}),
             service("ns-sel", namespace="team"))
    r = allocate(o)
    assert r.allocations == {"default/web": ("10.0.0.0",)}
    assert cond(r, "default/db") == ("False", "no_pool", lbipam.NO_POOL_MSG)


def test_selector_on_synthetic_namespace_label():
    o = objs(pool("team", [{"cidr": "10.0.0.0/24"}],
                  selector={"matchLabels": {"io.kubernetes.service.namespace": "team"}}),
             service("web", namespace="team"), service("web"))
    assert allocate(o).allocations == {"team/web": ("10.0.0.0",)}


def test_disabled_pool_makes_no_new_allocations_but_keeps_existing():
    o = objs(pool("p", [{"cidr": "10.0.0.0/24"}], disabled=True), service("old"), service("new"))
    r = allocate(o, {"default/old": ("10.0.0.7",)})
    assert r.allocations == {"default/old": ("10.0.0.7",)}
    assert cond(r, "default/new") == ("False", "no_pool", lbipam.NO_POOL_MSG)


def test_requested_ips_from_annotation_and_load_balancer_ip():
    o = objs(pool("p", [{"cidr": "10.0.0.0/24"}]),
             service("a", annotations={"lbipam.cilium.io/ips": "10.0.0.50, 10.0.0.51"}),
             service("b", lb_ip="10.0.0.60"),
             service("c", annotations={"io.cilium/lb-ipam-ips": "10.0.0.70"}))
    r = allocate(o)
    assert r.allocations == {"default/a": ("10.0.0.50", "10.0.0.51"),
                             "default/b": ("10.0.0.60",), "default/c": ("10.0.0.70",)}


def test_requested_ip_outside_pools_and_selector_mismatch():
    o = objs(pool("p", [{"cidr": "10.0.0.0/24"}], selector={"matchLabels": {"x": "y"}}),
             service("out", lb_ip="192.0.2.1"), service("mismatch", lb_ip="10.0.0.5"))
    r = allocate(o)
    assert cond(r, "default/out") == ("False", "no_pool",
                                      "No pool exists with a CIDR containing '192.0.2.1'")
    assert cond(r, "default/mismatch") == (
        "False", "pool_selector_mismatch",
        "The pool with the CIDR containing '10.0.0.5', doesn't select this service")


def test_requested_ip_taken_without_sharing_key():
    o = objs(pool("p", [{"cidr": "10.0.0.0/24"}]), service("a", lb_ip="10.0.0.5", ts="1"),
             service("b", lb_ip="10.0.0.5", ts="2"))
    r = allocate(o)
    assert r.allocations == {"default/a": ("10.0.0.5",)}
    assert cond(r, "default/b") == ("False", "already_allocated",
                                    "The IP '10.0.0.5' is already allocated to another service")


SK = "lbipam.cilium.io/sharing-key"
XNS = "lbipam.cilium.io/sharing-cross-namespace"


@pytest.mark.parametrize("case,a_kw,b_kw,reason", [
    ("compatible", dict(ports=(80,)), dict(ports=(443,)), None),
    ("different sharing key", dict(), dict(annotations={SK: "other"}), "different sharing key"),
    ("different namespace", dict(), dict(namespace="team"),
     "different and not permitted namespace"),
    ("cross-namespace on one side only", dict(annotations={SK: "k", XNS: "team"}),
     dict(namespace="team"), "different and not permitted namespace"),
    ("cross-namespace on both sides", dict(annotations={SK: "k", XNS: "team"}),
     dict(namespace="team", annotations={SK: "k", XNS: "*"}), None),
    ("same port (protocol ignored)", dict(ports=(53,)), dict(ports=(53,)), "same port"),
    ("different eTP", dict(), dict(etp="Local"), "different ExternalTrafficPolicy"),
    ("Local with different selectors", dict(etp="Local", selector={"app": "a"}),
     dict(etp="Local", selector={"app": "b"}),
     "compatible ExternalTrafficPolicy local but selecting different set of pods"),
    ("Local without selector", dict(etp="Local"), dict(etp="Local"),
     "compatible ExternalTrafficPolicy local but selecting different set of pods"),
    ("Local with same selector", dict(etp="Local", selector={"app": "a"}),
     dict(etp="Local", selector={"app": "a"}, ports=(443,)), None),
])
def test_sharing_key_compatibility_rules(case, a_kw, b_kw, reason):
    a_kw = dict(a_kw)
    b_kw = dict(b_kw)
    a_kw.setdefault("annotations", {SK: "k"})
    b_kw.setdefault("annotations", {SK: "k"})
    b_kw.setdefault("ports", (443,))
    a_kw["annotations"] = {**a_kw["annotations"], "lbipam.cilium.io/ips": "10.0.0.9"}
    b_kw["annotations"] = {**b_kw["annotations"], "lbipam.cilium.io/ips": "10.0.0.9"}
    o = objs(pool("p", [{"cidr": "10.0.0.0/24"}]), service("a", ts="1", **a_kw),
             service("b", ts="2", **b_kw))
    r = allocate(o)
    key_b = f"{b_kw.get('namespace', 'default')}/b"
    if reason is None:
        assert r.allocations["default/a"] == r.allocations[key_b] == ("10.0.0.9",), case
        assert cond(r, key_b)[0] == "True"
    else:
        assert key_b not in r.allocations, case
        assert cond(r, key_b) == (
            "False", "already_allocated_incompatible_service",
            f"The IP '10.0.0.9' is already allocated to an incompatible service. Reason: {reason}")


def test_generic_sharing_shares_compatible_and_adds_ip_on_port_conflict():
    o = objs(pool("p", [{"cidr": "10.0.0.0/24"}]),
             service("a", ts="1", ports=(80,), annotations={SK: "k"}),
             service("b", ts="2", ports=(443,), annotations={SK: "k"}),
             service("c", ts="3", ports=(80,), annotations={SK: "k"}))
    r = allocate(o)
    assert r.allocations["default/a"] == r.allocations["default/b"] == ("10.0.0.0",)
    assert r.allocations["default/c"] == ("10.0.0.1",)


def test_overlapping_pools_later_one_conflicts_and_is_not_used():
    o = objs(pool("old", [{"cidr": "10.0.0.0/30"}], ts="2024-01-01T00:00:00Z"),
             pool("new", [{"cidr": "10.0.0.2/31"}, {"cidr": "10.9.0.0/24"}],
                  ts="2024-02-01T00:00:00Z"),
             *[service(f"s{i}", ts=str(i)) for i in range(5)])
    r = allocate(o)
    conflict = {c.type: c for c in r.pool_conditions["new"]}["cilium.io/PoolConflict"]
    assert (conflict.status, conflict.reason) == ("True", "cidr_overlap")
    assert conflict.message == ("Pool conflicts since range '10.0.0.2/31' overlaps range "
                                "'10.0.0.0/30' from IP Pool 'old'")
    assert sorted(ip for ips in r.allocations.values() for ip in ips) == \
        ["10.0.0.0", "10.0.0.1", "10.0.0.2", "10.0.0.3"]
    assert cond(r, "default/s4")[1] == "out_of_ips"


def test_allocations_are_stable_when_a_new_service_sorts_first():
    o1 = objs(pool("p", [{"cidr": "10.0.0.0/24"}]), service("zeta"))
    r1 = allocate(o1)
    o2 = objs(pool("p", [{"cidr": "10.0.0.0/24"}]), service("zeta"), service("alpha"))
    r2 = allocate(o2, r1.allocations)
    assert r2.allocations["default/zeta"] == r1.allocations["default/zeta"] == ("10.0.0.0",)
    assert r2.allocations["default/alpha"] == ("10.0.0.1",)


def test_previous_allocation_dropped_when_no_longer_valid():
    o = objs(pool("p", [{"cidr": "10.0.0.0/24"}], selector={"matchLabels": {"a": "b"}}),
             service("web", labels={"a": "b"}, lb_ip="10.0.0.9"))
    # previous IP not in the (changed) request list -> stripped, request satisfied instead
    r = allocate(o, {"default/web": ("10.0.0.1",)})
    assert r.allocations == {"default/web": ("10.0.0.9",)}


def test_existing_ingress_is_imported():
    o = objs(pool("p", [{"cidr": "10.0.0.0/24"}]), service("web", ingress=("10.0.0.42",)))
    assert allocate(o).allocations == {"default/web": ("10.0.0.42",)}


def test_services_with_other_classes_are_ignored_entirely():
    o = objs(pool("p", [{"cidr": "10.0.0.0/24"}]), service("x", lb_class="example.com/lb"),
             service("y", lb_class="io.cilium/bgp-control-plane"), service("z", type_="NodePort"))
    r = allocate(o)
    assert set(r.allocations) == {"default/y"} and set(r.service_conditions) == {"default/y"}


@pytest.mark.parametrize("policy,families,expected", [
    (None, None, ("10.0.0.0",)),
    ("SingleStack", ["IPv6"], ("fd00::",)),
    ("PreferDualStack", ["IPv6", "IPv4"], ("10.0.0.0", "fd00::")),
    ("RequireDualStack", ["IPv4"], ("10.0.0.0", "fd00::")),
])
def test_ip_families(policy, families, expected):
    o = objs(pool("p", [{"cidr": "10.0.0.0/24"}, {"cidr": "fd00::/120"}]),
             service("web", ip_family_policy=policy, ip_families=families))
    assert allocate(o).allocations["default/web"] == expected


def test_dual_stack_unsatisfied_without_ipv6_pool():
    o = objs(pool("p", [{"cidr": "10.0.0.0/24"}]),
             service("web", ip_family_policy="RequireDualStack"))
    r = allocate(o)
    assert r.allocations["default/web"] == ("10.0.0.0",)
    assert cond(r, "default/web") == ("False", "no_pool", lbipam.NO_POOL_MSG)


# ------------------------------------------------------------------------------ properties

_svc = st.fixed_dictionaries({
    "ports": st.lists(st.sampled_from([53, 80, 443]), min_size=1, max_size=2, unique=True),
    "key": st.sampled_from([None, "k1", "k2"]),
    "etp": st.sampled_from(["Cluster", "Local"]),
    "ns": st.sampled_from(["default", "team"]),
    "req": st.sampled_from([None, "10.0.0.1", "10.0.0.2"]),
})


@settings(max_examples=60, deadline=None)
@given(specs=st.lists(_svc, min_size=1, max_size=8), reverse=st.booleans())
def test_property_no_incompatible_sharing_and_stable_restarts(specs, reverse):
    svcs = []
    for i, s in enumerate(specs):
        ann = {}
        if s["key"]:
            ann[SK] = s["key"]
        if s["req"]:
            ann["lbipam.cilium.io/ips"] = s["req"]
        svcs.append(service(f"s{i}", namespace=s["ns"], ports=tuple(s["ports"]), etp=s["etp"],
                            annotations=ann or None, selector={"app": "x"}, ts=f"{i:03d}"))
    o = objs(pool("p", [{"cidr": "10.0.0.0/29"}]), *svcs)
    r = allocate(o)
    views = {f"{s['metadata']['namespace']}/{s['metadata']['name']}": lbipam._view(
        o.service(s["metadata"]["namespace"], s["metadata"]["name"])) for s in svcs}
    holders: dict[str, list[str]] = {}
    for key, ips in r.allocations.items():
        for ip in ips:
            assert ip.startswith("10.0.0.")
            holders.setdefault(ip, []).append(key)
    for ip, keys in holders.items():
        for a in keys:
            for b in keys:
                if a != b:
                    assert lbipam.is_compatible(views[a], views[b])[0], (ip, a, b)
    # every handled service has a condition; satisfied iff it got what it asked for
    assert set(r.service_conditions) == set(views)
    # feeding the allocations back (a restart), in any service order, changes nothing
    shuffled = objs(pool("p", [{"cidr": "10.0.0.0/29"}]), *(reversed(svcs) if reverse else svcs))
    assert lbipam.allocate(shuffled, r.allocations).allocations == r.allocations
