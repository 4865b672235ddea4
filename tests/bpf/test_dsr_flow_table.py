"""The DSR flow table (dsr_flows_v1): a DSR flow's backend in one 64-B slot that also holds
its tuple (bpf/include/lb.h "DSR flow table"). Through the XDP program: a flow keeps its
backend when Maglev changes, a flow that finds every probe slot live keeps it through conntrack,
stale slots are reused by the rules of dsr_flow_stale, a slot being written is never acted on,
and `vipctl bpf ct list` (Datapath.conntrack) shows the flows.
"""

from __future__ import annotations

import pytest
from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.inet6 import IPv6
from scapy.layers.l2 import Ether

from agent.datapath.abi import CtFlag, MapName, XdpAction
from agent.datapath.api import Features
from agent.datapath.model import Backend, Mode, Proto, Service, ServiceKey
from tests.bpf.conftest import TEST_FEATURES, new_datapath, run_xdp, zero_array

VIP4, VIP6 = "10.96.0.10", "fd00:96::10"
C4, C6 = "192.0.2.10", "2001:db8::10"
B4 = [f"10.2.0.{i}" for i in range(5, 9)]
B6 = [f"fd00:2::{i}" for i in range(5, 9)]
TICK_SHIFT = 8   # bpf/include/consts.h DSR_TICK_SHIFT
PORT80 = 0x5000  # port 80 as the maps hold it (network order, read as a little-endian u16)


def _svc(vip, backends, proto=Proto.TCP):
    return Service(ServiceKey(vip, 80, proto), tuple(Backend(b, 8080) for b in backends), mode=Mode.DSR,
                   maglev_m=251)


def _pkt(client, vip, sport, flags="A", l4="tcp"):
    ip = IP(src=client, dst=vip) if ":" not in vip else IPv6(src=client, dst=vip)
    l4p = TCP(sport=sport, dport=80, flags=flags) if l4 == "tcp" else UDP(sport=sport, dport=80)
    return Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02") / ip / l4p / b"x"


def _send(dp, net, client, vip, sport, flags="A", l4="tcp") -> str:
    """The backend address the packet left for (XDP_TX towards the peer)."""
    r = run_xdp(dp, _pkt(client, vip, sport, flags, l4), netns=net["ns"])
    assert r.retval in (XdpAction.TX, XdpAction.REDIRECT), f"verdict {r.retval}"
    out = Ether(r.data)
    return str(out[IP].dst if IP in out else out[IPv6].dst)


def _ct_service_entries(dp) -> int:
    return sum(1 for k, _ in dp.table(MapName.CT).items() if k.dir == 1)


@pytest.mark.parametrize("family,l4", [(4, "tcp"), (6, "tcp"), (6, "udp")])
def test_dsr_flows_live_in_the_table_and_keep_their_backend_when_maglev_changes(dp, net, family, l4):
    vip, client, backends = (VIP4, C4, B4) if family == 4 else (VIP6, C6, B6)
    proto = Proto.TCP if l4 == "tcp" else Proto.UDP
    dp.upsert_service(_svc(vip, backends[:2], proto))
    sports = range(42000, 42040)
    first = {s: _send(dp, net, client, vip, s, "S", l4) for s in sports}
    for s in sports:   # the second packet marks the flow established
        assert _send(dp, net, client, vip, s, "A", l4) == first[s]
    # every flow is in the flow table, none in conntrack, and `vipctl bpf ct list` shows them
    assert _ct_service_entries(dp) == 0
    listed = {e.sport: e for e in dp.conntrack() if e.direction == "service"}
    assert set(listed) == set(sports)
    for s in sports:
        e = listed[s]
        assert (str(e.saddr), str(e.daddr), e.dport, e.proto) == (client, vip, 80, proto)
        assert e.flags & CtFlag.DSR and e.flags & CtFlag.ESTABLISHED
        assert e.backend_id == dp.backend_id(first[s], 8080)
    from agent.datapath.inspect import count_conntrack
    assert count_conntrack(dp)["service"] == len(sports)
    # more backends: Maglev moves some of these flows' slots, the flows stay where they are
    dp.upsert_service(_svc(vip, backends, proto))
    for s in sports:
        assert _send(dp, net, client, vip, s, "A", l4) == first[s]
    if l4 == "tcp":   # ... while a new SYN of the same 4-tuple is placed afresh (Katran's rule)
        moved = [s for s in sports if _send(dp, net, client, vip, s, "S") != first[s]]
        assert moved, "Maglev moved none of 40 flows to the new backends"


@pytest.fixture(scope="module")
def tiny_dp():
    """A datapath whose DSR flow table has 4 slots: exactly one flow's probes (DSR_FLOW_PROBES)."""
    from dataclasses import replace
    dp = new_datapath("dsrt", replace(TEST_FEATURES, dsr_flow_slots=4))
    yield dp
    dp.destroy()


@pytest.fixture
def tdp(tiny_dp):
    yield tiny_dp
    tiny_dp.reconcile([])
    tiny_dp.table(MapName.CT).clear()
    zero_array(tiny_dp.table(MapName.DSR_FLOWS))


def _table_ports(dp) -> set[int]:
    from agent.datapath.inspect import read_flow_lines
    return {e.sport for e in read_flow_lines(dp)}


def _age_slots(dp, seconds: int, only=lambda v: True) -> None:
    """Move the last packet of the table's flows ``seconds`` into the past (as ticks)."""
    tbl = dp.table(MapName.DSR_FLOWS)
    for i in range(tbl.max_entries):
        v = tbl[tbl.Key(i)]
        if v.backend_id and only(v):
            v.last_seen -= (seconds * dp._hz >> TICK_SHIFT) + 2
            tbl[tbl.Key(i)] = v


def test_a_flow_that_finds_every_slot_live_keeps_its_backend_through_conntrack(tdp, net):
    tdp.upsert_service(_svc(VIP4, B4[:1]))
    sports = range(43000, 43006)   # 4 fit the table, 2 overflow into conntrack
    for s in sports:
        assert _send(tdp, net, C4, VIP4, s, "S") == B4[0]
    assert _ct_service_entries(tdp) == 2
    assert len([e for e in tdp.conntrack() if e.direction == "service"]) == 6
    tdp.upsert_service(_svc(VIP4, B4))   # the first backend stays: every flow keeps it
    for s in sports:
        assert _send(tdp, net, C4, VIP4, s, "A") == B4[0]


def test_stale_slots_are_reused_and_live_ones_are_not(tdp, net):
    tdp.upsert_service(_svc(VIP4, B4[:1]))
    # 4 flows fill the table: 2 established, 1 established and closed (FIN), 1 only a SYN (a scan)
    for s in (44000, 44001, 44002, 44003):
        _send(tdp, net, C4, VIP4, s, "S")
    for s in (44000, 44001, 44002):
        _send(tdp, net, C4, VIP4, s, "A")
    _send(tdp, net, C4, VIP4, 44002, "FA")
    # 11 s later: the closed flow's slot is free again (CT_CLOSE_TIMEOUT_S = 10), the others are not
    _age_slots(tdp, 11)
    _send(tdp, net, C4, VIP4, 45000, "S")
    _send(tdp, net, C4, VIP4, 45001, "S")
    in_table = _table_ports(tdp)
    ct_ports = {k.sport for k, _ in tdp.table(MapName.CT).items()}
    assert 45000 in in_table and 44002 not in in_table
    assert len(ct_ports) == 1   # 45001 found no stale slot: conntrack holds it
    # 61 s on: SYN-only flows' slots (CT_SYN_TIMEOUT_S = 60) go, established flows' stay
    _age_slots(tdp, 61)
    for s in (45002, 45003, 45005):
        _send(tdp, net, C4, VIP4, s, "S")
    in_table = _table_ports(tdp)
    assert in_table == {44000, 44001, 45002, 45003}
    assert _ct_service_entries(tdp) == 2   # 45001 and 45005
    # 6 h idle (CT_TCP_IDLE_TIMEOUT_S): established flows' slots go too
    _age_slots(tdp, 21601)
    _send(tdp, net, C4, VIP4, 45004, "S")
    in_table = _table_ports(tdp)
    assert 45004 in in_table


def test_a_slot_being_written_is_never_acted_on(tdp, net):
    """A claim on another CPU makes seq odd while it writes: readers must not use the slot."""
    tdp.upsert_service(_svc(VIP4, B4[:2]))
    b = _send(tdp, net, C4, VIP4, 46000, "S")
    other = B4[1] if b == B4[0] else B4[0]
    tbl = tdp.table(MapName.DSR_FLOWS)
    (idx,) = [i for i in range(tbl.max_entries) if tbl[tbl.Key(i)].backend_id]
    v = tbl[tbl.Key(idx)]
    v.backend_id = tdp.backend_id(other, 8080)   # half-written: another backend, seq odd
    v.seq += 1
    tbl[tbl.Key(idx)] = v
    assert _send(tdp, net, C4, VIP4, 46000, "A") == b   # Maglev's choice, not the torn slot's
    v = tbl[tbl.Key(idx)]
    v.seq += 1                                   # the write completes: the slot is the truth
    tbl[tbl.Key(idx)] = v
    assert _send(tdp, net, C4, VIP4, 46000, "A") == other


def test_flows_of_a_vipd_from_before_the_table_keep_their_conntrack_backend(dp, net):
    """An upgrade needs no migration: a DSR flow's conntrack SERVICE entry (all an older vipd
    wrote) is still found after a table miss, even where Maglev would pick another backend."""
    import ipaddress
    dp.upsert_service(_svc(VIP4, B4[:2]))
    front = dp.table(MapName.SERVICES)
    (svc,) = [v for k, v in front.items() if k.port == PORT80]   # not the VIP's wildcard entry
    ct = dp.table(MapName.CT)
    sports = range(47000, 47010)
    moved = {}
    for s in sports:
        maglev = _send(dp, net, C4, VIP4, s, "S")
        moved[s] = B4[1] if maglev == B4[0] else B4[0]
    zero_array(dp.table(MapName.DSR_FLOWS))   # as before the upgrade: conntrack only
    ct.clear()
    for s in sports:
        k, v = ct.Key(), ct.Leaf()
        k.saddr[0], k.daddr[0] = (int.from_bytes(ipaddress.ip_address(a).packed, "little") for a in (C4, VIP4))
        k.sport, k.dport = int.from_bytes(s.to_bytes(2, "big"), "little"), PORT80
        k.proto, k.family, k.dir = 6, 4, 1
        v.backend_id, v.svc_id, v.svc_gen, v.flags = dp.backend_id(moved[s], 8080), svc.id, svc.backend_gen, CtFlag.DSR
        ct[k] = v
    for s in sports:
        assert _send(dp, net, C4, VIP4, s, "A") == moved[s]
    from agent.datapath.inspect import read_flow_lines
    assert read_flow_lines(dp) == []   # a conntrack hit stays in conntrack
