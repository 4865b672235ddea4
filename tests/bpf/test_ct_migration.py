"""Upgrades keep SNAT flows: from a vipd whose conntrack map was ``ct_v1`` (value fields in
another order), the new agent moves every entry into ``ct_v2``; from one whose SNAT flows had a
``REPLY`` conntrack entry (``ct_v2`` before node-port slots), it moves those entries into
``snat_ports_v2``; from one whose slots were ``snat_ports_v1`` (80 B, before the SNAT flow
index), it moves the slots. Either way a SNAT flow set up by the old datapath keeps its backend
and node port, and its replies still reach the client. Old maps are created exactly as the old
build declared them."""

from __future__ import annotations

import ctypes
import dataclasses
import os
import time

from bcc import BPF
from scapy.layers.inet import IP, TCP
from scapy.layers.l2 import Ether
from scapy.packet import Raw

from agent.datapath.abi import MapName, XdpAction
from agent.datapath.api import CT_V1_VALUE, Datapath
from agent.datapath.model import Backend, Mode, Proto, Service, ServiceKey
from agent.datapath.snatports import claimed_slots
from tests.bpf.conftest import NODE4, PIN_ROOT, TEST_FEATURES, run_xdp

VIP, CLIENT, BACKEND = "10.96.0.10", "192.0.2.10", "10.2.0.5"
NAT_PORT = 61234

OLD_MAP = r"""
struct ct_key { u32 saddr[4]; u32 daddr[4]; u16 sport; u16 dport; u8 proto; u8 family; u8 dir; u8 pad; };
struct ct_val_v1 { u32 raddr[4]; u32 rdaddr[4]; u16 rport; u16 rdport; u16 nat_port; u16 flags;
                   u32 backend_id; u32 svc_id; u32 last_seen; u32 svc_gen; };
BPF_TABLE_PINNED("lru_hash", struct ct_key, struct ct_val_v1, ct_v1, 1024, "@PIN@");
"""


def _be16(v: int) -> int:
    return int.from_bytes(v.to_bytes(2, "big"), "little")


def _word(addr: str) -> int:
    return int.from_bytes(bytes(map(int, addr.split("."))), "little")


def _old_conntrack(pin: str) -> None:
    """ct_v1 as the old build pinned it, holding one SNAT flow client:40000 -> VIP:80 on
    backend id 1 (service id 1) with node port NAT_PORT: its SERVICE and REPLY entries."""
    old = BPF(text=OLD_MAP.replace("@PIN@", pin))
    try:
        t = old[b"ct_v1"]
        assert ctypes.sizeof(t.Leaf) == CT_V1_VALUE.size
        fwd_k, fwd_v = t.Key(), t.Leaf()
        fwd_k.saddr[0], fwd_k.daddr[0] = _word(CLIENT), _word(VIP)
        fwd_k.sport, fwd_k.dport, fwd_k.proto, fwd_k.family, fwd_k.dir = _be16(40000), _be16(80), 6, 4, 1
        fwd_v.raddr[0], fwd_v.rport = _word(BACKEND), _be16(8080)
        fwd_v.nat_port, fwd_v.flags, fwd_v.backend_id, fwd_v.svc_id, fwd_v.svc_gen = _be16(NAT_PORT), 2, 1, 1, 0
        rep_k, rep_v = t.Key(), t.Leaf()
        rep_k.saddr[0], rep_k.daddr[0] = _word(BACKEND), _word(NODE4)
        rep_k.sport, rep_k.dport, rep_k.proto, rep_k.family, rep_k.dir = _be16(8080), _be16(NAT_PORT), 6, 4, 2
        rep_v.raddr[0], rep_v.rport, rep_v.rdaddr[0], rep_v.rdport = _word(VIP), _be16(80), _word(CLIENT), _be16(40000)
        rep_v.flags, rep_v.backend_id, rep_v.svc_id, rep_v.last_seen = 2, 1, 1, 12345
        t[fwd_k], t[rep_k] = fwd_v, rep_v
    finally:
        old.cleanup()


def _service_entry(before: Datapath, key: ServiceKey) -> None:
    """The ct_v2 SERVICE entry of the SNAT flow client:40000 -> VIP:80 (backend id 1, NAT_PORT)."""
    ct = before.table(MapName.CT)
    fwd_k, fwd_v = ct.Key(), ct.Leaf()
    fwd_k.saddr[0], fwd_k.daddr[0] = _word(CLIENT), _word(VIP)
    fwd_k.sport, fwd_k.dport, fwd_k.proto, fwd_k.family, fwd_k.dir = _be16(40000), _be16(80), 6, 4, 1
    fwd_v.raddr[0], fwd_v.rport = _word(BACKEND), _be16(8080)
    fwd_v.nat_port, fwd_v.flags, fwd_v.backend_id, fwd_v.svc_id = _be16(NAT_PORT), 2, 1, 1
    fwd_v.svc_gen = before.table(MapName.SERVICES)[before._svc_key(key.vip, 80, 6)].backend_gen
    ct[fwd_k] = fwd_v


def _old_agent(instance: str, key: ServiceKey, features) -> Datapath:
    """The old agent's datapath: the SNAT service with backend id 1, service id 1."""
    before = Datapath(instance, pin_root=PIN_ROOT, features=features)
    before.load()
    before.set_node_addresses(v4=NODE4)
    before.upsert_service(Service(key, (Backend(BACKEND, 8080),), mode=Mode.SNAT, maglev_m=251))
    assert before.backend_id(BACKEND, 8080) == 1 and before.service_id(key) == 1
    return before


def test_a_snat_flow_of_the_old_layout_survives_the_upgrade(net):
    instance = f"ctmig-{os.getpid()}"
    key = ServiceKey(VIP, 80, Proto.TCP)
    dp = Datapath(instance, pin_root=PIN_ROOT, features=TEST_FEATURES)
    try:
        # the old agent's services and backends (pinned maps whose layout did not change)
        before = _old_agent(instance, key, TEST_FEATURES)
        before.close()
        # ... and its conntrack, in the old layout (the old build had no ct_v2)
        (before.pin_dir / "ct_v2").unlink()
        _old_conntrack(str(before.pin_dir / "ct_v1"))

        dp.load()
        assert not (dp.pin_dir / "ct_v1").exists()
        _flow_survived(dp, net)
    finally:
        dp.destroy()


def _one_port_datapath(tag: str):
    """(instance, service key, features with the single node port NAT_PORT, the new agent's
    Datapath, not loaded yet): an upgrade test's starting point."""
    instance = f"{tag}-{os.getpid()}"
    one_port = dataclasses.replace(TEST_FEATURES, snat_port_min=NAT_PORT, snat_port_max=NAT_PORT)
    return instance, ServiceKey(VIP, 80, Proto.TCP), one_port, Datapath(instance, pin_root=PIN_ROOT, features=one_port)


def test_a_snat_flow_with_a_reply_conntrack_entry_survives_the_upgrade(net):
    """The last layout before node-port slots: ct_v2 holding the flow's SERVICE and REPLY
    entries, no node-port slots."""
    instance, key, one_port, dp = _one_port_datapath("ctmig2")
    try:
        before = _old_agent(instance, key, one_port)
        ct = before.table(MapName.CT)
        _service_entry(before, key)
        rep_k, rep_v = ct.Key(), ct.Leaf()
        rep_k.saddr[0], rep_k.daddr[0] = _word(BACKEND), _word(NODE4)
        rep_k.sport, rep_k.dport, rep_k.proto, rep_k.family, rep_k.dir = _be16(8080), _be16(NAT_PORT), 6, 4, 2
        rep_v.raddr[0], rep_v.rport, rep_v.rdaddr[0], rep_v.rdport = _word(VIP), _be16(80), _word(CLIENT), _be16(40000)
        rep_v.flags, rep_v.backend_id, rep_v.svc_id = 2, 1, 1
        rep_v.last_seen = int(time.clock_gettime(time.CLOCK_MONOTONIC))
        ct[rep_k] = rep_v
        before.close()
        (before.pin_dir / MapName.SNAT_PORTS.value).unlink()   # the old build had no slots

        dp.load()
        _flow_survived(dp, net)
        # the one node port is the flow's: another client's SYN towards the backend is refused
        syn = Ether() / IP(src="192.0.2.99", dst=VIP) / TCP(sport=40000, dport=80, flags="S")
        assert run_xdp(dp, syn, netns=net["ns"]).retval == XdpAction.DROP
        assert dp.counters().drops["SNAT_NO_PORT"] == 1
    finally:
        dp.destroy()


OLD_SLOTS = r"""
struct snat_slot_v1 { u64 seq; u32 backend_id; u32 baddr[4]; u16 bport; u16 nat_port; u8 proto; u8 family;
                      u16 flags; u32 last_seen; u32 svc_id; u32 caddr[4]; u32 vaddr[4]; u16 cport; u16 vport; };
BPF_TABLE_PINNED("array", u32, struct snat_slot_v1, snat_ports_v1, @N@, "@PIN@");
"""


def test_a_snat_flow_of_the_slot_layout_before_the_flow_index_survives_the_upgrade(net):
    """The layout before the SNAT flow index: the flow's SERVICE entry in ct_v2 and its slot in
    snat_ports_v1 (80 B). The new agent moves the slot into snat_ports_v2."""
    from agent.datapath.snatports import SLOT_V1, snat_slot_index
    instance, key, one_port, dp = _one_port_datapath("ctmig3")
    try:
        before = _old_agent(instance, key, one_port)
        _service_entry(before, key)
        before.close()
        (before.pin_dir / MapName.SNAT_PORTS.value).unlink()   # the old build had v1 slots
        (before.pin_dir / "snat_flows_v1").unlink()            # ... and no flow index
        old = BPF(text=OLD_SLOTS.replace("@PIN@", str(before.pin_dir / "snat_ports_v1"))
                  .replace("@N@", str(one_port.snat_slots)))
        try:
            t = old[b"snat_ports_v1"]
            assert ctypes.sizeof(t.Leaf) == SLOT_V1.size
            v = t.Leaf()
            v.backend_id, v.bport, v.nat_port, v.proto, v.family = 1, _be16(8080), _be16(NAT_PORT), 6, 4
            v.flags, v.svc_id = 2 | 32, 1   # SNAT | REPLIED
            v.last_seen = int(time.clock_gettime(time.CLOCK_MONOTONIC))
            v.baddr[0], v.caddr[0], v.vaddr[0], v.cport, v.vport = _word(BACKEND), _word(CLIENT), _word(VIP), \
                _be16(40000), _be16(80)
            t[t.Key(snat_slot_index(BACKEND, 8080, NAT_PORT, 6, one_port.hash_seed, one_port.snat_slots))] = v
        finally:
            old.cleanup()

        dp.load()
        assert not (dp.pin_dir / "snat_ports_v1").exists()
        _flow_survived(dp, net)
        # the one node port is still the flow's: another client's SYN towards the backend is refused
        syn = Ether() / IP(src="192.0.2.99", dst=VIP) / TCP(sport=40000, dport=80, flags="S")
        assert run_xdp(dp, syn, netns=net["ns"]).retval == XdpAction.DROP
    finally:
        dp.destroy()


def _flow_survived(dp, net) -> None:
    """The flow client:40000 -> VIP:80 on backend id 1, node port NAT_PORT, is whole."""
    entries = {e.direction: e for e in dp.conntrack()}
    assert entries["service"].nat_port == NAT_PORT and entries["service"].backend_id == 1
    assert (str(entries["reply"].rewrite_saddr), entries["reply"].rewrite_sport) == (VIP, 80)

    # an established packet of the flow keeps its node port ...
    pkt = Ether() / IP(src=CLIENT, dst=VIP) / TCP(sport=40000, dport=80, flags="A") / Raw(b"x")
    r = run_xdp(dp, pkt, netns=net["ns"])
    assert r.retval in (XdpAction.TX, XdpAction.REDIRECT)
    out = Ether(r.data)
    assert (out[IP].src, out[TCP].sport, out[IP].dst, out[TCP].dport) == (NODE4, NAT_PORT, BACKEND, 8080)
    # ... and the backend's reply reaches the client as VIP:80
    rep = Ether() / IP(src=BACKEND, dst=NODE4) / TCP(sport=8080, dport=NAT_PORT, flags="A") / Raw(b"y" * 1400)
    r = run_xdp(dp, rep, netns=net["ns"])
    assert r.retval in (XdpAction.TX, XdpAction.REDIRECT)
    back = Ether(r.data)
    assert (back[IP].src, back[TCP].sport, back[IP].dst, back[TCP].dport) == (VIP, 80, CLIENT, 40000)
    assert len(dp.table(MapName.CT)) == 1   # the SERVICE entry; the reply direction is a slot
    assert len(list(claimed_slots(dp.table(MapName.SNAT_PORTS)))) == 1
