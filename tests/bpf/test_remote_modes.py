"""Remote backends: SNAT mode (DNAT + SNAT to the node, FIB lookup + redirect, replies reversed)
and DSR mode (DNAT + Cilium "opt" IPv4 option / IPv6 Destination Option on the first packet;
on the backend's node tc ingress records it and tc egress rewrites the reply to VIP:port).

bpf_fib_lookup under BPF_PROG_TEST_RUN uses the namespace the run happens in, so the runs
happen inside a lab namespace "node" with a veth towards "peer" (the next hop to clients and
to remote backends) and a permanent neighbour entry for it.
"""

from __future__ import annotations

import json

import pytest
from scapy.layers.inet import IP, IPOption, IPOption_NOP, TCP, UDP
from scapy.layers.inet6 import HBHOptUnknown, IPv6, IPv6ExtHdrDestOpt
from scapy.layers.l2 import Ether
from scapy.packet import Raw

from agent.datapath.abi import MapName, TcAction, XdpAction
from agent.datapath.model import Backend, Mode, Proto, Service, ServiceKey
from agent.lab import Lab
from tests.bpf.conftest import assert_checksums_valid, assert_frame, expected, run_tc, run_xdp

from tests.bpf.conftest import NODE4, NODE6
VIP4, VIP6 = "10.96.0.10", "fd00:96::10"
C4, C6 = "192.0.2.10", "2001:db8::10"
B4, B6 = "10.2.0.5", "fd00:2::5"


def _svc(vip, proto, backend, mode, **kw):
    return Service(ServiceKey(vip, 80, proto), (Backend(backend, 8080),), mode=mode, maglev_m=251, **kw)


def _req(client, vip, l4="tcp", sport=40000, flags="S"):
    ip = IP(src=client, dst=vip) if ":" not in vip else IPv6(src=client, dst=vip)
    l4p = TCP(sport=sport, dport=80, flags=flags, seq=7) if l4 == "tcp" else UDP(sport=sport, dport=80)
    return Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02") / ip / l4p / Raw(b"request")


@pytest.mark.parametrize("family,l4", [(4, "tcp"), (4, "udp"), (6, "tcp"), (6, "udp")])
def test_snat_to_remote_backend_and_reply_reversal(dp, net, family, l4):
    vip, client, backend, node = (VIP4, C4, B4, NODE4) if family == 4 else (VIP6, C6, B6, NODE6)
    proto = Proto.TCP if l4 == "tcp" else Proto.UDP
    IPX, L4X = (IP if family == 4 else IPv6).__name__, ("TCP" if l4 == "tcp" else "UDP")
    dp.set_node_addresses(v4=NODE4, v6=NODE6)
    dp.upsert_service(_svc(vip, proto, backend, Mode.SNAT))

    req = _req(client, vip, l4)
    r = run_xdp(dp, req, netns=net["ns"])
    assert r.retval == XdpAction.REDIRECT
    (fwd,) = [e for e in dp.conntrack() if e.direction == "service"]
    nat_port = fwd.nat_port
    assert 61000 <= nat_port <= 65535
    want = expected(req, Ether_src=net["node_mac"], Ether_dst=net["peer_mac"],
                    **{f"{IPX}_src": node, f"{IPX}_dst": backend, f"{L4X}_sport": nat_port, f"{L4X}_dport": 8080})
    assert_frame(r.data, want)

    # the same flow keeps its port
    r2 = run_xdp(dp, _req(client, vip, l4, flags="A"), netns=net["ns"])
    out = Ether(r2.data)
    assert out[L4X].sport == nat_port and out[IPX].dst == backend

    # the backend's reply comes back to node:nat_port and leaves as VIP:80 -> client
    reply = Ether(src="02:00:00:00:00:09", dst=net["node_mac"]) / (IP if family == 4 else IPv6)(src=backend, dst=node) \
        / (TCP(sport=8080, dport=nat_port, flags="SA") if l4 == "tcp" else UDP(sport=8080, dport=nat_port)) / Raw(b"answer")
    before = dp.counters().stat("xdp", "snat_reply")
    r = run_xdp(dp, reply, netns=net["ns"])
    assert r.retval == XdpAction.REDIRECT
    want = expected(reply, Ether_src=net["node_mac"], Ether_dst=net["peer_mac"],
                    **{f"{IPX}_src": vip, f"{IPX}_dst": client, f"{L4X}_sport": 80, f"{L4X}_dport": 40000})
    assert_frame(r.data, want)
    assert dp.counters().stat("xdp", "snat_reply") == before + 1


def test_snat_flows_get_distinct_ports(dp, net):
    dp.set_node_addresses(v4=NODE4)
    dp.upsert_service(_svc(VIP4, Proto.TCP, B4, Mode.SNAT))
    ports = set()
    for s in range(2000, 2100):
        out = Ether(run_xdp(dp, _req(C4, VIP4, sport=s), netns=net["ns"]).data)
        ports.add(out[TCP].sport)
    assert len(ports) == 100


def test_snat_without_node_address_drops_with_reason(dp, net):
    dp.upsert_service(_svc(VIP4, Proto.TCP, B4, Mode.SNAT))
    before = dp.counters().drops["NO_NODE_ADDR"]
    assert run_xdp(dp, _req(C4, VIP4), netns=net["ns"]).retval == XdpAction.DROP
    assert dp.counters().drops["NO_NODE_ADDR"] == before + 1


def test_unroutable_backend_drops_with_fib_reason_and_leaves_no_state(dp, net):
    dp.set_node_addresses(v4=NODE4)
    dp.upsert_service(_svc(VIP4, Proto.TCP, "10.3.0.5", Mode.SNAT))   # no route to 10.3/16
    before = dp.counters().drops["FIB_LOOKUP"]
    assert run_xdp(dp, _req(C4, VIP4), netns=net["ns"]).retval == XdpAction.DROP
    assert dp.counters().drops["FIB_LOOKUP"] == before + 1
    assert dp.conntrack() == []


def _dsr_opt4(vip, port):
    import ipaddress
    return IPOption(b"\x9a\x08" + port.to_bytes(2, "big") + ipaddress.ip_address(vip).packed)


@pytest.mark.parametrize("l4", ["tcp", "udp"])
def test_dsr_ipv4_option_on_first_packet_and_backend_side_reply(dp, net, l4):
    proto = Proto.TCP if l4 == "tcp" else Proto.UDP
    L4X = "TCP" if l4 == "tcp" else "UDP"
    dp.upsert_service(_svc(VIP4, proto, B4, Mode.DSR))
    req = _req(C4, VIP4, l4)
    r = run_xdp(dp, req, netns=net["ns"])
    assert r.retval == XdpAction.REDIRECT
    l4p = req[L4X].copy()
    l4p.dport = 8080
    l4p.chksum = None
    want = Ether(src=net["node_mac"], dst=net["peer_mac"]) / IP(src=C4, dst=B4, id=req[IP].id, options=[_dsr_opt4(VIP4, 80)]) / l4p
    assert_frame(r.data, want)
    assert Ether(r.data)[IP].ihl == 7

    if l4 == "tcp":   # the rest of a TCP flow carries no option
        r = run_xdp(dp, _req(C4, VIP4, flags="A"), netns=net["ns"])
        out = Ether(r.data)
        assert out[IP].ihl == 5 and out[IP].dst == B4 and out[TCP].dport == 8080
        assert_checksums_valid(r.data)

    # backend node: tc ingress records the option, tc egress rewrites the reply from VIP:80
    before = dp.counters().stat("tc_ingress", "dsr_record")
    dsr_pkt = Ether(bytes(want))
    rin = run_tc(dp, "ingress", dsr_pkt)
    assert rin.retval == TcAction.OK and rin.data == bytes(dsr_pkt)
    assert dp.counters().stat("tc_ingress", "dsr_record") == before + 1
    reply = Ether() / IP(src=B4, dst=C4) / (TCP(sport=8080, dport=40000, flags="SA") if l4 == "tcp"
                                            else UDP(sport=8080, dport=40000)) / Raw(b"direct")
    rout = run_tc(dp, "egress", reply)
    assert_frame(rout.data, expected(reply, IP_src=VIP4, **{f"{L4X}_sport": 80}))


def test_dsr_ipv6_destination_option(dp, net):
    import ipaddress
    dp.upsert_service(_svc(VIP6, Proto.TCP, B6, Mode.DSR))
    req = _req(C6, VIP6)
    r = run_xdp(dp, req, netns=net["ns"])
    assert r.retval == XdpAction.REDIRECT
    data = ipaddress.ip_address(VIP6).packed + (80).to_bytes(2, "big") + b"\0\0"
    l4p = req[TCP].copy(); l4p.dport = 8080; l4p.chksum = None
    want = (Ether(src=net["node_mac"], dst=net["peer_mac"]) / IPv6(src=C6, dst=B6)
            / IPv6ExtHdrDestOpt(nh=6, len=2, options=[HBHOptUnknown(otype=0x1B, optlen=20, optdata=data)]) / l4p)
    assert_frame(r.data, want)
    assert len(r.data) == len(bytes(req)) + 24
    rin = run_tc(dp, "ingress", Ether(r.data))
    assert rin.retval == TcAction.OK
    reply = Ether() / IPv6(src=B6, dst=C6) / TCP(sport=8080, dport=40000, flags="SA")
    assert_frame(run_tc(dp, "egress", reply).data, expected(reply, IPv6_src=VIP6, TCP_sport=80))


def test_dsr_option_goes_before_existing_ipv4_options(dp, net):
    dp.upsert_service(_svc(VIP4, Proto.TCP, B4, Mode.DSR))
    req = Ether() / IP(src=C4, dst=VIP4, options=[IPOption_NOP()] * 3 + [IPOption(b"\x94\x04\x00\x00")]) \
        / TCP(sport=1, dport=80, flags="S") / Raw(b"x")
    r = run_xdp(dp, req, netns=net["ns"])
    assert r.retval == XdpAction.REDIRECT
    l4p = req[TCP].copy(); l4p.dport = 8080; l4p.chksum = None
    want = Ether(src=net["node_mac"], dst=net["peer_mac"]) / IP(
        src=C4, dst=B4, id=req[IP].id,
        options=[_dsr_opt4(VIP4, 80)] + [IPOption_NOP()] * 3 + [IPOption(b"\x94\x04\x00\x00")]) / l4p
    assert_frame(r.data, want)
    assert Ether(r.data)[IP].ihl == 5 + 2 + 2
    # the backend node finds the option (first after the fixed header) and reverses the reply
    assert run_tc(dp, "ingress", Ether(r.data)).retval == TcAction.OK
    reply = Ether() / IP(src=B4, dst=C4) / TCP(sport=8080, dport=1, flags="SA")
    assert_frame(run_tc(dp, "egress", reply).data, expected(reply, IP_src=VIP4, TCP_sport=80))


def test_dsr_option_goes_before_existing_ipv6_extension_headers(dp, net):
    import ipaddress
    from scapy.layers.inet6 import IPv6ExtHdrRouting
    dp.upsert_service(_svc(VIP6, Proto.UDP, B6, Mode.DSR))
    req = Ether() / IPv6(src=C6, dst=VIP6) / IPv6ExtHdrDestOpt() / IPv6ExtHdrRouting(segleft=0) \
        / UDP(sport=5000, dport=80) / Raw(b"query")
    r = run_xdp(dp, req, netns=net["ns"])
    assert r.retval == XdpAction.REDIRECT
    data = ipaddress.ip_address(VIP6).packed + (80).to_bytes(2, "big") + b"\0\0"
    l4p = req[UDP].copy(); l4p.dport = 8080; l4p.chksum = None
    want = (Ether(src=net["node_mac"], dst=net["peer_mac"]) / IPv6(src=C6, dst=B6)
            / IPv6ExtHdrDestOpt(nh=60, len=2, options=[HBHOptUnknown(otype=0x1B, optlen=20, optdata=data)])
            / IPv6ExtHdrDestOpt() / IPv6ExtHdrRouting(segleft=0) / l4p)
    assert_frame(r.data, want)
    assert len(r.data) == len(bytes(req)) + 24
    assert run_tc(dp, "ingress", Ether(r.data)).retval == TcAction.OK
    reply = Ether() / IPv6(src=B6, dst=C6) / UDP(sport=8080, dport=5000) / Raw(b"answer")
    assert_frame(run_tc(dp, "egress", reply).data, expected(reply, IPv6_src=VIP6, UDP_sport=80))


def test_dsr_option_on_a_double_tagged_frame_keeps_both_tags(dp, net):
    from scapy.layers.l2 import Dot1AD, Dot1Q
    dp.upsert_service(_svc(VIP4, Proto.TCP, B4, Mode.DSR))
    req = Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02") / Dot1AD(vlan=100) / Dot1Q(vlan=20) \
        / IP(src=C4, dst=VIP4) / TCP(sport=7, dport=80, flags="S")
    r = run_xdp(dp, req, netns=net["ns"])
    assert r.retval == XdpAction.REDIRECT
    l4p = req[TCP].copy(); l4p.dport = 8080; l4p.chksum = None
    want = Ether(src=net["node_mac"], dst=net["peer_mac"]) / Dot1AD(vlan=100) / Dot1Q(vlan=20) \
        / IP(src=C4, dst=B4, id=req[IP].id, options=[_dsr_opt4(VIP4, 80)]) / l4p
    assert_frame(r.data, want)


@pytest.mark.parametrize("case", ["v4-ihl-full", "v6-hop-by-hop"])
def test_dsr_refuses_packets_with_no_room_for_the_option(dp, net, case):
    from scapy.layers.inet6 import IPv6ExtHdrHopByHop
    vip = VIP4 if case.startswith("v4") else VIP6
    dp.upsert_service(_svc(vip, Proto.TCP, B4 if vip == VIP4 else B6, Mode.DSR))
    before = dp.counters().drops["DSR_UNSUPPORTED"]
    if case == "v4-ihl-full":   # 40 bytes of options: IHL is 15 already
        pkt = Ether() / IP(src=C4, dst=VIP4, options=[IPOption_NOP()] * 40) / TCP(sport=1, dport=80, flags="S")
        assert pkt[IP].ihl is None and IP(bytes(pkt[IP])).ihl == 15
    else:                       # Hop-by-Hop must stay first (RFC 8200 4.1)
        pkt = Ether() / IPv6(src=C6, dst=VIP6) / IPv6ExtHdrHopByHop() / TCP(sport=1, dport=80, flags="S")
    r = run_xdp(dp, pkt, netns=net["ns"])
    assert r.retval == XdpAction.DROP and r.data == bytes(pkt)
    assert dp.counters().drops["DSR_UNSUPPORTED"] == before + 1


def test_stateless_snat_is_rejected():
    from agent.datapath.api import Datapath
    with pytest.raises(ValueError, match="stateless"):
        dp = Datapath("unused")
        dp._loaded = object()   # bypass load: validation happens before any map access
        dp.upsert_service(_svc(VIP4, Proto.TCP, B4, Mode.SNAT, stateless=True))


def test_unresolved_neighbour_punts_the_rewritten_packet_to_the_stack(dp, net):
    """A route but no neighbour entry yet: the packet is translated and passed to the stack,
    which resolves the neighbour and forwards it (instead of dropping every first SYN)."""
    node = net["node"]
    node.run("ip", "route", "replace", "10.4.0.0/16", "via", "10.0.0.3")   # 10.0.0.3: never resolved
    dp.set_node_addresses(v4=NODE4)
    dp.upsert_service(_svc(VIP4, Proto.TCP, "10.4.0.5", Mode.SNAT))
    before = dp.counters().stat("xdp", "neigh_punt")
    req = _req(C4, VIP4)
    r = run_xdp(dp, req, netns=net["ns"])
    assert r.retval == XdpAction.PASS
    (fwd,) = [e for e in dp.conntrack() if e.direction == "service"]
    assert_frame(r.data, expected(req, IP_src=NODE4, IP_dst="10.4.0.5", TCP_sport=fwd.nat_port, TCP_dport=8080))
    assert dp.counters().stat("xdp", "neigh_punt") == before + 1


def test_snat_ports_of_closed_flows_are_reused():
    """With a one-port SNAT range: a second flow finds no port; after the first flow's FIN
    (and the close timeout, 0 here) its port is taken over and its conntrack entry dropped."""
    import dataclasses

    from tests.bpf.conftest import TEST_FEATURES, new_datapath
    feats = dataclasses.replace(TEST_FEATURES, snat_port_min=62000, snat_port_max=62000, ct_close_timeout=0)
    dp = new_datapath("snatreuse", feats)
    try:
        with Lab("dpreuse") as lab:
            node = lab.host("node", forwarding=True)
            peer = lab.host("peer")
            n_if, p_if = lab.link(node, peer, [f"{NODE4}/24"], ["10.0.0.2/24"])
            node.run("ip", "route", "add", "10.2.0.0/16", "via", "10.0.0.2")
            node.run("ip", "route", "add", "192.0.2.0/24", "via", "10.0.0.2")
            node.run("ip", "neigh", "replace", "10.0.0.2", "lladdr", "02:00:00:00:00:22", "dev", n_if, "nud", "permanent")
            dp.set_node_addresses(v4=NODE4)
            dp.upsert_service(_svc(VIP4, Proto.TCP, B4, Mode.SNAT))
            first = run_xdp(dp, _req(C4, VIP4, sport=1000), netns=node.ns)
            assert first.retval == XdpAction.REDIRECT and Ether(first.data)[TCP].sport == 62000
            before = dp.counters().drops["SNAT_NO_PORT"]
            assert run_xdp(dp, _req(C4, VIP4, sport=2000), netns=node.ns).retval == XdpAction.DROP
            assert dp.counters().drops["SNAT_NO_PORT"] == before + 1
            # the backend closes the first flow
            fin = Ether() / IP(src=B4, dst=NODE4) / TCP(sport=8080, dport=62000, flags="FA")
            assert run_xdp(dp, fin, netns=node.ns).retval == XdpAction.REDIRECT
            third = run_xdp(dp, _req(C4, VIP4, sport=3000), netns=node.ns)
            assert third.retval == XdpAction.REDIRECT and Ether(third.data)[TCP].sport == 62000
            assert dp.counters().stat("xdp", "snat_reuse") == 1
            flows = {(str(e.saddr), e.sport) for e in dp.conntrack() if e.direction == "service"}
            assert flows == {(C4, 3000)}, "the closed flow's forward entry must be gone"
    finally:
        dp.destroy()


@pytest.mark.parametrize("mode", [Mode.DSR, Mode.SNAT], ids=["dsr", "snat"])
def test_syn_of_a_known_flow_is_placed_afresh_and_snat_keeps_its_port(dp, net, mode):
    """A TCP SYN skips the conntrack probe (Katran's rule): a SYN reusing a known 4-tuple is
    placed by Maglev afresh (here: after a backend was added, some move), while its ACKs keep
    the flow's backend until then. SNAT: a SYN that stays on its backend keeps its node port
    (the port candidates are a function of the flow), and one that moved gets a port whose
    replies reach the client."""
    b2 = "10.2.0.6"
    dp.set_node_addresses(v4=NODE4)
    dp.upsert_service(_svc(VIP4, Proto.TCP, B4, mode))
    sports = range(41000, 41040)
    first = {}
    for s in sports:
        out = Ether(run_xdp(dp, _req(C4, VIP4, sport=s), netns=net["ns"]).data)
        first[s] = (out[IP].dst, out[TCP].sport)
        assert out[IP].dst == B4
    dp.upsert_service(Service(ServiceKey(VIP4, 80, Proto.TCP), (Backend(B4, 8080), Backend(b2, 8080)),
                              mode=mode, maglev_m=251))
    for s in sports:   # established packets keep their backend (still a member)
        assert Ether(run_xdp(dp, _req(C4, VIP4, sport=s, flags="A"), netns=net["ns"]).data)[IP].dst == B4
    again = {}
    for s in sports:
        out = Ether(run_xdp(dp, _req(C4, VIP4, sport=s), netns=net["ns"]).data)
        again[s] = (out[IP].dst, out[TCP].sport)
    moved = [s for s in sports if again[s][0] != B4]
    assert moved, "no SYN was re-placed by Maglev"
    for s in moved:   # the new placement is now the flow's
        assert Ether(run_xdp(dp, _req(C4, VIP4, sport=s, flags="A"), netns=net["ns"]).data)[IP].dst == b2
    if mode == Mode.SNAT:
        assert all(again[s] == first[s] for s in sports if s not in moved)
        for s in moved:
            rep = Ether() / IP(src=b2, dst=NODE4) / TCP(sport=8080, dport=again[s][1], flags="SA")
            out = Ether(run_xdp(dp, rep, netns=net["ns"]).data)
            assert (out[IP].src, out[IP].dst, out[TCP].sport, out[TCP].dport) == (VIP4, C4, 80, s)
