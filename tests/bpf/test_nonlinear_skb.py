"""tc egress / ingress on real, non-linear skbs of every size (see tests/bpf/wire.py).

A local backend's or a DSR backend's reply leaves through tc egress and must leave as
VIP:port whatever its size, its layout (a linear head of 14 bytes, the rest in fragments) and
its checksum state (complete, or CHECKSUM_PARTIAL; a GSO super-packet segmented after tc).
The regression: tc pulled 128 bytes and then required the whole IP packet to be linear, so a
reply with more than 62 bytes of TCP payload (with timestamps) left untranslated.
"""

from __future__ import annotations

import ipaddress
import time

import pytest
from scapy.layers.inet import ICMP, IP, IPOption, TCP, UDP, IPerror, UDPerror
from scapy.layers.inet6 import HBHOptUnknown, ICMPv6DestUnreach, IPv6, IPv6ExtHdrDestOpt, IPerror6
from scapy.layers.l2 import Ether
from scapy.packet import Raw

from agent.datapath.abi import XdpAction
from agent.datapath.model import Backend, Proto, Service, ServiceKey
from agent.lab import Lab
from tests.bpf.conftest import assert_checksums_valid, expected, run_xdp
from tests.bpf.wire import GSO_TCPV4, GSO_TCPV6, Port, vnet_hdr

CLIENT4, VIP4, BACKEND4 = "192.0.2.10", "10.96.0.10", "10.1.0.5"
CLIENT6, VIP6, BACKEND6 = "2001:db8::10", "fd00:96::10", "fd00:1::5"
MTU = 9000
# every frame size from 60 to 200 bytes (the 128-byte pull boundary is in there), then a
# stride, the usual MTUs' frames and the largest a 9000-byte MTU carries
SIZES = sorted(set(range(60, 201)) | set(range(200, MTU + 15, 241)) | {1514, 1518, 3514, 4110, 8192, MTU + 14})
TS_OPT = [("NOP", None), ("NOP", None), ("Timestamp", (1, 2))]   # 12 bytes, as Linux sends


def fam(v6):
    return (CLIENT6, VIP6, BACKEND6, IPv6) if v6 else (CLIENT4, VIP4, BACKEND4, IP)


def reply_frame(v6: bool, proto: str, size: int, cport: int, sport: int = 8080, src=None):
    client, _, backend, IPX = fam(v6)
    l4 = (TCP(sport=sport, dport=cport, flags="PA", seq=1, ack=1, options=TS_OPT) if proto == "tcp"
          else UDP(sport=sport, dport=cport))
    hdr = Ether(src="02:00:00:00:00:0b", dst="02:00:00:00:00:0c") / IPX(src=src or backend, dst=client) / l4
    n = size - len(hdr)
    payload = bytes((i * 7 + size) & 0xff for i in range(n))
    return Ether(bytes(hdr / Raw(payload)))


def sizes_for(v6: bool, proto: str) -> list[int]:
    least = len(reply_frame(v6, proto, 0, 1))
    return [s for s in SIZES if s >= least]


@pytest.fixture(scope="module")
def wire(module_dp):
    with Lab("dpwire") as lab:
        node, peer = lab.host("node"), lab.host("peer")
        n_if, p_if = lab.link(node, peer, mtu=MTU)
        # segment GSO packets and complete CHECKSUM_PARTIAL checksums in software, *after*
        # tc egress (validate_xmit_skb), so the peer captures what a wire would carry
        node.run("ethtool", "-K", n_if, "tx", "off", "tso", "off", "gso", "off")
        module_dp.attach_tc(n_if, "egress", netns=node.ns)
        module_dp.attach_tc(n_if, "ingress", netns=node.ns)
        ports = {"out": Port(node.ns, n_if), "vout": Port(node.ns, n_if, vnet=True),
                 "gso": Port(node.ns, n_if, vnet=True, ring=False),   # a GSO packet is > a page anyway
                 "cap": Port(peer.ns, p_if, ring=False), "inj": Port(peer.ns, p_if)}
        try:
            yield ports
        finally:
            for p in ports.values():
                p.close()


def local_flow(dp, v6: bool, proto: str, cport: int) -> None:
    """Program a local-backend service and let XDP see the client's first packet (conntrack)."""
    client, vip, backend, IPX = fam(v6)
    p = Proto.TCP if proto == "tcp" else Proto.UDP
    dp.upsert_service(Service(ServiceKey(vip, 80, p), (Backend(backend, 8080, local=True),), maglev_m=251))
    l4 = TCP(sport=cport, dport=80, flags="S") if proto == "tcp" else UDP(sport=cport, dport=80)
    r = run_xdp(dp, Ether(src="02:00:00:00:00:0c", dst="02:00:00:00:00:0b") / IPX(src=client, dst=vip) / l4)
    assert r.retval == XdpAction.PASS


def _ports(frame: bytes, IPX, proto):
    p = Ether(frame)
    L4 = TCP if proto == "tcp" else UDP
    if IPX not in p or L4 not in p:
        return None
    return p[L4].dport


def send_and_check(wire, frames: dict[int, Ether], v6: bool, proto: str, cport: int, *, vnet: bool = False):
    """Send each reply frame through tc egress; every one must arrive as VIP:80 with valid
    checksums and its payload intact. Returns the sizes that failed, with the reason."""
    _, vip, _, IPX = fam(v6)
    L4 = TCP if proto == "tcp" else UDP
    cap, failures = wire["cap"], []
    cap.drain()
    for size, f in frames.items():
        raw = bytes(f)
        if vnet:
            l4_off = 14 + (40 if v6 else 20)
            # the pseudo-header sum in the checksum field, as the stack leaves it for offload
            q = f.copy()
            q[L4].chksum = _pseudo_sum(f, IPX, L4)
            raw = bytes(q)
            wire["vout"].send(raw, vnet_hdr(csum_start=l4_off, csum_offset=16 if proto == "tcp" else 6,
                                            hdr_len=l4_off + (18 if proto == "tcp" else 8)))
        else:
            wire["out"].send(raw)
        got = cap.recv_until(lambda d: _ports(d, IPX, proto) == cport, 1, timeout=2)
        if not got:
            failures.append((size, "not received"))
            continue
        want = bytes(expected(f, **{f"{IPX.__name__}_src": vip, f"{L4.__name__}_sport": 80}))
        if got[0] != want:
            g = Ether(got[0])
            failures.append((size, f"src {g[IPX].src}:{g[L4].sport}, {len(got[0])} bytes"))
            continue
        try:
            assert_checksums_valid(got[0])
        except AssertionError as exc:
            failures.append((size, str(exc)))
    return failures


def _pseudo_sum(f: Ether, IPX, L4) -> int:
    """The folded (not complemented) pseudo-header sum Linux puts in a CHECKSUM_PARTIAL field."""
    ip = f[IPX]
    l4len = len(bytes(ip[L4]))
    if IPX is IP:
        ph = ipaddress.ip_address(ip.src).packed + ipaddress.ip_address(ip.dst).packed + \
            bytes([0, 6 if L4 is TCP else 17]) + l4len.to_bytes(2, "big")
    else:
        ph = ipaddress.ip_address(ip.src).packed + ipaddress.ip_address(ip.dst).packed + \
            l4len.to_bytes(4, "big") + bytes([0, 0, 0, 6 if L4 is TCP else 17])
    s = sum(int.from_bytes(ph[i:i + 2], "big") for i in range(0, len(ph), 2))
    while s >> 16:
        s = (s & 0xffff) + (s >> 16)
    return s


CASES = [(False, "tcp"), (False, "udp"), (True, "tcp"), (True, "udp")]
IDS = ["v4-tcp", "v4-udp", "v6-tcp", "v6-udp"]


def test_reply_with_63_bytes_of_tcp_payload_is_translated(dp, wire):
    """The reproduction of issue 8: 62 bytes of payload worked, 63 did not."""
    local_flow(dp, False, "tcp", 41000)
    frames = {n: reply_frame(False, "tcp", 14 + 20 + 32 + n, 41000) for n in (62, 63, 1448)}
    assert send_and_check(wire, frames, False, "tcp", 41000) == []


@pytest.mark.parametrize("v6,proto", CASES, ids=IDS)
def test_local_reply_of_every_size_leaves_from_the_vip(dp, wire, v6, proto):
    cport = 42000 + CASES.index((v6, proto))
    local_flow(dp, v6, proto, cport)
    frames = {s: reply_frame(v6, proto, s, cport) for s in sizes_for(v6, proto)}
    assert send_and_check(wire, frames, v6, proto, cport) == []


@pytest.mark.parametrize("v6,proto", CASES, ids=IDS)
def test_checksum_partial_local_reply_of_every_size(dp, wire, v6, proto):
    """CHECKSUM_PARTIAL (offloaded) replies: only the pseudo-header sum may change."""
    cport = 42100 + CASES.index((v6, proto))
    local_flow(dp, v6, proto, cport)
    frames = {s: reply_frame(v6, proto, s, cport) for s in sizes_for(v6, proto)}
    assert send_and_check(wire, frames, v6, proto, cport, vnet=True) == []


@pytest.mark.parametrize("v6", [False, True], ids=["v4", "v6"])
@pytest.mark.parametrize("mtu", [1500, MTU])
def test_gso_super_packet_reply_is_translated_in_every_segment(dp, wire, v6, mtu):
    """A 60 KB TCP GSO packet (what a local pod's TSO socket hands the node) leaves tc egress
    once; every segment the kernel cuts from it afterwards must come from VIP:80, with valid
    checksums and the payload in order."""
    cport = 42200 + v6 * 2 + (mtu > 1500)
    local_flow(dp, v6, "tcp", cport)
    client, vip, backend, IPX = fam(v6)
    mss = mtu - (40 if v6 else 20) - 32
    payload = bytes((i * 13) & 0xff for i in range(60000))
    f = Ether(bytes(Ether(src="02:00:00:00:00:0b", dst="02:00:00:00:00:0c") / IPX(src=backend, dst=client)
                    / TCP(sport=8080, dport=cport, flags="PA", seq=1000, ack=1, options=TS_OPT) / Raw(payload)))
    q = f.copy()
    q[TCP].chksum = _pseudo_sum(f, IPX, TCP)
    l4_off = 14 + (40 if v6 else 20)
    wire["cap"].drain()
    wire["gso"].send(bytes(q), vnet_hdr(csum_start=l4_off, csum_offset=16, hdr_len=l4_off + 32,
                                        gso_type=GSO_TCPV6 if v6 else GSO_TCPV4, gso_size=mss))
    n = -(-len(payload) // mss)
    segs = wire["cap"].recv_until(lambda d: _ports(d, IPX, "tcp") == cport, n, timeout=5)
    assert len(segs) == n, f"{len(segs)} of {n} segments"
    data = b""
    for s in segs:
        p = Ether(s)
        assert (p[IPX].src, p[TCP].sport) == (vip, 80)
        assert_checksums_valid(s)
        assert p[TCP].seq == 1000 + len(data)
        data += bytes(p[TCP].payload)
    assert data == payload


def _dsr_request(v6: bool, proto: str, size: int, cport: int) -> Ether:
    client, vip, backend, IPX = fam(v6)
    l4 = TCP(sport=cport, dport=8080, flags="S") if proto == "tcp" else UDP(sport=cport, dport=8080)
    if v6:
        data = ipaddress.ip_address(vip).packed + (80).to_bytes(2, "big") + b"\0\0"
        hdr = IPv6(src=client, dst=backend) / IPv6ExtHdrDestOpt(
            len=2, options=[HBHOptUnknown(otype=0x1B, optlen=20, optdata=data)])
    else:
        hdr = IP(src=client, dst=backend, options=[IPOption(b"\x9a\x08\x00\x50" + ipaddress.ip_address(vip).packed)])
    f = Ether(src="02:00:00:00:00:0c", dst="02:00:00:00:00:0b") / hdr / l4
    return Ether(bytes(f / Raw(b"q" * max(0, size - len(f)))))


@pytest.mark.parametrize("v6,proto", CASES, ids=IDS)
def test_dsr_request_recorded_and_reply_translated_at_every_size(dp, wire, v6, proto):
    """Backend node: tc ingress records the DSR option of a (non-linear) request of each size,
    and tc egress rewrites the reply of that flow from VIP:80."""
    base = 43000 + 1000 * CASES.index((v6, proto))
    sizes = sizes_for(v6, proto)
    before = dp.counters().stat("tc_ingress", "dsr_record")
    for i, s in enumerate(sizes):
        wire["inj"].send(bytes(_dsr_request(v6, proto, s, base + i)))
    # the ingress program runs when the frame is received: wait until all are counted
    deadline = time.monotonic() + 5
    while dp.counters().stat("tc_ingress", "dsr_record") < before + len(sizes) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert dp.counters().stat("tc_ingress", "dsr_record") - before == len(sizes)
    failures = []
    for i, s in enumerate(sizes):
        failures += send_and_check(wire, {s: reply_frame(v6, proto, s, base + i)}, v6, proto, base + i)
    assert failures == []


@pytest.mark.parametrize("v6", [False, True], ids=["v4", "v6"])
def test_icmp_error_of_a_local_backend_leaves_about_the_vip(dp, wire, v6):
    """A local backend's port-unreachable about a UDP flow (quoting up to 1200 bytes): the outer
    source and the quoted destination become the VIP, at every quote length."""
    client, vip, backend, IPX = fam(v6)
    failures = []
    for i, qlen in enumerate(list(range(0, 140, 1)) + list(range(140, 1200, 97))):
        cport = 44000 + i
        local_flow(dp, v6, "udp", cport)
        quoted = IPX(src=client, dst=backend) / UDP(sport=cport, dport=8080) / Raw(b"u" * qlen)
        if v6:
            err = IPv6(src=backend, dst=client) / ICMPv6DestUnreach(code=4) / quoted
        else:
            err = IP(src=backend, dst=client) / ICMP(type=3, code=3) / quoted
        f = Ether(bytes(Ether(src="02:00:00:00:00:0b", dst="02:00:00:00:00:0c") / err))
        wire["cap"].drain()
        wire["out"].send(bytes(f))

        def ours(d, cport=cport):
            p = Ether(d)
            inner = p.getlayer(UDPerror)
            return inner is not None and inner.sport == cport
        got = wire["cap"].recv_until(ours, 1, timeout=2)
        if not got:
            failures.append((qlen, "not received"))
            continue
        p = Ether(got[0])
        inner_ip = p[IPerror] if not v6 else p[IPerror6]
        if p[IPX].src != vip or inner_ip.dst != vip or p[UDPerror].dport != 80:
            failures.append((qlen, f"outer src {p[IPX].src}, quoted dst {inner_ip.dst}"))
            continue
        if not v6:
            q = p.copy()
            q[ICMP].chksum = None
            q[IPerror].chksum = None
            if bytes(Ether(bytes(q))) != got[0]:
                failures.append((qlen, "checksum"))
        else:
            q = p.copy()
            q[ICMPv6DestUnreach].cksum = None
            if bytes(Ether(bytes(q))) != got[0]:
                failures.append((qlen, "ICMPv6 checksum"))
    assert failures == []
