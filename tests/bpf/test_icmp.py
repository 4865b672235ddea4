"""ICMP/ICMPv6 errors about a service flow reach that flow's (local) backend, rewritten like
the flow: outer destination and quoted source become the backend, checksums stay valid."""

from __future__ import annotations

from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.inet6 import ICMPv6DestUnreach, ICMPv6PacketTooBig, IPv6
from scapy.layers.l2 import Ether
from scapy.packet import Raw

from agent.datapath.abi import XdpAction
from agent.datapath.model import Backend, Proto, Service, ServiceKey
from agent.datapath.abi import TcAction
from tests.bpf.conftest import assert_checksums_valid, run_tc, run_xdp

VIP4, C4, B4, R4 = "10.96.0.10", "192.0.2.10", "10.1.0.5", "198.51.100.1"
VIP6, C6, B6, R6 = "fd00:96::10", "2001:db8::10", "fd00:1::5", "2001:db8:ffff::1"


def _svc(vip, b, proto=Proto.TCP):
    return Service(ServiceKey(vip, 80, proto), (Backend(b, 8080, local=True),), maglev_m=251)


def test_icmpv4_frag_needed_for_a_service_flow_goes_to_its_backend(dp):
    dp.upsert_service(_svc(VIP4, B4))
    run_xdp(dp, Ether() / IP(src=C4, dst=VIP4) / TCP(sport=40000, dport=80, flags="S"))   # the flow
    quoted = bytes(IP(src=VIP4, dst=C4, len=1500) / TCP(sport=80, dport=40000, seq=5))[:28]
    err = Ether() / IP(src=R4, dst=VIP4) / ICMP(type=3, code=4, nexthopmtu=1400) / Raw(quoted)
    before = dp.counters().stat("xdp", "icmp_mapped")
    r = run_xdp(dp, err)
    assert r.retval == XdpAction.PASS
    want_quoted = bytes(IP(src=B4, dst=C4, len=1500) / TCP(sport=8080, dport=40000, seq=5))[:28]
    want = Ether() / IP(src=R4, dst=B4) / ICMP(type=3, code=4, nexthopmtu=1400) / Raw(want_quoted)
    assert r.data == bytes(want)
    assert_checksums_valid(r.data)
    assert dp.counters().stat("xdp", "icmp_mapped") == before + 1


def test_icmpv4_error_without_conntrack_uses_maglev(dp):
    dp.upsert_service(_svc(VIP4, B4, Proto.UDP))
    quoted = bytes(IP(src=VIP4, dst=C4) / UDP(sport=80, dport=5353) / Raw(b"abcd"))[:28]
    err = Ether() / IP(src=R4, dst=VIP4) / ICMP(type=11, code=0) / Raw(quoted)
    r = run_xdp(dp, err)
    want_quoted = bytes(IP(src=B4, dst=C4) / UDP(sport=8080, dport=5353, chksum=Ether(bytes(Ether() / IP(src=VIP4, dst=C4) / UDP(sport=80, dport=5353) / Raw(b"abcd")))[UDP].chksum) / Raw(b"abcd"))[:28]
    assert Ether(r.data)[IP].dst == B4
    assert bytes(Ether(r.data)[ICMP].payload)[:26] == want_quoted[:26]
    assert_checksums_valid(r.data)


def test_icmpv6_packet_too_big_for_a_service_flow_goes_to_its_backend(dp):
    dp.upsert_service(_svc(VIP6, B6))
    run_xdp(dp, Ether() / IPv6(src=C6, dst=VIP6) / TCP(sport=40000, dport=80, flags="S"))
    quoted = bytes(IPv6(src=VIP6, dst=C6, plen=1400) / TCP(sport=80, dport=40000, seq=5))[:48]
    err = Ether() / IPv6(src=R6, dst=VIP6) / ICMPv6PacketTooBig(mtu=1280) / Raw(quoted)
    r = run_xdp(dp, err)
    assert r.retval == XdpAction.PASS
    want_quoted = bytes(IPv6(src=B6, dst=C6, plen=1400) / TCP(sport=8080, dport=40000, seq=5))[:48]
    want = Ether() / IPv6(src=R6, dst=B6) / ICMPv6PacketTooBig(mtu=1280) / Raw(want_quoted)
    assert r.data == bytes(want)    # scapy computed the ICMPv6 checksum of `want`


def test_icmp_errors_about_other_flows_pass_untouched(dp):
    dp.upsert_service(_svc(VIP4, B4))
    dp.upsert_service(_svc(VIP6, B6))
    others = [
        Ether() / IP(src=R4, dst=VIP4) / ICMP(type=3, code=3) / Raw(bytes(IP(src=VIP4, dst=C4) / TCP(sport=81, dport=1))[:28]),
        Ether() / IP(src=R4, dst="10.0.0.1") / ICMP(type=3, code=1) / Raw(bytes(IP(src="10.0.0.1", dst=C4) / UDP(sport=1, dport=2))[:28]),
        Ether() / IP(src=R4, dst=VIP4) / ICMP(type=0) / Raw(b"echo reply"),
        Ether() / IP(src=R4, dst=VIP4) / ICMP(type=3, code=4) / Raw(b"\x45\x00"),            # quoted packet truncated
        Ether() / IPv6(src=R6, dst=VIP6) / ICMPv6DestUnreach() / Raw(bytes(IPv6(src=VIP6, dst=C6) / UDP(sport=80, dport=1))[:48]),
    ]
    for pkt in others:
        r = run_xdp(dp, pkt)
        assert r.retval == XdpAction.PASS and r.data == bytes(pkt), pkt.summary()


def test_backend_icmp_error_leaves_as_if_from_the_vip(dp):
    """A local backend's port unreachable about a client's UDP packet: tc egress makes it come
    from the VIP and quote the VIP:port the client used."""
    dp.upsert_service(_svc(VIP4, B4, Proto.UDP))
    run_xdp(dp, Ether() / IP(src=C4, dst=VIP4) / UDP(sport=5353, dport=80) / Raw(b"q"))   # the flow
    quoted = bytes(IP(src=C4, dst=B4) / UDP(sport=5353, dport=8080) / Raw(b"q"))[:28]
    err = Ether() / IP(src=B4, dst=C4) / ICMP(type=3, code=3) / Raw(quoted)
    r = run_tc(dp, "egress", err)
    assert r.retval == TcAction.OK
    inner = IP(src=C4, dst=VIP4) / UDP(sport=5353, dport=80) / Raw(b"q")
    # the quoted UDP checksum is left as the client sent it (the stack never checks it)
    want_quoted = bytearray(bytes(inner)[:28])
    want_quoted[26:28] = quoted[26:28]
    want = Ether() / IP(src=VIP4, dst=C4) / ICMP(type=3, code=3) / Raw(bytes(want_quoted))
    assert r.data == bytes(want)
    assert_checksums_valid(r.data)
    assert dp.counters().stat("tc_egress", "revnat") >= 1


def test_backend_icmpv6_error_leaves_as_if_from_the_vip(dp):
    dp.upsert_service(_svc(VIP6, B6, Proto.UDP))
    run_xdp(dp, Ether() / IPv6(src=C6, dst=VIP6) / UDP(sport=5353, dport=80) / Raw(b"q"))
    inner_b = IPv6(src=C6, dst=B6) / UDP(sport=5353, dport=8080) / Raw(b"q")
    quoted = bytes(inner_b)
    err = Ether() / IPv6(src=B6, dst=C6) / ICMPv6DestUnreach(code=4) / Raw(quoted)
    r = run_tc(dp, "egress", err)
    want_inner = bytearray(bytes(IPv6(src=C6, dst=VIP6) / UDP(sport=5353, dport=80) / Raw(b"q")))
    want_inner[46:48] = quoted[46:48]     # quoted UDP checksum untouched
    want = Ether() / IPv6(src=VIP6, dst=C6) / ICMPv6DestUnreach(code=4) / Raw(bytes(want_inner))
    assert r.data == bytes(want)


def test_router_icmp_error_about_backend_traffic_is_not_rewritten_by_tc(dp):
    dp.upsert_service(_svc(VIP4, B4, Proto.UDP))
    run_xdp(dp, Ether() / IP(src=C4, dst=VIP4) / UDP(sport=5353, dport=80) / Raw(b"q"))
    quoted = bytes(IP(src=C4, dst=B4) / UDP(sport=5353, dport=8080) / Raw(b"q"))[:28]
    err = Ether() / IP(src=R4, dst=C4) / ICMP(type=11) / Raw(quoted)    # not from the backend
    r = run_tc(dp, "egress", err)
    assert r.data == bytes(err)
