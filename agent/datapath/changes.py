"""Map changes as data: what a batch of service upserts writes, in an order that keeps the
datapath consistent, for :func:`apply` to write with one BPF_MAP_*_BATCH syscall per run.

Pure (keys and values are bytes, no kernel): ``Datapath`` records into a :class:`MapChanges`
while it programs many services (``Datapath.upsert_services``) instead of writing entry by
entry, and :func:`apply` (the thin writer) does the syscalls.

Why the order is safe: each service's writes have a required order (a backend before a slot
names it, memberships and slots before the frontend entry that points at them, removed
memberships before the generation bump that announces them, clean-ups after the switch).
Writes of *all* services are grouped by :class:`Phase`, in that same order, so every
"A before B" of one service still holds. A key written twice in one batch keeps only its
last write (and moves to that write's phase): what the maps end with is what programming the
services one by one would have left.
"""

from __future__ import annotations

import enum
from array import array
from typing import Iterator, Sequence

__all__ = ["Phase", "MapChanges", "Batch", "SLOT_CHUNK"]

SLOT_CHUNK = 1 << 16   # Maglev slots per BPF_MAP_UPDATE_BATCH


class Phase(enum.IntEnum):
    REVNAT = 0       # reverse-NAT entries a designation will point at
    BACKENDS = 1     # backend entries (new, changed; designations)
    MEMBERS = 2      # memberships added and removed, source ranges added
    SLOTS = 3        # Maglev slots (a table is filled before its frontend points at it)
    FRONTENDS = 4    # frontend entries and wildcards: the switch
    CLEANUP = 5      # deleted frontends, old ranges, old reverse-NAT entries, deactivated backends


class Batch:
    """One run for the writer: ``op`` ("update" | "delete") of ``keys`` (and ``values``) in ``map``."""

    __slots__ = ("map", "op", "keys", "values")

    def __init__(self, map_name: str, op: str, keys: list, values: list | None):
        self.map, self.op, self.keys, self.values = map_name, op, keys, values

    def __repr__(self) -> str:
        return f"Batch({self.map!r}, {self.op!r}, {len(self.keys)} keys)"


class MapChanges:
    """Recorded map writes (see module doc)."""

    def __init__(self):
        # (phase, map) -> {key: value (bytes) or None (delete)}, insertion-ordered
        self._writes: dict[tuple[Phase, str], dict[bytes, bytes | None]] = {}
        self._phase_of: dict[tuple[str, bytes], Phase] = {}
        self._slots: list[tuple[int | array, array]] = []   # (first index or indices, values), in order
        self.pending_slots = 0                           # slots in _slots
        self.slots_map: str | None = None

    def __len__(self) -> int:
        return sum(len(w) for w in self._writes.values()) + self.pending_slots


    def take_through(self, last: Phase) -> "MapChanges":
        """Move the writes of phases up to ``last`` into a new MapChanges (to be applied now):
        a long batch writes its Maglev slots as it goes instead of holding millions of them.
        Safe because everything left here belongs to a later phase, and a key written again
        afterwards is a later write."""
        out = MapChanges()
        for (phase, map_name) in [w for w in self._writes if w[0] <= last]:
            writes = self._writes.pop((phase, map_name))
            out._writes[(phase, map_name)] = writes
            for key in writes:
                del self._phase_of[(map_name, key)]
                out._phase_of[(map_name, key)] = phase
        if last >= Phase.SLOTS:
            out._slots, out.slots_map, self._slots = self._slots, self.slots_map, []
            out.pending_slots, self.pending_slots = self.pending_slots, 0
        return out

    def put(self, phase: Phase, map_name: str, key: bytes, value: bytes | None) -> None:
        """Record an update (``value`` bytes) or a delete (``value`` None) of ``key``."""
        where = (map_name, key)
        prev = self._phase_of.get(where)
        if prev is not None and prev != phase:
            del self._writes[(prev, map_name)][key]
        self._writes.setdefault((phase, map_name), {})[key] = value
        self._phase_of[where] = phase

    def delete(self, phase: Phase, map_name: str, key: bytes) -> None:
        self.put(phase, map_name, key, None)

    def slots(self, map_name: str, first: int, values: Sequence[int]) -> None:
        """Maglev slots ``first``, ``first + 1``, ... get ``values`` (u32 array map). An
        ``array("I")`` is kept as is (not copied): the caller must not change it afterwards."""
        if not values:
            return
        self.slots_map = map_name
        self._slots.append((first, values if isinstance(values, array) and values.typecode == "I"
                            else array("I", values)))
        self.pending_slots += len(values)

    def slot_items(self, map_name: str, items: Sequence[tuple[int, int]]) -> None:
        """Scattered slots: (index, value) pairs."""
        if not items:
            return
        self.slots_map = map_name
        self._slots.append((array("I", [k for k, _ in items]), array("I", [v for _, v in items])))
        self.pending_slots += len(items)

    def slot_runs(self) -> Iterator[tuple[int | array, array]]:
        """The recorded slots in write order: (first index, values) for a contiguous run,
        (indices, values) for scattered slots (a writer with the map mmap'ed copies runs as
        they are)."""
        return iter(self._slots)

    def _slot_batches(self, chunk: int = SLOT_CHUNK) -> Iterator[Batch]:
        """The recorded slots as key/value runs of about ``chunk`` (not one copy of all of them)."""
        keys, vals = array("I"), array("I")
        for k, v in self._slots:
            keys.extend(range(k, k + len(v)) if isinstance(k, int) else k)
            vals.extend(v)
            if len(keys) >= chunk:
                yield Batch(self.slots_map, "update", keys, vals)
                keys, vals = array("I"), array("I")
        if keys:
            yield Batch(self.slots_map, "update", keys, vals)

    def batches(self, *, slots: bool = True) -> Iterator[Batch]:
        """The runs in write order: by phase; within a phase by map, updates before deletes.
        ``slots=False``: without the Maglev slots (the caller writes them itself, through
        :meth:`slot_runs`, when the SLOTS phase comes: see writer.apply)."""
        for phase in Phase:
            if phase is Phase.SLOTS:
                if slots:
                    yield from self._slot_batches()
                else:
                    yield _SLOTS_HERE
            for (ph, map_name), writes in self._writes.items():
                if ph != phase or not writes:
                    continue
                ups = [(k, v) for k, v in writes.items() if v is not None]
                dels = [k for k, v in writes.items() if v is None]
                if ups:
                    yield Batch(map_name, "update", [k for k, _ in ups], [v for _, v in ups])
                if dels:
                    yield Batch(map_name, "delete", dels, None)


_SLOTS_HERE = Batch("", "slots", [], None)   # batches(slots=False): where the slots go
