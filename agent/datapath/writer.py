"""The thin map writer: applies :class:`~agent.datapath.changes.MapChanges` with batched bpf(2)
calls (BPF_MAP_UPDATE_BATCH / BPF_MAP_DELETE_BATCH, Linux >= 5.6; one call per 64k entries),
falling back to one call per entry where a map type has no batch operations.

Maglev slots go straight into the mmap'ed array (``MapTable.u32_window``; the map is declared
BPF_F_MMAPABLE; a few MiB of it mapped at a time): one strided copy per table, in the SLOTS phase, so still after the backends and
memberships and before the frontend entries that point at them (those are bpf(2) calls, which
order the stores before them). Each 4-byte slot store is atomic, so a slot updated in place
names either its old or its new backend. A pin from before the flag is written by syscalls."""

from __future__ import annotations

import ctypes
import errno
import os
from array import array

from agent.datapath import bpfsys
from agent.datapath.changes import MapChanges

__all__ = ["WriteError", "apply"]

CHUNK = 1 << 16
_NO_BATCH = (errno.EINVAL, errno.EOPNOTSUPP, 524)   # 524: ENOTSUPP (kernel-internal)


class WriteError(OSError):
    """A map refused a write: ``map`` names it, ``errno`` says why (E2BIG / ENOSPC: full)."""

    def __init__(self, map_name: str, err: int, op: str):
        super().__init__(err, f"{op} in map {map_name} failed: {os.strerror(err)}")
        self.map = map_name

    @property
    def full(self) -> bool:
        return self.errno in (errno.E2BIG, errno.ENOSPC, errno.ENOMEM)


def _buffer(items):
    """A ctypes buffer over keys or values: an ``array`` as is, a list of bytes joined."""
    if isinstance(items, array):
        return (ctypes.c_char * max(1, len(items) * items.itemsize)).from_buffer(items)
    data = b"".join(items)
    return ctypes.create_string_buffer(data, max(1, len(data)))


def apply(changes: MapChanges, tables: dict) -> int:
    """Write ``changes`` into ``tables`` (name -> MapTable); returns the entries written or
    deleted. Raises :class:`WriteError` at the first refused write (earlier runs stay written)."""
    done_total = 0
    window = tables[changes.slots_map].u32_window() if changes.slots_map else None
    try:
        for b in changes.batches(slots=window is None):
            if b.op == "slots":
                done_total += _copy_slots(window, changes)
                window.close()   # unmapped before the frontend entries: nothing else needs it
                continue
            done_total += _write_batch(tables[b.map], b)
    finally:
        if window is not None:
            window.close()
    return done_total


def _write_batch(tbl, b) -> int:
    done_total = 0
    for i in range(0, len(b.keys), CHUNK):
        keys = b.keys[i:i + CHUNK]
        n = len(keys)
        if b.op == "update":
            vals = b.values[i:i + CHUNK]
            kbuf, vbuf = _buffer(keys), _buffer(vals)
            done, rc = bpfsys.update_batch(tbl.map_fd, kbuf, vbuf, n)
            if rc and -rc in _NO_BATCH and done == 0:
                _one_by_one(tbl, b.map, keys, vals)
            elif rc:
                raise WriteError(b.map, -rc, "update")
        else:
            _delete(tbl, b.map, keys)
        done_total += n
    return done_total


def _copy_slots(window, changes: MapChanges) -> int:
    """The recorded Maglev slots into the mapped array: a run as one slice copy."""
    n = 0
    for first, values in changes.slot_runs():
        if isinstance(first, int):
            window.write(first, values)
        else:
            window.write_items(first, values)
        n += len(values)
    return n


def _one_by_one(tbl, name: str, keys, vals) -> None:
    ks = ctypes.sizeof(tbl.Key)
    vs = ctypes.sizeof(tbl.Leaf)
    kraw = bytes(_buffer(keys))
    vraw = bytes(_buffer(vals))
    for j in range(len(keys)):
        k = ctypes.create_string_buffer(kraw[j * ks:(j + 1) * ks], ks)
        v = ctypes.create_string_buffer(vraw[j * vs:(j + 1) * vs], vs)
        try:
            bpfsys.update(tbl.map_fd, k, v)
        except OSError as exc:
            raise WriteError(name, exc.errno, "update") from exc


def _delete(tbl, name: str, keys: list[bytes]) -> None:
    """Delete ``keys``; absent ones are skipped (DELETE_BATCH stops at the first of them)."""
    start = 0
    while start < len(keys):
        part = keys[start:]
        done, rc = bpfsys.delete_batch(tbl.map_fd, _buffer(part), len(part))
        if rc == 0:
            return
        if -rc in _NO_BATCH and done == 0:
            for k in part:
                kb = ctypes.create_string_buffer(k, len(k))
                try:
                    bpfsys.delete(tbl.map_fd, kb)
                except OSError as exc:
                    raise WriteError(name, exc.errno, "delete") from exc
            return
        if -rc != errno.ENOENT:
            raise WriteError(name, -rc, "delete")
        start += done + 1   # skip the absent key
