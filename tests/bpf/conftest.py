"""Fixtures for the packet tests: one loaded Datapath per test module (bcc compiles take
seconds), emptied between tests; helpers to run frames and compare them field by field."""

from __future__ import annotations

import itertools
import json
import os

import pytest
from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.inet6 import IPv6, ICMPv6DestUnreach, ICMPv6PacketTooBig, ICMPv6TimeExceeded
from scapy.layers.l2 import Ether
from scapy.packet import Packet, Raw

from agent.datapath.abi import MapName
from agent.datapath.api import Datapath, Features
from agent.datapath.testrun import RunResult, test_run

_seq = itertools.count()
PIN_ROOT = "/sys/fs/bpf/vipd-test"

# Small compile-time sizes keep map memory low in tests; semantics are unchanged.
TEST_FEATURES = Features(max_services=4096, max_backends=4096, maglev_slots=1 << 20, ct_size=65536,
                         affinity_size=4096, src_range_size=1024)


def new_datapath(name: str, features: Features = TEST_FEATURES) -> Datapath:
    dp = Datapath(f"{name}-{os.getpid()}-{next(_seq)}", pin_root=PIN_ROOT, features=features)
    try:
        dp.load()
    except BaseException:
        dp.destroy()   # load may have pinned maps before failing
        raise
    return dp


@pytest.fixture(scope="session", autouse=True)
def _remove_pin_root():
    yield
    try:
        os.rmdir(PIN_ROOT)     # only when empty: every test removes its own instance dir
    except OSError:
        pass


@pytest.fixture(scope="module")
def module_dp():
    dp = new_datapath("t")
    yield dp
    dp.destroy()


@pytest.fixture
def dp(module_dp):
    """The module's datapath, emptied after each test (services, conntrack, affinity).
    Counters are cumulative: tests compare before/after."""
    yield module_dp
    module_dp.reconcile([])
    for name in (MapName.CT, MapName.AFFINITY):
        module_dp.table(name).clear()
    zero_array(module_dp.table(MapName.DSR_FLOWS))
    module_dp.set_node_addresses()


def zero_array(tbl) -> None:
    """Zero every element of an array map in one batch (a per-element clear() of a 64 Ki-slot
    table is 64 Ki syscalls)."""
    from agent.datapath import bpfsys
    n = tbl.max_entries
    _, rc = bpfsys.update_batch(tbl.map_fd, (tbl.Key * n)(*range(n)), (tbl.Leaf * n)(), n)
    assert not rc, f"zeroing {tbl.name}: {os.strerror(-rc)}"


NODE4, PEER4, NODE6, PEER6 = "10.0.0.1", "10.0.0.2", "fd00::1", "fd00::2"


def _mac(host, ifname):
    return json.loads(host.run("ip", "-j", "link", "show", ifname))[0]["address"]


@pytest.fixture(scope="module")
def net():
    """A lab namespace "node" for runs that need bpf_fib_lookup (which uses the namespace the
    test run happens in): a veth to "peer", the next hop towards clients (192.0.2.0/24,
    2001:db8::/64) and remote backends (10.2.0.0/16, fd00:2::/64), with a permanent neighbour."""
    from agent.lab import Lab
    with Lab("dpfib") as lab:
        node = lab.host("node", forwarding=True)
        peer = lab.host("peer")
        n_if, p_if = lab.link(node, peer, [f"{NODE4}/24", f"{NODE6}/64"], [f"{PEER4}/24", f"{PEER6}/64"])
        for prefix, via in (("10.2.0.0/16", PEER4), ("192.0.2.0/24", PEER4),
                            ("fd00:2::/64", PEER6), ("2001:db8::/64", PEER6)):
            node.run("ip", "route", "add", prefix, "via", via)
        peer_mac = _mac(peer, p_if)
        for via in (PEER4, PEER6):
            node.run("ip", "neigh", "replace", via, "lladdr", peer_mac, "dev", n_if, "nud", "permanent")
        yield {"ns": node.ns, "node_mac": _mac(node, n_if), "peer_mac": peer_mac, "node": node}


def run_xdp(dp: Datapath, frame, netns: str | None = None) -> RunResult:
    return test_run(dp.program_fd("xdp"), bytes(frame), netns=netns)


def run_tc(dp: Datapath, direction: str, frame) -> RunResult:
    return test_run(dp.program_fd(f"tc-{direction}"), bytes(frame))


def assert_frame(got: bytes, want: Packet) -> None:
    """Compare an output frame with the expected scapy packet layer by layer, field by field,
    then byte for byte; checksums in ``want`` are recomputed by scapy, so this also proves
    the program's incremental checksum updates."""
    want = Ether(bytes(want))
    g = Ether(got)
    gl, wl = g, want
    while wl is not None and not isinstance(wl, Raw) and wl.name != "NoPayload":
        assert type(gl) is type(wl), f"layer {wl.name}: got {gl.name}"
        for f in wl.fields_desc:
            gv, wv = gl.getfieldval(f.name), wl.getfieldval(f.name)
            assert gv == wv, f"{wl.name}.{f.name}: got {gv!r}, want {wv!r}"
        gl, wl = gl.payload, wl.payload
    assert got == bytes(want), f"bytes differ:\n got {got.hex()}\nwant {bytes(want).hex()}"
    assert_checksums_valid(got)


def assert_checksums_valid(frame: bytes) -> None:
    """Every IPv4/TCP/UDP/ICMP checksum in the frame equals what scapy computes from scratch."""
    p = Ether(frame)
    q = p.copy()
    for layer in (IP, TCP, UDP, ICMP):
        if q.haslayer(layer):
            q[layer].chksum = None
    q = Ether(bytes(q))
    for layer in (IP, TCP, UDP, ICMP):
        if p.haslayer(layer) and not (layer is UDP and p[UDP].chksum == 0):
            assert p[layer].chksum == q[layer].chksum, \
                f"{layer.__name__} checksum {p[layer].chksum:#06x}, correct {q[layer].chksum:#06x}"


def expected(pkt: Packet, **changes) -> Packet:
    """Copy of ``pkt`` with layer fields changed (``IP_dst=...``, ``TCP_dport=...``) and all
    checksums recomputed."""
    out = Ether(bytes(pkt))
    for k, v in changes.items():
        layer, field = k.split("_", 1)
        cls = {"IP": IP, "IPv6": IPv6, "TCP": TCP, "UDP": UDP, "Ether": Ether, "ICMP": ICMP}[layer]
        setattr(out[cls], field, v)
    for layer in (IP, TCP, UDP, ICMP):
        if out.haslayer(layer):
            out[layer].chksum = None
    return Ether(bytes(out))
