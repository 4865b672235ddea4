"""Capacity growth: the sized maps (services, backends, memberships, Maglev slots) are created
at the size the configuration needs and grown by a reload that keeps flows. A datapath made
too small for its services runs out, grows, programs the rest; a conntrack entry made before
the growth is still there and still decides its flow after it (packets through
BPF_PROG_TEST_RUN); a restarted agent adopts the grown maps."""

from __future__ import annotations

import os
from dataclasses import replace

import pytest
from scapy.layers.inet import IP, TCP
from scapy.layers.l2 import Ether

from agent.datapath.abi import MapName, XdpAction
from agent.datapath.api import SIZED_MAPS, CapacityError, Datapath, _pinned_map_info
from agent.datapath.capacity import Capacity, plan_capacity, requirement
from agent.datapath.model import Backend, Proto, Service, ServiceKey
from tests.bpf.conftest import PIN_ROOT, TEST_FEATURES, new_datapath, run_xdp

TINY = replace(TEST_FEATURES, max_services=32, max_backends=64, max_memberships=64, maglev_slots=251 * 16)


def service(i: int, backends: tuple[Backend, ...] | None = None) -> Service:
    vip = f"10.96.{i // 250}.{i % 250 + 1}"
    return Service(ServiceKey(vip, 80, Proto.TCP),
                   backends or (Backend(f"10.1.{i // 250}.{i % 250 + 1}", 8080, local=True),), maglev_m=251)


def syn(vip: str, sport: int, flags: str = "S"):
    return Ether() / IP(src="192.0.2.7", dst=vip) / TCP(sport=sport, dport=80, flags=flags)


def test_services_beyond_the_initial_capacity_are_programmed_after_a_growth_that_keeps_flows():
    dp = new_datapath("grow", TINY)
    try:
        services = [service(i) for i in range(100)]
        done = []
        with pytest.raises(CapacityError) as exc:
            for s in services:
                dp.upsert_service(s)
                done.append(s)
        assert exc.value.what in ("services", "maglev_slots")
        assert 0 < len(done) < len(services)

        # a flow of service 0 before the growth: its SYN creates a conntrack entry
        first = services[0]
        r = run_xdp(dp, syn(str(first.key.vip), 40001))
        assert r.retval == XdpAction.PASS and Ether(r.data)[IP].dst == "10.1.0.1"
        ids_before = {s.key: dp.service_id(s.key) for s in done}
        old_fd = dp.program_fd("xdp")

        cap = plan_capacity(services, dp.capacity)
        assert cap.covers(requirement(services)) and not dp.capacity.covers(cap)
        dp.grow(cap)
        assert dp.capacity == cap and dp.reloads == 1
        assert dp.program_fd("xdp") != old_fd                   # new programs ...
        for name in SIZED_MAPS:                                  # ... over new, bigger pinned maps
            assert _pinned_map_info(dp.pin_dir / name.value).max_entries == dp.table(name).max_entries
        assert dp.table(MapName.MAGLEV).max_entries == cap.maglev_slots
        assert {s.key: dp.service_id(s.key) for s in done} == ids_before
        assert not (dp.pin_dir / "grow-staging").exists()

        for s in services[len(done):]:
            dp.upsert_service(s)
        assert set(dp.services()) == {s.key for s in services}
        # every service answers, the last ones included
        for i in (1, len(done), 99):
            r = run_xdp(dp, syn(str(services[i].key.vip), 40002))
            assert Ether(r.data)[IP].dst == str(services[i].backends[0].addr), i

        # the pre-growth conntrack entry is still there and still decides its flow: the
        # backend now only keeps established flows (terminating) and a new one takes new flows
        assert any(e.sport == 40001 and str(e.daddr) == str(first.key.vip) for e in dp.conntrack())
        old_backend = replace(first.backends[0], terminating=True)
        dp.upsert_service(replace(first, backends=(old_backend, Backend("10.1.9.9", 8080, local=True))))
        r = run_xdp(dp, syn(str(first.key.vip), 40001, flags="A"))
        assert Ether(r.data)[IP].dst == "10.1.0.1"               # conntrack: the old backend
        r = run_xdp(dp, syn(str(first.key.vip), 40003))
        assert Ether(r.data)[IP].dst == "10.1.9.9"               # Maglev: new flows elsewhere

        # a restarted agent (with the small Features it was first started with) adopts the grown maps
        dp.close()
        dp2 = Datapath(dp.instance, pin_root=PIN_ROOT, features=TINY)
        dp2.load()
        dp = dp2
        assert dp.capacity == cap
        assert set(dp.services()) == {s.key for s in services}
        r = run_xdp(dp, syn(str(first.key.vip), 40001, flags="A"))
        assert Ether(r.data)[IP].dst == "10.1.0.1"
    finally:
        dp.destroy()


def test_load_with_a_planned_capacity_creates_maps_of_that_size():
    cap = Capacity(max_services=2048, max_backends=3072, max_memberships=5120, maglev_slots=251 * 3000)
    dp = Datapath(f"plan-{os.getpid()}", pin_root=PIN_ROOT, features=TINY)
    try:
        dp.load(capacity=cap)
        assert dp.capacity == cap and dp.reloads == 0          # created at the size, no reload
        assert dp.table(MapName.SERVICES).max_entries == 2 * 2048
        assert dp.table(MapName.BACKENDS).max_entries == 3072
        assert dp.table(MapName.SVC_BACKENDS).max_entries == 5120
        assert dp.table(MapName.MAGLEV).max_entries == 251 * 3000
    finally:
        dp.destroy()
