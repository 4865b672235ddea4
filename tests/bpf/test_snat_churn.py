"""SNAT conntrack across backend churn and client source-port reuse (issue 8, part 3).

A SNAT flow has a conntrack entry ``SERVICE`` {client:cport -> VIP:vport} naming the
backend and the node port, and a node-port slot {backend:bport -> node:nat_port} naming VIP
and client (until issue 8's SYN work: a ``REPLY`` conntrack entry with the same key and
contents; "REPLY entry" below means the slot). The key has no client in it, so one that no longer belongs to the
flow its SERVICE entry describes (a stale one) can send a live flow's replies elsewhere, or
make the take-over of "its" port delete the live flow's SERVICE entry. Each test is one way
such a stale entry used to arise, and checks the flow users care about keeps working:

* the client reuses a source port: the new connection's SYN finds the old connection's
  REPLY entry marked closing; the live connection's port was then taken over by another
  client (its replies hijacked, its SERVICE entry deleted -> reset);
* the backend leaves: the flow re-balances on a new port, the old REPLY entry stayed (its
  port leaked, and a late packet of the old backend went to the client); when the old port
  was later taken over, the take-over deleted the SERVICE entry by the client's tuple, which
  by then belonged to the new connection of that client port, to a backend that stayed;
* a backend id is given to another backend (an agent restart reuses the ids of removed
  backends): the flow followed the id to the new address on its old port, for which no REPLY
  entry exists (its replies were lost, and another flow could be given the same port).

The SNAT range here is one port (62000) and the close timeout 0, so "the next flow towards
that backend takes the port over" is deterministic.
"""

from __future__ import annotations

import dataclasses
import ipaddress
from collections import Counter

import pytest
from scapy.layers.inet import IP, TCP
from scapy.layers.inet6 import IPv6
from scapy.layers.l2 import Ether
from scapy.packet import Raw

from agent.datapath.abi import MapName, XdpAction
from agent.datapath.model import Backend, Mode, Proto, Service, ServiceKey
from agent.datapath.snatports import claimed_slots, snat_slot_index
from tests.bpf.conftest import NODE4, NODE6, TEST_FEATURES, new_datapath, run_xdp

PORT = 62000
# per family: VIP, two clients, three backends, the node (routes: tests/bpf/conftest.py net)
ADDRS = {4: ("10.96.0.10", "192.0.2.10", "192.0.2.20", "10.2.0.5", "10.2.0.6", "10.2.0.7", NODE4),
         6: ("fd00:96::10", "2001:db8::10", "2001:db8::20", "fd00:2::5", "fd00:2::6", "fd00:2::7", NODE6)}
VIP, C, D, B1, B2, B3, _ = ADDRS[4]


def fam(addr: str) -> int:
    return 6 if ":" in addr else 4


def l3(addr: str):
    return IPv6 if ":" in addr else IP


@pytest.fixture(scope="module")
def module_dp():
    dp = new_datapath("snatchurn", dataclasses.replace(TEST_FEATURES, snat_port_min=PORT, snat_port_max=PORT,
                                                       ct_close_timeout=0))
    yield dp
    dp.destroy()


@pytest.fixture
def dp(module_dp):
    module_dp.set_node_addresses(v4=NODE4, v6=NODE6)
    yield module_dp
    module_dp.reconcile([])
    module_dp.table(MapName.CT).clear()
    slots = module_dp.table(MapName.SNAT_PORTS)
    for idx, _ in list(claimed_slots(slots)):
        slots[slots.Key(idx)] = slots.Leaf()
    module_dp.set_node_addresses()


def program(dp, *backends):
    vip = ADDRS[backends[0].addr.version][0]
    dp.upsert_service(Service(ServiceKey(vip, 80, Proto.TCP), tuple(backends), mode=Mode.SNAT, maglev_m=251))


def req(client, sport, flags="A"):
    return Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02") / l3(client)(src=client, dst=ADDRS[fam(client)][0]) \
        / TCP(sport=sport, dport=80, flags=flags, seq=1000) / Raw(b"x")


def reply(backend, flags="A", dport=PORT):
    return Ether(src="02:00:00:00:00:09", dst="02:00:00:00:00:02") / l3(backend)(src=backend, dst=ADDRS[fam(backend)][6]) \
        / TCP(sport=8080, dport=dport, flags=flags, seq=5000) / Raw(b"y")


def forward(dp, net, client, sport, flags="A"):
    """Run a client packet; returns (backend, node port) it left with, or None if not forwarded."""
    r = run_xdp(dp, req(client, sport, flags), netns=net["ns"])
    if r.retval not in (XdpAction.TX, XdpAction.REDIRECT):
        return None
    out = Ether(r.data)
    L3 = l3(client)
    assert out[L3].src == ADDRS[fam(client)][6]
    return out[L3].dst, out[TCP].sport


def back(dp, net, backend, flags="A", dport=PORT):
    """Run a backend's reply; returns (client, client port) it was sent to, or None."""
    r = run_xdp(dp, reply(backend, flags, dport), netns=net["ns"])
    if r.retval not in (XdpAction.TX, XdpAction.REDIRECT):
        return None
    out = Ether(r.data)
    L3 = l3(backend)
    assert (out[L3].src, out[TCP].sport) == (ADDRS[fam(backend)][0], 80)
    return out[L3].dst, out[TCP].dport


def sport_towards(dp, net, client, backend, first=5000):
    """A source port whose new flow goes to ``backend`` (found by sending SYNs; a SYN towards
    another backend whose one port is busy is dropped without leaving state)."""
    for sport in range(first, first + 200):
        got = forward(dp, net, client, sport, "S")
        if got is not None and got[0] == backend:
            return sport
    raise AssertionError(f"no flow of {client} went to {backend}")


FAMILIES = pytest.mark.parametrize("family", [4, 6], ids=["v4", "v6"])


@FAMILIES
def test_new_connection_on_a_reused_client_port_is_live_not_closing(dp, net, family):
    """The client reuses source port 4000 after a closed connection towards the same backend.
    The new connection is live: nobody else may take its port over or get its replies."""
    _, C, D, B1, B2, B3, _ = ADDRS[family]
    program(dp, Backend(B1, 8080))
    assert forward(dp, net, C, 4000, "S") == (B1, PORT)
    assert back(dp, net, B1, "SA") == (C, 4000)
    assert back(dp, net, B1, "FA") == (C, 4000)        # the first connection closes
    assert forward(dp, net, C, 4000, "FA") == (B1, PORT)
    # a new connection from the same client port
    assert forward(dp, net, C, 4000, "S") == (B1, PORT)
    assert back(dp, net, B1, "SA") == (C, 4000)
    # another client's new flow towards B1: the one port is in use by a live flow
    before = dp.counters().drops["SNAT_NO_PORT"]
    assert forward(dp, net, D, 7000, "S") is None
    assert dp.counters().drops["SNAT_NO_PORT"] == before + 1
    # the live connection keeps its port and its replies
    assert forward(dp, net, C, 4000) == (B1, PORT)
    assert back(dp, net, B1) == (C, 4000)


@FAMILIES
def test_taking_over_a_stale_port_never_deletes_the_live_flow_of_that_client_port(dp, net, family):
    """Client port 4000 had a closed connection to B1 (port 62000 towards B1, closing).
    B1 leaves; a new connection from port 4000 goes to B2 (62000 towards B2). B1 comes back
    and another client's flow takes B1's port 62000 over: that must not touch the
    connection to B2, whose backend never left."""
    _, C, D, B1, B2, B3, _ = ADDRS[family]
    program(dp, Backend(B1, 8080))
    assert forward(dp, net, C, 4000, "S") == (B1, PORT)
    assert back(dp, net, B1, "FA") == (C, 4000)
    program(dp, Backend(B2, 8080))                      # B1 leaves
    assert forward(dp, net, C, 4000, "S") == (B2, PORT)
    assert back(dp, net, B2, "SA") == (C, 4000)
    program(dp, Backend(B2, 8080), Backend(B1, 8080))   # B1 is back (a new backend id)
    d_port = sport_towards(dp, net, D, B1)               # takes B1:62000 over
    assert back(dp, net, B1) == (D, d_port)
    # the connection to B2 is untouched: same backend, same port, replies to the client
    assert forward(dp, net, C, 4000) == (B2, PORT)
    assert back(dp, net, B2) == (C, 4000)


@FAMILIES
def test_rebalanced_flow_releases_its_old_port_and_the_old_backend_cannot_reach_the_client(dp, net, family):
    """A live flow to B1; B1 leaves and the flow re-balances to B2 on a new port. The old
    REPLY entry {B1 -> node:62000} must go: a late packet from B1 must not reach the client
    (whose port now carries the flow to B2), and B1's port is free for the next flow at once
    (not after the 6 h idle timeout)."""
    _, C, D, B1, B2, B3, _ = ADDRS[family]
    program(dp, Backend(B1, 8080))
    assert forward(dp, net, C, 4000, "S") == (B1, PORT)
    assert back(dp, net, B1, "SA") == (C, 4000)
    program(dp, Backend(B2, 8080))                      # B1 leaves (the pod may still be there)
    assert forward(dp, net, C, 4000) == (B2, PORT)      # re-balanced (this connection breaks)
    assert back(dp, net, B1) is None                     # B1's late segment reaches nobody
    program(dp, Backend(B2, 8080), Backend(B1, 8080))   # B1 comes back with the same address
    d_port = sport_towards(dp, net, D, B1)               # and its port is free at once
    assert back(dp, net, B1) == (D, d_port)
    assert forward(dp, net, C, 4000) == (B2, PORT)
    assert back(dp, net, B2) == (C, 4000)


@FAMILIES
def test_flow_does_not_follow_its_backend_id_to_another_backend(dp, net, family):
    """Backend id 7 was B1's; B1 leaves and id 7 is given to B3 (an agent restart allocates
    ids afresh). The flow's SERVICE entry still says 7: it must re-balance like any flow whose
    backend left, onto a port whose replies come back to it, not go on to B3 on B1's port."""
    _, C, D, B1, B2, B3, _ = ADDRS[family]
    program(dp, Backend(B1, 8080, id=7))
    assert forward(dp, net, C, 4000, "S") == (B1, PORT)
    assert back(dp, net, B1, "SA") == (C, 4000)
    program(dp, Backend(B2, 8080, id=8))                # B1 leaves, id 7 is free
    program(dp, Backend(B2, 8080, id=8), Backend(B3, 8080, id=7))
    got = forward(dp, net, C, 4000)
    assert got is not None
    backend, port = got
    # wherever the flow went now, that backend's replies on that port come back to it
    assert back(dp, net, backend, dport=port) == (C, 4000)
    if backend == B3:
        # and B3's port is this flow's: a new flow towards B3 cannot get it too
        before = dp.counters().drops["SNAT_NO_PORT"]
        for sport in range(7000, 7040):
            got = forward(dp, net, D, sport, "S")
            assert got is None or got[0] != B3, "a second flow got the same B3 port"
        assert dp.counters().drops["SNAT_NO_PORT"] > before


def _be16(port: int) -> int:
    return int.from_bytes(port.to_bytes(2, "big"), "little")


def _be32(addr: str) -> int:
    return int.from_bytes(ipaddress.ip_address(addr).packed, "little")


def _claim(dp, backend: str, nat_port: int, bid: int, client: str = C, cport: int = 4000) -> None:
    """Write a claimed node-port slot as the datapath would (index: snat_slot_index)."""
    slots = dp.table(MapName.SNAT_PORTS)
    idx = snat_slot_index(backend, 8080, nat_port, 6, dp.features.hash_seed, dp.features.snat_slots)
    v = slots.Leaf()
    v.baddr[0], v.caddr[0], v.vaddr[0] = _be32(backend), _be32(client), _be32(VIP)
    v.bport, v.nat_port, v.cport, v.vport = _be16(8080), _be16(nat_port), _be16(cport), _be16(80)
    v.proto, v.family, v.backend_id, v.flags = 6, 4, bid, 2
    slots[slots.Key(idx)] = v


def test_removing_a_backend_frees_all_its_node_ports_and_only_its(dp):
    """The agent's sweep reads the port slots in batches: every slot of the removed backend
    is freed (more than one batch holds), slots of the backend that stays are kept."""
    program(dp, Backend(B1, 8080), Backend(B2, 8080))
    for backend, n in ((B1, 5000), (B2, 300)):
        bid = dp.backend_id(backend, 8080)
        for i in range(n):
            _claim(dp, backend, 1024 + i, bid)
    placed = Counter(str(e.saddr) for e in dp.conntrack() if e.direction == "reply")
    program(dp, Backend(B2, 8080))                      # B1 leaves
    left = Counter(str(e.saddr) for e in dp.conntrack() if e.direction == "reply")
    assert left == {B2: placed[B2]} and placed[B2] > 290 and placed[B1] > 4900   # (a few index collisions)


def test_a_new_agent_frees_node_ports_of_backends_that_are_not_active(dp):
    """An agent that stopped between deactivating a backend and sweeping it left port slots
    naming an inactive id: the next agent frees them when it adopts the maps; slots of active
    backends stay."""
    from agent.datapath.api import Datapath
    program(dp, Backend(B1, 8080), Backend(B2, 8080))
    for backend, bid in ((B1, dp.backend_id(B1, 8080)), (B2, dp.backend_id(B2, 8080)), (B3, 4000)):
        _claim(dp, backend, 62000, bid)
    again = Datapath(dp.instance, pin_root=str(dp.pin_dir.parent), features=dp.features)
    again.load()
    try:
        left = {str(e.saddr) for e in again.conntrack() if e.direction == "reply"}
        assert left == {B1, B2}
    finally:
        again.close()


def _slot(dp):
    """The one claimed node-port slot: (index, value)."""
    [(idx, val)] = list(claimed_slots(dp.table(MapName.SNAT_PORTS)))
    return idx, val


def test_an_idle_port_is_taken_over_after_the_idle_timeout_of_the_datapath_clock(dp, net):
    """The port slot's last_seen is seconds since boot (now_s: jiffies, as CLOCK_MONOTONIC):
    a flow that is neither closing nor idle keeps the only port; once its slot is older than
    the TCP idle timeout (21,600 s), a new flow towards the same backend takes the port over."""
    import time

    program(dp, Backend(B1, 8080))
    held = forward(dp, net, C, 4000, "S")
    assert held == (B1, PORT)
    assert back(dp, net, B1, "SA") == (C, 4000)
    slots = dp.table(MapName.SNAT_PORTS)
    idx, val = _slot(dp)
    assert abs(val.last_seen - time.clock_gettime(time.CLOCK_MONOTONIC)) <= 2, val.last_seen
    assert forward(dp, net, D, 4001, "S") is None          # busy, not idle: refused, not stolen
    assert back(dp, net, B1) == (C, 4000)
    idx, val = _slot(dp)
    val.last_seen -= TEST_IDLE + 1                          # the flow went quiet long ago
    slots[slots.Key(idx)] = val
    assert forward(dp, net, D, 4001, "S") == (B1, PORT)    # taken over
    assert back(dp, net, B1) == (D, 4001)


def test_a_port_that_never_saw_a_reply_is_free_after_the_syn_timeout(dp, net):
    """A SYN whose backend never answered (a scan, a SYN that moved on) holds its port for
    ct_syn_timeout (60 s), not for the 6 h idle timeout; one that got a reply is held."""
    program(dp, Backend(B1, 8080))
    assert forward(dp, net, C, 4000, "S") == (B1, PORT)
    slots = dp.table(MapName.SNAT_PORTS)
    idx, val = _slot(dp)
    val.last_seen -= 50                                     # (a margin for the clock's next second)
    slots[slots.Key(idx)] = val
    assert forward(dp, net, D, 4001, "S") is None          # not yet
    val.last_seen -= 11
    slots[slots.Key(idx)] = val
    assert forward(dp, net, D, 4001, "S") == (B1, PORT)    # never answered for 61 s: reused
    assert back(dp, net, B1, "SA") == (D, 4001)
    idx, val = _slot(dp)
    val.last_seen -= 3600                                   # answered, quiet for an hour: held
    slots[slots.Key(idx)] = val
    assert forward(dp, net, C, 4002, "S") is None
    assert back(dp, net, B1) == (D, 4001)


@FAMILIES
def test_a_retransmitted_syn_keeps_its_node_port_and_its_replies(dp, net, family):
    """A SNAT SYN takes no conntrack probe: a retransmission must still find the port its
    first copy claimed (the candidates are a function of the flow), not claim a second one."""
    _, C, D, B1, B2, B3, _ = ADDRS[family]
    program(dp, Backend(B1, 8080))
    assert forward(dp, net, C, 4000, "S") == (B1, PORT)
    assert forward(dp, net, C, 4000, "S") == (B1, PORT)    # retransmitted: same port, not refused
    assert back(dp, net, B1, "SA") == (C, 4000)
    assert len(list(claimed_slots(dp.table(MapName.SNAT_PORTS)))) == 1


TEST_IDLE = 21600   # Features.ct_tcp_idle_timeout, unchanged by this module's fixture
