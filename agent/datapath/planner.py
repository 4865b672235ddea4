"""The datapath's pure planner: desired services -> map changes as data, no kernel.

:class:`Planner` holds what the maps program (service and backend ids, Maglev slot ranges,
memberships, wildcard entries, reverse-NAT designations, backend reference counts) as plain
data and turns each upsert or delete of a :class:`~agent.datapath.model.Service` into writes
recorded in a :class:`~agent.datapath.changes.MapChanges` (keys and values as bytes, grouped
into phases so no packet sees a half-written service). It allocates ids and slot ranges and
raises :class:`CapacityError` naming the service when a sized map would overflow.

The map layouts come in as data (:class:`Layouts`: ctypes key and value types per map, built
from bcc's type descriptions that the loader child reports, or from a recorded fixture), so
the planner runs and is tested without root, bcc or a kernel. ``Datapath`` (api.py) is the
effectful shell: it lets the planner record, has the writer (writer.py) apply the changes,
and after a refused write reads its view back from the maps (the planner updates its view
as it plans; the maps are the truth after a failure).

Time comes in through ``clock`` (freed Maglev ranges rest ``QUARANTINE_S`` before reuse).
"""

from __future__ import annotations

import ctypes
import struct as _struct
import time
from array import array
from ipaddress import IPv4Address as _IPv4
from dataclasses import dataclass
from typing import Callable, Iterable, Mapping, Sequence

from agent.datapath.abi import BackendFlag, MapName, SvcFlag
from agent.datapath.changes import MapChanges, Phase
from agent.datapath.model import IPAddress, IPNetwork, Mode, Service, ServiceKey, Backend, backend_name

__all__ = ["Planner", "Layouts", "Limits", "Programmed", "RangeAllocator", "ServiceChange",
           "DatapathError", "CapacityError", "PLANNED_MAPS", "words"]

TableBuilder = Callable[[Sequence[tuple[str, int]], int], list[int]]
TABLE_CACHE_SIZE = 4096  # distinct (backends, M) Maglev tables kept (~1 KB each at M = 251)

# the maps the planner writes (their layouts are its input)
PLANNED_MAPS = (MapName.SERVICES, MapName.BACKENDS, MapName.SVC_BACKENDS, MapName.REVNAT,
                MapName.MAGLEV, MapName.SRC_RANGES)


class DatapathError(RuntimeError):
    """A datapath operation failed; the message says which object and why."""


class CapacityError(DatapathError):
    """A sized map is full (``what``: "services", "backends", "memberships", "maglev_slots");
    ``Datapath.grow`` with a bigger :class:`~agent.datapath.capacity.Capacity` fixes it."""

    def __init__(self, what: str, message: str):
        super().__init__(message)
        self.what = what


@dataclass(frozen=True)
class ServiceChange:
    """What one upsert wrote."""

    created: bool          # a new service id / frontend entry
    slots_written: int     # Maglev slots written (delta) or filled (swap)
    swapped: bool          # a fresh table range was filled and swapped in atomically
    service_written: bool  # the frontend entry (flags, table pointer) was rewritten


@dataclass(frozen=True)
class Limits:
    """The sizes the planner allocates within (the maps' capacity) and the one feature it needs."""

    max_services: int
    max_backends: int
    max_memberships: int
    maglev_slots: int
    derive_local_replies: bool = True

    @classmethod
    def of(cls, features) -> "Limits":
        """From :class:`agent.datapath.api.Features`."""
        return cls(features.max_services, features.max_backends, features.max_memberships,
                   features.maglev_slots, features.derive_local_replies)


class Layouts:
    """Key and value types (ctypes) of the planned maps: ``types[name] = (Key, Leaf)``."""

    def __init__(self, types: Mapping[str, tuple[type, type]]):
        missing = [m.value for m in PLANNED_MAPS if m.value not in types]
        if missing:
            raise DatapathError(f"map layouts lack {', '.join(missing)}: the loaded program "
                                "does not declare them (another bpf/ build?)")
        self.types = {str(k): v for k, v in types.items()}
        self._packers: dict[tuple, object] = {}
        # the planner's hot writes, resolved once (None: build ctypes objects instead)
        self.addr_key_st = {m: self.packer(m, "key", _ADDR_KEY) for m in (_SERVICES, _REVNAT)}
        self.svc_val_st = self.packer(_SERVICES, "leaf", _SVC_VAL)
        self.member_key_st = self.packer(_MEMBERS, "key", ("svc_id", "backend_id"))

    @classmethod
    def from_descs(cls, descs: Mapping[str, tuple[object, object]]) -> "Layouts":
        """From bcc's JSON type descriptions (``{name: (key_desc, leaf_desc)}``, as the loader
        child reports them in each map's spec)."""
        from agent.datapath.maptable import decode_type
        return cls({name: (decode_type(k), decode_type(v)) for name, (k, v) in descs.items()})

    @classmethod
    def from_tables(cls, tables: Mapping[str, object]) -> "Layouts":
        """From loaded tables (:class:`~agent.datapath.maptable.MapTable`: ``Key``, ``Leaf``)."""
        return cls({m.value: (tables[m.value].Key, tables[m.value].Leaf)
                    for m in PLANNED_MAPS if m.value in tables})

    def key(self, name: str):
        return self.types[name][0]

    def packer(self, name: str, which: str, fields: tuple[str, ...]):
        """A ``struct.Struct`` that packs the map's key (``which`` "key") or value ("leaf")
        from plain ints in the order of ``fields`` (an array field takes as many ints as it
        has elements), or None when the C layout is not exactly those fields of u8/u16/u32
        (then the caller builds a ctypes object). ~1 us instead of ~5 us per entry, which
        counts at 20,000 services x several entries."""
        ck = (name, which, fields)
        if ck not in self._packers:
            self._packers[ck] = _struct_for(self.types[name][0 if which == "key" else 1], fields)
        return self._packers[ck]

    def leaf(self, name: str):
        return self.types[name][1]


@dataclass(slots=True)
class Programmed:
    """What the maps currently hold for one frontend (one per frontend, 20,000+: slots, and
    the sets shared between frontends with equal ones, see ``Planner.shared_set``)."""

    svc_id: int
    flags: int
    table_off: int
    table_cap: int
    table: Sequence[int]          # backend id per slot, array('I') (empty = no backend for new flows)
    affinity_timeout: int
    ranges: frozenset
    service: Service | None       # the model last upserted (None after adoption)
    refs: frozenset = frozenset()  # backend ids this service keeps alive (table + listed backends)
    members: frozenset = frozenset()  # backend ids in svc_backends for this service (listed backends)
    backend_gen: int = 0           # svc_val.backend_gen: bumped whenever a member leaves


class RangeAllocator:
    """Maglev slot ranges: a bump pointer plus free lists per size (tables come in a handful
    of prime sizes, so exact-size reuse keeps fragmentation low). Freed ranges rest a while
    before reuse so a packet still reading a just-swapped-out table never sees another
    service's slots."""

    QUARANTINE_S = 2.0

    def __init__(self, size: int, clock: Callable[[], float] = time.monotonic):
        self.size = size
        self.clock = clock
        self.top = 0
        self.used: dict[int, int] = {}                 # off -> length
        self.free_by_len: dict[int, list[int]] = {}
        self.resting: list[tuple[float, int, int]] = []

    def reserve(self, off: int, length: int) -> None:
        """Mark a range in use (adoption); gaps below the top become free lists lazily."""
        self.used[off] = length
        self.top = max(self.top, off + length)

    def alloc(self, length: int, who: object = None) -> int:
        now = self.clock()
        while self.resting and self.resting[0][0] <= now:
            _, off, n = self.resting.pop(0)
            self.free_by_len.setdefault(n, []).append(off)
        free = self.free_by_len.get(length)
        if free:
            off = free.pop()
        else:
            if self.top + length > self.size:
                for_whom = f"service {who}: " if who is not None else ""
                raise CapacityError("maglev_slots", f"{for_whom}Maglev slot space exhausted ({self.size} "
                                    f"slots, {self.top} in use, a table of {length} does not fit)")
            off = self.top
            self.top += length
        self.used[off] = length
        return off

    def free(self, off: int) -> None:
        n = self.used.pop(off, None)
        if n:
            self.resting.append((self.clock() + self.QUARANTINE_S, off, n))


# ---------------------------------------------------------------------------- byte helpers

_FOUR_U32 = _struct.Struct("<4I")
_CODES = {1: "B", 2: "H", 4: "I"}


def _struct_for(ctype, fields: tuple[str, ...]):
    """See :meth:`Layouts.packer`: the Struct, after checking it packs like ``ctype``."""
    declared = [f[0] for f in ctype._fields_]
    if tuple(declared) != fields or getattr(ctype, "_pack_", None):
        return None
    fmt, pos, n = "<", 0, 0
    for fname, ftype, *_ in ctype._fields_:
        desc = getattr(ctype, fname)
        count, elem = (ftype._length_, ftype._type_) if issubclass(ftype, ctypes.Array) else (1, ftype)
        code = _CODES.get(ctypes.sizeof(elem)) if elem in (ctypes.c_uint8, ctypes.c_uint16, ctypes.c_uint32) else None
        if code is None or desc.offset < pos:
            return None
        fmt += "x" * (desc.offset - pos) + (f"{count}{code}" if count > 1 else code)
        pos, n = desc.offset + desc.size, n + count
    fmt += "x" * (ctypes.sizeof(ctype) - pos)
    st = _struct.Struct(fmt)
    sample = list(range(1, n + 1))
    if st.size != ctypes.sizeof(ctype) or bytes(ctype.from_buffer_copy(st.pack(*sample))) != st.pack(*sample):
        return None
    return st


def words(addr: IPAddress) -> tuple[int, int, int, int]:
    """An address as the four raw network-order u32 words of the C structs (little-endian host)."""
    if type(addr) is _IPv4:   # arithmetic: ~10x faster than .packed, and called per entry
        ip = addr._ip
        return (((ip & 0xFF) << 24) | ((ip & 0xFF00) << 8) | ((ip >> 8) & 0xFF00) | (ip >> 24), 0, 0, 0)
    return _FOUR_U32.unpack(addr.packed.ljust(16, b"\0"))


def htons(v: int) -> int:
    return ((v & 0xFF) << 8) | ((v >> 8) & 0xFF)


_EMPTY: frozenset = frozenset()

# flag values as plain ints for the per-service hot path
_BE_ACTIVE, _BE_LOCAL, _BE_TERMINATING = int(BackendFlag.ACTIVE), int(BackendFlag.LOCAL), int(BackendFlag.TERMINATING)
_SVC_LOCAL_ONLY, _SVC_DSR, _SVC_AFFINITY = int(SvcFlag.LOCAL_ONLY), int(SvcFlag.DSR), int(SvcFlag.AFFINITY)
_SVC_SOURCE_RANGES, _SVC_STATELESS = int(SvcFlag.SOURCE_RANGES), int(SvcFlag.STATELESS)

_ADDR_KEY = ("addr", "port", "proto", "family")   # struct svc_key (services, revnat)
_SVC_VAL = ("id", "flags", "table_off", "table_size", "affinity_timeout", "table_cap", "backend_gen")
_SERVICES, _BACKENDS, _MEMBERS = MapName.SERVICES.value, MapName.BACKENDS.value, MapName.SVC_BACKENDS.value
_REVNAT, _MAGLEV, _RANGES = MapName.REVNAT.value, MapName.MAGLEV.value, MapName.SRC_RANGES.value


# ---------------------------------------------------------------------------- the planner

class Planner:
    """Programmed state + the rules that turn service changes into map writes (module doc).

    Writes are recorded into ``self.changes``, and the few that must land before all of them
    into ``self.first``; the caller takes both with :meth:`take_changes` and has the writer
    apply them in that order."""

    def __init__(self, layouts: Layouts | None, limits: Limits, *, table_builder: TableBuilder | None = None,
                 clock: Callable[[], float] = time.monotonic):
        self.layouts = layouts
        self.limits = limits
        self.clock = clock
        self._table_builder = table_builder
        self._tables: dict[tuple, tuple[int, ...]] = {}  # (backends, M) -> Maglev table
        self._id_tables: dict[tuple, array] = {}         # ... with backend ids: shared arrays
        self._sets: dict[frozenset, frozenset] = {}      # one object per distinct id / range set
        self.maglev_builds = 0
        self.changes = MapChanges()
        self.first = MapChanges()   # applied before ``changes`` (see _set_revnat)
        self.reset()

    def reset(self) -> None:
        """Forget what the maps program (ids, tables, ranges): an empty datapath."""
        self.programmed: dict[ServiceKey, Programmed] = {}
        self.wildcards: dict[tuple[int, IPAddress], int] = {}
        self.backend_ids: dict[tuple[IPAddress, int], int] = {}
        self.backend_vals: dict[int, tuple[IPAddress, int, int]] = {}   # id -> (addr, port, flags)
        self.backend_refs: dict[int, int] = {}                           # id -> services using it
        self.backend_svcs: dict[int, set[ServiceKey]] = {}               # id -> services listing it
        self.revnat: dict[int, ServiceKey] = {}    # local backend id -> its designated service
        self.free_svc_ids: list[int] = []
        self.dead_backends: dict[int, tuple[IPAddress, int]] = {}   # deactivated, REPLY entries not yet swept
        self.dead_remote = False   # a deactivated backend was remote: its SNAT port slots need freeing
        self.next_svc_id = 1
        self.next_backend_id = 1
        self.member_count = 0      # entries of svc_backends (memberships of all services)
        self.alloc = RangeAllocator(self.limits.maglev_slots, self.clock)

    def take_changes(self) -> list[MapChanges]:
        """The recorded writes, to apply in list order (empty ones left out); recording
        starts afresh."""
        out = [c for c in (self.first, self.changes) if len(c)]
        self.first, self.changes = MapChanges(), MapChanges()
        return out

    def take_dead_backends(self) -> tuple[dict[int, tuple[IPAddress, int]], bool]:
        """The backends deactivated since the last call (their REPLY entries need a sweep) and
        whether one was remote (its SNAT port slots need freeing)."""
        dead, self.dead_backends = self.dead_backends, {}
        remote, self.dead_remote = self.dead_remote, False
        return dead, remote

    def set_limits(self, limits: Limits) -> None:
        self.limits = limits
        self.alloc.size = limits.maglev_slots

    # ------------------------------------------------------------------ whole passes

    def plan(self, services: Iterable[Service], *, delete: Iterable[ServiceKey] = ()) -> dict[ServiceKey, Exception]:
        """Delete ``delete``, upsert ``services``; returns the services that cannot be
        programmed, with why (one failing service does not stop the others). The writes are
        in ``self.changes``."""
        errors: dict[ServiceKey, Exception] = {}
        for key in delete:
            self.delete(key)
        for svc in services:
            try:
                self.upsert(svc)
            except Exception as exc:  # noqa: BLE001 - reported per service
                errors[svc.key] = exc
        return errors

    # ------------------------------------------------------------------ one service

    def upsert(self, svc: Service, atomic: bool = False) -> ServiceChange:
        """Record the writes that make the maps program ``svc`` (only what differs)."""
        if svc.stateless and svc.mode is Mode.SNAT and any(not b.local for b in svc.backends):
            raise ValueError(f"service {svc.key}: stateless needs mode DSR or local backends only "
                             "(SNAT keeps per-flow port state)")
        key = svc.key
        old = self.programmed.get(key)
        created = old is None
        self._check_fits(svc, old)
        svc_id = old.svc_id if old else self._alloc_svc_id(key)
        new_ids: list[int] = []     # backends this call creates: deactivated again if it fails
        try:
            # 1. backends first, so every id a slot will name is programmed before the slot
            ids = []
            for b in svc.backends:
                known = (b.addr, b.port) in self.backend_ids
                ids.append(self._program_backend(b, key))
                if not known:
                    new_ids.append(ids[-1])
            selectable = svc.selectable_backends()
            id_of = dict(zip(map(id, svc.backends), ids))
            sel_ids = [id_of[id(b)] for b in selectable]
            table = self._id_table(selectable, sel_ids, svc.maglev_m)
            in_place = old is not None and old.table_cap == svc.maglev_m and not atomic
            new_off = None if in_place else self.alloc.alloc(svc.maglev_m, key)
        except Exception:
            # nothing of this service is programmed: no id, no backend only it would have used
            if created:
                self.free_svc_ids.append(svc_id)
            for bid in new_ids:
                if bid not in self.backend_refs:   # no flow can name it yet: no sweep needed
                    val = self.backend_vals.pop(bid)
                    self.backend_ids.pop((val[0], val[1]), None)
                    self.changes.put(Phase.CLEANUP, _BACKENDS, bytes(self.layouts.key(_BACKENDS)(bid)),
                                     bytes(self.layouts.leaf(_BACKENDS)()))
            raise

        flags = ((_SVC_LOCAL_ONLY if svc.traffic_policy_local else 0) | (_SVC_DSR if svc.mode is Mode.DSR else 0)
                 | (_SVC_AFFINITY if svc.affinity_timeout else 0)
                 | (_SVC_SOURCE_RANGES if svc.source_ranges else 0) | (_SVC_STATELESS if svc.stateless else 0))

        # 2. membership before any slot names a new backend; a backend that leaves is removed
        #    now and announced by the generation bump in the frontend entry (step 4): flows
        #    whose conntrack entry names it re-balance even when another service still uses it
        members = self.shared_set(frozenset(ids))
        old_members = old.members if old else _EMPTY
        self._write_members(svc_id, members - old_members, present=True)
        self._write_members(svc_id, old_members - members, present=False)
        self.member_count += len(members) - len(old_members)
        gen = (old.backend_gen if old else 0) + (1 if old_members - members else 0)
        gen &= 0xFFFFFFFF

        # 2b. source ranges before the flag that enforces them
        old_ranges = old.ranges if old else _EMPTY
        new_ranges = self.shared_set(frozenset(svc.source_ranges)) if svc.source_ranges else _EMPTY
        self._write_ranges(svc_id, new_ranges - old_ranges, present=True)

        # 3. table: delta in place, or fill a fresh range and swap
        swapped = False
        if in_place:
            off, cap = old.table_off, old.table_cap
            if len(old.table) != len(table):   # emptied / refilled within the same range
                self.changes.slots(_MAGLEV, off, table)
                written = len(table)
            elif old.table == table:   # the usual case of a pass: nothing to write (a C compare)
                written = 0
            else:
                delta = [(off + s, v) for s, (u, v) in enumerate(zip(old.table, table)) if u != v]
                self.changes.slot_items(_MAGLEV, delta)
                written = len(delta)
        else:
            cap, off = svc.maglev_m, new_off
            self.changes.slots(_MAGLEV, off, table)
            written = len(table)
            swapped = old is not None

        # 4. the frontend entry (one atomic update: flags, table pointer)
        table_size = len(table)
        service_written = (created or swapped or old.flags != flags or old.affinity_timeout != svc.affinity_timeout
                           or (len(old.table) == 0) != (table_size == 0) or old.backend_gen != gen)
        if service_written:
            self._write_service(key, svc_id, flags, off, table_size, cap, svc.affinity_timeout, gen)
        if created:
            self._wildcard_ref(key, +1)
        if old and swapped:
            self.alloc.free(old.table_off)

        # 5. clean-ups after the switch
        self._write_ranges(svc_id, old_ranges - new_ranges, present=False)
        refs = members   # the table names only listed backends
        # array('I'): 4 bytes a slot, not a list's 8 (20,000 tables of 251 slots: 20 MB less);
        # the same array the changes hold for the write (never modified in place)
        self.programmed[key] = Programmed(svc_id, flags, off, cap, table, svc.affinity_timeout,
                                          new_ranges, svc, refs, members, gen)
        self._ref_backends(refs, +1)
        if old:
            self._ref_backends(old.refs, -1)
        self._index_members(key, old_members, members)
        return ServiceChange(created, written, swapped, service_written)

    def delete(self, key: ServiceKey) -> bool:
        """Record the removal of a frontend; False when it is not programmed."""
        old = self.programmed.pop(key, None)
        if old is None:
            return False
        self.changes.delete(Phase.CLEANUP, _SERVICES, self._svc_key(key.vip, key.port, key.proto))
        self._wildcard_ref(key, -1)
        self._write_members(old.svc_id, old.members, present=False)
        self.member_count -= len(old.members)
        self._index_members(key, old.members, frozenset())
        self._write_ranges(old.svc_id, old.ranges, present=False)
        self.alloc.free(old.table_off)
        self.free_svc_ids.append(old.svc_id)
        self._ref_backends(old.refs, -1)
        return True

    # ------------------------------------------------------------------ adoption

    def adopt_service(self, key: ServiceKey, p: Programmed) -> None:
        """Take a frontend read back from the maps (``Datapath._adopt``) into the view."""
        self.programmed[key] = p
        self.member_count += len(p.members)
        self._ref_backends(p.refs, +1)
        for bid in p.members:
            self.backend_svcs.setdefault(bid, set()).add(key)
        self.alloc.reserve(p.table_off, p.table_cap)

    def adopt_backend(self, bid: int, addr: IPAddress, port: int, flags: int) -> None:
        self.backend_ids[(addr, port)] = bid
        self.backend_vals[bid] = (addr, port, flags)
        self.next_backend_id = max(self.next_backend_id, bid + 1)

    def adopt_done(self, wildcards: Iterable[tuple[int, IPAddress]], revnat_svc: Mapping[int, int]) -> None:
        """After the services: count wildcard references (removing wildcards no service uses),
        restore designations (``revnat_svc``: backend id -> service id) and the free service ids."""
        counts = {wk: 0 for wk in wildcards}
        for key in self.programmed:
            wk = (key.family, key.vip)
            counts[wk] = counts.get(wk, 0) + 1
        for wk, n in counts.items():
            if n == 0:   # a leftover wildcard without services
                self._write_wildcard(wk, present=False)
        self.wildcards = {wk: n for wk, n in counts.items() if n}
        key_of_id = {p.svc_id: k for k, p in self.programmed.items()}
        for bid, sid in revnat_svc.items():
            if sid in key_of_id and bid in self.backend_vals:
                self.revnat[bid] = key_of_id[sid]
        if key_of_id:
            self.next_svc_id = max(key_of_id) + 1
            self.free_svc_ids = sorted(set(range(1, self.next_svc_id)) - set(key_of_id), reverse=True)

    # ------------------------------------------------------------------ internals

    def _check_fits(self, svc: Service, old: Programmed | None) -> None:
        """Refuse, naming the service, a service whose memberships would overflow svc_backends
        (counted here so the failure is this service's, not a refused batch's)."""
        limit = self.limits.max_memberships
        in_use = self.member_count
        after = in_use - (len(old.members) if old else 0) + len(svc.backends)
        if after > limit:
            raise CapacityError("memberships", f"service {svc.key}: service memberships map full "
                                f"({limit}): {len(svc.backends)} backends do not fit beside {in_use} in use")

    def shared_set(self, ids: frozenset) -> frozenset:
        """``ids``, or an equal set kept earlier: 20,000 frontends over a few pods hold a few
        sets, not 20,000 (~200 bytes each, several per frontend)."""
        if len(self._sets) >= TABLE_CACHE_SIZE:
            self._sets.clear()
        return self._sets.setdefault(ids, ids)

    def _id_table(self, selectable: Sequence[Backend], sel_ids: list[int], m: int) -> array:
        """The Maglev table of backend ids (``array("I")``, M slots; empty without backends).
        Services with the same backends share one array (never modified in place): 20,000
        one-backend Services over 50 pods hold 50 tables, not 20,000 (~20 MB)."""
        if len(sel_ids) == 1:   # every slot names the only backend: no names, no permutation
            self.maglev_builds += 1
            key = (sel_ids[0], m)
        else:
            key = (tuple((b.name, b.weight) for b in selectable), m, tuple(sel_ids))
        table = self._id_tables.get(key)
        if table is None:
            if len(self._id_tables) >= TABLE_CACHE_SIZE:
                self._id_tables.clear()
            if len(sel_ids) == 1:
                table = array("I", sel_ids) * m
            else:
                table = array("I", map(sel_ids.__getitem__, self._build_table(list(key[0]), m)))
            self._id_tables[key] = table
        return table

    def _build_table(self, backends: list[tuple[str, int]], m: int) -> Sequence[int]:
        if self._table_builder is None:
            from agent.lb.maglev import build_table
            self._table_builder = build_table
        if not backends:
            return []
        if len(backends) == 1:   # every slot names the only backend (no permutation needed)
            self.maglev_builds += 1
            return (0,) * m
        # Services often share a backend set (one Deployment behind several Services, or many
        # single-backend Services): the table is a pure function of (backends, M), so build it
        # once. At 20,000 Services this is ~2.5 s of start-up.
        key = (tuple(backends), m)
        table = self._tables.get(key)
        if table is None:
            if len(self._tables) >= TABLE_CACHE_SIZE:
                self._tables.clear()
            table = self._tables[key] = tuple(self._table_builder(backends, m))
            self.maglev_builds += 1
        return table

    def _alloc_svc_id(self, key: ServiceKey) -> int:
        if self.free_svc_ids:
            return self.free_svc_ids.pop()
        if self.next_svc_id >= self.limits.max_services:
            raise CapacityError("services", f"service {key}: too many services "
                                f"(max {self.limits.max_services - 1})")
        self.next_svc_id += 1
        return self.next_svc_id - 1

    def _program_backend(self, b: Backend, key: ServiceKey) -> int:
        ident = (b.addr, b.port)
        bid = self.backend_ids.get(ident)
        if b.id is not None:
            if bid is not None and bid != b.id:
                raise DatapathError(f"service {key}: backend {b.name} already has id {bid}, asked for {b.id}")
            other = self.backend_vals.get(b.id)
            if other and (other[0], other[1]) != ident:
                raise DatapathError(f"service {key}: backend id {b.id} is taken by "
                                    f"{backend_name(other[0], other[1])}")
            bid = b.id
        if bid is None:
            bid = self.next_backend_id
            while bid in self.backend_vals:
                bid += 1
            if bid >= self.limits.max_backends:
                # ids are handed out in order; after a wrap, reuse the lowest free one
                bid = next((i for i in range(1, self.limits.max_backends) if i not in self.backend_vals), None)
                if bid is None:
                    raise CapacityError("backends", f"service {key}: too many backends "
                                        f"(max {self.limits.max_backends - 1})")
            self.next_backend_id = bid + 1
        flags = (_BE_ACTIVE | (_BE_LOCAL if b.local else 0)        # plain ints: IntFlag
                 | (_BE_TERMINATING if b.terminating else 0))     # arithmetic is slow
        if self.backend_vals.get(bid) != (b.addr, b.port, flags):
            self.backend_vals[bid] = (b.addr, b.port, flags)
            self._write_backend(bid)
        self.backend_ids[ident] = bid
        return bid

    def _ref_backends(self, ids: Iterable[int], delta: int) -> None:
        """Count services per backend; one that no service uses any more is deactivated in the
        map (flags 0), so its conntrack entries re-balance instead of reaching a stale address."""
        for bid in ids:
            n = self.backend_refs.get(bid, 0) + delta
            if n > 0:
                self.backend_refs[bid] = n
                continue
            self.backend_refs.pop(bid, None)
            if bid in self.revnat:
                self._set_revnat(bid, None)
            val = self.backend_vals.pop(bid, None)
            if val is not None:
                self.backend_ids.pop((val[0], val[1]), None)
                self.changes.put(Phase.CLEANUP, _BACKENDS, bytes(self.layouts.key(_BACKENDS)(bid)),
                                 bytes(self.layouts.leaf(_BACKENDS)()))
                self.dead_backends[bid] = (val[0], val[1])
                if not val[2] & _BE_LOCAL:   # only remote backends have SNAT ports
                    self.dead_remote = True

    def _write_backend(self, bid: int, into: MapChanges | None = None) -> None:
        addr, port, flags = self.backend_vals[bid]
        leaf = self.layouts.leaf(_BACKENDS)()
        for i, w in enumerate(words(addr)):
            leaf.addr[i] = w
        leaf.port = htons(port)
        leaf.family = addr.version
        leaf.flags = flags
        rk = self.revnat.get(bid)
        leaf.revnat_svc = self.programmed[rk].svc_id if rk is not None else 0
        (self.changes if into is None else into).put(Phase.BACKENDS, _BACKENDS, bytes(self.layouts.key(_BACKENDS)(bid)), bytes(leaf))

    def _write_members(self, svc_id: int, bids: Iterable[int], present: bool) -> None:
        if not bids:
            return
        Key = self.layouts.key(_MEMBERS)
        st = self.layouts.member_key_st
        one = bytes(ctypes.c_uint32(1))
        for bid in bids:
            if st is not None:
                kb = st.pack(svc_id, bid)
            else:
                k = Key()
                k.svc_id, k.backend_id = svc_id, bid
                kb = bytes(k)
            if present:
                self.changes.put(Phase.MEMBERS, _MEMBERS, kb, one)
            else:
                self.changes.delete(Phase.MEMBERS, _MEMBERS, kb)

    def _index_members(self, key: ServiceKey, old: frozenset, new: frozenset) -> None:
        """Keep backend -> services current and re-designate the backends whose set changed."""
        for bid in old - new:
            svcs = self.backend_svcs.get(bid)
            if svcs is not None:
                svcs.discard(key)
                if not svcs:
                    del self.backend_svcs[bid]
        for bid in new - old:
            self.backend_svcs.setdefault(bid, set()).add(key)
        for bid in old | new:
            self._designate(bid)

    def _designate(self, bid: int) -> None:
        """Pick the service whose flows on local backend ``bid`` XDP creates without a REPLY
        conntrack entry (tc derives their reply rewrite from revnat[backend] and the flow's
        SERVICE entry). A designation stays while its service lists the backend, so its
        existing flows keep being derivable; flows of other services get REPLY entries."""
        val = self.backend_vals.get(bid)
        cur = self.revnat.get(bid)
        svcs = self.backend_svcs.get(bid, ())

        def eligible(k):
            p = self.programmed.get(k)
            return p is not None and k in svcs and not p.flags & _SVC_STATELESS

        if val is None or not val[2] & _BE_LOCAL or not self.limits.derive_local_replies:
            want = None
        elif cur is not None and cur in self.programmed and cur in svcs:
            want = cur     # even if it became stateless: its existing flows stay derivable
        else:
            want = min((k for k in svcs if eligible(k)), key=str, default=None)
        if want != cur:
            self._set_revnat(bid, want)

    def _set_revnat(self, bid: int, key: ServiceKey | None) -> None:
        """Move a backend's designation. Order: XDP stops skipping REPLY entries (backend
        entry) before tc's revnat entry changes, and a new revnat entry exists before XDP
        starts skipping them for the new service."""
        addr, port, _ = self.backend_vals.get(bid, (None, None, None))
        cur = self.revnat.pop(bid, None)
        if cur is not None and addr is not None:
            # XDP must stop skipping REPLY entries for the old service before its revnat entry
            # changes; in one batch that entry is overwritten in the REVNAT phase (a move) or
            # deleted in CLEANUP next to a deactivation of this backend (which would replace
            # a BACKENDS-phase write of it): so this write goes before the whole batch
            self._write_backend(bid, self.first)
            self._write_backend(bid)
            self.changes.delete(Phase.CLEANUP, _REVNAT, self._revnat_key(addr, port, cur.proto))
        if key is None or addr is None:
            return
        p = self.programmed[key]
        v = self.layouts.leaf(_REVNAT)()
        for i, w in enumerate(words(key.vip)):
            v.vip[i] = w
        v.vport, v.svc_id, v.backend_id = htons(key.port), p.svc_id, bid
        self.changes.put(Phase.REVNAT, _REVNAT, self._revnat_key(addr, port, key.proto), bytes(v))
        self.revnat[bid] = key
        self._write_backend(bid)

    def _revnat_key(self, addr: IPAddress, port: int, proto: int) -> bytes:
        return self._addr_key(_REVNAT, addr, port, proto)   # struct svc_key, as the frontends

    def _svc_key(self, vip: IPAddress, port: int, proto: int) -> bytes:
        return self._addr_key(_SERVICES, vip, port, proto)

    def _addr_key(self, map_name: str, addr: IPAddress, port: int, proto: int) -> bytes:
        st = self.layouts.addr_key_st.get(map_name)
        if st is not None:
            return st.pack(*words(addr), htons(port), int(proto), addr.version)
        k = self.layouts.key(map_name)()
        for i, w in enumerate(words(addr)):
            k.addr[i] = w
        k.port = htons(port)
        k.proto = int(proto)
        k.family = addr.version
        return bytes(k)

    def _write_service(self, key: ServiceKey, svc_id, flags, off, size, cap, affinity_timeout, gen) -> None:
        st = self.layouts.svc_val_st
        if st is not None:
            self.changes.put(Phase.FRONTENDS, _SERVICES, self._svc_key(key.vip, key.port, key.proto),
                             st.pack(svc_id, int(flags), off, size, affinity_timeout, cap, gen))
            return
        v = self.layouts.leaf(_SERVICES)()
        v.id, v.flags, v.table_off, v.table_size = svc_id, int(flags), off, size
        v.affinity_timeout, v.table_cap, v.backend_gen = affinity_timeout, cap, gen
        self.changes.put(Phase.FRONTENDS, _SERVICES, self._svc_key(key.vip, key.port, key.proto), bytes(v))

    def _wildcard_ref(self, key: ServiceKey, delta: int) -> None:
        wk = (key.family, key.vip)
        n = self.wildcards.get(wk, 0) + delta
        if n > 0 and wk not in self.wildcards:
            self._write_wildcard(wk, present=True)
        if n <= 0:
            self.wildcards.pop(wk, None)
            self._write_wildcard(wk, present=False)
        else:
            self.wildcards[wk] = n

    def _write_wildcard(self, wk, present: bool) -> None:
        k = self._svc_key(wk[1], 0, 0)
        if present:
            v = self.layouts.leaf(_SERVICES)()
            v.flags = int(SvcFlag.WILDCARD)
            self.changes.put(Phase.FRONTENDS, _SERVICES, k, bytes(v))
        else:
            self.changes.delete(Phase.CLEANUP, _SERVICES, k)

    def _write_ranges(self, svc_id: int, nets: Iterable[IPNetwork], present: bool) -> None:
        Key = self.layouts.key(_RANGES)
        one = bytes(ctypes.c_uint8(1))
        for net in nets:
            k = Key()
            k.prefixlen = 32 + net.prefixlen
            k.svc_id = svc_id
            for i, w in enumerate(words(net.network_address)):
                k.addr[i] = w
            if present:
                self.changes.put(Phase.MEMBERS, _RANGES, bytes(k), one)
            else:
                self.changes.delete(Phase.CLEANUP, _RANGES, bytes(k))
