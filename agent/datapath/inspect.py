"""What the kernel's maps hold, decoded for people (``vipctl service list``, ``vipctl bpf ...``,
the per-service and drop metrics).

Everything here reads the BPF maps themselves, never the agent's bookkeeping: an operator asks
"what does the datapath do now", and after an agent restart or a failed write the maps are the
only truth. Reads are plain syscalls (batch lookups where the kernel has them), so callers run
them off the event loop. The maps change while they are read; each entry is read atomically,
the dump as a whole is not (as with ``cilium-dbg bpf lb list``).
"""

from __future__ import annotations

from dataclasses import dataclass

from agent.datapath.abi import BackendFlag, CtDir, CtFlag, DropReason, Hook, MapName, Stat, SvcFlag
from agent.datapath.api import (
    CtEntry, _HOOK_NAMES, _addr_from_words, _array_items, _array_read_range, _hash_items, _ntohs,
)
from agent.datapath.model import IPAddress, Proto, ServiceKey
from agent.datapath.snatports import claimed_slots, read_slots

__all__ = [
    "BackendRow", "FrontendRow", "read_backends", "read_frontends", "read_maglev",
    "read_conntrack", "read_flow_lines", "count_conntrack", "ct_flag_names", "read_drops", "read_stats", "read_service_counters", "svc_flag_names",
    "backend_state",
]


@dataclass(frozen=True)
class BackendRow:
    id: int
    addr: IPAddress
    port: int
    flags: int

    def __str__(self) -> str:
        host = f"[{self.addr}]" if self.addr.version == 6 else str(self.addr)
        return f"{host}:{self.port}"


@dataclass(frozen=True)
class FrontendRow:
    addr: IPAddress
    port: int                       # 0 in a wildcard entry
    proto: Proto | None             # None in a wildcard entry
    svc_id: int
    flags: int
    table_off: int                  # first slot in the shared maglev array
    table_size: int                 # M in use (0: no backend for new flows)
    table_cap: int                  # slots allocated
    affinity_timeout: int
    members: tuple[int, ...] = ()   # backend ids listed for the service (svc_backends), sorted
    wildcard: bool = False          # "known VIP, unknown port": the entry that drops

    @property
    def key(self) -> ServiceKey:
        if self.wildcard:
            raise ValueError(f"the wildcard entry of {self.addr} has no service key")
        return ServiceKey(self.addr, self.port, self.proto)

    @property
    def family(self) -> int:
        return self.addr.version


def svc_flag_names(flags: int) -> list[str]:
    names = ["DSR" if flags & SvcFlag.DSR else "SNAT"]
    for flag, name in ((SvcFlag.LOCAL_ONLY, "Local"), (SvcFlag.AFFINITY, "sessionAffinity"),
                       (SvcFlag.SOURCE_RANGES, "sourceRanges"), (SvcFlag.STATELESS, "stateless")):
        if flags & flag:
            names.append(name)
    return names


def backend_state(flags: int) -> str:
    if not flags & BackendFlag.ACTIVE:
        return "deleted"
    return "terminating" if flags & BackendFlag.TERMINATING else "active"


def read_backends(dp) -> dict[int, BackendRow]:
    out = {}
    for k, v in _array_items(dp.table(MapName.BACKENDS)):
        if v.flags & BackendFlag.ACTIVE:
            out[k] = BackendRow(k, _addr_from_words(v.addr, v.family), _ntohs(v.port), int(v.flags))
    return out


def read_frontends(dp) -> list[FrontendRow]:
    """Every frontend of the services map, sorted by service id (wildcards last)."""
    members: dict[int, list[int]] = {}
    for k, _ in _hash_items(dp.table(MapName.SVC_BACKENDS)):
        members.setdefault(int(k.svc_id), []).append(int(k.backend_id))
    rows = []
    for k, v in _hash_items(dp.table(MapName.SERVICES)):
        addr = _addr_from_words(k.addr, k.family)
        wildcard = bool(v.flags & SvcFlag.WILDCARD)
        rows.append(FrontendRow(addr, 0 if wildcard else _ntohs(k.port), None if wildcard else Proto(k.proto),
                                int(v.id), int(v.flags), int(v.table_off), int(v.table_size), int(v.table_cap),
                                int(v.affinity_timeout), tuple(sorted(members.get(int(v.id), ()))),
                                wildcard))
    rows.sort(key=lambda r: (r.wildcard, r.svc_id, r.family, r.addr, r.port))
    return rows


def read_maglev(dp, front: FrontendRow) -> list[int]:
    """Backend id per slot of the frontend's Maglev table as the kernel holds it."""
    if not front.table_size:
        return []
    return _array_read_range(dp.table(MapName.MAGLEV), front.table_off, front.table_size).tolist()


def _lines(dp):
    """The flow table's lines that name a flow (claimed, not a tombstone: proto 0)."""
    return ((i, v) for i, v in claimed_slots(dp.table(MapName.DSR_FLOWS)) if v.proto)


def read_flow_lines(dp) -> list[CtEntry]:
    """The flow table's flows (dsr_flows_v1: one line per DSR or SNAT flow, client -> VIP tuple,
    backend and, for SNAT, node port), as the SERVICE entries they replace; a line of a closed
    or idle flow stays until a new flow reuses it, as an LRU entry stays until evicted."""
    rows = []
    for _, v in _lines(dp):
        fam = v.family
        flags = CtFlag(v.flags)
        rows.append(CtEntry(
            direction="service", proto=Proto(v.proto), saddr=_addr_from_words(v.saddr, fam),
            sport=_ntohs(v.sport), daddr=_addr_from_words(v.daddr, fam), dport=_ntohs(v.dport),
            backend_id=int(v.backend_id), service_id=int(v.svc_id), flags=flags,
            nat_port=_ntohs(v.nat_port) if flags & CtFlag.SNAT else 0))
    return rows


def _flow_of(e: CtEntry) -> tuple:
    return (e.saddr, e.sport, e.daddr, e.dport, e.proto)


def read_conntrack(dp, limit: int | None = None) -> tuple[list[CtEntry], int]:
    """(up to ``limit`` entries, total entries). DSR and SNAT flows come from the flow table
    first; a conntrack SERVICE entry of the same flow (left from before it was re-balanced into
    the table) is shadowed there, so it is not shown."""
    lines = read_flow_lines(dp)
    in_table = {_flow_of(e) for e in lines}
    rows, total = lines[:limit], len(lines)
    for k, v in _hash_items(dp.table(MapName.CT)):
        fam = k.family
        if k.dir == CtDir.SERVICE and in_table and (
                (_addr_from_words(k.saddr, fam), _ntohs(k.sport), _addr_from_words(k.daddr, fam), _ntohs(k.dport),
                 Proto(k.proto)) in in_table):
            continue
        total += 1
        if limit is not None and len(rows) >= limit:
            continue
        reply = k.dir == CtDir.REPLY
        rows.append(CtEntry(
            direction="reply" if reply else "service", proto=Proto(k.proto),
            saddr=_addr_from_words(k.saddr, fam), sport=_ntohs(k.sport),
            daddr=_addr_from_words(k.daddr, fam), dport=_ntohs(k.dport),
            backend_id=int(v.backend_id), service_id=int(v.svc_id), flags=CtFlag(v.flags),
            rewrite_saddr=_addr_from_words(v.raddr, fam) if reply else None,
            rewrite_sport=_ntohs(v.rport) if reply else None, nat_port=_ntohs(v.nat_port)))
    # SNAT flows' reply direction lives in the node-port slots, shown as the REPLY entries
    # they replaced: {backend:bport -> node:nat_port} rewritten to VIP:vport -> client
    nodes = _node_addresses(dp)
    # ... and the forward direction of flows of vipd before SNAT lines (found through the old
    # flow index), unless the flow has a line or a SERVICE entry: {client:cport -> VIP:vport}
    # via backend and node port
    with_entry = in_table | {_flow_of(r) for r in rows if r.direction == "service"}
    for s in read_slots(dp):
        for direction in ("service", "reply"):
            if direction == "service" and (s.client, s.cport, s.vip, s.vport, Proto(s.proto)) in with_entry:
                continue
            total += 1
            if limit is not None and len(rows) >= limit:
                continue
            if direction == "service":
                rows.append(CtEntry(
                    direction="service", proto=Proto(s.proto), saddr=s.client, sport=s.cport, daddr=s.vip,
                    dport=s.vport, backend_id=s.backend_id, service_id=s.svc_id, flags=CtFlag(s.flags),
                    rewrite_saddr=None, rewrite_sport=None, nat_port=s.nat_port))
            else:
                rows.append(CtEntry(
                    direction="reply", proto=Proto(s.proto), saddr=s.backend, sport=s.bport,
                    daddr=nodes.get(s.backend.version, s.backend), dport=s.nat_port, backend_id=s.backend_id,
                    service_id=s.svc_id, flags=CtFlag(s.flags), rewrite_saddr=s.vip, rewrite_sport=s.vport,
                    nat_port=0))
    return rows, total


def _node_addresses(dp) -> dict[int, IPAddress]:
    """IP version -> the node address SNAT uses (node_cfg_v1)."""
    tbl, out = dp.table(MapName.NODE_CFG), {}
    for idx, fam in ((0, 4), (1, 6)):
        v = tbl[tbl.Key(idx)]
        if v.valid:
            out[fam] = _addr_from_words(v.addr, fam)
    return out


def count_conntrack(dp) -> dict[str, int]:
    """Flows by direction; a SNAT flow's slot counts as its reply direction and, unless the
    flow also has a line or a SERVICE entry (a flow of vipd before SNAT lines), as its service
    direction (as in read_conntrack)."""
    counts = {"service": 0, "reply": 0}
    dsr = {(tuple(v.saddr), v.sport, tuple(v.daddr), v.dport, v.proto) for _, v in _lines(dp)}
    counts["service"] += len(dsr)   # flows in the flow table (their SERVICE entries shadowed)
    with_entry = set(dsr)
    for k, _ in _hash_items(dp.table(MapName.CT)):
        if k.dir == CtDir.REPLY:
            counts["reply"] += 1
        else:
            flow = (tuple(k.saddr), k.sport, tuple(k.daddr), k.dport, k.proto)
            counts["service"] += flow not in dsr
            with_entry.add(flow)
    for _, v in claimed_slots(dp.table(MapName.SNAT_PORTS)):
        counts["reply"] += 1
        if (tuple(v.caddr), v.cport, tuple(v.vaddr), v.vport, v.proto) not in with_entry:
            counts["service"] += 1
    return counts


def read_drops(dp) -> dict[str, int]:
    """Drop reason -> packets (all CPUs)."""
    dt = dp.table(MapName.DROPS)
    return {r.name: int(sum(dt[dt.Key(r)])) for r in DropReason}


def read_stats(dp) -> dict[tuple[str, str], int]:
    """(hook, outcome) -> packets (all CPUs), e.g. ("xdp", "tx")."""
    from agent.datapath import abi

    tbl = dp.table(MapName.STATS)
    out = {}
    for hook in Hook:
        for st in Stat:
            out[(_HOOK_NAMES[hook], st.name.lower())] = int(sum(tbl[tbl.Key(hook * abi.NUM_STATS + st)]))
    return out


def read_service_counters(dp, svc_ids) -> dict[int, tuple[int, int]]:
    """svc_id -> (packets, bytes) summed over CPUs."""
    st = dp.table(MapName.SVC_STATS)
    out = {}
    for sid in svc_ids:
        vals = st[st.Key(sid)]
        out[sid] = (int(sum(c.packets for c in vals)), int(sum(c.bytes for c in vals)))
    return out


def ct_flag_names(flags: int) -> list[str]:
    return [f.name.lower() for f in CtFlag if flags & f]
