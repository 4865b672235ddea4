"""Foundation smoke test: bcc compiles an XDP program; it runs under BPF_PROG_TEST_RUN on a
scapy-built packet (verdict and output bytes checked), and the same program attached to a
veth inside a lab namespace sees real pings."""

from __future__ import annotations

import ctypes

import pytest
from bcc import BPF
from scapy.layers.inet import ICMP, IP, UDP
from scapy.layers.l2 import Ether

from agent.datapath.netns import in_netns
from agent.datapath.testrun import test_run
from agent.lab import Lab

# Counts IPv4 ICMP echo requests; answers UDP to port 9 ("discard") by bouncing the frame
# back out (XDP_TX) with the Ethernet addresses swapped; passes everything else untouched.
PROGRAM = r"""
#include <uapi/linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/ip.h>
#include <linux/in.h>
#include <linux/udp.h>

BPF_ARRAY(echo_requests, u64, 1);

int smoke(struct xdp_md *ctx) {
    void *data = (void *)(long)ctx->data, *end = (void *)(long)ctx->data_end;
    struct ethhdr *eth = data;
    if ((void *)(eth + 1) > end || eth->h_proto != htons(ETH_P_IP))
        return XDP_PASS;
    struct iphdr *ip = (void *)(eth + 1);
    if ((void *)(ip + 1) > end || ip->ihl != 5)
        return XDP_PASS;
    if (ip->protocol == IPPROTO_ICMP) {
        u8 *type = (void *)(ip + 1);
        if ((void *)(type + 1) <= end && *type == 8) {
            int zero = 0;
            u64 *n = echo_requests.lookup(&zero);
            if (n) __sync_fetch_and_add(n, 1);
        }
        return XDP_PASS;
    }
    if (ip->protocol == IPPROTO_UDP) {
        struct udphdr *udp = (void *)(ip + 1);
        if ((void *)(udp + 1) <= end && udp->dest == htons(9)) {
            u8 tmp[ETH_ALEN];
            __builtin_memcpy(tmp, eth->h_dest, ETH_ALEN);
            __builtin_memcpy(eth->h_dest, eth->h_source, ETH_ALEN);
            __builtin_memcpy(eth->h_source, tmp, ETH_ALEN);
            return XDP_TX;
        }
    }
    return XDP_PASS;
}
"""

XDP_PASS, XDP_TX = 2, 3
A_MAC, B_MAC = "02:00:00:00:00:0a", "02:00:00:00:00:0b"


@pytest.fixture(scope="module")
def prog():
    b = BPF(text=PROGRAM)
    fn = b.load_func("smoke", BPF.XDP)
    yield b, fn
    b.cleanup()


def _count(b) -> int:
    return b["echo_requests"][ctypes.c_int(0)].value


def test_udp_discard_is_bounced_with_swapped_macs(prog):
    b, fn = prog
    frame = bytes(Ether(src=A_MAC, dst=B_MAC) / IP(src="10.0.0.1", dst="10.0.0.2") / UDP(sport=4000, dport=9) / (b"x" * 18))
    result = test_run(fn.fd, frame)
    assert result.retval == XDP_TX
    out = Ether(result.data)
    assert (out.src, out.dst) == (B_MAC, A_MAC)
    assert result.data[12:] == frame[12:], "only the Ethernet addresses may change"


def test_echo_request_is_counted_and_passed_unchanged(prog):
    b, fn = prog
    before = _count(b)
    frame = bytes(Ether(src=A_MAC, dst=B_MAC) / IP(src="10.0.0.1", dst="10.0.0.2") / ICMP(type=8, id=1, seq=1))
    result = test_run(fn.fd, frame)
    assert result.retval == XDP_PASS
    assert result.data == frame
    assert _count(b) == before + 1


def test_attached_to_a_veth_in_a_namespace_it_sees_real_pings(prog):
    b, fn = prog
    with Lab("smoke") as lab:
        a, z = lab.host("a"), lab.host("z")
        _, z_if = lab.link(a, z, ["10.0.0.1/24"], ["10.0.0.2/24"])
        before = _count(b)
        in_netns(z.ns, lambda: b.attach_xdp(z_if, fn, 0))
        try:
            a.run("ping", "-c", "3", "-i", "0.2", "-W", "2", "10.0.0.2")  # replies prove XDP_PASS
            assert _count(b) - before == 3
        finally:
            in_netns(z.ns, lambda: b.remove_xdp(z_if, 0))
