"""Capacity from configuration (pure): the Maglev table size per service and the map sizes."""

import ipaddress

import pytest

from agent.datapath.capacity import (MIN_CAPACITY, Capacity, MaglevSize, choose_maglev_m,
                                     parse_maglev_table_size, plan_capacity, requirement)
from agent.datapath.model import MAGLEV_PRIMES, Backend, Service, ServiceKey


@pytest.mark.parametrize("backends,m", [(0, 251), (1, 251), (2, 251), (3, 509), (5, 509), (6, 1021),
                                        (10, 1021), (11, 2039), (163, 16381), (164, 32749),
                                        (1310, 131071), (5000, 131071)])
def test_auto_is_the_smallest_allowed_prime_of_at_least_100_per_backend(backends, m):
    assert choose_maglev_m(backends) == m
    assert m in MAGLEV_PRIMES


def test_auto_with_a_cap_and_a_fixed_size():
    assert choose_maglev_m(50, MaglevSize(cap=2039)) == 2039        # wanted 8191, capped
    assert choose_maglev_m(2, MaglevSize(cap=2039)) == 251
    assert choose_maglev_m(1, MaglevSize(fixed=16381)) == 16381     # Cilium: one M for all
    assert choose_maglev_m(1000, MaglevSize(fixed=251)) == 251


@pytest.mark.parametrize("text,want", [("auto", MaglevSize()), ("AUTO", MaglevSize()),
                                       ("auto:4093", MaglevSize(cap=4093)), ("16381", MaglevSize(fixed=16381)),
                                       (65521, MaglevSize(fixed=65521))])
def test_parse_maglev_table_size(text, want):
    assert parse_maglev_table_size(text) == want
    assert parse_maglev_table_size(str(want)) == want


@pytest.mark.parametrize("bad", ["16380", "1000", "auto:1000", "big", "", "-251"])
def test_parse_rejects_sizes_that_are_not_ciliums_choices(bad):
    with pytest.raises(ValueError, match="251, 509"):
        parse_maglev_table_size(bad)


def svc(i, n_backends=1, m=251, shared=False):
    base = 0 if shared else i * 10
    return Service(ServiceKey(ipaddress.IPv4Address(0x0A600001 + i), 80),
                   tuple(Backend(ipaddress.IPv4Address(0x0B000001 + base + j), 8080) for j in range(n_backends)),
                   maglev_m=m)


def test_requirement_counts_ids_members_and_slots():
    services = [svc(i, 3, m=509) for i in range(10)] + [svc(100, 2, m=251, shared=True)]
    need = requirement(services)
    assert need.max_services == 12                    # 11 services + id 0
    assert need.max_backends == 30 + 1                # the shared service reuses backends 0,1 of svc 0
    assert need.max_memberships == 32
    assert need.maglev_slots == 10 * 509 + 251 + 509  # + one table to swap into


def test_plan_has_headroom_keeps_sizes_that_suffice_and_never_shrinks():
    small = [svc(i) for i in range(10)]
    assert plan_capacity(small) == MIN_CAPACITY       # floors
    big = [svc(i) for i in range(20000)]
    plan = plan_capacity(big)
    need = requirement(big)
    assert plan.covers(need)
    assert plan.max_services >= 1.5 * 20000 and plan.maglev_slots >= 1.5 * 20000 * 251
    assert plan.maglev_slots * 4 < 40 << 20          # 20,000 x 1 backend: < 40 MiB of Maglev slots
    assert plan_capacity(big, plan) == plan           # fits: no growth
    assert plan_capacity(small, plan) == plan         # never shrinks
    more = big + [svc(i) for i in range(20000, 40000)]
    grown = plan_capacity(more, plan)
    assert grown.covers(requirement(more)) and grown.covers(plan) and grown != plan


def test_a_default_install_sizes_40000_frontends():
    """20,000 Services x 2 ports, 3 backends each (M = 509 by auto)."""
    services = [svc(i, 3, m=choose_maglev_m(3)) for i in range(40000)]
    plan = plan_capacity(services)
    assert plan.covers(requirement(services))
    assert plan.map_bytes() < 256 << 20
    assert Capacity(*plan.astuple()) == plan
