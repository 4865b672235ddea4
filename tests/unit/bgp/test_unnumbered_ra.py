"""agent.bgp.unnumbered: the Router Advertisement vipd sends on unnumbered interfaces (so the
router learns our link-local address; the e2e test with FRR is
tests/e2e/controlplane/test_unnumbered.py) and the socket address of zone-scoped peers."""

import socket

import pytest
from scapy.layers.inet6 import ICMPv6ND_RA

from agent.bgp.unnumbered import router_advertisement, sockaddr, with_zone, zone_of

pytestmark = pytest.mark.unit


def test_router_advertisement_says_not_a_default_router_and_carries_nothing_else():
    ra = ICMPv6ND_RA(router_advertisement())
    assert (ra.type, ra.code, ra.chlim, ra.M, ra.O, ra.routerlifetime, ra.reachabletime, ra.retranstimer) == (
        134, 0, 64, 0, 0, 0, 0, 0)
    assert len(router_advertisement()) == 16 and not ra.payload   # no options, no prefixes


def test_zone_scoped_peers_connect_through_their_interface_index():
    assert zone_of("fe80::1%lo") == "lo" and zone_of("10.0.0.1") is None and zone_of("fd00::1") is None
    assert sockaddr("fe80::1%lo", 179) == ("fe80::1", 179, 0, socket.if_nametoindex("lo"))
    assert sockaddr("10.0.0.1", 179) == ("10.0.0.1", 179)
    with pytest.raises(OSError, match="interface 'nosuch0' of link-local peer fe80::1%nosuch0 does not exist"):
        sockaddr("fe80::1%nosuch0", 179)


def test_an_accepted_link_local_peer_is_named_with_its_zone():
    # accept() gives the interface index, the configured peer is "fe80::1%IF"
    lo = socket.if_nametoindex("lo")
    assert with_zone("fe80::1", ("fe80::1", 4321, 0, lo)) == "fe80::1%lo"
    assert with_zone("fd00::1", ("fd00::1", 4321, 0, 0)) == "fd00::1"
    assert with_zone("10.0.0.1", ("10.0.0.1", 4321)) == "10.0.0.1"
