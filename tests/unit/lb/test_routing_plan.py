"""The pure part of the route manager: route values and the desired-vs-current plan."""

from __future__ import annotations

import pytest
from hypothesis import given, strategies as st

from agent.routing.model import NextHop, Route, RoutePlan, plan, satisfied


def r(prefix, *hops, **kw):
    return Route(prefix, [NextHop(*h) if isinstance(h, tuple) else NextHop(h) for h in hops], **kw)


def test_default_metric_per_family():
    assert r("10.0.0.0/24", "10.1.0.1").metric == 0
    assert r("fd00::/64", "fd01::1").metric == 1024


def test_validation():
    with pytest.raises(ValueError, match="needs at least one next hop"):
        Route("10.0.0.0/24", [])
    with pytest.raises(ValueError, match="IPv4"):
        r("fd00::/64", "10.0.0.1")                    # IPv4 via IPv6 is fine (RFC 8950), not the reverse
    with pytest.raises(ValueError, match="needs its device"):
        r("10.0.0.0/24", "fe80::1")
    assert NextHop("fe80::1%eth0") == NextHop("fe80::1", dev="eth0")   # the zone is the device
    with pytest.raises(ValueError):
        Route("10.0.0.1/24", [NextHop("10.0.0.2")])  # host bits set
    with pytest.raises(ValueError, match="duplicate"):
        r("10.0.0.0/24", "10.1.0.1", "10.1.0.1")
    with pytest.raises(ValueError, match="weight"):
        NextHop("10.1.0.1", weight=0)
    with pytest.raises(ValueError, match="no next hops"):
        Route("10.0.0.0/24", [NextHop("10.1.0.1")], type="blackhole")


def test_plan_add_change_delete():
    a, b, c = r("10.0.0.0/24", "10.1.0.1"), r("10.0.1.0/24", "10.1.0.1"), r("10.0.2.0/24", "10.1.0.1")
    b2 = r("10.0.1.0/24", "10.1.0.1", "10.1.0.2")
    p = plan([a, b2], [b, c])
    assert p.replace == (a, b2)
    assert p.delete == (c,)
    assert plan([a], [a]) == RoutePlan() and not plan([a], [a])


def test_same_prefix_other_table_or_metric_is_another_route():
    a = r("10.0.0.0/24", "10.1.0.1")
    assert plan([a], [r("10.0.0.0/24", "10.1.0.1", table=100)]).delete
    assert plan([a], [r("10.0.0.0/24", "10.1.0.1", metric=10)]).delete


def test_gateway_without_device_matches_the_resolved_device():
    want = r("10.0.0.0/24", "10.1.0.1")
    assert satisfied(want, r("10.0.0.0/24", ("10.1.0.1", "eth0")))
    assert not satisfied(r("10.0.0.0/24", ("10.1.0.1", "eth1")), r("10.0.0.0/24", ("10.1.0.1", "eth0")))
    assert not satisfied(r("10.0.0.0/24", ("10.1.0.1", None, 2)), r("10.0.0.0/24", ("10.1.0.1", "eth0")))


def test_conflicting_desired_routes_are_rejected():
    with pytest.raises(ValueError, match="conflicting"):
        plan([r("10.0.0.0/24", "10.1.0.1"), r("10.0.0.0/24", "10.1.0.2")], [])


def test_nexthop_order_does_not_matter():
    assert r("10.0.0.0/24", "10.1.0.2", "10.1.0.1") == r("10.0.0.0/24", "10.1.0.1", "10.1.0.2")


prefixes = st.integers(0, 255).map(lambda i: f"10.{i}.0.0/16")
routes = st.builds(lambda p, g: r(p, f"192.168.0.{g}"), prefixes, st.integers(1, 3))


@given(st.lists(routes, unique_by=lambda x: x.key), st.lists(routes, unique_by=lambda x: x.key))
def test_applying_the_plan_reaches_desired(desired, current):
    p = plan(desired, current)
    state = {x.key: x for x in current}
    for x in p.replace:
        state[x.key] = x
    for x in p.delete:
        del state[x.key]
    assert state == {x.key: x for x in desired}
    assert plan(desired, list(state.values())) == RoutePlan()
