"""A pinned BPF map as the agent sees it: an fd plus key and value types built from data.

The loader child (agent/datapath/child.py) sends, per map, bcc's own JSON descriptions of the
key and value types (what bcc derived from bpf/include/structs.h) together with the map fd;
:func:`decode_type` turns them into ctypes types exactly as bcc would, so struct layouts are
declared once, in C. :class:`MapTable` offers the small part of bcc's table API the agent
uses (``Key``, ``Leaf``, ``sLeaf``, ``map_fd``, ``max_entries``, item get/set/delete,
``items()``) on raw syscalls (agent/datapath/bpfsys.py).
"""

from __future__ import annotations

import ctypes as ct
import mmap
import os
from dataclasses import dataclass

from agent.datapath import bpfsys

__all__ = ["decode_type", "MapSpec", "MapTable", "BPF_F_MMAPABLE"]

BPF_F_MMAPABLE = 1 << 10   # include/uapi/linux/bpf.h: an array map user space may mmap

_SCALARS = {
    "_Bool": ct.c_bool, "char": ct.c_char, "wchar_t": ct.c_wchar, "unsigned char": ct.c_ubyte,
    "short": ct.c_short, "unsigned short": ct.c_ushort, "int": ct.c_int, "unsigned int": ct.c_uint,
    "long": ct.c_long, "unsigned long": ct.c_ulong, "long long": ct.c_longlong,
    "unsigned long long": ct.c_ulonglong, "float": ct.c_float, "double": ct.c_double,
    "long double": ct.c_longdouble, "__int128": ct.c_int64 * 2, "unsigned __int128": ct.c_uint64 * 2,
}


def decode_type(desc):
    """bcc's table type description (JSON) -> a ctypes type (the rules of bcc's
    ``BPF._decode_table_type``, so layouts equal what bcc itself would use)."""
    if isinstance(desc, str):
        return _SCALARS[desc]
    anon: list[str] = []
    fields: list[tuple] = []
    for t in desc[1]:
        if len(t) == 2:
            fields.append((t[0], decode_type(t[1])))
        elif len(t) == 3 and isinstance(t[2], list):
            fields.append((t[0], decode_type(t[1]) * t[2][0]))
        elif len(t) == 3 and isinstance(t[2], int):
            fields.append((t[0], decode_type(t[1]), t[2]))
        elif len(t) == 3 and t[2] in ("union", "struct", "struct_packed"):
            name = t[0] or f"__anon{len(anon)}"
            if not t[0]:
                anon.append(name)
            fields.append((name, decode_type(t)))
        else:
            raise ValueError(f"cannot decode bcc type description {t!r}")
    kind = desc[2] if len(desc) > 2 else "struct"
    base = ct.Union if kind == "union" else ct.Structure
    attrs: dict = {"_anonymous_": anon, "_fields_": fields}
    if kind == "struct_packed":
        attrs["_pack_"] = 1
    return type(str(desc[0]), (base,), attrs)


@dataclass(frozen=True)
class MapSpec:
    """What the child reports about one map (JSON-able): name, kernel type, entries, and bcc's
    key/value type descriptions."""

    name: str
    map_type: int
    max_entries: int
    key_desc: object
    leaf_desc: object
    declared_entries: int | None = None   # what the C declares (None: sized by the capacity plan)


class MapTable:
    """One map: ``fd`` owned by this object (closed by :meth:`close`)."""

    def __init__(self, fd: int, spec: MapSpec):
        self.map_fd = fd
        self.name = spec.name
        self.map_type = spec.map_type
        self.max_entries = spec.max_entries
        self.declared_entries = spec.declared_entries
        self.Key = decode_type(spec.key_desc)
        self.sLeaf = decode_type(spec.leaf_desc)
        self.percpu = spec.map_type in bpfsys.PERCPU_TYPES
        self.is_array = spec.map_type in bpfsys.ARRAY_TYPES
        if self.percpu:
            n = len(bpfsys.possible_cpus())
            if ct.sizeof(self.sLeaf) % 8 == 0:
                self.Leaf = self.sLeaf * n
            elif self.sLeaf in (ct.c_uint, ct.c_int):   # the kernel pads each CPU's value to 8 bytes
                self.Leaf = (ct.c_uint64 if self.sLeaf is ct.c_uint else ct.c_int64) * n
            else:   # as bcc: such a map cannot be read from Python (only BPF uses it)
                self.Leaf = None
        else:
            self.Leaf = self.sLeaf
        self._mmap: mmap.mmap | None = None
        self._view: memoryview | None = None

    def u32_view(self) -> memoryview | None:
        """The array's elements as a writable memoryview of u32 (format "I") over an mmap of
        the map, or None when the map is not an mmap-able u32 array (BPF_F_MMAPABLE; a pin
        created before the flag). Stores through it are plain memory writes the programs see
        at once: 4-byte aligned, so each element changes atomically. The kernel spaces array
        elements 8 bytes apart (elem_size = round_up(value_size, 8)): the view is strided, so
        ``view[a:b] = array("I", ...)`` is a C-level strided copy (use ``view[a:b].tobytes()``
        to read a range out). Do not keep slices of it beyond their use (they pin the mapping
        until released)."""
        if self._view is None and self._mmap is None and self.map_fd >= 0:
            ok = (self.is_array and not self.percpu and ct.sizeof(self.Key) == 4 and ct.sizeof(self.sLeaf) == 4
                  and bpfsys.map_info(self.map_fd).map_flags & BPF_F_MMAPABLE)
            if not ok:
                self._mmap = False   # checked: not mmap-able
                return None
            elem = 8   # kernel/bpf/arraymap.c: round_up(value_size, 8)
            length = -(-self.max_entries * elem // mmap.PAGESIZE) * mmap.PAGESIZE
            self._mmap = mmap.mmap(self.map_fd, length, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
            self._view = memoryview(self._mmap).cast("I")[::elem // 4][:self.max_entries]
        return self._view or None

    def _key(self, key):
        return self.Key(key) if isinstance(key, int) else key

    def __getitem__(self, key):
        leaf = self.Leaf()
        if not bpfsys.lookup(self.map_fd, self._key(key), leaf):
            raise KeyError(key)
        return leaf

    def get(self, key, default=None):
        try:
            return self[key]
        except KeyError:
            return default

    def __setitem__(self, key, leaf) -> None:
        bpfsys.update(self.map_fd, self._key(key), leaf)

    def __delitem__(self, key) -> None:
        key = self._key(key)
        if self.is_array:   # array elements cannot be deleted: zero them, as bcc does
            bpfsys.update(self.map_fd, key, self.Leaf())
        elif not bpfsys.delete(self.map_fd, key):
            raise KeyError(key)

    def keys(self):
        out, cur = [], None
        while True:
            nxt = self.Key()
            if not bpfsys.next_key(self.map_fd, cur, nxt):
                return out
            out.append(nxt)
            cur = nxt

    def __len__(self) -> int:
        """Entries (arrays: their size, as bcc)."""
        return self.max_entries if self.is_array else len(self.keys())

    def __iter__(self):
        return iter(self.keys())

    def __contains__(self, key) -> bool:
        return bpfsys.lookup(self.map_fd, self._key(key), self.Leaf())

    def clear(self) -> None:
        """Delete every element (arrays: zero every element)."""
        if self.is_array:
            for i in range(self.max_entries):
                del self[i]
            return
        for k in self.keys():
            bpfsys.delete(self.map_fd, k)

    def items(self):
        """(key, value) of every element (elements deleted meanwhile are skipped)."""
        out = []
        for k in self.keys():
            v = self.Leaf()
            if bpfsys.lookup(self.map_fd, k, v):
                out.append((k, v))
        return out

    def items_lookup_batch(self, chunk: int = 4096):
        """(key, value) of every element by BPF_MAP_LOOKUP_BATCH (copies, safe to keep)."""
        keys, vals = (self.Key * chunk)(), (self.Leaf * chunk)()
        tin, tout = ct.c_uint32(0), ct.c_uint32(0)
        first = True
        while True:
            n, rc = bpfsys.lookup_batch(self.map_fd, None if first else tin, tout, keys, vals, chunk)
            if rc not in (0, -2):
                raise bpfsys.BpfError(-rc, f"reading map {self.name}: {os.strerror(-rc)}")
            for i in range(n):
                yield _copy(self.Key, keys[i]), _copy(self.Leaf, vals[i])
            if rc:
                return
            tin.value, first = tout.value, False

    def close(self) -> None:
        if self._view is not None:
            self._view.release()
            self._view = None
        if self._mmap:
            try:
                self._mmap.close()
            except BufferError:   # a caller still holds a slice: the mapping goes with it
                pass
        self._mmap = None
        if self.map_fd >= 0:
            os.close(self.map_fd)
            self.map_fd = -1


def _copy(typ, item):
    """A copy of one element of a ctypes array (scalars come out as Python ints)."""
    return typ(item) if isinstance(item, (int, float, bytes)) else typ.from_buffer_copy(item)
