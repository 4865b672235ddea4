"""SNAT node-port slots (``snat_ports_v2``): index mirror, listing, sweeping, migration.

A SNAT flow's node port is claimed in an array slot at the index hashed from what the flow's
replies carry, ``{backend:bport -> node:nat_port, proto}`` (bpf/include/lb.h
``snat_slot_index``); the slot names the client and the VIP the replies go back to. This
module is the agent's side of that map: the same index in Python, the slots as rows, clearing
the slots of removed backends, and moving SNAT ``REPLY`` conntrack entries of an older vipd
(which claimed ports with a conntrack insert) into slots, so its flows survive the upgrade.
"""

from __future__ import annotations

import ctypes
import ipaddress
import os
import struct
from dataclasses import dataclass
from types import SimpleNamespace

from agent.datapath.abi import CtDir, CtFlag, MapName
from agent.datapath.flowhash import flow_hash

__all__ = ["snat_slot_index", "snat_search_start", "snat_port_candidate", "SnatSlot", "read_slots",
           "clear_slots", "migrate_reply_entries", "migrate_v1_slots", "SLOT_V1"]

_M32 = 0xFFFFFFFF


def snat_slot_index(backend, bport: int, nat_port: int, proto: int, seed: int, slots: int) -> int:
    """The slot of ``{backend:bport -> node:nat_port}`` (host-order ports), as the datapath
    computes it: the flow hash of (backend, nat_port, bport, proto), masked to the array."""
    return flow_hash(backend, nat_port, bport, proto, seed) & (slots - 1)


def snat_search_start(client, cport: int, vip, vport: int, proto: int, seed: int) -> int:
    """Where a flow's node-port search starts (bpf/include/lb.h snat_port_for): the flow hash
    Maglev uses, xor the VIP's first and last address words (as the datapath loads them)."""
    raw = ipaddress.ip_address(vip).packed.ljust(16, b"\0")
    return flow_hash(client, cport, vport, proto, seed) ^ int.from_bytes(raw[:4], "little") ^ \
        int.from_bytes(raw[12:], "little")


def snat_port_candidate(start: int, i: int, port_min: int, port_max: int) -> int:
    """The i-th node-port candidate from ``start`` (lb.h snat_port_candidate): a 32-bit mix of
    start + i*phi scaled to the range, so candidates are independent of each other."""
    x = (start + i * 0x9E3779B9) & _M32
    x ^= x >> 16
    x = (x * 0x7FEB352D) & _M32
    x ^= x >> 15
    x = (x * 0x846CA68B) & _M32
    x ^= x >> 16
    return port_min + ((x * (port_max - port_min + 1)) >> 32)


@dataclass(frozen=True)
class SnatSlot:
    index: int
    backend_id: int
    backend: ipaddress.IPv4Address | ipaddress.IPv6Address
    bport: int
    nat_port: int
    proto: int
    flags: int
    last_seen: int
    svc_id: int
    client: ipaddress.IPv4Address | ipaddress.IPv6Address
    cport: int
    vip: ipaddress.IPv4Address | ipaddress.IPv6Address
    vport: int


def _addr(words, family: int):
    raw = b"".join(int(w).to_bytes(4, "little") for w in words)
    return ipaddress.ip_address(raw[:4] if family == 4 else raw)


def _ntohs(v: int) -> int:
    return int.from_bytes(int(v).to_bytes(2, "little"), "big")


def claimed_slots(tbl):
    """(index, value) of the claimed slots (backend_id != 0). One pass of batch lookups over the
    whole array, filtered on backend_id without building a ctypes object per free slot."""
    from agent.datapath.api import _raw_batches
    ks, vs = ctypes.sizeof(tbl.Key), ctypes.sizeof(tbl.Leaf)
    bid_word = tbl.Leaf.backend_id.offset // 4
    for keys, vals, n in _raw_batches(tbl.map_fd, ks, vs):
        words = memoryview(vals).cast("B").cast("I")[:n * vs // 4]
        kraw = vraw = None
        for j, bid in enumerate(words[bid_word::vs // 4]):
            if bid:
                if kraw is None:   # one copy of each buffer per batch
                    kraw, vraw = keys.raw, vals.raw
                yield (int.from_bytes(kraw[j * ks:j * ks + 4], "little"),
                       tbl.Leaf.from_buffer_copy(vraw, j * vs))


def read_slots(dp) -> list[SnatSlot]:
    out = []
    for i, v in claimed_slots(dp.table(MapName.SNAT_PORTS)):
        fam = v.family
        out.append(SnatSlot(i, int(v.backend_id), _addr(v.baddr, fam), _ntohs(v.bport), _ntohs(v.nat_port),
                            int(v.proto), int(v.flags), int(v.last_seen), int(v.svc_id), _addr(v.caddr, fam),
                            _ntohs(v.cport), _addr(v.vaddr, fam), _ntohs(v.vport)))
    return out


def clear_slots(dp, doomed_if) -> int:
    """Free the slots for which ``doomed_if(backend_id, key)`` holds; ``key`` has the REPLY
    key's ``saddr`` (backend address words) and ``sport`` (backend port, network order), so
    the agent's conntrack sweep predicates apply unchanged. Returns the number freed."""
    tbl = dp.table(MapName.SNAT_PORTS)
    doomed = [i for i, v in claimed_slots(tbl)
              if doomed_if(int(v.backend_id), SimpleNamespace(saddr=tuple(v.baddr), sport=int(v.bport)))]
    empty = tbl.Leaf()
    for i in doomed:
        tbl[tbl.Key(i)] = empty
    return len(doomed)


# snat_ports_v1's slot (vipd before the SNAT flow index; 80 B, no svc_gen / flow_idx), declared
# here only, for migrate_v1_slots: seq, backend_id, baddr[4], bport, nat_port, proto, family,
# flags, last_seen, svc_id, caddr[4], vaddr[4], cport, vport (ports as stored: network order)
SLOT_V1 = struct.Struct("<QI16sHHBBHII16s16sHH")
assert SLOT_V1.size == 80


def migrate_v1_slots(dp) -> int:
    """Move the claimed slots of ``snat_ports_v1`` (vipd before the SNAT flow index) into
    ``snat_ports_v2``, then unpin the old map. Their flows keep the SERVICE conntrack entries
    that vipd inserted, so they go on through conntrack (which checks the slot); only new flows
    use the flow index. Returns the number of slots moved."""
    from agent.datapath import bpfsys
    from agent.datapath.api import DatapathError, _raw_batches
    old = dp.pin_dir / "snat_ports_v1"
    if not old.exists():
        return 0
    fd = bpfsys.obj_get(old)
    try:
        info = bpfsys.map_info(fd)
        if (info.key_size, info.value_size) != (4, SLOT_V1.size):
            raise DatapathError(f"{old} has key/value sizes {(info.key_size, info.value_size)}, not "
                                f"snat_ports_v1's (4, {SLOT_V1.size}); remove it to start afresh")
        slots = dp.table(MapName.SNAT_PORTS)
        seed, n = dp.features.hash_seed, dp.features.snat_slots
        moved = 0
        for _, vals, cnt in _raw_batches(fd, info.key_size, info.value_size):
            for j in range(cnt):
                (_, bid, baddr, bport, nat_port, proto, family, flags, last_seen, svc_id, caddr, vaddr,
                 cport, vport) = SLOT_V1.unpack_from(vals, j * SLOT_V1.size)
                if not bid:
                    continue
                raw = baddr if family == 6 else baddr[:4]
                idx = snat_slot_index(ipaddress.ip_address(raw), _ntohs(bport), _ntohs(nat_port), proto, seed, n)
                s = slots.Leaf()
                s.backend_id, s.bport, s.nat_port, s.proto, s.family = bid, bport, nat_port, proto, family
                s.flags, s.last_seen, s.svc_id = flags, last_seen, svc_id
                ctypes.memmove(ctypes.addressof(s.baddr), baddr, 16)
                ctypes.memmove(ctypes.addressof(s.caddr), caddr, 16)
                ctypes.memmove(ctypes.addressof(s.vaddr), vaddr, 16)
                s.cport, s.vport = cport, vport
                slots[slots.Key(idx)] = s
                moved += 1
    finally:
        os.close(fd)
    old.unlink()
    return moved


def migrate_reply_entries(dp) -> tuple[int, int]:
    """Move SNAT REPLY entries of ``ct_v2`` (vipd before port slots) into their slots, then
    delete them from conntrack. Returns (moved, lost): an entry is lost only when another
    entry already holds its slot (two keys of one index; that flow's replies then reach the
    node's stack, as after an LRU eviction)."""
    from agent.datapath.api import _hash_items
    ct, slots = dp.table(MapName.CT), dp.table(MapName.SNAT_PORTS)
    reply, snat = int(CtDir.REPLY), int(CtFlag.SNAT)
    seed, n = dp.features.hash_seed, dp.features.snat_slots
    entries = [(ct.Key.from_buffer_copy(k), ct.Leaf.from_buffer_copy(v)) for k, v in _hash_items(ct)
               if k.dir == reply and v.flags & snat]
    if not entries:   # the usual start: nothing to move, no need to read the 256 Ki slots
        return 0, 0
    moved = lost = 0
    taken = {i for i, _ in claimed_slots(slots)}
    for k, v in entries:
        idx = snat_slot_index(_addr(k.saddr, k.family), _ntohs(k.sport), _ntohs(k.dport), k.proto, seed, n)
        if idx in taken:
            lost += 1
        else:
            s = slots.Leaf()
            s.backend_id, s.bport, s.nat_port, s.proto, s.family = v.backend_id, k.sport, k.dport, k.proto, k.family
            # REPLIED: whether a reply came is unknown; only the closing and idle rules apply, as before
            s.flags, s.last_seen, s.svc_id = v.flags | int(CtFlag.REPLIED), v.last_seen, v.svc_id
            ctypes.memmove(ctypes.addressof(s.baddr), ctypes.addressof(k.saddr), 16)
            ctypes.memmove(ctypes.addressof(s.caddr), ctypes.addressof(v.rdaddr), 16)
            ctypes.memmove(ctypes.addressof(s.vaddr), ctypes.addressof(v.raddr), 16)
            s.cport, s.vport = v.rdport, v.rport
            slots[slots.Key(idx)] = s
            taken.add(idx)
            moved += 1
        try:
            del ct[k]
        except KeyError:
            pass
    return moved, lost
