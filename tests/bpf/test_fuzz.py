"""Property test: mutate header bytes of valid service packets at random; whatever the XDP
program does, it never produces a mis-rewritten packet. Either the frame is untouched, or
only the NAT fields changed (destination address and port, IP and L4 checksums) and every
checksum that was valid on input is still valid on output."""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.inet6 import IPv6
from scapy.layers.l2 import Ether
from scapy.packet import Raw

from agent.datapath.abi import XdpAction
from agent.datapath.model import Backend, Proto, Service, ServiceKey
from agent.datapath.testrun import TestRunner

VIP4, VIP6 = "10.96.0.10", "fd00:96::10"
SEEDS = [
    bytes(Ether() / IP(src="192.0.2.1", dst=VIP4) / TCP(sport=1000, dport=80) / Raw(b"x" * 12)),
    bytes(Ether() / IP(src="192.0.2.1", dst=VIP4) / UDP(sport=1000, dport=80) / Raw(b"x" * 12)),
    bytes(Ether() / IPv6(src="2001:db8::1", dst=VIP6) / TCP(sport=1000, dport=80) / Raw(b"x" * 12)),
    bytes(Ether() / IPv6(src="2001:db8::1", dst=VIP6) / UDP(sport=1000, dport=80) / Raw(b"x" * 12)),
]


def _checksums(frame: bytes) -> dict[str, bool]:
    """Which of the IPv4/L4 checksums of ``frame`` are valid (scapy recomputation)."""
    out = {}
    try:
        p = Ether(frame)
        q = p.copy()
        for layer in (IP, TCP, UDP):
            if q.haslayer(layer):
                q[layer].chksum = None
        q = Ether(bytes(q))
        for layer in (IP, TCP, UDP):
            if p.haslayer(layer) and q.haslayer(layer):
                out[layer.__name__] = p[layer].chksum == q[layer].chksum
    except Exception:  # noqa: BLE001 - unparsable for scapy: nothing to compare
        pass
    return out


@settings(max_examples=600, deadline=None, suppress_health_check=list(HealthCheck))
@given(seed=st.sampled_from(range(len(SEEDS))),
       flips=st.lists(st.tuples(st.integers(0, 69), st.integers(0, 255)), min_size=1, max_size=4))
def test_mutated_headers_are_never_mis_rewritten(module_dp, seed, flips):
    dp = module_dp
    if not dp.services():
        for vip, b in ((VIP4, "10.1.0.5"), (VIP6, "fd00:1::5")):
            for proto in Proto:
                dp.upsert_service(Service(ServiceKey(vip, 80, proto), (Backend(b, 8080, local=True),),
                                          maglev_m=251))
    data = bytearray(SEEDS[seed])
    for pos, val in flips:
        if pos < len(data):
            data[pos] = val
    data = bytes(data)
    r = TestRunner(dp.program_fd("xdp")).run(data)
    assert r.retval in (XdpAction.PASS, XdpAction.DROP)
    if r.data == data:
        return
    assert len(r.data) == len(data)
    p = Ether(r.data)
    v6 = p.haslayer(IPv6)
    l3 = 14
    ihl = (data[l3] & 0xF) * 4 if not v6 else 40
    l4 = l3 + ihl
    l4name = "TCP" if p.haslayer(TCP) else "UDP"
    allowed = set(range(l3 + 24, l3 + 40)) if v6 else set(range(l3 + 16, l3 + 20)) | {l3 + 10, l3 + 11}
    allowed |= {l4 + 2, l4 + 3}
    allowed |= {l4 + 16, l4 + 17} if l4name == "TCP" else {l4 + 6, l4 + 7}
    changed = {i for i in range(len(data)) if data[i] != r.data[i]}
    assert changed <= allowed, f"bytes outside the NAT fields changed: {sorted(changed - allowed)}"
    assert (p[IPv6].dst if v6 else p[IP].dst) in ("10.1.0.5", "fd00:1::5")
    before, after = _checksums(data), _checksums(r.data)
    for name, ok in before.items():
        if ok:
            assert after.get(name), f"{name} checksum was valid before the rewrite and is not after"
