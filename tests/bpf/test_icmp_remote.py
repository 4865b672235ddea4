"""ICMP/ICMPv6 errors about flows with a remote backend are translated like the flow and
forwarded (bpf_fib_lookup inside the lab namespace "node", as in test_remote_modes):

* SNAT: an error about our reply (quoted VIP:80 -> client) goes to the backend, quoting what
  the backend sent (backend:8080 -> node:nat_port); an error about our translated request
  (addressed to the node, quoting node:nat_port -> backend:8080) goes to the client, quoting
  client -> VIP:80.
* DSR: an error about the backend's reply (quoted VIP:80 -> client) goes to the backend,
  quoting backend:8080 -> client.
"""

from __future__ import annotations

import pytest
from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.inet6 import ICMPv6PacketTooBig, ICMPv6TimeExceeded, IPv6
from scapy.layers.l2 import Ether
from scapy.packet import Raw

from agent.datapath.abi import XdpAction
from agent.datapath.model import Backend, Mode, Proto, Service, ServiceKey
from tests.bpf.conftest import NODE4, NODE6, assert_checksums_valid, run_xdp

VIP4, C4, B4, R4 = "10.96.0.10", "192.0.2.10", "10.2.0.5", "198.51.100.1"
VIP6, C6, B6, R6 = "fd00:96::10", "2001:db8::10", "fd00:2::5", "2001:db8:ffff::1"
FAMILIES = {4: (VIP4, C4, B4, R4, NODE4), 6: (VIP6, C6, B6, R6, NODE6)}


def _svc(vip, backend, mode, proto=Proto.TCP):
    return Service(ServiceKey(vip, 80, proto), (Backend(backend, 8080),), mode=mode, maglev_m=251)


def _ip(src, dst, **kw):
    return IP(src=src, dst=dst, **kw) if ":" not in src else IPv6(src=src, dst=dst, **kw)


def _error(family, src, dst, quoted_pkt):
    """A frag-needed / packet-too-big error from `src` to `dst` quoting `quoted_pkt`."""
    if family == 4:
        return Ether() / IP(src=src, dst=dst) / ICMP(type=3, code=4, nexthopmtu=1400) / Raw(bytes(quoted_pkt)[:28])
    return Ether() / IPv6(src=src, dst=dst) / ICMPv6PacketTooBig(mtu=1280) / Raw(bytes(quoted_pkt)[:48])


def _open_flow(dp, net, family, vip, client, l4="tcp"):
    syn = Ether() / _ip(client, vip) / (TCP(sport=40000, dport=80, flags="S") if l4 == "tcp"
                                         else UDP(sport=40000, dport=80))
    assert run_xdp(dp, syn, netns=net["ns"]).retval == XdpAction.REDIRECT
    (fwd,) = [e for e in dp.conntrack() if e.direction == "service"]
    return fwd.nat_port


def _check_forwarded(r, net, want_frame):
    assert r.retval == XdpAction.REDIRECT
    want = Ether(src=net["node_mac"], dst=net["peer_mac"]) / Ether(bytes(want_frame)).payload
    assert r.data == bytes(want), f"\n got {r.data.hex()}\nwant {bytes(want).hex()}"
    assert_checksums_valid(r.data)


@pytest.mark.parametrize("family", [4, 6])
def test_snat_error_about_our_reply_goes_to_the_backend_about_its_own_packet(dp, net, family):
    vip, client, backend, router, node = FAMILIES[family]
    dp.set_node_addresses(v4=NODE4, v6=NODE6)
    dp.upsert_service(_svc(vip, backend, Mode.SNAT))
    nat_port = _open_flow(dp, net, family, vip, client)
    quoted = _ip(vip, client, **({"len": 1500} if family == 4 else {"plen": 1480})) / TCP(sport=80, dport=40000, seq=5)
    before = dp.counters().stat("xdp", "icmp_mapped")
    r = run_xdp(dp, _error(family, router, vip, quoted), netns=net["ns"])
    want_quoted = _ip(backend, node, **({"len": 1500} if family == 4 else {"plen": 1480})) / \
        TCP(sport=8080, dport=nat_port, seq=5)
    _check_forwarded(r, net, _error(family, router, backend, want_quoted))
    assert dp.counters().stat("xdp", "icmp_mapped") == before + 1


@pytest.mark.parametrize("family", [4, 6])
def test_snat_error_about_our_request_goes_to_the_client_about_its_own_packet(dp, net, family):
    vip, client, backend, router, node = FAMILIES[family]
    dp.set_node_addresses(v4=NODE4, v6=NODE6)
    dp.upsert_service(_svc(vip, backend, Mode.SNAT, Proto.UDP))
    nat_port = _open_flow(dp, net, family, vip, client, "udp")
    quoted = _ip(node, backend) / UDP(sport=nat_port, dport=8080, chksum=0x1234) / Raw(b"request")
    r = run_xdp(dp, _error(family, router, node, quoted), netns=net["ns"])
    want_quoted = _ip(client, vip) / UDP(sport=40000, dport=80, chksum=0x1234) / Raw(b"request")
    _check_forwarded(r, net, _error(family, router, client, want_quoted))


@pytest.mark.parametrize("family", [4, 6])
def test_dsr_error_about_the_backends_reply_goes_to_the_backend(dp, net, family):
    vip, client, backend, router, node = FAMILIES[family]
    dp.upsert_service(_svc(vip, backend, Mode.DSR))
    _open_flow(dp, net, family, vip, client)
    quoted = _ip(vip, client) / TCP(sport=80, dport=40000, seq=9)
    r = run_xdp(dp, _error(family, router, vip, quoted), netns=net["ns"])
    want_quoted = _ip(backend, client) / TCP(sport=8080, dport=40000, seq=9)
    _check_forwarded(r, net, _error(family, router, backend, want_quoted))


@pytest.mark.parametrize("family", [4, 6])
def test_dsr_error_goes_to_the_flows_backend_after_the_maglev_table_changed(dp, net, family):
    """A DSR flow lives in the DSR flow table, not in conntrack: an error about it must still
    find the flow's own backend there, not the one Maglev would pick after a change."""
    vip, client, backend, router, node = FAMILIES[family]
    dp.upsert_service(_svc(vip, backend, Mode.DSR))
    ports = range(40000, 40032)
    for port in ports:
        syn = Ether() / _ip(client, vip) / TCP(sport=port, dport=80, flags="S")
        assert run_xdp(dp, syn, netns=net["ns"]).retval == XdpAction.REDIRECT
    # seven more backends: Maglev now maps ~7 in 8 of these flows elsewhere; the flows stay
    more = tuple(Backend(backend[:-1] + str(6 + i), 8080) for i in range(7))
    dp.upsert_service(Service(ServiceKey(vip, 80, Proto.TCP), (Backend(backend, 8080),) + more,
                              mode=Mode.DSR, maglev_m=251))
    for port in ports:
        quoted = _ip(vip, client) / TCP(sport=80, dport=port, seq=9)
        r = run_xdp(dp, _error(family, router, vip, quoted), netns=net["ns"])
        want_quoted = _ip(backend, client) / TCP(sport=8080, dport=port, seq=9)
        _check_forwarded(r, net, _error(family, router, backend, want_quoted))


def test_errors_that_match_no_remote_flow_pass_untouched(dp, net):
    dp.set_node_addresses(v4=NODE4, v6=NODE6)
    dp.upsert_service(_svc(VIP4, B4, Mode.SNAT))
    nat_port = _open_flow(dp, net, 4, VIP4, C4)
    others = [
        # SNAT service, but no conntrack entry for this client port: no node port to quote
        _error(4, R4, VIP4, IP(src=VIP4, dst=C4) / TCP(sport=80, dport=40001)),
        # to the node, quoting a node port no flow owns
        _error(4, R4, NODE4, IP(src=NODE4, dst=B4) / TCP(sport=nat_port ^ 1, dport=8080)),
        # to the node, quoting a port outside the SNAT range
        _error(4, R4, NODE4, IP(src=NODE4, dst=B4) / TCP(sport=40000, dport=8080)),
        # quoting the VIP flow but addressed elsewhere (not the VIP): not ours to rewrite
        _error(4, R4, "10.0.0.99", IP(src=VIP4, dst=C4) / TCP(sport=80, dport=40000)),
        # IPv6 time exceeded about a flow of no service
        Ether() / IPv6(src=R6, dst=VIP6) / ICMPv6TimeExceeded() /
        Raw(bytes(IPv6(src=VIP6, dst=C6) / TCP(sport=80, dport=40000))[:48]),
    ]
    for pkt in others:
        r = run_xdp(dp, pkt, netns=net["ns"])
        assert r.retval == XdpAction.PASS and r.data == bytes(pkt), pkt.summary()
