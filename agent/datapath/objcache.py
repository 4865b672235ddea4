"""A content-addressed cache of the compiled BPF programs: compile once, load many.

Compiling bpf/xdp_lb.c and bpf/tc_lb.c with bcc costs ~4-5 s of CPU and ~240 MB in a loader
child (agent/datapath/child.py). What a compile produces does not depend on the map sizes
(the child compiles with placeholder sizes) nor on the pin directory (a pin path only names
where a map lives, it is not in the code), so it can be kept: per program its instructions
with the map references blanked plus which instruction refers to which map (the relocations),
and per map its declaration. Loading such an entry is a few bpf(2) calls and needs neither
bcc nor clang (child.py ``load_programs``, the one path for a fresh compile and a hit).

The key is a SHA-256 of everything that decides the instructions: the translation units the
compile reads (bpf/*.c with our headers inlined, loader.bundle), the -D flags that are not
placeholders, the fixed cflags, the program table (function, type, flags), the bcc version
and library, the kernel release and the headers bcc compiles against, and FORMAT_VERSION.
An entry is one file ``<key>.bpfc``: a header line with the format version and the SHA-256
of the body, then the body (JSON). A file that does not verify is a miss with a warning.

Loading bytecode from a file runs it in the kernel, so an entry is used only from a directory
that is not a symlink, is owned by this user (or root) and is writable by nobody else, and
only when the entry file itself passes the same test.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import stat
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from agent.log import get_logger

__all__ = ["ProgramCache", "CompiledPrograms", "MapDecl", "ProgramCode", "cache_key", "FORMAT_VERSION",
           "ENV_VAR", "FROM_ENV", "CacheError", "untrusted"]

log = get_logger("datapath")

FORMAT_VERSION = 1
ENV_VAR = "VIPD_BPF_CACHE_DIR"
DEFAULT_KEEP = 8          # entries kept (the newest used); one per distinct program set
SUFFIX = ".bpfc"
_MAGIC = b"vipd-bpf-cache"
_MAX_ENTRY = 64 << 20     # an entry is ~0.5 MB; anything this big is not ours


FROM_ENV = "from-env"   # Datapath(bpf_cache=...) default: $VIPD_BPF_CACHE_DIR, or no cache when unset


class CacheError(ValueError):
    """A cache entry that does not verify (its file is named in the message)."""


@dataclass(frozen=True)
class MapDecl:
    """One map as the C declares it (bcc's view), enough to create it without bcc."""

    name: str
    map_type: int
    key_size: int
    value_size: int
    max_entries: int           # declared; for a sized map the placeholder (see ``sized``)
    map_flags: int
    pin: str | None            # "PIN_DIR", "SIZED_PIN_DIR" or None (not pinned)
    sized: tuple[str, int] | None   # (size define, factor): max_entries comes from the capacity plan
    key_desc: object           # bcc's JSON type descriptions (agent/datapath/maptable.py)
    leaf_desc: object


@dataclass(frozen=True)
class ProgramCode:
    """One program's instructions with every map reference's fd blanked (``relocs`` says which)."""

    agent_name: str
    func: str
    source: str
    prog_type: int
    prog_flags: int
    license: str
    insns: bytes
    relocs: tuple[tuple[int, str], ...]   # (instruction index of an ld_imm64, map name)


@dataclass(frozen=True)
class CompiledPrograms:
    """What one compile produced: per source module its maps, and the programs."""

    key: str
    main_source: str                       # the module whose maps the agent reads
    maps: dict[str, tuple[MapDecl, ...]]   # source -> its maps, in bcc's order
    programs: tuple[ProgramCode, ...]
    compile_s: float

    def to_bytes(self) -> bytes:
        body = json.dumps({
            "key": self.key, "main_source": self.main_source, "compile_s": self.compile_s,
            "maps": {s: [asdict(m) for m in ms] for s, ms in self.maps.items()},
            "programs": [dict(asdict(p), insns=base64.b64encode(p.insns).decode()) for p in self.programs],
        }, sort_keys=True).encode()
        head = b"%s %d %s\n" % (_MAGIC, FORMAT_VERSION, hashlib.sha256(body).hexdigest().encode())
        return head + body

    @classmethod
    def from_bytes(cls, data: bytes, what: str = "cache entry") -> "CompiledPrograms":
        head, sep, body = data.partition(b"\n")
        parts = head.split(b" ")
        if not sep or len(parts) != 3 or parts[0] != _MAGIC:
            raise CacheError(f"{what}: not a vipd BPF cache entry (bad header)")
        if parts[1] != str(FORMAT_VERSION).encode():
            raise CacheError(f"{what}: format version {parts[1].decode(errors='replace')}, "
                             f"this vipd reads {FORMAT_VERSION}")
        if hashlib.sha256(body).hexdigest().encode() != parts[2]:
            raise CacheError(f"{what}: checksum mismatch (truncated or corrupted)")
        try:
            d = json.loads(body)
            maps = {s: tuple(MapDecl(**dict(m, sized=tuple(m["sized"]) if m["sized"] else None)) for m in ms)
                    for s, ms in d["maps"].items()}
            programs = tuple(ProgramCode(**dict(p, insns=base64.b64decode(p["insns"], validate=True),
                                                relocs=tuple((int(i), str(n)) for i, n in p["relocs"])))
                             for p in d["programs"])
            return cls(d["key"], d["main_source"], maps, programs, float(d["compile_s"]))
        except (ValueError, TypeError, KeyError) as exc:
            raise CacheError(f"{what}: malformed body ({exc})") from exc


# ------------------------------------------------------------------------------ the key

def _file_identity(path: str) -> str:
    """Resolved path, size and mtime (a package upgrade changes them)."""
    try:
        real = os.path.realpath(path)
        st = os.stat(real)
        return f"{real}:{st.st_size}:{st.st_mtime_ns}"
    except OSError:
        return f"{path}:absent"


def toolchain_identity() -> dict[str, str]:
    """bcc and the kernel headers it compiles against, read without importing bcc (which
    would map LLVM into this process)."""
    release = os.uname().release
    bcc_py = "/usr/lib/python3/dist-packages/bcc/version.py"
    try:
        bcc_version = Path(bcc_py).read_text().strip()
    except OSError:
        bcc_version = "unknown"
    return {
        "bcc": bcc_version,
        "libbcc": _file_identity("/usr/lib/x86_64-linux-gnu/libbcc.so.0"),
        "kernel": release,
        "headers": _file_identity(os.environ.get("BCC_KERNEL_SOURCE") or f"/lib/modules/{release}/build"),
    }


def cache_key(sources: dict[str, str], defines: dict[str, object], cflags: list[str],
              programs: tuple) -> str:
    """SHA-256 (hex) of the translation units (source name -> bundled text), the defines that
    reach the compiler as themselves (not placeholders), the fixed cflags, the program table,
    the toolchain and FORMAT_VERSION."""
    h = hashlib.sha256()
    meta = {"format": FORMAT_VERSION, "defines": {k: str(v) for k, v in sorted(defines.items())},
            "cflags": list(cflags), "programs": [list(p) for p in programs], "toolchain": toolchain_identity()}
    h.update(json.dumps(meta, sort_keys=True).encode())
    for name in sorted(sources):
        h.update(b"\0source\0" + name.encode() + b"\0" + hashlib.sha256(sources[name].encode()).digest())
    return h.hexdigest()


# ------------------------------------------------------------------------------ the store

def untrusted(st: os.stat_result) -> str | None:
    """Why a file or directory with this stat may not be trusted (None: it may)."""
    if st.st_uid not in (os.geteuid(), 0):
        return f"owned by uid {st.st_uid}, not by this user ({os.geteuid()}) or root"
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        return f"writable by group or others (mode {stat.S_IMODE(st.st_mode):o})"
    return None


class ProgramCache:
    """Entries under ``directory`` (created 0700 when missing); at most ``keep`` are kept."""

    def __init__(self, directory: str | os.PathLike, keep: int = DEFAULT_KEEP):
        self.directory = Path(directory)
        self.keep = keep

    @classmethod
    def from_env(cls) -> "ProgramCache | None":
        """The cache named by $VIPD_BPF_CACHE_DIR (None when unset or empty: always compile)."""
        d = os.environ.get(ENV_VAR)
        return cls(d) if d else None

    def path(self, key: str) -> Path:
        return self.directory / f"{key}{SUFFIX}"

    def _usable_dir(self, create: bool) -> bool:
        if create and not self.directory.exists():
            try:
                self.directory.mkdir(mode=0o700, parents=True)
            except OSError as exc:
                log.warning("bpf program cache directory cannot be created; compiling without it",
                            cache_dir=str(self.directory), error=str(exc))
                return False
        try:
            st = os.lstat(self.directory)
        except FileNotFoundError:
            return False
        why = "not a directory (or a symlink)" if not stat.S_ISDIR(st.st_mode) else untrusted(st)
        if why:
            log.warning("bpf program cache directory not trusted, not used: loading bytecode from it "
                        "would run whatever someone else put there in the kernel; make it root-owned "
                        "mode 0700 or choose another --bpf-cache-dir",
                        cache_dir=str(self.directory), reason=why)
            return False
        return True

    def get(self, key: str) -> CompiledPrograms | None:
        """The entry for ``key``; None on a miss. An entry that does not verify is a miss with a
        warning (and is removed, so the next compile replaces it)."""
        if not self._usable_dir(create=False):
            return None
        path = self.path(key)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            return None
        except OSError as exc:
            log.warning("bpf program cache entry unreadable; compiling", entry=str(path), error=str(exc))
            return None
        try:
            st = os.fstat(fd)
            why = "not a regular file" if not stat.S_ISREG(st.st_mode) else untrusted(st)
            if why:
                log.warning("bpf program cache entry not trusted, not used; compiling", entry=str(path),
                            reason=why)
                return None
            with os.fdopen(fd, "rb", closefd=False) as f:
                data = f.read(_MAX_ENTRY + 1)
        finally:
            os.close(fd)
        try:
            if len(data) > _MAX_ENTRY:
                raise CacheError(f"{path}: larger than {_MAX_ENTRY} bytes")
            entry = CompiledPrograms.from_bytes(data, str(path))
            if entry.key != key:
                raise CacheError(f"{path}: holds key {entry.key[:16]}..., not its file name's")
        except CacheError as exc:
            log.warning("bpf program cache entry invalid, ignored and removed; compiling", entry=str(path),
                        error=str(exc))
            self.discard(key)
            return None
        try:
            os.utime(path)   # the newest used are the ones kept
        except OSError:
            pass
        return entry

    def put(self, entry: CompiledPrograms) -> Path | None:
        """Store ``entry`` atomically (temporary file + rename), then keep the ``keep`` newest."""
        if not self._usable_dir(create=True):
            return None
        path = self.path(entry.key)
        try:
            fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=SUFFIX, dir=self.directory)
            try:
                with os.fdopen(fd, "wb") as f:
                    f.write(entry.to_bytes())
                    f.flush()
                    os.fsync(f.fileno())
                os.chmod(tmp, 0o600)
                os.rename(tmp, path)
            except BaseException:
                try:
                    os.unlink(tmp)
                except OSError:
                    pass
                raise
        except OSError as exc:
            log.warning("bpf program cache entry not stored", entry=str(path), error=str(exc))
            return None
        self._prune()
        return path

    def discard(self, key: str) -> None:
        try:
            self.path(key).unlink()
        except OSError:
            pass

    def entries(self) -> list[Path]:
        """Entry files, newest used first."""
        found = []
        for p in self.directory.glob(f"*{SUFFIX}"):
            if p.name.startswith("."):
                continue
            try:
                found.append((p.stat().st_mtime_ns, p))
            except OSError:
                pass
        return [p for _, p in sorted(found, reverse=True)]

    def _prune(self) -> None:
        for p in self.entries()[self.keep:]:
            try:
                p.unlink()
            except OSError:
                pass
        cutoff = time.time() - 3600   # temporaries of a writer that died mid-write
        for p in self.directory.glob(f".tmp-*{SUFFIX}"):
            try:
                if p.stat().st_mtime < cutoff:
                    p.unlink()
            except OSError:
                pass
