"""Fixtures for the speaker interop tests.

Topology (built once per test module; daemons and the speaker are started per test)::

       spk 10.0.0.1 fd00::1 (vipd speaker, AS 65001)
        |
   [lan bridge] ---- frr 10.0.0.2 fd00::2 (FRR, AS 65002)
        |  |------- gobgp 10.0.0.3 fd00::3 (GoBGP, AS 65003)
        |  \\------- bird 10.0.0.5 fd00::5 (BIRD 2, AS 65005)
        |
       mid 10.0.0.4 ==== 10.1.0.1 | 10.1.0.2 far (FRR or GoBGP, multihop: two IP hops from spk)
"""

from __future__ import annotations

import os
import shutil

import pytest

from agent.lab import Lab
from bgp_helpers import FAR_ADDR, SPEAKER_V4, SPEAKER_V6, BgpCase, Topo


EXTRA_TOOLS = ("bird", "birdc", "tcpdump", "ss", "/usr/lib/frr/zebra")


@pytest.fixture(scope="module")
def topo():
    # Beyond tests/conftest.py's e2e prerequisites (FRR bgpd, GoBGP, iproute2): fail, never skip.
    missing = [t for t in EXTRA_TOOLS if shutil.which(t) is None and not os.path.exists(t)]
    if missing:
        raise RuntimeError(f"tests/e2e/bgp needs {', '.join(missing)} (apt: bird2 tcpdump iproute2 frr)")
    with Lab("bgpe2e") as lab:
        # FRR with `capability extended-nexthop` makes zebra send router advertisements; a host
        # that accepts them gains a SLAAC address, which the kernel may then pick as the source
        # of our IPv6 session (the router knows only fd00::1). Nodes here have static addresses.
        no_ra = {"net.ipv6.conf.all.accept_ra": "0", "net.ipv6.conf.default.accept_ra": "0"}
        spk = lab.host("spk", sysctls=no_ra)
        frr, gobgp = lab.host("frr", sysctls=no_ra), lab.host("gobgp", sysctls=no_ra)
        bird = lab.host("bird", sysctls=no_ra)
        mid, far = lab.host("mid", forwarding=True, sysctls=no_ra), lab.host("far", sysctls=no_ra)
        lab.segment("lan", [(spk, [f"{SPEAKER_V4}/24", f"{SPEAKER_V6}/64"]),
                            (frr, ["10.0.0.2/24", "fd00::2/64"]),
                            (gobgp, ["10.0.0.3/24", "fd00::3/64"]),
                            (mid, ["10.0.0.4/24", "fd00::4/64"]),
                            (bird, ["10.0.0.5/24", "fd00::5/64"])])
        lab.link(mid, far, ["10.1.0.1/24"], [f"{FAR_ADDR}/24"])
        spk.route("10.1.0.0/24", via="10.0.0.4")
        far.route("10.0.0.0/24", via="10.1.0.1")
        yield Topo(lab, spk, {"frr": frr, "gobgp": gobgp, "bird": bird}, mid, far)


@pytest.fixture
def bgp(topo):
    case = BgpCase(topo)
    try:
        yield case
    finally:
        case.close()


