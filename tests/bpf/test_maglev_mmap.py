"""Maglev tables written through the mmap'ed slot array (maps.h: maglev_v1 is BPF_F_MMAPABLE;
agent/datapath/writer.py copies a table with one strided memcpy instead of update syscalls).

* packets land where the Maglev model (agent.lb.maglev + the flow hash) says, and the kernel's
  own lookups of the slots (bpf(2)) read what the agent wrote through the mapping;
* a Service whose backends change 200 times while packets flow never shows a packet a
  half-written table: every packet lands on a backend of the set before or after the change;
* a new agent adopting the pins of an identical configuration writes nothing;
* the same through a one-page mapping window (tables crossing windows), with no mapping left.
"""

from __future__ import annotations

import ipaddress
import threading
from dataclasses import replace

from scapy.layers.inet import IP, TCP
from scapy.layers.inet6 import IPv6
from scapy.layers.l2 import Ether

from agent.datapath import inspect
from agent.datapath.abi import MapName, XdpAction
from agent.datapath.api import Datapath
from agent.datapath.flowhash import flow_hash
from agent.datapath.maptable import U32Window
from agent.datapath.model import Backend, Proto, Service, ServiceKey
from agent.lb.maglev import build_table
from agent.reconcilers.services import ServiceReconciler
from tests.bpf.conftest import PIN_ROOT, TEST_FEATURES, new_datapath, run_xdp


def _svc(vip: str, n: int, m: int, base: int = 1) -> Service:
    fam = ipaddress.ip_address(vip).version
    addrs = [f"10.1.{i // 250}.{i % 250 + 1}" if fam == 4 else f"fd00:1::{i + 1:x}" for i in range(base, base + n)]
    return Service(ServiceKey(vip, 80, Proto.TCP), tuple(Backend(a, 8080, local=True) for a in addrs), maglev_m=m)


def _syn(src: str, dst: str, sport: int) -> Ether:
    l3 = IPv6(src=src, dst=dst) if ":" in dst else IP(src=src, dst=dst)
    return Ether(src="02:00:00:00:00:02", dst="02:00:00:00:00:01") / l3 / TCP(sport=sport, dport=80, flags="S")


def _syn_frames(dst: str, count: int) -> list[bytes]:
    """``count`` SYNs of distinct flows to ``dst``:80 (IPv4): one scapy frame, then the source
    address and port patched and both checksums recomputed (scapy would take ~2 ms a frame)."""
    tmpl = bytearray(bytes(_syn("198.18.0.0", dst, 1024)))
    out = []
    for k in range(count):
        f = bytearray(tmpl)
        f[26:30] = bytes((198, 18, k >> 8 & 255, k & 255))
        f[34:36] = (1024 + k).to_bytes(2, "big")
        f[24:26] = b"\0\0"
        f[24:26] = _csum(f[14:34]).to_bytes(2, "big")
        f[50:52] = b"\0\0"
        pseudo = bytes(f[26:34]) + b"\0\x06" + (len(f) - 34).to_bytes(2, "big")
        f[50:52] = _csum(pseudo + bytes(f[34:])).to_bytes(2, "big")
        out.append(bytes(f))
    return out


def _csum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    s = sum(int.from_bytes(data[i:i + 2], "big") for i in range(0, len(data), 2))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


def _dst(data: bytes) -> str:
    p = Ether(data)
    return p[IPv6].dst if p.haslayer(IPv6) else p[IP].dst


def test_mmap_written_tables_send_packets_where_the_maglev_model_says(dp):
    services = [_svc("10.96.0.1", 5, 251), _svc("10.96.0.2", 7, 1021, base=20), _svc("fd96::3", 3, 509)]
    assert dp.upsert_services(services) == {}
    maglev = dp.table(MapName.MAGLEV)
    assert maglev.u32_window() is not None, "maglev_v1 is not mmap-able: the agent fell back to syscalls"
    seed = dp.features.hash_seed
    for svc in services:
        names = build_table([(b.name, b.weight) for b in svc.backends], svc.maglev_m)
        want_ids = [dp.backend_id(svc.backends[i].addr, 8080) for i in names]
        # the kernel's view of the slots (BPF_MAP_LOOKUP_ELEM), not the mapping we wrote
        off = next(f.table_off for f in inspect.read_frontends(dp) if f.key == svc.key)
        got_ids = [maglev[maglev.Key(off + i)].value for i in range(svc.maglev_m)]
        assert got_ids == want_ids
        client = "2001:db8::7" if svc.key.family == 6 else "192.0.2.7"
        for sport in range(20000, 20150):
            r = run_xdp(dp, _syn(client, str(svc.key.vip), sport))
            assert r.retval == XdpAction.PASS
            slot = flow_hash(client, sport, 80, 6, seed) % svc.maglev_m
            assert _dst(r.data) == str(svc.backends[names[slot]].addr), (svc.key, sport)


def test_backends_changing_200_times_under_traffic_never_expose_a_half_written_table(dp):
    """Sets of 4 backends out of 12, shifted by one per change (in place, fresh range + swap,
    and M changes, which always swap); a second thread runs new flows through XDP all along.
    A packet sent while change g was being made must land on a backend of set g-1 or g."""
    pool = [f"10.1.7.{i}" for i in range(1, 13)]

    def svc_of(g: int) -> Service:
        addrs = [pool[(g + j) % len(pool)] for j in range(4)]
        return Service(ServiceKey("10.96.1.1", 80, Proto.TCP), tuple(Backend(a, 8080, local=True) for a in addrs),
                       maglev_m=509 if g % 7 == 3 else 251)

    frames = _syn_frames("10.96.1.1", 6000)
    assert _dst(run_xdp(dp, frames[0]).data) == "10.96.1.1"   # no service yet: passed untouched
    sets = {}
    gen = [0]
    sent = [0]
    bad: list = []
    done = threading.Event()

    def traffic():
        for k, frame in enumerate(frames):
            if done.is_set():
                return
            g0 = gen[0]
            r = run_xdp(dp, frame)
            g1 = gen[0]
            ok_addrs = set().union(*(sets[g] for g in range(max(0, g0 - 1), g1 + 1)))
            dst = str(ipaddress.IPv4Address(r.data[30:34])) if r.retval == XdpAction.PASS else None
            if dst not in ok_addrs:
                bad.append((k, g0, g1, r.retval, dst))
            sent[0] = k + 1

    try:
        sets[0] = {str(b.addr) for b in svc_of(0).backends}
        dp.upsert_service(svc_of(0))
        t = threading.Thread(target=traffic)
        t.start()
        for g in range(1, 201):
            target = sent[0] + 20   # at least 20 packets during each change's aftermath
            sets[g] = {str(b.addr) for b in svc_of(g).backends}
            gen[0] = g              # before the write: a packet from now on may see set g
            dp.upsert_service(svc_of(g), atomic=(g % 2 == 0))
            while sent[0] < target and t.is_alive():
                t.join(0.0005)
        done.set()
        t.join()
        assert sent[0] >= 200 * 20
        assert not bad, f"{len(bad)} packets saw neither the old nor the new backends, e.g. {bad[:5]}"
    finally:
        done.set()


def test_a_restarted_agent_adopting_an_identical_configuration_writes_nothing():
    features = replace(TEST_FEATURES, max_services=1024, max_backends=1024, max_memberships=4096)
    first = new_datapath("mmapadopt", features)
    instance = first.instance
    try:
        desired = {s.key: s for s in [_svc(f"10.96.2.{i}", 1 + i % 4, 251, base=i % 40) for i in range(1, 201)]
                   + [_svc(f"fd96::2:{i:x}", 2, 509) for i in range(1, 21)]}
        assert first.upsert_services(desired.values()) == {}
        before = {k: run_xdp(first, _syn("192.0.2.9" if k.family == 4 else "2001:db8::9", str(k.vip), 33333)).data
                  for k in desired}
        first.close()

        second = Datapath(instance, pin_root=PIN_ROOT, features=features)
        second.load()                     # adopts the pins
        assert second.entries_written == 0
        rec = ServiceReconciler(second, "node")
        changed, failed = rec._apply(desired)   # the daemon's first pass
        assert (changed, failed) == (None, {})
        assert second.entries_written == 0
        # the planner's own diff agrees: nothing to write
        assert second.upsert_services(desired.values()) == {} and second.entries_written == 0
        second.table(MapName.CT).clear()   # new flows: placed by the adopted tables, not by conntrack
        after = {k: run_xdp(second, _syn("192.0.2.9" if k.family == 4 else "2001:db8::9", str(k.vip), 33333)).data
                 for k in desired}
        assert after == before
        # and a real change is written: one backend more for one service
        k0 = next(iter(desired))
        s0 = desired[k0]
        second.upsert_service(replace(s0, backends=s0.backends + (Backend("10.1.9.9", 8080, local=True),)))
        assert second.entries_written > 0
        second.close()
    finally:
        Datapath(instance, pin_root=PIN_ROOT, features=features).destroy()


def test_tables_written_and_adopted_through_a_one_page_window_leave_no_mapping(monkeypatch):
    """The agent maps a few MiB of the slot array at a time (the kernel makes a whole mapping
    resident at once: 60 MB of RSS at 20,000 Services). With one page (512 slots) per window
    every table crosses windows, on write and on adoption; afterwards nothing stays mapped."""
    monkeypatch.setattr(U32Window, "WINDOW", 512)
    test_a_restarted_agent_adopting_an_identical_configuration_writes_nothing()
    with open("/proc/self/maps") as fh:
        assert "bpf-map" not in fh.read(), "a BPF map is still mmap'ed after the writes"
