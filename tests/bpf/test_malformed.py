"""Robustness: every truncation point of every valid test packet, and a set of malformed
headers, never produce a rewritten packet (the program passes the frame untouched or drops it)."""

from __future__ import annotations

import errno

import pytest
from scapy.layers.inet import IP, IPOption_NOP, TCP, UDP
from scapy.layers.inet6 import IPv6, IPv6ExtHdrDestOpt, IPv6ExtHdrHopByHop, IPv6ExtHdrRouting
from scapy.layers.l2 import Dot1Q, Ether
from scapy.packet import Raw

from agent.datapath.abi import TcAction, XdpAction
from agent.datapath.model import Backend, Proto, Service, ServiceKey
from agent.datapath.testrun import test_run

VIP4, VIP6, C4, C6, B4, B6 = "10.96.0.10", "fd00:96::10", "192.0.2.10", "2001:db8::10", "10.1.0.5", "fd00:1::5"
E = Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02")

VALID = {
    "v4-tcp": E / IP(src=C4, dst=VIP4) / TCP(sport=40000, dport=80, flags="S") / Raw(b"payload!"),
    "v4-udp": E / IP(src=C4, dst=VIP4) / UDP(sport=40000, dport=80) / Raw(b"payload!"),
    "v4-opts-tcp": E / IP(src=C4, dst=VIP4, options=[IPOption_NOP()] * 8) / TCP(sport=40000, dport=80) / Raw(b"p"),
    "v4-vlan-udp": E / Dot1Q(vlan=5) / IP(src=C4, dst=VIP4) / UDP(sport=40000, dport=80) / Raw(b"p"),
    "v6-tcp": E / IPv6(src=C6, dst=VIP6) / TCP(sport=40000, dport=80, flags="S") / Raw(b"payload!"),
    "v6-udp": E / IPv6(src=C6, dst=VIP6) / UDP(sport=40000, dport=80) / Raw(b"payload!"),
    "v6-ext-tcp": E / IPv6(src=C6, dst=VIP6) / IPv6ExtHdrHopByHop() / IPv6ExtHdrDestOpt() / TCP(sport=40000, dport=80),
}
REPLIES = {
    "v4-tcp": E / IP(src=B4, dst=C4) / TCP(sport=8080, dport=40000, flags="SA") / Raw(b"reply"),
    "v6-udp": E / IPv6(src=B6, dst=C6) / UDP(sport=8080, dport=40000) / Raw(b"reply"),
}


@pytest.fixture
def services(dp):
    for vip, b in ((VIP4, B4), (VIP6, B6)):
        for proto in Proto:
            dp.upsert_service(Service(ServiceKey(vip, 80, proto), (Backend(b, 8080, local=True),), maglev_m=251))
    return dp


def _run(fd, data: bytes, refused_below: int = 14):
    try:
        return test_run(fd, data)
    except OSError as exc:
        # the kernel refuses frames shorter than an Ethernet header (XDP) or than Ethernet + the
        # IP header announced by the ethertype (skb) before running the program
        assert exc.errno == errno.EINVAL and len(data) < refused_below, f"test run failed for {len(data)} bytes"
        return None


def _assert_untouched(r, data: bytes, ok_verdicts, what):
    if r is None:
        return
    assert r.retval in ok_verdicts, f"{what}: verdict {r.retval}"
    if r.retval not in (XdpAction.DROP, TcAction.SHOT) or ok_verdicts == (TcAction.OK, TcAction.SHOT):
        assert r.data == data, f"{what}: truncated/malformed frame was rewritten"


@pytest.mark.parametrize("name", VALID)
def test_every_truncation_of_a_service_packet_is_never_rewritten(services, name):
    dp = services
    full = bytes(VALID[name])
    fd = dp.program_fd("xdp")
    r = test_run(fd, full)
    assert r.data != full and r.retval == XdpAction.PASS   # the full packet IS translated
    for n in range(len(full)):
        data = full[:n]
        _assert_untouched(_run(fd, data), data, (XdpAction.PASS, XdpAction.DROP), f"{name}[:{n}]")


@pytest.mark.parametrize("name", REPLIES)
def test_every_truncation_of_a_reply_is_never_rewritten_by_tc(services, name):
    dp = services
    # create the conntrack reply entry with the matching request
    req = VALID["v4-tcp"] if name.startswith("v4") else VALID["v6-udp"]
    test_run(dp.program_fd("xdp"), bytes(req))
    full = bytes(REPLIES[name])
    fd = dp.program_fd("tc-egress")
    assert test_run(fd, full).data != full      # the full reply IS translated
    for n in range(len(full)):
        data = full[:n]
        r = _run(fd, data, refused_below=14 + (20 if name.startswith("v4") else 40))
        if r is not None:
            assert r.retval == TcAction.OK and r.data == data, f"{name}[:{n}] rewritten"


def _bad_ip4(**kw):
    return E / IP(src=C4, dst=VIP4, **kw) / TCP(sport=40000, dport=80) / Raw(b"xxxxxxxx")


MALFORMED = {
    "ihl<5": bytes(_bad_ip4(ihl=4)),
    "ihl>len": bytes(_bad_ip4(ihl=15)),
    "totlen<hdr": bytes(_bad_ip4(len=12)),
    "totlen>frame": bytes(_bad_ip4(len=400)),
    "version6-in-ipv4": bytes(_bad_ip4(version=6)),
    "tcp-doff<5": bytes(E / IP(src=C4, dst=VIP4) / TCP(sport=1, dport=80, dataofs=4) / Raw(b"x" * 8)),
    "tcp-doff>packet": bytes(E / IP(src=C4, dst=VIP4) / TCP(sport=1, dport=80, dataofs=15) / Raw(b"x" * 8)),
    "udp-len<8": bytes(E / IP(src=C4, dst=VIP4) / UDP(sport=1, dport=80, len=7) / Raw(b"x" * 8)),
    "udp-len>ip": bytes(E / IP(src=C4, dst=VIP4) / UDP(sport=1, dport=80, len=300) / Raw(b"x" * 8)),
    "v6-plen>frame": bytes(E / IPv6(src=C6, dst=VIP6, plen=500) / TCP(sport=1, dport=80)),
    "v6-version4": bytes(E / IPv6(src=C6, dst=VIP6, version=4) / TCP(sport=1, dport=80)),
    "v6-ext-chain-too-long": bytes(E / IPv6(src=C6, dst=VIP6) / IPv6ExtHdrDestOpt() / IPv6ExtHdrDestOpt()
                                   / IPv6ExtHdrDestOpt() / IPv6ExtHdrDestOpt() / IPv6ExtHdrDestOpt() / TCP(sport=1, dport=80)),
    "v6-ext-len>packet": bytes(E / IPv6(src=C6, dst=VIP6) / IPv6ExtHdrRouting(len=30) / TCP(sport=1, dport=80)),
    "vlan-truncated": bytes(Ether(type=0x8100) / Raw(b"\x00\x05")),
}


@pytest.mark.parametrize("name", MALFORMED)
def test_malformed_headers_pass_untouched(services, name):
    data = MALFORMED[name]
    before = services.counters().stat("xdp", "unparsed")
    r = test_run(services.program_fd("xdp"), data)
    assert r.retval == XdpAction.PASS and r.data == data
    assert services.counters().stat("xdp", "unparsed") == before + 1


def _truncations_unchanged(dp, full: bytes, netns=None, what=""):
    from agent.datapath.netns import in_netns
    from agent.datapath.testrun import TestRunner
    runner = TestRunner(dp.program_fd("xdp"))

    def sweep():
        out = []
        for n in range(14, len(full)):
            r = runner.run(full[:n])
            out.append((n, r.retval, r.data))
        return out

    for n, rv, data in in_netns(netns, sweep):
        assert rv in (XdpAction.PASS, XdpAction.DROP), f"{what}[:{n}]: verdict {rv}"
        if rv == XdpAction.PASS:
            assert data == full[:n], f"{what}[:{n}] was rewritten"


def test_truncated_snat_dsr_and_icmp_packets_are_never_rewritten(dp, net):
    from scapy.layers.inet6 import ICMPv6PacketTooBig

    from agent.datapath.model import Mode
    from tests.bpf.conftest import NODE4
    dp.set_node_addresses(v4=NODE4)
    dp.upsert_service(Service(ServiceKey(VIP4, 80, Proto.TCP), (Backend("10.2.0.5", 8080),), maglev_m=251))
    dp.upsert_service(Service(ServiceKey(VIP4, 80, Proto.UDP), (Backend("10.2.0.6", 8080),), mode=Mode.DSR,
                              maglev_m=251))
    dp.upsert_service(Service(ServiceKey(VIP6, 80, Proto.TCP), (Backend(B6, 8080, local=True),), maglev_m=251))
    # full packets take the remote paths (redirect) ...
    syn = bytes(VALID["v4-tcp"])
    r = test_run(dp.program_fd("xdp"), syn, netns=net["ns"])
    assert r.retval == XdpAction.REDIRECT
    (fwd,) = [e for e in dp.conntrack() if e.direction == "service"]
    reply = bytes(E / IP(src="10.2.0.5", dst=NODE4) / TCP(sport=8080, dport=fwd.nat_port, flags="SA") / Raw(b"r"))
    assert test_run(dp.program_fd("xdp"), reply, netns=net["ns"]).retval == XdpAction.REDIRECT
    dsr = bytes(VALID["v4-udp"])
    assert test_run(dp.program_fd("xdp"), dsr, netns=net["ns"]).retval == XdpAction.REDIRECT
    icmp = bytes(E / IPv6(src="2001:db8:ffff::1", dst=VIP6) / ICMPv6PacketTooBig()
                 / Raw(bytes(IPv6(src=VIP6, dst=C6) / TCP(sport=80, dport=40000))[:48]))
    test_run(dp.program_fd("xdp"), bytes(VALID["v6-tcp"]))   # the flow the error is about
    assert test_run(dp.program_fd("xdp"), icmp).data != icmp
    # ... and none of their truncations is rewritten
    for name, pkt in (("snat-request", syn), ("snat-reply", reply), ("dsr-request", dsr), ("icmp6-error", icmp)):
        _truncations_unchanged(dp, pkt, net["ns"], name)
