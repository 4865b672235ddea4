"""SNAT flows in the flow table (dsr_flows_v1, bpf/include/lb.h "Flow table: SNAT lines").

A SNAT flow's forward state (backend, node port, service generation) lives in one 64-B line
of the flow table, as a DSR flow's does, so its established packets read one cache line; the
node-port slot (snat_ports_v2) stays what replies use and what decides the port's life.
Through the XDP program: flows keep backend and node port through their line when Maglev
changes, and their replies are reversed; a stale port taken over by another flow takes the
old flow's line with it (the old flow never sends with the port someone else now has); a
flow that finds every probe line live keeps backend and port through conntrack; a line whose
port slot went stale is reused; a flow established under the layout before SNAT lines (flow
index snat_flows_v1 -> port slot, no line) keeps its port across the upgrade.
"""

from __future__ import annotations

import ctypes
import dataclasses

import pytest
from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.inet6 import IPv6
from scapy.layers.l2 import Ether
from scapy.packet import Raw

from agent.datapath.abi import CtFlag, MapName, XdpAction
from agent.datapath.model import Backend, Mode, Proto, Service, ServiceKey
from agent.datapath.snatports import claimed_slots, snat_search_start
from tests.bpf.conftest import NODE4, NODE6, TEST_FEATURES, new_datapath, run_xdp, zero_array

ADDRS = {4: ("10.96.0.10", "192.0.2.10", "192.0.2.20", [f"10.2.0.{i}" for i in range(5, 9)], NODE4),
         6: ("fd00:96::10", "2001:db8::10", "2001:db8::20", [f"fd00:2::{i}" for i in range(5, 9)], NODE6)}
FAMILIES = pytest.mark.parametrize("family", [4, 6], ids=["v4", "v6"])


def _l3(addr: str):
    return IPv6 if ":" in addr else IP


def _svc(vip, backends, proto=Proto.TCP):
    return Service(ServiceKey(vip, 80, proto), tuple(Backend(b, 8080) for b in backends), mode=Mode.SNAT,
                   maglev_m=251)


def forward(dp, net, vip, client, sport, flags="A", l4="tcp"):
    """Run a client packet; (backend, node port) it left with, or None if not forwarded."""
    L3 = _l3(client)
    l4p = TCP(sport=sport, dport=80, flags=flags, seq=1000) if l4 == "tcp" else UDP(sport=sport, dport=80)
    frame = Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02") / L3(src=client, dst=vip) / l4p / Raw(b"x")
    r = run_xdp(dp, frame, netns=net["ns"])
    if r.retval not in (XdpAction.TX, XdpAction.REDIRECT):
        return None
    out = Ether(r.data)
    assert str(out[L3].src) == ADDRS[4 if L3 is IP else 6][4]
    return str(out[L3].dst), (out[TCP] if l4 == "tcp" else out[UDP]).sport


def back(dp, net, vip, backend, nat_port, flags="A", l4="tcp"):
    """Run a backend's reply to node:nat_port; (source, source port, client, client port) it
    left with, or None."""
    L3 = _l3(backend)
    node = ADDRS[4 if L3 is IP else 6][4]
    l4p = TCP(sport=8080, dport=nat_port, flags=flags, seq=5000) if l4 == "tcp" else UDP(sport=8080, dport=nat_port)
    frame = Ether(src="02:00:00:00:00:09", dst="02:00:00:00:00:02") / L3(src=backend, dst=node) / l4p / Raw(b"y")
    r = run_xdp(dp, frame, netns=net["ns"])
    if r.retval not in (XdpAction.TX, XdpAction.REDIRECT):
        return None
    out = Ether(r.data)
    p4 = out[TCP] if l4 == "tcp" else out[UDP]
    return str(out[L3].src), p4.sport, str(out[L3].dst), p4.dport


def _lines(dp) -> dict[int, object]:
    """client port -> the SNAT flow's line, as `vipctl bpf ct list` shows it"""
    from agent.datapath.inspect import read_flow_lines
    return {e.sport: e for e in read_flow_lines(dp) if e.flags & CtFlag.SNAT}


def _ct_service_entries(dp) -> list:
    return [v for k, v in dp.table(MapName.CT).items() if k.dir == 1]


def _index_entries(dp) -> int:
    return sum(1 for _, v in dp.table("snat_flows_v1").items_lookup_batch() if v.value)


def _emptied(dp):
    """A module's datapath with node addresses, emptied after the test: services, conntrack,
    port slots, flow table and flow index."""
    dp.set_node_addresses(v4=NODE4, v6=NODE6)
    yield dp
    dp.reconcile([])
    dp.table(MapName.CT).clear()
    for name in (MapName.SNAT_PORTS, MapName.DSR_FLOWS, "snat_flows_v1"):
        zero_array(dp.table(name))
    dp.set_node_addresses()


@pytest.fixture
def sdp(dp):
    dp.set_node_addresses(v4=NODE4, v6=NODE6)
    yield dp
    dp.set_node_addresses()


@pytest.mark.parametrize("family,l4", [(4, "tcp"), (6, "tcp"), (4, "udp")])
def test_snat_flows_keep_backend_and_port_through_their_line_when_maglev_changes(sdp, net, family, l4):
    dp = sdp
    vip, client, _, backends, _ = ADDRS[family]
    dp.upsert_service(_svc(vip, backends[:2], Proto.TCP if l4 == "tcp" else Proto.UDP))
    sports = range(42000, 42030)
    first = {s: forward(dp, net, vip, client, s, "S", l4) for s in sports}
    assert len({p for _, p in first.values()}) == len(sports)   # one node port per flow (one client)
    # every flow has a line naming backend and node port; no SERVICE entry, no flow-index entry
    lines = _lines(dp)
    assert set(lines) == set(sports)
    for s in sports:
        assert lines[s].backend_id == dp.backend_id(first[s][0], 8080)
        assert lines[s].nat_port == first[s][1]
        assert (str(lines[s].saddr), str(lines[s].daddr), lines[s].dport) == (client, vip, 80)
    assert _ct_service_entries(dp) == [] and _index_entries(dp) == 0
    # more backends: Maglev moves some flows, every flow stays on its backend and port, and the
    # backends' replies still reach the client as VIP:80
    dp.upsert_service(_svc(vip, backends, Proto.TCP if l4 == "tcp" else Proto.UDP))
    for s in sports:
        assert forward(dp, net, vip, client, s, "A", l4) == first[s]
        assert back(dp, net, vip, first[s][0], first[s][1], "A", l4) == (vip, 80, client, s)
    if l4 == "tcp":   # ... while a new SYN of the same 4-tuple is placed afresh (Katran's rule)
        moved = [s for s in sports if forward(dp, net, vip, client, s, "S")[0] != first[s][0]]
        assert moved, "Maglev moved none of 30 flows to the new backends"
        for s in moved:   # re-balanced: its own line rewritten in place, a new port towards the new backend
            e = _lines(dp)[s]
            assert e.backend_id != dp.backend_id(first[s][0], 8080)
            be = [b for b in backends if dp.backend_id(b, 8080) == e.backend_id][0]
            assert forward(dp, net, vip, client, s, "A") == (be, e.nat_port)
            assert back(dp, net, vip, be, e.nat_port) == (vip, 80, client, s)


# ---- one node port (62000), close timeout 0: a closed flow's port is taken over at once ----
PORT = 62000


@pytest.fixture(scope="module")
def one_port_dp():
    dp = new_datapath("snatline", dataclasses.replace(TEST_FEATURES, snat_port_min=PORT, snat_port_max=PORT,
                                                      ct_close_timeout=0))
    yield dp
    dp.destroy()


@pytest.fixture
def odp(one_port_dp):
    yield from _emptied(one_port_dp)


@FAMILIES
def test_a_taken_over_port_takes_the_old_flows_line_with_it(odp, net, family):
    """Client C's flow closes (FIN): its one port becomes reusable, and client D's new flow
    takes it over. C's line named that port: it must not send with it again (it would land
    in D's connection at the backend). With one port in the range, C's next packet finds no
    free port and is dropped; D's flow and its replies are untouched."""
    dp = odp
    vip, c, d, backends, _ = ADDRS[family]
    dp.upsert_service(_svc(vip, backends[:1]))
    assert forward(dp, net, vip, c, 4000, "S") == (backends[0], PORT)
    assert back(dp, net, vip, backends[0], PORT, "SA") == (vip, 80, c, 4000)
    assert forward(dp, net, vip, c, 4000, "A") == (backends[0], PORT)    # through its line
    assert set(_lines(dp)) == {4000}
    assert forward(dp, net, vip, c, 4000, "FA") == (backends[0], PORT)   # closing: free after 0 s
    assert forward(dp, net, vip, d, 4001, "S") == (backends[0], PORT)    # taken over
    drops = dp.counters().drops.get("SNAT_NO_PORT", 0)
    assert forward(dp, net, vip, c, 4000, "A") is None                    # never D's port
    assert dp.counters().drops["SNAT_NO_PORT"] == drops + 1
    assert set(_lines(dp)) == {4001}                                     # C's line: a tombstone
    assert back(dp, net, vip, backends[0], PORT) == (vip, 80, d, 4001)
    assert forward(dp, net, vip, d, 4001, "A") == (backends[0], PORT)


# ---- a flow table of 4 lines: exactly one flow's probes -------------------------------------
@pytest.fixture(scope="module")
def tiny_dp():
    dp = new_datapath("snatlt", dataclasses.replace(TEST_FEATURES, dsr_flow_slots=4))
    yield dp
    dp.destroy()


@pytest.fixture
def tdp(tiny_dp):
    yield from _emptied(tiny_dp)


def test_a_snat_flow_that_finds_every_line_live_keeps_backend_and_port_through_conntrack(tdp, net):
    dp = tdp
    vip, c, _, backends, _ = ADDRS[4]
    dp.upsert_service(_svc(vip, backends[:1]))
    sports = range(43000, 43006)   # 4 fit the table, 2 overflow into conntrack
    first = {s: forward(dp, net, vip, c, s, "S") for s in sports}
    assert len(_lines(dp)) == 4
    over = _ct_service_entries(dp)
    assert len(over) == 2 and all(v.nat_port and v.flags & CtFlag.SNAT for v in over)
    assert {e.sport for e in dp.conntrack() if e.direction == "service"} == set(sports)
    dp.upsert_service(_svc(vip, backends))   # the first backend stays: every flow keeps it and its port
    for s in sports:
        assert forward(dp, net, vip, c, s, "A") == first[s]
        assert back(dp, net, vip, *first[s]) == (vip, 80, c, s)


def test_a_line_is_reused_once_its_port_slot_is_stale(tdp, net):
    """4 live flows fill the table: a 5th goes to conntrack. Once their ports' slots are stale
    (closed long ago), a new flow takes a line again (checked through the slot, not a clock)."""
    dp = tdp
    vip, c, d, backends, _ = ADDRS[4]
    dp.upsert_service(_svc(vip, backends[:1]))
    for s in range(44000, 44004):
        forward(dp, net, vip, c, s, "S")
    assert forward(dp, net, vip, d, 5000, "S") is not None
    assert len(_ct_service_entries(dp)) == 1 and 5000 not in _lines(dp)
    slots = dp.table(MapName.SNAT_PORTS)
    for i, v in list(claimed_slots(slots)):   # every port closed an hour ago
        v.flags |= CtFlag.CLOSING
        v.last_seen -= 3600
        slots[slots.Key(i)] = v
    got = forward(dp, net, vip, d, 5001, "S")
    assert got is not None and 5001 in _lines(dp) and _lines(dp)[5001].nat_port == got[1]
    assert len(_ct_service_entries(dp)) == 1   # only the earlier overflow flow's
    assert back(dp, net, vip, *got) == (vip, 80, d, 5001)


# ---- upgrade from the layout before SNAT lines ------------------------------------------
@FAMILIES
def test_a_flow_of_the_layout_before_lines_keeps_its_port_after_the_upgrade(odp, net, family):
    """vipd before SNAT lines: a flow's port slot found through the flow index snat_flows_v1
    (entry = slot index + 1 at snat_search_start(flow)), no line. Such a flow is built here
    from a new one (its line removed, its index entry written as the old program did): its
    established packets keep backend and node port (also once its backend is terminating, so
    Maglev would send a re-balanced flow elsewhere), its replies are reversed, and the port is
    still its own (another client's SYN finds it busy)."""
    dp = odp
    vip, c, d, backends, _ = ADDRS[family]
    dp.upsert_service(_svc(vip, backends[:1]))
    assert forward(dp, net, vip, c, 4000, "S") == (backends[0], PORT)
    assert back(dp, net, vip, backends[0], PORT, "SA") == (vip, 80, c, 4000)
    zero_array(dp.table(MapName.DSR_FLOWS))                   # the old layout: no line ...
    [(slot_idx, slot)] = list(claimed_slots(dp.table(MapName.SNAT_PORTS)))
    feats = dp.features
    fi = snat_search_start(c, 4000, vip, 80, 6, feats.hash_seed) & (feats.snat_slots - 1)
    slot.flow_idx = fi
    dp.table(MapName.SNAT_PORTS)[ctypes.c_uint32(slot_idx)] = slot
    idx = dp.table("snat_flows_v1")
    idx[idx.Key(fi)] = idx.Leaf(slot_idx + 1)                 # ... but a flow-index entry
    assert _lines(dp) == {} and _ct_service_entries(dp) == []
    listed = [e for e in dp.conntrack() if e.direction == "service"]
    assert [(e.sport, e.nat_port) for e in listed] == [(4000, PORT)]
    dp.upsert_service(Service(ServiceKey(vip, 80, Proto.TCP), (Backend(backends[0], 8080, terminating=True),
                                                               Backend(backends[1], 8080)), mode=Mode.SNAT,
                              maglev_m=251))
    for _ in range(3):
        assert forward(dp, net, vip, c, 4000, "A") == (backends[0], PORT)
        assert back(dp, net, vip, backends[0], PORT) == (vip, 80, c, 4000)
    assert _lines(dp) == {}                                  # nothing was re-balanced
    assert forward(dp, net, vip, d, 4001, "S") != (backends[0], PORT)   # the port is still the old flow's
