"""xdp_lb on frames of every size from 60 to 9,014 bytes (a 9000-byte MTU's largest frame).

xdp_lb is loaded with BPF_F_XDP_HAS_FRAGS, so BPF_PROG_TEST_RUN hands it a frame larger than
its linear limit (a page minus headroom and skb_shared_info: 3,520 bytes here) as a
multi-buffer xdp_buff: the first 3,520 bytes linear, the rest in fragments, as veth does at
MTU 9000. The program must read its headers in the linear part, check lengths against the
whole frame, and its rewrites (DNAT, SNAT, DSR option insert with bpf_xdp_adjust_head) must
leave every byte, address, port and checksum right.
"""

from __future__ import annotations

import json
import sys
import textwrap

import pytest
from scapy.layers.inet import IP, IPOption, TCP, UDP
from scapy.layers.inet6 import HBHOptUnknown, IPv6, IPv6ExtHdrDestOpt
from scapy.layers.l2 import Ether
from scapy.packet import Raw

from agent.datapath.abi import XdpAction
from agent.datapath.model import Backend, Mode, Proto, Service, ServiceKey
from agent.lab import Lab, wait_until
from tests.bpf.conftest import expected, run_xdp

NODE4, PEER4, NODE6, PEER6 = "10.0.0.1", "10.0.0.2", "fd00::1", "fd00::2"
C4, V4, LB4, RB4 = "192.0.2.10", "10.96.0.10", "10.1.0.5", "10.2.0.5"
C6, V6, LB6, RB6 = "2001:db8::10", "fd00:96::10", "fd00:1::5", "fd00:2::5"
MTU = 9000
XDP_LINEAR_MAX = 4096 - 256 - 320   # test-run linear part: page - XDP headroom - skb_shared_info
SIZES = sorted(set(range(60, 201)) | set(range(200, MTU + 15, 241))
               | {1514, XDP_LINEAR_MAX - 1, XDP_LINEAR_MAX, XDP_LINEAR_MAX + 1, 4096, 8192, MTU + 14})
CLIENT_MAC, NODE_MAC_IN = "02:00:00:00:00:01", "02:00:00:00:00:02"


@pytest.fixture(scope="module")
def net9k():
    """The node namespace (bpf_fib_lookup runs where the test run runs) with a 9000-byte MTU
    link to the next hop towards clients and remote backends."""
    with Lab("dpx9k") as lab:
        node, peer = lab.host("node", forwarding=True), lab.host("peer")
        n_if, p_if = lab.link(node, peer, [f"{NODE4}/24", f"{NODE6}/64"], [f"{PEER4}/24", f"{PEER6}/64"], mtu=MTU)
        for prefix, via in (("10.2.0.0/16", PEER4), ("192.0.2.0/24", PEER4),
                            ("fd00:2::/64", PEER6), ("2001:db8::/64", PEER6)):
            node.run("ip", "route", "add", prefix, "via", via)
        mac = lambda h, i: json.loads(h.run("ip", "-j", "link", "show", i))[0]["address"]  # noqa: E731
        peer_mac = mac(peer, p_if)
        for via in (PEER4, PEER6):
            node.run("ip", "neigh", "replace", via, "lladdr", peer_mac, "dev", n_if, "nud", "permanent")
        yield {"ns": node.ns, "node_mac": mac(node, n_if), "peer_mac": peer_mac}


def frame(src, dst, l4, size, *, sport=40000, dport=80, flags="S", src_mac=CLIENT_MAC, dst_mac=NODE_MAC_IN):
    IPX = IPv6 if ":" in src else IP
    l4p = TCP(sport=sport, dport=dport, flags=flags, seq=5) if l4 == "tcp" else UDP(sport=sport, dport=dport)
    hdr = Ether(src=src_mac, dst=dst_mac) / IPX(src=src, dst=dst) / l4p
    n = size - len(hdr)
    return Ether(bytes(hdr / Raw(bytes((i * 5 + size) & 0xff for i in range(n)))))


def sizes_for(v6, l4, grow=0):
    least = 14 + (40 if v6 else 20) + (20 if l4 == "tcp" else 8)
    return [s for s in SIZES if least <= s <= MTU + 14 - grow]


def run_sizes(dp, ns, build, want_of, verdict, sizes):
    """Run every size; return [(size, problem)]."""
    failures = []
    for s in sizes:
        f = build(s)
        r = run_xdp(dp, f, netns=ns)
        if r.retval != verdict:
            failures.append((s, f"verdict {r.retval}"))
            continue
        want = bytes(want_of(f))
        if r.data != want:
            failures.append((s, f"{len(r.data)} bytes out, {len(want)} expected, first difference at byte "
                                f"{next((i for i, (x, y) in enumerate(zip(r.data, want)) if x != y), None)}; "
                                f"{Ether(r.data).summary()}"))
    return failures


CASES = [(False, "tcp"), (False, "udp"), (True, "tcp"), (True, "udp")]
IDS = ["v4-tcp", "v4-udp", "v6-tcp", "v6-udp"]


def _svc(vip, l4, backend, **kw):
    return Service(ServiceKey(vip, 80, Proto.TCP if l4 == "tcp" else Proto.UDP), (Backend(backend, 8080, **kw),),
                   maglev_m=251)


@pytest.mark.parametrize("v6,l4", CASES, ids=IDS)
def test_local_dnat_of_every_size(dp, net9k, v6, l4):
    c, v, b = (C6, V6, LB6) if v6 else (C4, V4, LB4)
    IPX, L4X = ("IPv6" if v6 else "IP"), l4.upper()
    dp.upsert_service(_svc(v, l4, b, local=True))
    failures = run_sizes(dp, net9k["ns"], lambda s: frame(c, v, l4, s),
                         lambda f: expected(f, **{f"{IPX}_dst": b, f"{L4X}_dport": 8080}),
                         XdpAction.PASS, sizes_for(v6, l4))
    assert failures == []


@pytest.mark.parametrize("v6,l4", CASES, ids=IDS)
def test_snat_request_and_reply_of_every_size(dp, net9k, v6, l4):
    c, v, b, node = (C6, V6, RB6, NODE6) if v6 else (C4, V4, RB4, NODE4)
    IPX, L4X = ("IPv6" if v6 else "IP"), l4.upper()
    dp.set_node_addresses(v4=NODE4, v6=NODE6)
    dp.upsert_service(Service(ServiceKey(v, 80, Proto.TCP if l4 == "tcp" else Proto.UDP), (Backend(b, 8080),),
                              mode=Mode.SNAT, maglev_m=251))
    r = run_xdp(dp, frame(c, v, l4, 100), netns=net9k["ns"])
    assert r.retval == XdpAction.REDIRECT
    nat_port = Ether(r.data)[L4X].sport
    macs = {"Ether_src": net9k["node_mac"], "Ether_dst": net9k["peer_mac"]}
    failures = run_sizes(dp, net9k["ns"], lambda s: frame(c, v, l4, s, flags="A"),
                         lambda f: expected(f, **macs, **{f"{IPX}_src": node, f"{IPX}_dst": b,
                                                          f"{L4X}_sport": nat_port, f"{L4X}_dport": 8080}),
                         XdpAction.REDIRECT, sizes_for(v6, l4))
    failures += [("reply",) + x for x in run_sizes(
        dp, net9k["ns"], lambda s: frame(b, node, l4, s, sport=8080, dport=nat_port, flags="A"),
        lambda f: expected(f, **macs, **{f"{IPX}_src": v, f"{IPX}_dst": c, f"{L4X}_sport": 80, f"{L4X}_dport": 40000}),
        XdpAction.REDIRECT, sizes_for(v6, l4))]
    assert failures == []


def _with_dsr_option(f: Ether, vip: str, backend: str, macs: dict) -> Ether:
    """What DSR makes of f: destination backend:8080, the option after the fixed IP header."""
    import ipaddress
    out = expected(f, **macs, **({"IPv6_dst": backend} if IPv6 in f else {"IP_dst": backend}),
                   **({"TCP_dport": 8080} if TCP in f else {"UDP_dport": 8080}))
    l4 = out[IPv6].payload if IPv6 in out else out[IP].payload
    if IPv6 in out:
        data = ipaddress.ip_address(vip).packed + (80).to_bytes(2, "big") + b"\0\0"
        ip = out[IPv6].copy()
        ip.remove_payload()
        ip.plen = None
        ip.nh = 60
        new = Ether(bytes(out)[:12] + b"\x86\xdd") / ip / IPv6ExtHdrDestOpt(
            len=2, options=[HBHOptUnknown(otype=0x1B, optlen=20, optdata=data)]) / l4
    else:
        ip = out[IP].copy()
        ip.remove_payload()
        ip.options = [IPOption(b"\x9a\x08\x00\x50" + ipaddress.ip_address(vip).packed)]
        ip.ihl = ip.len = ip.chksum = None
        new = Ether(bytes(out)[:12] + b"\x08\x00") / ip / l4
    return Ether(bytes(new))


@pytest.mark.parametrize("v6,l4", CASES, ids=IDS)
def test_dsr_option_insert_of_every_size(dp, net9k, v6, l4):
    """Every UDP packet and every TCP SYN gets the option (8 / 24 bytes more): frames up to the
    MTU minus that growth; a larger one cannot leave (FIB MTU check) and is dropped, not sent."""
    c, v, b = (C6, V6, RB6) if v6 else (C4, V4, RB4)
    grow = 24 if v6 else 8
    dp.upsert_service(Service(ServiceKey(v, 80, Proto.TCP if l4 == "tcp" else Proto.UDP), (Backend(b, 8080),),
                              mode=Mode.DSR, maglev_m=251))
    macs = {"Ether_src": net9k["node_mac"], "Ether_dst": net9k["peer_mac"]}
    failures = run_sizes(dp, net9k["ns"], lambda s: frame(c, v, l4, s, sport=41000 + s),
                         lambda f: _with_dsr_option(f, v, b, macs), XdpAction.REDIRECT, sizes_for(v6, l4, grow))
    assert failures == []
    too_big = frame(c, v, l4, MTU + 14, sport=39999)
    assert run_xdp(dp, too_big, netns=net9k["ns"]).retval == XdpAction.DROP


def test_veth_at_mtu_9000_hands_xdp_lb_multi_buffer_frames_and_they_are_served(dp):
    """For real: xdp_lb (multi-buffer aware) and tc on a veth with MTU 9000, a local-backend
    VIP, and a 10 MiB TCP upload with TSO/GSO/GRO on at the sender: veth hands XDP 9,014-byte
    multi-buffer frames (it turns GSO off on the peer of an XDP veth, so never larger), which
    xdp_lb DNATs; the client reads the server's byte count back through tc egress."""
    server = textwrap.dedent("""
        import socket
        s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("10.0.0.1", 8080)); s.listen(8)
        while True:
            c, _ = s.accept()
            n = 0
            while True:
                d = c.recv(1 << 20)
                if not d:
                    break
                n += len(d)
            c.sendall(str(n).encode()); c.close()
    """)
    client = textwrap.dedent(f"""
        import socket
        s = socket.create_connection(("{V4}", 80), timeout=20)
        peer = s.getpeername()[0]
        s.sendall(bytes(10 << 20)); s.shutdown(socket.SHUT_WR)
        print(s.recv(100).decode(), peer)
    """)
    with Lab("dpmb") as lab:
        node, peer = lab.host("node"), lab.host("client")
        n_if, c_if = lab.link(node, peer, ["10.0.0.1/24"], ["10.0.0.2/24"], mtu=MTU)
        for h, i in ((node, n_if), (peer, c_if)):
            h.run("ethtool", "-K", i, "gro", "on")
        peer.run("ip", "route", "add", f"{V4}/32", "via", "10.0.0.1")
        dp.attach_xdp(n_if, netns=node.ns)
        dp.attach_tc(n_if, "egress", netns=node.ns)
        key = ServiceKey(V4, 80, Proto.TCP)
        dp.upsert_service(Service(key, (Backend("10.0.0.1", 8080, local=True),), maglev_m=251))
        node.spawn([sys.executable, "-c", server])
        wait_until(lambda: ":8080" in node.run("ss", "-ltn"), what="server")
        before = dp.counters().services.get(key, (0, 0))
        out = peer.run(sys.executable, "-c", client, timeout=60).split()
        assert out == [str(10 << 20), V4]
        packets, nbytes = (a - b for a, b in zip(dp.counters().services[key], before))
        # most of 10 MiB arrived in frames far above one page: multi-buffer xdp_buffs
        assert nbytes >= 10 << 20 and nbytes / packets > XDP_LINEAR_MAX, (packets, nbytes)
