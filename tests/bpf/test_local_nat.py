"""Local backends: DNAT on XDP ingress, reverse NAT on tc egress, and the per-service policies
(Maglev choice, conntrack, terminating backends, eTP=Local, affinity, source ranges, stateless,
fragments, non-service traffic). Every output is compared field by field with an expected
scapy packet whose checksums scapy recomputed."""

from __future__ import annotations

import ipaddress

import pytest
from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.inet6 import IPv6, IPv6ExtHdrFragment
from scapy.layers.l2 import ARP, Dot1Q, Ether
from scapy.packet import Raw

from agent.datapath.abi import MapName, TcAction, XdpAction
from agent.datapath.flowhash import flow_hash
from agent.datapath.model import Backend, Mode, Proto, Service, ServiceKey
from agent.lb.maglev import build_table
from tests.bpf.conftest import assert_frame, expected, run_tc, run_xdp

MAC_CLIENT, MAC_NODE = "02:00:00:00:00:01", "02:00:00:00:00:02"
CLIENT4, VIP4 = "192.0.2.10", "10.96.0.10"
CLIENT6, VIP6 = "2001:db8::10", "fd00:96::10"
L4 = {"tcp": lambda s, d: TCP(sport=s, dport=d, flags="S", seq=1000),
      "udp": lambda s, d: UDP(sport=s, dport=d)}


def frame(src, dst, l4="tcp", sport=40000, dport=80, payload=b"hello vipd"):
    ip = IP(src=src, dst=dst) if ipaddress.ip_address(src).version == 4 else IPv6(src=src, dst=dst)
    return Ether(src=MAC_CLIENT, dst=MAC_NODE) / ip / L4[l4](sport, dport) / Raw(payload)


def ip_cls(addr):
    return IP if ipaddress.ip_address(addr).version == 4 else IPv6


def local_service(vip, proto, backends, **kw):
    return Service(ServiceKey(vip, 80, proto), tuple(Backend(a, 8080, local=True) for a in backends),
                   maglev_m=kw.pop("maglev_m", 251), **kw)


CASES = [(CLIENT4, VIP4, "10.1.0.5", "tcp"), (CLIENT4, VIP4, "10.1.0.5", "udp"),
         (CLIENT6, VIP6, "fd00:1::5", "tcp"), (CLIENT6, VIP6, "fd00:1::5", "udp")]


@pytest.mark.parametrize("client,vip,backend,l4", CASES)
def test_dnat_to_local_backend_and_reverse_nat_of_the_reply(dp, client, vip, backend, l4):
    proto = Proto.TCP if l4 == "tcp" else Proto.UDP
    dp.upsert_service(local_service(vip, proto, [backend]))
    IPX, L4X = ip_cls(vip), (TCP if l4 == "tcp" else UDP)

    req = frame(client, vip, l4)
    r = run_xdp(dp, req)
    assert r.retval == XdpAction.PASS
    assert_frame(r.data, expected(req, **{f"{IPX.__name__}_dst": backend, f"{L4X.__name__}_dport": 8080}))

    # the backend's reply leaves through tc egress and must come from VIP:80 again
    reply = frame(backend, client, l4, sport=8080, dport=40000, payload=b"reply")
    r = run_tc(dp, "egress", reply)
    assert r.retval == TcAction.OK
    assert_frame(r.data, expected(reply, **{f"{IPX.__name__}_src": vip, f"{L4X.__name__}_sport": 80}))


def test_udp_without_checksum_keeps_zero_checksum(dp):
    dp.upsert_service(local_service(VIP4, Proto.UDP, ["10.1.0.5"]))
    req = Ether(src=MAC_CLIENT, dst=MAC_NODE) / IP(src=CLIENT4, dst=VIP4) / UDP(sport=5000, dport=80, chksum=0) / Raw(b"x" * 9)
    r = run_xdp(dp, req)
    out = Ether(r.data)
    assert out[UDP].chksum == 0 and out[IP].dst == "10.1.0.5" and out[UDP].dport == 8080
    want = req.copy(); want[IP].dst = "10.1.0.5"; want[UDP].dport = 8080; want[IP].chksum = None
    assert r.data == bytes(Ether(bytes(want)))


def test_vlan_tagged_frame_is_translated(dp):
    dp.upsert_service(local_service(VIP4, Proto.TCP, ["10.1.0.5"]))
    req = Ether(src=MAC_CLIENT, dst=MAC_NODE) / Dot1Q(vlan=7) / IP(src=CLIENT4, dst=VIP4) / TCP(sport=1, dport=80) / Raw(b"v")
    r = run_xdp(dp, req)
    assert r.retval == XdpAction.PASS
    assert_frame(r.data, expected(req, IP_dst="10.1.0.5", TCP_dport=8080))


def test_ipv4_options_and_ipv6_extension_headers_are_parsed(dp):
    from scapy.layers.inet import IPOption_NOP
    from scapy.layers.inet6 import IPv6ExtHdrDestOpt, IPv6ExtHdrHopByHop
    dp.upsert_service(local_service(VIP4, Proto.TCP, ["10.1.0.5"]))
    dp.upsert_service(local_service(VIP6, Proto.TCP, ["fd00:1::5"]))
    v4 = Ether() / IP(src=CLIENT4, dst=VIP4, options=[IPOption_NOP()] * 4) / TCP(sport=2, dport=80)
    r = run_xdp(dp, v4)
    assert_frame(r.data, expected(v4, IP_dst="10.1.0.5", TCP_dport=8080))
    v6 = Ether() / IPv6(src=CLIENT6, dst=VIP6) / IPv6ExtHdrHopByHop() / IPv6ExtHdrDestOpt() / TCP(sport=2, dport=80)
    r = run_xdp(dp, v6)
    assert_frame(r.data, expected(v6, IPv6_dst="fd00:1::5", TCP_dport=8080))


NON_SERVICE = [
    frame(CLIENT4, "10.96.0.99"),                        # not a VIP
    frame(CLIENT4, VIP4, dport=81),                      # VIP, other port
    frame(CLIENT4, VIP4, "udp"),                         # VIP, other protocol
    Ether() / IP(src=CLIENT4, dst=VIP4) / ICMP(),        # ping to the VIP
    Ether() / ARP(pdst=VIP4),
    frame(CLIENT6, "fd00:96::99"),
    Ether(type=0x88B5) / Raw(b"\x00" * 50),
]


@pytest.mark.parametrize("pkt", NON_SERVICE, ids=lambda p: p.summary())
def test_non_service_traffic_passes_unchanged(dp, pkt):
    dp.upsert_service(local_service(VIP4, Proto.TCP, ["10.1.0.5"]))
    r = run_xdp(dp, pkt)
    assert r.retval == XdpAction.PASS
    assert r.data == bytes(pkt)


def _backend_of(out: bytes) -> str:
    p = Ether(out)
    return p[IP].dst if p.haslayer(IP) else p[IPv6].dst


def test_maglev_choice_equals_python_model_for_1000_flows(dp):
    backends = [f"10.1.{i // 250}.{i % 250 + 1}" for i in range(10)]
    m = 16381
    dp.upsert_service(local_service(VIP4, Proto.TCP, backends, maglev_m=m))
    names = [(f"{b}:8080", 1) for b in backends]
    table = build_table(names, m)            # the LB engineer's model, independent of the datapath
    seen = set()
    for i in range(1000):
        client = str(ipaddress.ip_address("198.18.0.0") + i * 7919 % 65536)
        sport = 1024 + (i * 31) % 60000
        r = run_xdp(dp, frame(client, VIP4, sport=sport))
        want = backends[table[flow_hash(client, sport, 80, 6) % m]]
        assert _backend_of(r.data) == want, f"flow {client}:{sport}"
        seen.add(want)
    assert len(seen) == 10


def test_maglev_choice_ipv6_matches_model(dp):
    backends = [f"fd00:1::{i + 1:x}" for i in range(5)]
    dp.upsert_service(local_service(VIP6, Proto.UDP, backends))
    table = build_table([(f"[{b}]:8080", 1) for b in backends], 251)
    for i in range(200):
        client = f"2001:db8:{i:x}::{i * 3 + 1:x}"
        r = run_xdp(dp, frame(client, VIP6, "udp", sport=2000 + i))
        assert _backend_of(r.data) == backends[table[flow_hash(client, 2000 + i, 80, 17) % 251]]


def test_conntrack_keeps_established_flow_after_table_change(dp):
    old = ["10.1.0.1", "10.1.0.2"]
    svc = local_service(VIP4, Proto.TCP, old)
    dp.upsert_service(svc)
    # find flows whose slot moves to a new backend once 10.1.0.3 joins
    new_table = build_table([(f"{b}:8080", 1) for b in old + ["10.1.0.3"]], 251)
    movers = [s for s in range(1000, 3000) if new_table[flow_hash(CLIENT4, s, 80, 6) % 251] == 2][:5]
    assert movers
    first = {s: _backend_of(run_xdp(dp, frame(CLIENT4, VIP4, sport=s)).data) for s in movers}
    change = dp.upsert_service(local_service(VIP4, Proto.TCP, old + ["10.1.0.3"]))
    assert 0 < change.slots_written < 251 and not change.swapped   # only the changed slots
    for s in movers:
        ack = Ether() / IP(src=CLIENT4, dst=VIP4) / TCP(sport=s, dport=80, flags="A")
        assert _backend_of(run_xdp(dp, ack).data) == first[s], "established flow moved"
    # a new flow on a moved slot goes to the new backend
    other = [s for s in range(3000, 6000) if new_table[flow_hash(CLIENT4, s, 80, 6) % 251] == 2][0]
    assert _backend_of(run_xdp(dp, frame(CLIENT4, VIP4, sport=other)).data) == "10.1.0.3"


def test_terminating_backend_keeps_flows_gets_no_new_ones(dp):
    bs = ["10.1.0.1", "10.1.0.2"]
    dp.upsert_service(local_service(VIP4, Proto.TCP, bs))
    table = build_table([(f"{b}:8080", 1) for b in bs], 251)
    on_first = [s for s in range(1000, 2000) if table[flow_hash(CLIENT4, s, 80, 6) % 251] == 0][:3]
    for s in on_first:
        assert _backend_of(run_xdp(dp, frame(CLIENT4, VIP4, sport=s)).data) == "10.1.0.1"
    dp.upsert_service(Service(ServiceKey(VIP4, 80), (Backend("10.1.0.1", 8080, local=True, terminating=True),
                                                     Backend("10.1.0.2", 8080, local=True)), maglev_m=251))
    for s in on_first:
        ack = Ether() / IP(src=CLIENT4, dst=VIP4) / TCP(sport=s, dport=80, flags="A")
        assert _backend_of(run_xdp(dp, ack).data) == "10.1.0.1"     # drained, not cut
        syn = frame(CLIENT4, VIP4, sport=s + 7000)
        assert _backend_of(run_xdp(dp, syn).data) == "10.1.0.2"     # new flows avoid it


def test_removed_backend_flows_rebalance(dp):
    bs = ["10.1.0.1", "10.1.0.2"]
    dp.upsert_service(local_service(VIP4, Proto.TCP, bs))
    table = build_table([(f"{b}:8080", 1) for b in bs], 251)
    s = next(s for s in range(1000, 2000) if table[flow_hash(CLIENT4, s, 80, 6) % 251] == 0)
    assert _backend_of(run_xdp(dp, frame(CLIENT4, VIP4, sport=s)).data) == "10.1.0.1"
    dp.upsert_service(local_service(VIP4, Proto.TCP, ["10.1.0.2"]))
    ack = Ether() / IP(src=CLIENT4, dst=VIP4) / TCP(sport=s, dport=80, flags="A")
    assert _backend_of(run_xdp(dp, ack).data) == "10.1.0.2"


def test_etp_local_without_local_backend_drops_with_reason(dp):
    svc = Service(ServiceKey(VIP4, 80), (Backend("10.2.0.5", 8080, local=False),),
                  traffic_policy_local=True, maglev_m=251)
    dp.upsert_service(svc)
    before = dp.counters().drops["NO_LOCAL_BACKEND"]
    r = run_xdp(dp, frame(CLIENT4, VIP4))
    assert r.retval == XdpAction.DROP
    assert dp.counters().drops["NO_LOCAL_BACKEND"] == before + 1
    # with a local backend, only the local one is used
    dp.upsert_service(Service(ServiceKey(VIP4, 80), (Backend("10.2.0.5", 8080), Backend("10.1.0.7", 8080, local=True)),
                              traffic_policy_local=True, maglev_m=251))
    for s in range(100, 140):
        assert _backend_of(run_xdp(dp, frame(CLIENT4, VIP4, sport=s)).data) == "10.1.0.7"


def test_service_without_backends_drops_no_backend(dp):
    dp.upsert_service(Service(ServiceKey(VIP4, 80), (), maglev_m=251))
    before = dp.counters().drops["NO_BACKEND"]
    assert run_xdp(dp, frame(CLIENT4, VIP4)).retval == XdpAction.DROP
    assert dp.counters().drops["NO_BACKEND"] == before + 1


def test_session_affinity_pins_client_across_ports_and_table_changes(dp):
    bs = [f"10.1.0.{i}" for i in range(1, 6)]
    dp.upsert_service(local_service(VIP4, Proto.TCP, bs, affinity_timeout=3600))
    chosen = {_backend_of(run_xdp(dp, frame(CLIENT4, VIP4, sport=p)).data) for p in range(2000, 2040)}
    assert len(chosen) == 1, "one client must stick to one backend"
    (b,) = chosen
    # the model: sport is hashed as 0 under affinity
    table = build_table([(f"{x}:8080", 1) for x in bs], 251)
    assert b == bs[table[flow_hash(CLIENT4, 0, 80, 6) % 251]]
    before = dp.counters().stat("xdp", "affinity")
    # grow the service: the affinity entry keeps the client even if its slot moved
    dp.upsert_service(local_service(VIP4, Proto.TCP, bs + [f"10.1.1.{i}" for i in range(1, 30)], affinity_timeout=3600))
    assert {_backend_of(run_xdp(dp, frame(CLIENT4, VIP4, sport=p)).data) for p in range(3000, 3020)} == {b}
    assert dp.counters().stat("xdp", "affinity") >= before + 20
    # different clients spread
    spread = {_backend_of(run_xdp(dp, frame(f"192.0.2.{i}", VIP4)).data) for i in range(1, 60)}
    assert len(spread) > 3


def test_source_ranges_allow_list(dp):
    dp.upsert_service(local_service(VIP4, Proto.TCP, ["10.1.0.5"], source_ranges=("192.0.2.0/28", "203.0.113.7/32")))
    before = dp.counters().drops["SOURCE_RANGE"]
    for ok in ("192.0.2.1", "192.0.2.15", "203.0.113.7"):
        r = run_xdp(dp, frame(ok, VIP4))
        assert r.retval == XdpAction.PASS and _backend_of(r.data) == "10.1.0.5", ok
    for bad in ("192.0.2.16", "203.0.113.8", "10.0.0.1"):
        assert run_xdp(dp, frame(bad, VIP4)).retval == XdpAction.DROP, bad
    assert dp.counters().drops["SOURCE_RANGE"] == before + 3
    # ranges are replaced by diff: drop one, add one
    dp.upsert_service(local_service(VIP4, Proto.TCP, ["10.1.0.5"], source_ranges=("203.0.113.8/32",)))
    assert run_xdp(dp, frame("192.0.2.1", VIP4)).retval == XdpAction.DROP
    assert run_xdp(dp, frame("203.0.113.8", VIP4)).retval == XdpAction.PASS
    # v6
    dp.upsert_service(local_service(VIP6, Proto.TCP, ["fd00:1::5"], source_ranges=("2001:db8::/64",)))
    assert run_xdp(dp, frame("2001:db8::99", VIP6)).retval == XdpAction.PASS
    assert run_xdp(dp, frame("2001:db8:1::99", VIP6)).retval == XdpAction.DROP


def test_stateless_service_creates_no_forward_conntrack_entry(dp):
    dp.upsert_service(local_service(VIP4, Proto.TCP, ["10.1.0.5", "10.1.0.6"], stateless=True))
    for s in range(100, 110):
        r = run_xdp(dp, frame(CLIENT4, VIP4, sport=s))
        assert r.retval == XdpAction.PASS
    entries = dp.conntrack()
    assert not [e for e in entries if e.direction == "service"]
    assert len([e for e in entries if e.direction == "reply"]) == 10   # replies still reversed


def test_fragments_to_a_vip_are_dropped_with_reason_others_pass(dp):
    dp.upsert_service(local_service(VIP4, Proto.UDP, ["10.1.0.5"]))
    dp.upsert_service(local_service(VIP6, Proto.UDP, ["fd00:1::5"]))
    before = dp.counters().drops["FRAGMENT"]
    first = Ether() / IP(src=CLIENT4, dst=VIP4, flags="MF", frag=0) / UDP(sport=1, dport=80) / Raw(b"a" * 16)
    later = Ether() / IP(src=CLIENT4, dst=VIP4, frag=3, proto=17) / Raw(b"b" * 16)
    v6 = Ether() / IPv6(src=CLIENT6, dst=VIP6) / IPv6ExtHdrFragment(m=1) / UDP(sport=1, dport=80) / Raw(b"c" * 16)
    for p in (first, later, v6):
        assert run_xdp(dp, p).retval == XdpAction.DROP
    assert dp.counters().drops["FRAGMENT"] == before + 3
    other = Ether() / IP(src=CLIENT4, dst="10.96.0.99", flags="MF") / UDP(sport=1, dport=80) / Raw(b"a" * 16)
    r = run_xdp(dp, other)
    assert r.retval == XdpAction.PASS and r.data == bytes(other)
    # deleting the service removes the VIP's address entry: fragments pass again
    dp.delete_service(ServiceKey(VIP4, 80, Proto.UDP))
    r = run_xdp(dp, first)
    assert r.retval == XdpAction.PASS and r.data == bytes(first)


def test_counters_per_service(dp):
    dp.upsert_service(local_service(VIP4, Proto.TCP, ["10.1.0.5"]))
    key = ServiceKey(VIP4, 80, Proto.TCP)
    p0, b0 = dp.counters().services[key]
    pkt = frame(CLIENT4, VIP4)
    for _ in range(3):
        run_xdp(dp, pkt)
    p1, b1 = dp.counters().services[key]
    assert (p1 - p0, b1 - b0) == (3, 3 * (len(bytes(pkt)) - 14))   # bytes of the IP packets


def test_session_affinity_expires_after_its_timeout(dp):
    import time
    bs = [f"10.1.0.{i}" for i in range(1, 4)]
    grown = bs + [f"10.1.2.{i}" for i in range(1, 20)]
    t1 = build_table([(f"{b}:8080", 1) for b in bs], 251)
    t2 = build_table([(f"{b}:8080", 1) for b in grown], 251)
    # a client whose (affinity) slot names another backend once the service grows
    client = next(c for c in (f"192.0.2.{i}" for i in range(1, 250))
                  if bs[t1[flow_hash(c, 0, 80, 6) % 251]] != grown[t2[flow_hash(c, 0, 80, 6) % 251]])
    before, after = bs[t1[flow_hash(client, 0, 80, 6) % 251]], grown[t2[flow_hash(client, 0, 80, 6) % 251]]
    dp.upsert_service(local_service(VIP4, Proto.TCP, bs, affinity_timeout=1))
    assert _backend_of(run_xdp(dp, frame(client, VIP4, sport=1111)).data) == before
    dp.upsert_service(local_service(VIP4, Proto.TCP, grown, affinity_timeout=1))
    assert _backend_of(run_xdp(dp, frame(client, VIP4, sport=2222)).data) == before   # still pinned
    time.sleep(1.3)
    assert _backend_of(run_xdp(dp, frame(client, VIP4, sport=3333)).data) == after    # expired: Maglev


def test_weighted_backends_follow_the_weighted_model(dp):
    bs = [("10.1.0.1", 1), ("10.1.0.2", 3), ("10.1.0.3", 0)]     # weight 0: no new flows
    svc = Service(ServiceKey(VIP4, 80), tuple(Backend(a, 8080, weight=w, local=True) for a, w in bs),
                  maglev_m=1021)
    dp.upsert_service(svc)
    live = [(a, w) for a, w in bs if w > 0]
    table = build_table([(f"{a}:8080", w) for a, w in live], 1021)
    counts = {}
    for i in range(400):
        client = f"198.18.{i // 200}.{i % 200 + 1}"
        got = _backend_of(run_xdp(dp, frame(client, VIP4, sport=5000 + i)).data)
        assert got == live[table[flow_hash(client, 5000 + i, 80, 6) % 1021]][0]
        counts[got] = counts.get(got, 0) + 1
    assert "10.1.0.3" not in counts
    assert counts["10.1.0.2"] > 2 * counts["10.1.0.1"]
