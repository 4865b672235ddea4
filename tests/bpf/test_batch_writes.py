"""A pass of many services is written in batches (agent/datapath/changes.py, writer.py): when a
map fills up in the middle of a batch, what fits is programmed and serves packets, each
service that does not fit gets its own CapacityError, and the maps hold exactly what the
datapath reports (no half-programmed frontend, no orphan membership)."""

from __future__ import annotations

from dataclasses import replace

from scapy.layers.inet import IP, TCP
from scapy.layers.l2 import Ether

from agent.datapath import inspect
from agent.datapath.abi import MapName, XdpAction
from agent.datapath.api import CapacityError
from agent.datapath.model import Backend, Proto, Service, ServiceKey
from tests.bpf.conftest import TEST_FEATURES, new_datapath, run_xdp

# 8 memberships per service: the 9th service overflows svc_backends (64 entries)
SMALL = replace(TEST_FEATURES, max_services=32, max_backends=64, max_memberships=64, maglev_slots=251 * 16)
BACKENDS = tuple(Backend(f"10.1.0.{j}", 8080, local=True) for j in range(1, 9))


def test_a_batch_that_overflows_a_map_programs_what_fits_and_names_each_service_that_does_not():
    dp = new_datapath("batch", SMALL)
    try:
        services = [Service(ServiceKey(f"10.96.0.{i}", 80, Proto.TCP), BACKENDS, maglev_m=251)
                    for i in range(1, 11)]
        errors = dp.upsert_services(services)
        assert sorted(str(k.vip) for k in errors) == ["10.96.0.10", "10.96.0.9"]
        assert all(isinstance(e, CapacityError) and e.what == "memberships" for e in errors.values())
        fits = {s.key for s in services[:8]}
        assert set(dp.services()) == fits
        # the kernel's maps, read back: every programmed frontend complete, nothing else
        fronts = [f for f in inspect.read_frontends(dp) if not f.wildcard]
        assert {f.key for f in fronts} == fits
        assert all(f.table_size == 251 and len(f.members) == 8 for f in fronts)
        assert len(dp.table(MapName.SVC_BACKENDS)) == 64
        r = run_xdp(dp, Ether() / IP(src="192.0.2.7", dst="10.96.0.8") / TCP(sport=40000, dport=80, flags="S"))
        assert r.retval == XdpAction.PASS and Ether(r.data)[IP].dst in {str(b.addr) for b in BACKENDS}
        r = run_xdp(dp, Ether() / IP(src="192.0.2.7", dst="10.96.0.9") / TCP(sport=40000, dport=80, flags="S"))
        assert Ether(r.data)[IP].dst == "10.96.0.9"          # not a VIP: passed untouched
    finally:
        dp.destroy()
