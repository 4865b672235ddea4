"""The bpf(2) syscall for maps and pinned objects, through ctypes, without bcc.

The agent process never loads bcc (its LLVM alone is ~240 MB of RSS): programs are compiled
and loaded by a short-lived child (agent/datapath/child.py), and everything the agent does
afterwards with maps is one of the few commands here. The ``union bpf_attr`` members used are
declared as ctypes structures (include/uapi/linux/bpf.h); the kernel accepts a shorter attr
than its own and zero-fills the rest.
"""

from __future__ import annotations

import ctypes
import errno
import os
import platform

__all__ = [
    "BpfError", "obj_get", "obj_pin", "map_info", "prog_info_verified_insns", "lookup", "update", "delete",
    "next_key", "lookup_batch", "update_batch", "delete_batch", "map_create", "possible_cpus", "MapInfo",
    "BPF_ANY", "BPF_MAP_TYPE_HASH", "BPF_MAP_TYPE_ARRAY", "BPF_MAP_TYPE_PERCPU_HASH",
    "BPF_MAP_TYPE_PERCPU_ARRAY", "BPF_MAP_TYPE_LRU_HASH", "BPF_MAP_TYPE_LRU_PERCPU_HASH",
    "BPF_MAP_TYPE_LPM_TRIE", "PERCPU_TYPES", "ARRAY_TYPES",
]

_NR_BPF = {"x86_64": 321, "aarch64": 280}.get(platform.machine(), 321)
_libc = ctypes.CDLL(None, use_errno=True)
_syscall = _libc.syscall
_syscall.restype = ctypes.c_long
_syscall.argtypes = [ctypes.c_long, ctypes.c_int, ctypes.c_void_p, ctypes.c_uint]

(BPF_MAP_CREATE, BPF_MAP_LOOKUP_ELEM, BPF_MAP_UPDATE_ELEM, BPF_MAP_DELETE_ELEM,
 BPF_MAP_GET_NEXT_KEY) = 0, 1, 2, 3, 4
BPF_OBJ_PIN, BPF_OBJ_GET, BPF_OBJ_GET_INFO_BY_FD = 6, 7, 15
BPF_MAP_LOOKUP_BATCH, BPF_MAP_UPDATE_BATCH, BPF_MAP_DELETE_BATCH = 24, 26, 27
BPF_ANY = 0

BPF_MAP_TYPE_HASH, BPF_MAP_TYPE_ARRAY = 1, 2
BPF_MAP_TYPE_PERCPU_HASH, BPF_MAP_TYPE_PERCPU_ARRAY = 5, 6
BPF_MAP_TYPE_LRU_HASH, BPF_MAP_TYPE_LRU_PERCPU_HASH, BPF_MAP_TYPE_LPM_TRIE = 9, 10, 11
PERCPU_TYPES = frozenset({BPF_MAP_TYPE_PERCPU_HASH, BPF_MAP_TYPE_PERCPU_ARRAY, BPF_MAP_TYPE_LRU_PERCPU_HASH})
ARRAY_TYPES = frozenset({BPF_MAP_TYPE_ARRAY, BPF_MAP_TYPE_PERCPU_ARRAY})


class BpfError(OSError):
    """A bpf(2) command failed (``errno`` set); the message names the command and object."""


class _ElemAttr(ctypes.Structure):
    _fields_ = [("map_fd", ctypes.c_uint32), ("_pad", ctypes.c_uint32), ("key", ctypes.c_uint64),
                ("value", ctypes.c_uint64), ("flags", ctypes.c_uint64)]


class _BatchAttr(ctypes.Structure):
    _fields_ = [("in_batch", ctypes.c_uint64), ("out_batch", ctypes.c_uint64), ("keys", ctypes.c_uint64),
                ("values", ctypes.c_uint64), ("count", ctypes.c_uint32), ("map_fd", ctypes.c_uint32),
                ("elem_flags", ctypes.c_uint64), ("flags", ctypes.c_uint64)]


class _ObjAttr(ctypes.Structure):
    _fields_ = [("pathname", ctypes.c_uint64), ("bpf_fd", ctypes.c_uint32), ("file_flags", ctypes.c_uint32)]


class _InfoAttr(ctypes.Structure):
    _fields_ = [("bpf_fd", ctypes.c_uint32), ("info_len", ctypes.c_uint32), ("info", ctypes.c_uint64)]


class _CreateAttr(ctypes.Structure):
    _fields_ = [("map_type", ctypes.c_uint32), ("key_size", ctypes.c_uint32), ("value_size", ctypes.c_uint32),
                ("max_entries", ctypes.c_uint32), ("map_flags", ctypes.c_uint32),
                ("inner_map_fd", ctypes.c_uint32), ("numa_node", ctypes.c_uint32),
                ("map_name", ctypes.c_char * 16)]


class MapInfo(ctypes.Structure):
    """The head of struct bpf_map_info."""

    _fields_ = [("type", ctypes.c_uint32), ("id", ctypes.c_uint32), ("key_size", ctypes.c_uint32),
                ("value_size", ctypes.c_uint32), ("max_entries", ctypes.c_uint32),
                ("map_flags", ctypes.c_uint32), ("name", ctypes.c_char * 16), ("_rest", ctypes.c_uint8 * 64)]


def _call(cmd: int, attr: ctypes.Structure) -> int:
    """One bpf(2) call; returns its result, or -errno."""
    rc = _syscall(_NR_BPF, cmd, ctypes.addressof(attr), ctypes.sizeof(attr))
    return rc if rc >= 0 else -ctypes.get_errno()


def _check(rc: int, what: str) -> int:
    if rc < 0:
        raise BpfError(-rc, f"{what}: {os.strerror(-rc)}")
    return rc


def _addr(buf) -> int:
    return 0 if buf is None else ctypes.addressof(buf)


def obj_get(path: str | os.PathLike) -> int:
    """An fd for a pinned map or program (BPF_OBJ_GET)."""
    name = ctypes.create_string_buffer(os.fsencode(path))
    return _check(_call(BPF_OBJ_GET, _ObjAttr(pathname=ctypes.addressof(name))), f"opening pinned object {path}")


def obj_pin(fd: int, path: str | os.PathLike) -> None:
    name = ctypes.create_string_buffer(os.fsencode(path))
    _check(_call(BPF_OBJ_PIN, _ObjAttr(pathname=ctypes.addressof(name), bpf_fd=fd)), f"pinning at {path}")


def map_info(fd: int) -> MapInfo:
    info = MapInfo()
    _check(_call(BPF_OBJ_GET_INFO_BY_FD, _InfoAttr(bpf_fd=fd, info_len=ctypes.sizeof(info),
                                                     info=ctypes.addressof(info))), f"reading info of map fd {fd}")
    return info


# struct bpf_prog_info (Linux >= 5.16): verified_insns is the u32 at offset 216
_PROG_INFO_SIZE, _VERIFIED_INSNS_OFF = 232, 216


def prog_info_verified_insns(fd: int) -> int:
    """The verifier's "processed N insns" of a loaded program (bpf_prog_info.verified_insns)."""
    buf = (ctypes.c_uint8 * _PROG_INFO_SIZE)()
    attr = _InfoAttr(bpf_fd=fd, info_len=_PROG_INFO_SIZE, info=ctypes.addressof(buf))
    _check(_call(BPF_OBJ_GET_INFO_BY_FD, attr), f"reading info of program fd {fd}")
    if attr.info_len < _VERIFIED_INSNS_OFF + 4:
        raise RuntimeError("kernel too old: bpf_prog_info has no verified_insns (Linux >= 5.16)")
    return int.from_bytes(bytes(buf[_VERIFIED_INSNS_OFF:_VERIFIED_INSNS_OFF + 4]), "little")


def map_create(map_type: int, key_size: int, value_size: int, max_entries: int, flags: int = 0,
               name: str = "") -> int:
    attr = _CreateAttr(map_type=map_type, key_size=key_size, value_size=value_size, max_entries=max_entries,
                       map_flags=flags, map_name=name.encode()[:15])
    return _check(_call(BPF_MAP_CREATE, attr), f"creating map {name or '?'}")


def lookup(fd: int, key, value) -> bool:
    """Fill ``value`` (a ctypes object) with the element of ``key``; False when absent."""
    rc = _call(BPF_MAP_LOOKUP_ELEM, _ElemAttr(map_fd=fd, key=_addr(key), value=_addr(value)))
    if rc == -errno.ENOENT:
        return False
    _check(rc, f"looking up an element of map fd {fd}")
    return True


def update(fd: int, key, value, flags: int = BPF_ANY) -> None:
    _check(_call(BPF_MAP_UPDATE_ELEM, _ElemAttr(map_fd=fd, key=_addr(key), value=_addr(value), flags=flags)),
           f"updating an element of map fd {fd}")


def delete(fd: int, key) -> bool:
    """Delete ``key``; False when it was absent."""
    rc = _call(BPF_MAP_DELETE_ELEM, _ElemAttr(map_fd=fd, key=_addr(key)))
    if rc == -errno.ENOENT:
        return False
    _check(rc, f"deleting an element of map fd {fd}")
    return True


def next_key(fd: int, key, next_out) -> bool:
    """BPF_MAP_GET_NEXT_KEY (``key`` None: the first); False at the end."""
    rc = _call(BPF_MAP_GET_NEXT_KEY, _ElemAttr(map_fd=fd, key=_addr(key), value=_addr(next_out)))
    if rc == -errno.ENOENT:
        return False
    _check(rc, f"iterating map fd {fd}")
    return True


def lookup_batch(fd: int, in_batch, out_batch, keys, values, count: int) -> tuple[int, int]:
    """BPF_MAP_LOOKUP_BATCH: (elements read, 0 or -errno); -ENOENT means "that was the last"."""
    attr = _BatchAttr(in_batch=_addr(in_batch), out_batch=_addr(out_batch), keys=_addr(keys),
                      values=_addr(values), count=count, map_fd=fd)
    rc = _call(BPF_MAP_LOOKUP_BATCH, attr)
    return attr.count, min(rc, 0)


def update_batch(fd: int, keys, values, count: int) -> tuple[int, int]:
    """BPF_MAP_UPDATE_BATCH of ``count`` elements: (elements written, 0 or -errno)."""
    attr = _BatchAttr(keys=_addr(keys), values=_addr(values), count=count, map_fd=fd)
    rc = _call(BPF_MAP_UPDATE_BATCH, attr)
    return attr.count, min(rc, 0)


def delete_batch(fd: int, keys, count: int) -> tuple[int, int]:
    """BPF_MAP_DELETE_BATCH: (elements deleted, 0 or -errno); it stops at the first absent key."""
    attr = _BatchAttr(keys=_addr(keys), count=count, map_fd=fd)
    rc = _call(BPF_MAP_DELETE_BATCH, attr)
    return attr.count, min(rc, 0)


def _parse_cpu_list(text: str) -> list[int]:
    out: list[int] = []
    for part in text.strip().split(","):
        if "-" in part:
            a, b = part.split("-")
            out.extend(range(int(a), int(b) + 1))
        elif part:
            out.append(int(part))
    return out


_POSSIBLE: list[int] | None = None


def possible_cpus() -> list[int]:
    """The CPUs a per-CPU map has a value for (/sys/devices/system/cpu/possible)."""
    global _POSSIBLE
    if _POSSIBLE is None:
        with open("/sys/devices/system/cpu/possible") as f:
            _POSSIBLE = _parse_cpu_list(f.read())
    return _POSSIBLE
