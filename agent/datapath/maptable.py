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

__all__ = ["decode_type", "MapSpec", "MapTable", "U32Window", "BPF_F_MMAPABLE"]

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
        self._mmapable: bool | None = None   # BPF_F_MMAPABLE u32 array (checked once)

    def u32_window(self) -> "U32Window | None":
        """The array's u32 elements through an mmap of the map (:class:`U32Window`), or None
        when the map is not an mmap-able u32 array (BPF_F_MMAPABLE; a pin created before the
        flag). Stores through it are plain memory writes the programs see at once: 4-byte
        aligned, so each element changes atomically. Close it after use."""
        if self._mmapable is None and self.map_fd >= 0:
            self._mmapable = bool(self.is_array and not self.percpu and ct.sizeof(self.Key) == 4
                                  and ct.sizeof(self.sLeaf) == 4
                                  and bpfsys.map_info(self.map_fd).map_flags & BPF_F_MMAPABLE)
        return U32Window(self.map_fd, self.max_entries) if self._mmapable else None

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
        if self.map_fd >= 0:
            os.close(self.map_fd)
            self.map_fd = -1


class U32Window:
    """Reads and writes the u32 elements of an mmap-able BPF array through a mapping of a few
    MiB at a time, moved along as needed.

    Why not map the whole array once: the kernel populates every page of a BPF array mapping
    at mmap time (remap_vmalloc_range), and those pages count in the agent's RSS. The Maglev
    array at 20,000 Services holds 7.5 M slots, 8 bytes apart (elem_size = round_up(4, 8)):
    60 MB of the agent's peak RSS for a mapping used for a moment."""

    ELEM = 8                    # kernel/bpf/arraymap.c: elements are spaced round_up(value_size, 8)
    WINDOW = 1 << 19            # elements mapped at a time (4 MiB)

    def __init__(self, fd: int, max_entries: int):
        self.fd, self.max_entries = fd, max_entries
        self._mm: mmap.mmap | None = None
        self._u: memoryview | None = None     # the window's elements as u32 (strided)
        self._lo = self._hi = 0               # element range mapped

    def __enter__(self) -> "U32Window":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _cover(self, first: int, end: int) -> memoryview:
        """The mapping moved (if needed) so it covers elements [first, end)."""
        if self._u is None or not (self._lo <= first and end <= self._hi):
            if not 0 <= first <= end <= self.max_entries:
                raise IndexError(f"elements {first}..{end} outside the array (0..{self.max_entries})")
            self.close()
            per_page = mmap.PAGESIZE // self.ELEM
            lo = first - first % per_page
            hi = min(self.max_entries, max(end, lo + self.WINDOW))
            length = -(-(hi - lo) * self.ELEM // mmap.PAGESIZE) * mmap.PAGESIZE
            self._mm = mmap.mmap(self.fd, length, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE,
                                 offset=lo * self.ELEM)
            with memoryview(self._mm) as raw:
                self._u = raw.cast("I")[::self.ELEM // 4]
            self._lo, self._hi = lo, hi
        return self._u

    def write(self, first: int, values) -> None:
        """Elements ``first``, ``first + 1``, ... = ``values`` (an ``array("I")``): strided
        copies in C, at most one window each."""
        n = len(values)
        for i in range(0, n, self.WINDOW):
            part = values if n <= self.WINDOW else values[i:i + self.WINDOW]
            at = first + i
            u = self._cover(at, at + len(part))
            u[at - self._lo:at - self._lo + len(part)] = part

    def write_items(self, indices, values) -> None:
        """Scattered elements: ``indices[j]`` = ``values[j]``."""
        for i, v in zip(indices, values):
            u = self._cover(i, i + 1)
            u[i - self._lo] = v

    def read(self, first: int, count: int) -> bytes:
        """Elements [first, first + count) as packed u32 bytes."""
        out = []
        for at in range(first, first + count, self.WINDOW):
            n = min(self.WINDOW, first + count - at)
            u = self._cover(at, at + n)
            out.append(u[at - self._lo:at - self._lo + n].tobytes())
        return out[0] if len(out) == 1 else b"".join(out)

    def close(self) -> None:
        if self._u is not None:
            self._u.release()
            self._u = None
        if self._mm is not None:
            self._mm.close()
            self._mm = None


def _copy(typ, item):
    """A copy of one element of a ctypes array (scalars come out as Python ints)."""
    return typ(item) if isinstance(item, (int, float, bytes)) else typ.from_buffer_copy(item)
