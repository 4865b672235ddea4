"""Pinning and adoption: a second Datapath on the same pin directory (a restarted agent) finds
the maps, reads back what they program, keeps conntrack, and writes only differences."""

from __future__ import annotations

import subprocess
import sys
import textwrap

from scapy.layers.inet import IP, TCP
from scapy.layers.l2 import Ether

from agent.datapath.abi import MapName, XdpAction
from agent.datapath.api import Datapath
from agent.datapath.model import Backend, Proto, Service, ServiceKey
from tests.bpf.conftest import PIN_ROOT, TEST_FEATURES, new_datapath, run_tc, run_xdp

VIP = "10.96.0.10"


def svcs(backends=("10.1.0.1", "10.1.0.2", "10.1.0.3"), m=251):
    return [
        Service(ServiceKey(VIP, 80, Proto.TCP), tuple(Backend(b, 8080, local=True) for b in backends),
                maglev_m=m, source_ranges=("192.0.2.0/24",)),
        Service(ServiceKey(VIP, 53, Proto.UDP), (Backend("10.1.0.9", 53, local=True),), maglev_m=509,
                affinity_timeout=60),
        Service(ServiceKey("fd00:96::1", 443, Proto.TCP), (Backend("fd00:1::1", 8443, local=True),), maglev_m=251),
    ]


def _dst(out: bytes) -> str:
    return Ether(out)[IP].dst


def test_restart_adopts_maps_keeps_flows_and_writes_only_differences():
    dp1 = new_datapath("pin")
    instance = dp1.instance
    try:
        for s in svcs():
            dp1.upsert_service(s)
        syn = Ether() / IP(src="192.0.2.7", dst=VIP) / TCP(sport=4242, dport=80, flags="S")
        first = _dst(run_xdp(dp1, syn).data)
        tables = {s.key: dp1.maglev_table(s.key) for s in svcs()}
        dp1.close()                                   # the agent exits; maps stay pinned

        # the "restarted agent" runs in a separate process: only the pins connect them
        code = textwrap.dedent(f"""
            import json, sys
            from agent.datapath.api import Datapath, Features
            from tests.bpf.test_pinning import svcs
            from tests.bpf.conftest import TEST_FEATURES
            dp = Datapath({instance!r}, pin_root={PIN_ROOT!r}, features=TEST_FEATURES)
            dp.load()
            out = {{"services": sorted(str(k) for k in dp.services()),
                    "ct": len(dp.conntrack()),
                    "written": [dp.upsert_service(s).slots_written for s in svcs()],
                    "rewritten": [dp.upsert_service(s).service_written for s in svcs()]}}
            print(json.dumps(out))
            dp.close()
        """)
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                              cwd=str(__import__("pathlib").Path(__file__).parents[2]))
        assert proc.returncode == 0, proc.stderr[-3000:]
        import json
        res = json.loads(proc.stdout.strip().splitlines()[-1])
        assert res["services"] == sorted(str(s.key) for s in svcs())
        # the SYN's forward entry survived; its reply needs no entry of its own (the backend's
        # only service is its designated one: tc derives the rewrite from revnat + that entry)
        assert res["ct"] == 1
        assert res["written"] == [0, 0, 0]                # identical desired state: nothing written
        assert res["rewritten"] == [False, False, False]

        dp2 = Datapath(instance, pin_root=PIN_ROOT, features=TEST_FEATURES)
        dp2.load()
        dp1 = dp2
        assert {k: dp2.maglev_table(k) for k in tables} == tables
        ack = Ether() / IP(src="192.0.2.7", dst=VIP) / TCP(sport=4242, dport=80, flags="A")
        assert _dst(run_xdp(dp2, ack).data) == first      # established flow kept its backend
        reply = Ether() / IP(src=first, dst="192.0.2.7") / TCP(sport=8080, dport=4242, flags="SA")
        out = Ether(run_tc(dp2, "egress", reply).data)
        assert (out[IP].src, out[TCP].sport) == (VIP, 80)  # and its reply is still reversed
        bad = Ether() / IP(src="198.51.100.1", dst=VIP) / TCP(sport=1, dport=80, flags="S")
        assert run_xdp(dp2, bad).retval == XdpAction.DROP   # adopted source ranges still enforced
        adopted = dp2.services()[ServiceKey(VIP, 80, Proto.TCP)]
        assert {str(b.addr) for b in adopted.backends} == {"10.1.0.1", "10.1.0.2", "10.1.0.3"}
        assert [str(r) for r in adopted.source_ranges] == ["192.0.2.0/24"]

        # one backend less: only that backend's slots (and Maglev's few reshuffles) are written
        ch = dp2.upsert_service(svcs(("10.1.0.1", "10.1.0.2"))[0])
        assert 0 < ch.slots_written < 251 * 0.5 and not ch.swapped

        # atomic swap: a fresh range, one frontend update
        old_off = dp2.table(MapName.SERVICES)[dp2._svc_key(ServiceKey(VIP, 80).vip, 80, 6)].table_off
        ch = dp2.upsert_service(svcs(("10.1.0.1", "10.1.0.4"))[0], atomic=True)
        assert ch.swapped and ch.slots_written == 251
        new_off = dp2.table(MapName.SERVICES)[dp2._svc_key(ServiceKey(VIP, 80).vip, 80, 6)].table_off
        assert new_off != old_off
        syn2 = Ether() / IP(src="192.0.2.8", dst=VIP) / TCP(sport=999, dport=80, flags="S")
        assert _dst(run_xdp(dp2, syn2).data) in ("10.1.0.1", "10.1.0.4")

        # a different M also swaps
        ch = dp2.upsert_service(svcs(("10.1.0.1", "10.1.0.4"), m=509)[0])
        assert ch.swapped and ch.slots_written == 509

        # reconcile to a subset deletes the rest, including the VIP's wildcard entry when unused
        stats = dp2.reconcile(svcs()[2:])
        assert stats["deleted"] == 2
        keys = {(bytes(k.addr).hex(), k.port, k.proto) for k, _ in dp2.table(MapName.SERVICES).items()}
        assert len(keys) == 2        # the v6 service + its wildcard
    finally:
        dp1.destroy()
    assert not (dp1.pin_dir).exists()


def test_pins_from_a_build_with_other_sizes_are_refused_not_reused():
    import dataclasses

    import pytest

    from agent.datapath.api import DatapathError
    dp = new_datapath("pinsz")
    try:
        dp.close()
        other = Datapath(dp.instance, pin_root=PIN_ROOT,
                         features=dataclasses.replace(TEST_FEATURES, ct_size=TEST_FEATURES.ct_size * 2))
        with pytest.raises(DatapathError, match="other Features"):
            other.load()
        other.close()
    finally:
        dp.destroy()
