"""Compile and load the BPF programs in a short-lived child process, so bcc never lives in the agent.

bcc links LLVM and clang (~240 MB of RSS once loaded). The agent starts this child as early as
it can — ``vipd run`` does so before it parses the configuration — and the child compiles
right away, while the agent is busy elsewhere. Map sizes come from the configuration, which
the child does not wait for: it compiles with *placeholder* sizes (distinct primes, the sized
maps pinned in a scratch directory), and when the agent sends the real sizes it creates the
sized maps (or opens the existing pins), rewrites the map fds in the programs' instructions
(``ld_imm64`` with ``BPF_PSEUDO_MAP_FD``) and only then loads the programs (BPF_PROG_LOAD).
Which map is sized by which define, and by what factor, is learnt from the placeholders
(``services_v2`` has 2 x ``MAX_SERVICES`` entries): the loader needs no table of maps, so a
map added in bpf/include/maps.h is handled without a change here.

The child hands back over a socketpair (SCM_RIGHTS) the program and map fds plus, as JSON,
each map's kernel type, size and bcc's description of its key and value types (from which
agent/datapath/maptable.py builds ctypes types). Then it exits.

Parent side: :class:`LoaderChild` (``start`` then ``finish``). Child side: ``python -m
agent.datapath.child FD``.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import struct
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

__all__ = ["LoaderChild", "Loaded", "Program", "LoaderError", "SIZE_DEFINES"]

# The defines that size maps (bpf/include/consts.h); their placeholders are distinct primes so
# each sized map's entries reveal one define and a small factor.
SIZE_DEFINES = {"MAX_SERVICES": 1031, "MAX_BACKENDS": 1033, "MAX_MEMBERS": 1039, "MAGLEV_SLOTS": 1049}
SCRATCH_PREFIX = "compile-"          # <pin dir>/compile-<pid>: placeholder sized maps
_MAX_MSG = 1 << 20
_MAX_FDS = 128

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
MAIN_SOURCE = "xdp_lb.c"   # the maps the agent reads are those of this program's module


class LoaderError(RuntimeError):
    """The child could not compile or load the programs; the message is the child's."""


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
    """What one child produced: maps by name (MapTable) and programs by agent name."""

    tables: dict
    programs: dict
    sized: dict            # map name -> (define, factor)
    compile_s: float       # the child's compile time (it overlaps the agent's work)
    load_s: float          # finish request -> fds received (what the agent waited)
    child_peak_rss_mb: float = 0.0

    def close(self) -> None:
        for t in self.tables.values():
            t.close()
        for p in self.programs.values():
            p.close()


# ------------------------------------------------------------------------------ parent side

def _package_root() -> str:
    return str(Path(__file__).resolve().parents[2])


class LoaderChild:
    """One loader child: compiling from :meth:`start`, loading on :meth:`finish`."""

    def __init__(self, defines: dict[str, object]):
        self.defines = dict(defines)
        self._sock, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (_package_root(), env.get("PYTHONPATH")) if p)
        self.proc = subprocess.Popen([sys.executable, "-m", "agent.datapath.child", str(theirs.fileno())],
                                     pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL, env=env)
        theirs.close()
        self.started = time.monotonic()
        self._sock.send(json.dumps({"defines": self.defines}).encode())

    @classmethod
    def start(cls, defines: dict[str, object]) -> "LoaderChild":
        return cls(defines)

    def finish(self, sized_pin_dir: Path, sizes: dict[str, int]) -> Loaded:
        """Send the real sizes (``SIZE_DEFINES`` keys) and the directory of the sized pins;
        returns the loaded programs and maps. The child exits afterwards."""
        from agent.datapath.maptable import MapSpec, MapTable

        t0 = time.monotonic()
        try:
            self._sock.send(json.dumps({"sized_pin_dir": str(sized_pin_dir), "sizes": sizes}).encode())
            msg, fds, _, _ = socket.recv_fds(self._sock, _MAX_MSG, _MAX_FDS)
        except OSError as exc:
            self.kill()
            raise LoaderError(f"the BPF loader child failed: {exc}") from exc
        finally:
            self._sock.close()
        # reap it ourselves for its peak RSS (bcc + LLVM live there, for these seconds only)
        _, status, usage = os.wait4(self.proc.pid, 0)
        rc = self.proc.returncode = os.waitstatus_to_exitcode(status)
        self.peak_rss_mb = usage.ru_maxrss / 1024
        if not msg:
            raise LoaderError(f"the BPF loader child exited with status {rc} without an answer "
                              "(its error is on stderr above)")
        reply = json.loads(msg)
        if "error" in reply:
            for fd in fds:
                os.close(fd)
            raise LoaderError(reply["error"])
        tables = {}
        for i, spec in enumerate(reply["maps"]):
            tables[spec["name"]] = MapTable(fds[i], MapSpec(**spec))
        base = len(reply["maps"])
        programs = {p["agent_name"]: Program(p["name"], fds[base + i], p["verified_insns"])
                    for i, p in enumerate(reply["programs"])}
        return Loaded(tables, programs, {k: tuple(v) for k, v in reply["sized"].items()},
                      reply["compile_s"], time.monotonic() - t0, self.peak_rss_mb)

    def kill(self) -> None:
        """Stop the child (the agent gave up on it); its scratch pins go with the next child."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        try:
            self._sock.close()
        except OSError:
            pass


# ------------------------------------------------------------------------------ child side

_LD_IMM64 = 0x18
_PSEUDO_MAP_FD, _PSEUDO_MAP_VALUE = 1, 2
_INSN = struct.Struct("<BBhi")


def relocate_map_fds(code: bytes, fd_map: dict[int, int]) -> bytes:
    """``code`` with every map reference (ld_imm64 of a map fd or map value) whose fd is a key
    of ``fd_map`` pointing at the mapped fd instead."""
    out = bytearray(code)
    i = 0
    while i + 16 <= len(out):
        op, regs, off, imm = _INSN.unpack_from(out, i)
        if op == _LD_IMM64:
            if (regs >> 4) in (_PSEUDO_MAP_FD, _PSEUDO_MAP_VALUE) and imm in fd_map:
                _INSN.pack_into(out, i, op, regs, off, fd_map[imm])
            i += 16
        else:
            i += 8
    return bytes(out)


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


class _Prepared:
    """Compiled modules with placeholder sized maps, programs not yet loaded."""

    def __init__(self, defines: dict[str, object]):
        from agent.datapath.loader import BPF_DIR, bundle, compile_program, ensure_bpffs, import_bcc

        t0 = time.monotonic()
        import ctypes

        import_bcc()
        from bcc.libbcc import lib
        lib.bpf_num_tables.restype, lib.bpf_num_tables.argtypes = ctypes.c_size_t, [ctypes.c_void_p]
        lib.bpf_table_name.restype = ctypes.c_char_p
        lib.bpf_table_name.argtypes = [ctypes.c_void_p, ctypes.c_ulonglong]
        self.pin_dir = Path(str(defines["PIN_DIR"]))
        ensure_bpffs(self.pin_dir)
        self.pin_dir.mkdir(parents=True, exist_ok=True)
        _remove_stale_scratch(self.pin_dir)
        self.scratch = self.pin_dir / f"{SCRATCH_PREFIX}{os.getpid()}"
        shutil.rmtree(self.scratch, ignore_errors=True)
        self.scratch.mkdir()
        d = {**defines, **SIZE_DEFINES, "SIZED_PIN_DIR": str(self.scratch)}
        self.modules = {}
        for _, source, *_ in PROGRAMS:
            if source not in self.modules:
                self.modules[source] = compile_program(bundle(BPF_DIR / source), d)
        # per module: fd -> map name, and the JSON-able spec of each map of the main module
        self.fd_names: dict[str, dict[int, str]] = {}
        self.specs: dict[str, dict] = {}
        for source, b in self.modules.items():
            names = {}
            for i in range(lib.bpf_num_tables(b.module)):
                name = lib.bpf_table_name(b.module, i).decode()
                tid = lib.bpf_table_id(b.module, name.encode())
                names[int(lib.bpf_table_fd_id(b.module, tid))] = name
                if source == MAIN_SOURCE:
                    self.specs[name] = {
                        "name": name, "map_type": int(lib.bpf_table_type_id(b.module, tid)),
                        "max_entries": int(lib.bpf_table_max_entries_id(b.module, tid)),
                        "key_desc": json.loads(lib.bpf_table_key_desc(b.module, name.encode()).decode()),
                        "leaf_desc": json.loads(lib.bpf_table_leaf_desc(b.module, name.encode()).decode())}
            self.fd_names[source] = names
        self.sized = self._sized_defines()
        self.code = {agent: self.modules[source].dump_func(func.encode())
                     for agent, source, func, _, _ in PROGRAMS}
        self.compile_s = time.monotonic() - t0

    def _sized_defines(self) -> dict[str, tuple[str, int]]:
        """map name -> (define, factor) for every map bcc pinned in the scratch directory."""
        from agent.datapath import bpfsys
        out = {}
        for entry in sorted(os.listdir(self.scratch)):
            fd = bpfsys.obj_get(self.scratch / entry)
            try:
                n = bpfsys.map_info(fd).max_entries
            finally:
                os.close(fd)
            found = [(d, n // p) for d, p in SIZE_DEFINES.items() if n % p == 0 and n // p <= 64]
            if len(found) != 1:
                raise LoaderError(f"map {entry} (pinned at SIZED_PIN_DIR) has {n} entries: not one of "
                                  f"{sorted(SIZE_DEFINES)} times a small factor")
            out[entry] = found[0]
        return out

    def finish(self, sized_pin_dir: Path, sizes: dict[str, int]) -> tuple[dict, list[int]]:
        from agent.datapath import bpfsys
        from agent.datapath.loader import load_insns

        real: dict[str, int] = {}   # sized map name -> fd of the real map
        for name, (define, factor) in self.sized.items():
            path = sized_pin_dir / name
            if path.exists():
                real[name] = bpfsys.obj_get(path)
                continue
            fd = bpfsys.obj_get(self.scratch / name)
            try:
                info = bpfsys.map_info(fd)
            finally:
                os.close(fd)
            new = bpfsys.map_create(info.type, info.key_size, info.value_size, factor * int(sizes[define]),
                                    info.map_flags, name)
            bpfsys.obj_pin(new, path)
            real[name] = new
        programs, prog_fds = [], []
        for agent, source, func, prog_type, flags in PROGRAMS:
            fd_map = {fd: real[n] for fd, n in self.fd_names[source].items() if n in real}
            fd, insns = load_insns(relocate_map_fds(self.code[agent], fd_map), func, prog_type, prog_flags=flags)
            programs.append({"agent_name": agent, "name": func, "verified_insns": insns})
            prog_fds.append(fd)
        maps, map_fds = [], []
        main = {n: fd for fd, n in self.fd_names[MAIN_SOURCE].items()}
        for name, spec in self.specs.items():
            fd = real.get(name, main[name])
            spec = dict(spec, max_entries=int(bpfsys.map_info(fd).max_entries),
                        declared_entries=None if name in real else spec["max_entries"])
            maps.append(spec)
            map_fds.append(fd)
        shutil.rmtree(self.scratch, ignore_errors=True)
        reply = {"maps": maps, "programs": programs, "sized": self.sized, "compile_s": self.compile_s}
        return reply, map_fds + prog_fds



def _recv_json(sock: socket.socket) -> dict | None:
    msg = sock.recv(_MAX_MSG)
    return json.loads(msg) if msg else None


def main(argv: list[str]) -> int:
    sock = socket.socket(fileno=int(argv[0]))
    prepared = error = None
    req = _recv_json(sock)
    if req is None:
        return 0
    try:
        prepared = _Prepared(req["defines"])
    except Exception as exc:  # noqa: BLE001 - reported to the agent, which names it to the user
        error = f"compiling the BPF programs failed: {exc}"
    fin = _recv_json(sock)
    if fin is None:   # the agent went away or gave up: leave no scratch pins behind
        if prepared is not None:
            shutil.rmtree(prepared.scratch, ignore_errors=True)
        return 0
    if prepared is not None:
        try:
            reply, fds = prepared.finish(Path(fin["sized_pin_dir"]), fin["sizes"])
            socket.send_fds(sock, [json.dumps(reply).encode()], fds)
            return 0
        except Exception as exc:  # noqa: BLE001 - as above
            shutil.rmtree(prepared.scratch, ignore_errors=True)
            error = f"loading the BPF programs failed: {exc}"
    sock.send(json.dumps({"error": error}).encode())
    return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
