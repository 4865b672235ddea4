"""Compile the BPF programs in a short-lived child process, so bcc never lives in the agent;
load them (from that compile or from the program cache) in the agent with raw bpf(2).

bcc links LLVM and clang (~240 MB of RSS once loaded). The agent starts loading as early as it
can — ``vipd run`` does so before it parses the configuration — with :func:`start_loading`:

* a **cache hit** (agent/datapath/objcache.py: the same sources, flags, bcc and kernel were
  compiled before) needs no child, no bcc and no clang at all;
* a **miss** starts the child, which compiles right away, while the agent is busy elsewhere.
  Map sizes come from the configuration, which the child does not wait for: it compiles with
  *placeholder* sizes (distinct primes, the sized maps pinned in a scratch directory), hands
  back what the compile produced (:class:`~agent.datapath.objcache.CompiledPrograms`: each
  program's instructions with the map fds blanked, which ``ld_imm64`` refers to which map, each
  map's declaration and bcc's description of its key and value types) and exits. The agent
  stores that in the cache.

Either way the agent then does the same thing (:func:`load_programs`): it opens each pinned map
(or creates and pins it; the sized ones at the planned size), creates the unpinned ones, writes
the map fds into the instructions and calls BPF_PROG_LOAD. Which map is sized by which define,
and by what factor, is learnt from the placeholders (``services_v2`` has 2 x ``MAX_SERVICES``
entries): there is no table of maps here, so a map added in bpf/include/maps.h needs no change.

Parent side: :func:`start_loading` then ``finish``. Child side: ``python -m agent.datapath.child FD``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import struct
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from agent.datapath.objcache import CompiledPrograms, MapDecl, ProgramCache, ProgramCode, cache_key
from agent.log import get_logger

__all__ = ["start_loading", "PendingLoad", "LoaderChild", "Loaded", "Program", "LoaderError", "SIZE_DEFINES",
           "load_programs", "program_key"]

log = get_logger("datapath")

# The defines that size maps (bpf/include/consts.h); their placeholders are distinct primes so
# each sized map's entries reveal one define and a small factor.
SIZE_DEFINES = {"MAX_SERVICES": 1031, "MAX_BACKENDS": 1033, "MAX_MEMBERS": 1039, "MAGLEV_SLOTS": 1049}
# Defines that never reach the code: where maps are pinned (bcc reads them, the code does not)
PIN_DEFINES = ("PIN_DIR", "SIZED_PIN_DIR")
SCRATCH_PREFIX = "compile-"          # <pin dir>/compile-<pid>: placeholder sized maps
_MAX_MSG = 1 << 16

# (agent name, file, function, prog type, flags); prog types: XDP 6, SCHED_CLS 3
BPF_PROG_TYPE_SCHED_CLS, BPF_PROG_TYPE_XDP = 3, 6
BPF_F_XDP_HAS_FRAGS = 1 << 5
PROGRAMS = (
    # multi-buffer aware (BPF_F_XDP_HAS_FRAGS): veth refuses MTUs above ~3.5k otherwise
    ("xdp", "xdp_lb.c", "xdp_lb", BPF_PROG_TYPE_XDP, BPF_F_XDP_HAS_FRAGS),
    ("tc-egress", "tc_lb.c", "tc_egress", BPF_PROG_TYPE_SCHED_CLS, 0),
    ("tc-ingress", "tc_lb.c", "tc_ingress", BPF_PROG_TYPE_SCHED_CLS, 0),
    ("clock-probe", "xdp_lb.c", "clock_probe", BPF_PROG_TYPE_XDP, 0),
)
CLOCK_PROBE = "clock-probe"   # returns jiffies (the agent measures the kernel's HZ with it)
MAIN_SOURCE = "xdp_lb.c"   # the maps the agent reads are those of this program's module


class LoaderError(RuntimeError):
    """Compiling or loading the programs failed; the message says what and where."""


@dataclass
class Program:
    name: str              # function name (tc filters show it)
    fd: int
    verified_insns: int | None

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


@dataclass
class Loaded:
    """Loaded programs and maps: maps by name (MapTable) and programs by agent name."""

    tables: dict
    programs: dict
    sized: dict            # map name -> (define, factor)
    compile_s: float       # the compile's time (0 on a cache hit; it overlaps the agent's work)
    load_s: float          # finish request -> programs loaded (what the agent waited)
    child_peak_rss_mb: float = 0.0
    from_cache: bool = False
    cache_key: str = ""
    clock_start: tuple[int, float] | None = None   # (jiffies, monotonic s) read as the clock probe loaded

    def close(self) -> None:
        for t in self.tables.values():
            t.close()
        for p in self.programs.values():
            p.close()


# ------------------------------------------------------------------------------ instructions

_LD_IMM64 = 0x18
_PSEUDO_MAP_FD, _PSEUDO_MAP_VALUE = 1, 2
_INSN = struct.Struct("<BBhi")


def map_references(code: bytes) -> list[tuple[int, int]]:
    """(instruction index, fd) of every map reference: ``ld_imm64`` of a map fd or map value."""
    out, i = [], 0
    while i + 16 <= len(code):
        op, regs, _, imm = _INSN.unpack_from(code, i)
        if op == _LD_IMM64:
            if (regs >> 4) in (_PSEUDO_MAP_FD, _PSEUDO_MAP_VALUE):
                out.append((i // 8, imm))
            i += 16
        else:
            i += 8
    return out


def patch_map_fds(code: bytes, fds: dict[int, int]) -> bytes:
    """``code`` with the map fd of the ``ld_imm64`` at each instruction index replaced."""
    out = bytearray(code)
    for index, fd in fds.items():
        op, regs, off, _ = _INSN.unpack_from(out, index * 8)
        _INSN.pack_into(out, index * 8, op, regs, off, fd)
    return bytes(out)


# ------------------------------------------------------------------------------ parent side

def _package_root() -> str:
    return str(Path(__file__).resolve().parents[2])


def compile_defines(defines: dict[str, object]) -> dict[str, object]:
    """The defines that reach the compiled code as themselves: neither pin paths nor sizes
    (those are placeholders)."""
    return {k: v for k, v in defines.items() if k not in PIN_DEFINES and k not in SIZE_DEFINES}


def program_key(defines: dict[str, object], bpf_dir: Path | None = None) -> str:
    """The cache key of what compiling the programs with ``defines`` would produce."""
    from agent.datapath.loader import BASE_CFLAGS, BPF_DIR, bundle, include_dirs
    bpf_dir = Path(bpf_dir or BPF_DIR)
    sources = {s: bundle(bpf_dir / s, include_dirs=include_dirs(bpf_dir)) for s in {p[1] for p in PROGRAMS}}
    return cache_key(sources, compile_defines(defines), BASE_CFLAGS, PROGRAMS)


class LoaderChild:
    """One compiling child (a cache miss): :meth:`compiled` waits for what it produced."""

    spawned = 0   # children started by this process (tests check a hit starts none)

    def __init__(self, defines: dict[str, object], key: str, bpf_dir: Path | None = None):
        from agent.datapath.loader import BPF_DIR
        self.defines = dict(defines)
        self._sock, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (_package_root(), env.get("PYTHONPATH")) if p)
        self.proc = subprocess.Popen([sys.executable, "-m", "agent.datapath.child", str(theirs.fileno())],
                                     pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL, env=env)
        LoaderChild.spawned += 1
        theirs.close()
        self.started = time.monotonic()
        self.peak_rss_mb = 0.0
        self._sock.send(json.dumps({"defines": self.defines, "key": key,
                                    "bpf_dir": str(bpf_dir or BPF_DIR)}).encode())

    def compiled(self) -> CompiledPrograms:
        """Wait for the compile; the child exits afterwards."""
        try:
            msg, fds, _, _ = socket.recv_fds(self._sock, _MAX_MSG, 1)
        except OSError as exc:
            self.kill()
            raise LoaderError(f"the BPF loader child failed: {exc}") from exc
        finally:
            self._sock.close()
        # reap it ourselves for its peak RSS (bcc + LLVM live there, for these seconds only)
        _, status, usage = os.wait4(self.proc.pid, 0)
        rc = self.proc.returncode = os.waitstatus_to_exitcode(status)
        self.peak_rss_mb = usage.ru_maxrss / 1024
        try:
            if not msg:
                raise LoaderError(f"the BPF loader child exited with status {rc} without an answer "
                                  "(its error is on stderr above)")
            reply = json.loads(msg)
            if "error" in reply:
                raise LoaderError(reply["error"])
            with os.fdopen(fds.pop(), "rb") as f:   # a memfd: the entry is too big for one message
                return CompiledPrograms.from_bytes(f.read(), "the loader child's compile")
        finally:
            for fd in fds:
                os.close(fd)

    def kill(self) -> None:
        """Stop the child (the agent gave up on it); its scratch pins go with the next child."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        try:
            self._sock.close()
        except OSError:
            pass


class PendingLoad:
    """Programs on their way: read from the cache (``hit``) or being compiled by ``child``."""

    def __init__(self, defines: dict[str, object], *, cache: ProgramCache | None = None,
                 bpf_dir: Path | None = None):
        self.defines = dict(defines)
        self.cache = cache
        self.bpf_dir = bpf_dir
        self.key = program_key(defines, bpf_dir)
        self.hit = cache.get(self.key) if cache is not None else None
        self.child = None if self.hit is not None else LoaderChild(defines, self.key, bpf_dir)

    @property
    def from_cache(self) -> bool:
        return self.hit is not None

    def finish(self, sized_pin_dir: Path, sizes: dict[str, int]) -> Loaded:
        """Load the programs with the sized maps (``SIZE_DEFINES`` keys -> entries) under
        ``sized_pin_dir``. A cached entry the kernel refuses is dropped and compiled again."""
        t0 = time.monotonic()
        pin_dir = Path(str(self.defines["PIN_DIR"]))
        if self.hit is not None:
            try:
                loaded = load_programs(self.hit, pin_dir, sized_pin_dir, sizes)
            except LoaderError as exc:
                log.warning("bpf programs from the cache did not load; compiling them again",
                            cache_key=self.key, entry=str(self.cache.path(self.key)), error=str(exc)[:2000])
                self.cache.discard(self.key)
                self.hit, self.child = None, LoaderChild(self.defines, self.key, self.bpf_dir)
            else:
                loaded.from_cache, loaded.cache_key, loaded.compile_s = True, self.key, 0.0
                loaded.load_s = time.monotonic() - t0
                log.info("bpf programs loaded from cache", cache_key=self.key,
                         entry=str(self.cache.path(self.key)), load_s=round(loaded.load_s, 3))
                return loaded
        compiled = self.child.compiled()
        stored = self.cache.put(compiled) if self.cache is not None else None
        loaded = load_programs(compiled, pin_dir, sized_pin_dir, sizes)
        loaded.compile_s, loaded.cache_key = compiled.compile_s, self.key
        loaded.child_peak_rss_mb = self.child.peak_rss_mb
        loaded.load_s = time.monotonic() - t0
        log.info("bpf programs compiled", cache_key=self.key, compile_s=round(compiled.compile_s, 2),
                 stored=str(stored) if stored else None,
                 cache_dir=str(self.cache.directory) if self.cache is not None else None)
        return loaded

    def kill(self) -> None:
        if self.child is not None:
            self.child.kill()


def start_loading(defines: dict[str, object], *, cache: ProgramCache | None = None,
                  bpf_dir: Path | None = None) -> PendingLoad:
    """Start getting the programs for ``defines`` (``Features.defines``): from ``cache`` when
    it holds them, else from a compiling child (started now). ``finish`` loads them."""
    return PendingLoad(defines, cache=cache, bpf_dir=bpf_dir)


def _map_fd(decl: MapDecl, pin_dir: Path, sized_pin_dir: Path, sizes: dict[str, int]) -> int:
    """Open ``decl``'s pin, or create the map (and pin it when declared pinned)."""
    from agent.datapath import bpfsys

    path = None
    if decl.pin is not None:
        path = (sized_pin_dir if decl.pin == "SIZED_PIN_DIR" else pin_dir) / decl.name
        if path.exists():
            return bpfsys.obj_get(path)
    entries = decl.sized[1] * int(sizes[decl.sized[0]]) if decl.sized else decl.max_entries
    fd = bpfsys.map_create(decl.map_type, decl.key_size, decl.value_size, entries, decl.map_flags, decl.name)
    if path is not None:
        try:
            bpfsys.obj_pin(fd, path)
        except BaseException:
            os.close(fd)
            raise
    return fd


def load_programs(compiled: CompiledPrograms, pin_dir: Path, sized_pin_dir: Path,
                  sizes: dict[str, int]) -> Loaded:
    """Create or open the maps, write their fds into the programs and load them (BPF_PROG_LOAD):
    the one load path, for a fresh compile and a cache hit alike. Needs no bcc."""
    from agent.datapath import bpfsys
    from agent.datapath.maptable import MapSpec, MapTable

    pinned: dict[str, int] = {}              # pinned maps are shared by every module
    module_fds: dict[str, dict[str, int]] = {}
    opened: list[int] = []
    programs: dict[str, Program] = {}
    tables: dict = {}
    try:
        for source, decls in compiled.maps.items():
            used = {n for p in compiled.programs if p.source == source for _, n in p.relocs}
            fds = module_fds[source] = {}
            for decl in decls:
                if decl.pin is not None and decl.name in pinned:
                    fds[decl.name] = pinned[decl.name]
                elif source == compiled.main_source or decl.name in used or decl.pin is not None:
                    fd = _map_fd(decl, pin_dir, sized_pin_dir, sizes)
                    opened.append(fd)
                    fds[decl.name] = fd
                    if decl.pin is not None:
                        pinned[decl.name] = fd
        codes = []
        for p in compiled.programs:
            fds = module_fds[p.source]
            missing = sorted({n for _, n in p.relocs} - set(fds))
            if missing:
                raise LoaderError(f"program {p.func} ({p.source}) refers to maps {missing} "
                                  "that its module does not declare")
            codes.append((p, patch_map_fds(p.insns, {i: fds[n] for i, n in p.relocs})))
        loaded_programs, clock_start = _load_all(codes)
        programs.update(loaded_programs)
        for decl in compiled.maps[compiled.main_source]:
            fd = module_fds[compiled.main_source][decl.name]
            spec = MapSpec(name=decl.name, map_type=decl.map_type,
                           max_entries=int(bpfsys.map_info(fd).max_entries),
                           key_desc=decl.key_desc, leaf_desc=decl.leaf_desc,
                           declared_entries=None if decl.sized else decl.max_entries)
            tables[decl.name] = MapTable(os.dup(fd), spec)
    except BaseException as exc:
        for obj in (*programs.values(), *tables.values()):
            obj.close()
        if isinstance(exc, bpfsys.BpfError):
            raise LoaderError(f"loading the BPF programs failed: {exc}") from exc
        raise
    finally:
        for fd in opened:   # the programs hold their maps; the agent holds the tables' dups
            os.close(fd)
    sized = {d.name: d.sized for d in compiled.maps[compiled.main_source] if d.sized}
    return Loaded(tables, programs, sized, compiled.compile_s, 0.0, clock_start=clock_start)


def _load_all(codes: list) -> tuple[dict[str, Program], tuple[int, float] | None]:
    """BPF_PROG_LOAD of every (ProgramCode, patched instructions), in parallel threads: the
    kernel's verifier (~0.7 s for the four at 20,000 Services' start-up, mostly xdp_lb) runs
    outside the GIL, so the programs verify side by side on as many CPUs. All loaded, or none
    (the first failure in program order is raised). Also -> (jiffies, monotonic time) read
    through the clock probe right after it loaded (``Loaded.clock_start``)."""
    from concurrent.futures import ThreadPoolExecutor

    from agent.datapath.loader import load_insns

    clock: list = []

    def one(item):
        p, code = item
        fd, insns = load_insns(code, p.func, p.prog_type, prog_flags=p.prog_flags, license=p.license)
        if p.agent_name == CLOCK_PROBE:   # loads at once: the HZ measurement runs from here
            from agent.datapath.testrun import test_run
            clock.append((test_run(fd, bytes(64)).retval, time.monotonic()))
        return fd, insns

    workers = max(1, min(len(codes), os.cpu_count() or 1))
    # the biggest first: the last one to finish bounds the wall time
    order = sorted(codes, key=lambda item: -len(item[1]))
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="bpf-prog-load") as pool:
        futures = {item[0].agent_name: pool.submit(one, item) for item in order}
    out, error = {}, None
    for p, _ in codes:
        try:
            fd, insns = futures[p.agent_name].result()
        except Exception as exc:  # noqa: BLE001 - every fd closed below, then raised
            if error is None:
                error = LoaderError(f"loading the BPF programs failed: {exc}") if isinstance(exc, RuntimeError) else exc
            continue
        out[p.agent_name] = Program(p.func, fd, insns)
    if error is not None:
        for prog in out.values():
            prog.close()
        raise error
    return out, (clock[0] if clock else None)


# ------------------------------------------------------------------------------ child side

def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_stale_scratch(pin_dir: Path) -> None:
    """Scratch directories of loader children that died before cleaning up."""
    if not pin_dir.is_dir():
        return
    for d in pin_dir.glob(SCRATCH_PREFIX + "*"):
        pid = d.name[len(SCRATCH_PREFIX):]
        if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
            shutil.rmtree(d, ignore_errors=True)


_PINNED_DECL = re.compile(r"\bBPF_TABLE_PINNED\s*\(")
_C_COMMENT = re.compile(r"/\*.*?\*/|//[^\n]*", re.S)


def _sized_define(name: str, n: int) -> tuple[str, int]:
    found = [(d, n // p) for d, p in SIZE_DEFINES.items() if n % p == 0 and n // p <= 64]
    if len(found) != 1:
        raise LoaderError(f"map {name} (pinned at SIZED_PIN_DIR) has {n} entries: not one of "
                          f"{sorted(SIZE_DEFINES)} times a small factor")
    return found[0]


def compile_programs(defines: dict[str, object], key: str, bpf_dir: Path) -> CompiledPrograms:
    """Compile every module of PROGRAMS with placeholder sizes (bcc: ~240 MB, seconds) and
    describe the result. bcc opens (or creates) the maps pinned under PIN_DIR as it always
    did; the placeholder sized maps live in a scratch directory removed before returning."""
    import ctypes

    from agent.datapath import bpfsys
    from agent.datapath.loader import compile_program, ensure_bpffs, import_bcc, include_dirs, bundle

    t0 = time.monotonic()
    import_bcc()
    from bcc.libbcc import lib
    lib.bpf_num_tables.restype, lib.bpf_num_tables.argtypes = ctypes.c_size_t, [ctypes.c_void_p]
    lib.bpf_table_name.restype = ctypes.c_char_p
    lib.bpf_table_name.argtypes = [ctypes.c_void_p, ctypes.c_ulonglong]
    lib.bpf_table_flags_id.restype = ctypes.c_int
    lib.bpf_table_flags_id.argtypes = [ctypes.c_void_p, ctypes.c_ulonglong]
    lib.bpf_module_license.restype = ctypes.c_char_p
    lib.bpf_module_license.argtypes = [ctypes.c_void_p]
    pin_dir = Path(str(defines["PIN_DIR"]))
    ensure_bpffs(pin_dir)
    pin_dir.mkdir(parents=True, exist_ok=True)
    _remove_stale_scratch(pin_dir)
    scratch = pin_dir / f"{SCRATCH_PREFIX}{os.getpid()}"
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir()
    try:
        d = {**defines, **SIZE_DEFINES, "SIZED_PIN_DIR": str(scratch)}
        modules, texts = {}, {}
        for _, source, *_ in PROGRAMS:
            if source not in modules:
                texts[source] = bundle(bpf_dir / source, include_dirs=include_dirs(bpf_dir))
                modules[source] = compile_program(texts[source], d)

        def pin_id(path: Path) -> int | None:
            if not path.exists():
                return None
            fd = bpfsys.obj_get(path)
            try:
                return bpfsys.map_info(fd).id
            finally:
                os.close(fd)

        maps, fd_names = {}, {}
        for source, b in modules.items():
            decls, names = [], {}
            for i in range(lib.bpf_num_tables(b.module)):
                name = lib.bpf_table_name(b.module, i).decode()
                tid = lib.bpf_table_id(b.module, name.encode())
                fd = int(lib.bpf_table_fd_id(b.module, tid))
                names[fd] = name
                own = bpfsys.map_info(fd).id
                pin = sized = None
                if pin_id(scratch / name) == own:
                    pin, sized = "SIZED_PIN_DIR", _sized_define(name, int(lib.bpf_table_max_entries_id(b.module, tid)))
                elif pin_id(pin_dir / name) == own:
                    pin = "PIN_DIR"
                decls.append(MapDecl(
                    name=name, map_type=int(lib.bpf_table_type_id(b.module, tid)),
                    key_size=int(lib.bpf_table_key_size_id(b.module, tid)),
                    value_size=int(lib.bpf_table_leaf_size_id(b.module, tid)),
                    max_entries=int(lib.bpf_table_max_entries_id(b.module, tid)),
                    map_flags=int(lib.bpf_table_flags_id(b.module, tid)), pin=pin, sized=sized,
                    key_desc=json.loads(lib.bpf_table_key_desc(b.module, name.encode()).decode()),
                    leaf_desc=json.loads(lib.bpf_table_leaf_desc(b.module, name.encode()).decode())))
            # a pin under another file name than the map's would be missed above: losing state
            declared = len(_PINNED_DECL.findall(_C_COMMENT.sub("", texts[source])))
            found = sum(1 for m in decls if m.pin)
            if declared != found:
                raise LoaderError(f"{source}: {declared} BPF_TABLE_PINNED declarations but {found} maps found "
                                  "pinned under PIN_DIR or SIZED_PIN_DIR by their own name; a pinned map's "
                                  "file name must be its map name")
            maps[source], fd_names[source] = tuple(decls), names
        programs = []
        for agent, source, func, prog_type, flags in PROGRAMS:
            b = modules[source]
            code = b.dump_func(func.encode())
            relocs = []
            for index, fd in map_references(code):
                if fd not in fd_names[source]:
                    raise LoaderError(f"{func} ({source}): instruction {index} refers to map fd {fd}, "
                                      "which is none of its module's maps")
                relocs.append((index, fd_names[source][fd]))
            programs.append(ProgramCode(
                agent_name=agent, func=func, source=source, prog_type=prog_type, prog_flags=flags,
                license=(lib.bpf_module_license(b.module) or b"GPL").decode(),
                insns=patch_map_fds(code, {i: 0 for i, _ in relocs}), relocs=tuple(relocs)))
        return CompiledPrograms(key, MAIN_SOURCE, maps, tuple(programs), time.monotonic() - t0)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def main(argv: list[str]) -> int:
    sock = socket.socket(fileno=int(argv[0]))
    msg = sock.recv(_MAX_MSG)
    if not msg:
        return 0
    req = json.loads(msg)
    try:
        compiled = compile_programs(req["defines"], req["key"], Path(req["bpf_dir"]))
    except Exception as exc:  # noqa: BLE001 - reported to the agent, which names it to the user
        # one datagram: keep the end of a long compiler message (the error is last)
        sock.send(json.dumps({"error": f"compiling the BPF programs failed: {str(exc)[-16000:]}"}).encode())
        return 1
    fd = os.memfd_create("vipd-bpf-programs")
    try:
        data = memoryview(compiled.to_bytes())
        while data:
            data = data[os.write(fd, data):]
        os.lseek(fd, 0, os.SEEK_SET)
        socket.send_fds(sock, [json.dumps({"ok": True}).encode()], [fd])
    except OSError:
        return 0   # the agent went away or gave up
    finally:
        os.close(fd)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
