"""Compile the C programs in bpf/ with bcc.

bcc rewrites map accesses (``services_v2.lookup(&k)``) only in the *main* source text, not in
included files, so the loader inlines our own ``#include "x.h"`` headers (each once, like
``#pragma once``) into one translation unit before handing it to bcc. System headers
(``<uapi/linux/...>``) are left to bcc and the installed kernel headers.
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path



def _bpf_dir() -> Path:
    """An installed wheel carries the C sources as ``agent/bpf``; a checkout has ``bpf/`` at the top."""
    package = Path(__file__).resolve().parents[1]
    installed = package / "bpf"
    return installed if (installed / "xdp_lb.c").exists() else package.parent / "bpf"


BPF_DIR = _bpf_dir()
INCLUDE_DIR = BPF_DIR / "include"

_INCLUDE = re.compile(r'^\s*#\s*include\s+"([^"]+)"\s*$', re.M)
_PRAGMA_ONCE = re.compile(r"^\s*#\s*pragma\s+once\s*$", re.M)


def import_bcc():
    """Import Debian's bcc (python3-bpfcc) even from a venv without system site packages."""
    try:
        import bcc  # noqa: F401
    except ImportError:
        sys.path.append("/usr/lib/python3/dist-packages")
        import bcc  # noqa: F401
    return sys.modules["bcc"]


def include_dirs(bpf_dir: Path) -> tuple[Path, ...]:
    """Where ``bundle`` looks for our headers in a tree laid out like bpf/."""
    return (bpf_dir / "include", bpf_dir)


def bundle(path: Path, *, include_dirs: tuple[Path, ...] = (INCLUDE_DIR, BPF_DIR)) -> str:
    """Return the source of ``path`` with our local includes expanded (each file once)."""
    seen: set[Path] = set()

    def expand(p: Path) -> str:
        p = p.resolve()
        if p in seen:
            return ""
        seen.add(p)
        text = _PRAGMA_ONCE.sub("", p.read_text())

        def repl(m: re.Match) -> str:
            name = m.group(1)
            for d in (p.parent, *include_dirs):
                cand = d / name
                if cand.exists():
                    return f"/* ---- {name} ---- */\n" + expand(cand)
            raise FileNotFoundError(f"{p}: #include \"{name}\" not found in {include_dirs}")

        return _INCLUDE.sub(repl, text)

    return expand(path)


def cflag_defines(defines: dict[str, object]) -> list[str]:
    out = []
    for k, v in defines.items():
        if isinstance(v, str):
            out.append(f'-D{k}="{v}"')
        else:
            out.append(f"-D{k}={int(v)}")
    return out


BASE_CFLAGS = ("-Wno-unused-function", "-Wno-unused-variable")   # part of the program cache's key


def compile_program(source: str, defines: dict[str, object], extra_cflags: list[str] = ()):
    """Compile one bundled source with bcc; returns the ``bcc.BPF`` object (maps created/pinned)."""
    bcc = import_bcc()
    cflags = [*BASE_CFLAGS, *cflag_defines(defines), *extra_cflags]
    # bcc needs the kernel headers; a Debian -amd64 tree works when build/ points at it.
    if not Path(f"/lib/modules/{os.uname().release}/build").exists() and not os.environ.get("BCC_KERNEL_SOURCE"):
        raise RuntimeError(
            f"bcc needs kernel headers: /lib/modules/{os.uname().release}/build is missing "
            "(run scripts/install-deps, or set BCC_KERNEL_SOURCE)")
    return bcc.BPF(text=source.encode(), cflags=cflags)


def verified_insns(prog_fd: int) -> int:
    """The verifier's "processed N insns" for a loaded program (bpf_prog_info.verified_insns)."""
    from agent.datapath.bpfsys import prog_info_verified_insns
    return prog_info_verified_insns(prog_fd)


BPF_F_XDP_HAS_FRAGS = 1 << 5
_BPF_PROG_LOAD = 5
_NR_BPF = 321   # x86_64


def load_insns(code: bytes, name: str, prog_type: int, *, prog_flags: int = 0,
               license: str = "GPL") -> tuple[int, int | None]:
    """BPF_PROG_LOAD of raw instructions (map fds already in them); returns (fd, the
    verifier's "processed" count). bcc 0.26's ``load_func`` cannot pass ``prog_flags``
    (``BPF_F_XDP_HAS_FRAGS``: an XDP program that accepts multi-buffer frames, which veth
    requires for an MTU above ~3.5k), so every program is loaded here."""
    import ctypes
    import errno as _errno

    class Attr(ctypes.Structure):   # the BPF_PROG_LOAD part of union bpf_attr
        _fields_ = [("prog_type", ctypes.c_uint32), ("insn_cnt", ctypes.c_uint32),
                    ("insns", ctypes.c_uint64), ("license", ctypes.c_uint64),
                    ("log_level", ctypes.c_uint32), ("log_size", ctypes.c_uint32),
                    ("log_buf", ctypes.c_uint64), ("kern_version", ctypes.c_uint32),
                    ("prog_flags", ctypes.c_uint32), ("prog_name", ctypes.c_char * 16),
                    ("prog_ifindex", ctypes.c_uint32), ("expected_attach_type", ctypes.c_uint32)]

    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    insns = ctypes.create_string_buffer(code, len(code))
    lic = ctypes.create_string_buffer(license.encode())
    for log_level, size in ((4, 1 << 12), (1, 1 << 24)):   # stats only; the full log on failure
        log = ctypes.create_string_buffer(size)
        attr = Attr(prog_type=prog_type, insn_cnt=len(code) // 8, insns=ctypes.addressof(insns),
                    license=ctypes.addressof(lic), log_level=log_level, log_size=size,
                    log_buf=ctypes.addressof(log), prog_flags=prog_flags, prog_name=name.encode()[:15])
        fd = libc.syscall(_NR_BPF, _BPF_PROG_LOAD, ctypes.byref(attr), ctypes.sizeof(attr))
        if fd >= 0:
            break
        err = ctypes.get_errno()
        if err != _errno.EINVAL and err != _errno.EACCES:
            break
    text = log.value.decode(errors="replace")
    if fd < 0:
        raise RuntimeError(f"BPF_PROG_LOAD {name}: {os.strerror(err)}\n{text[-4000:]}")
    m = re.search(r"processed (\d+) insns", text)
    return fd, int(m.group(1)) if m else None


def load_prog(bpf, name: str, prog_type: int, *, prog_flags: int = 0):
    """Load function ``name`` of a compiled ``bcc.BPF`` (tests and benchmarks that compile in
    their own process): a ``bcc.BPF.Function`` owned by ``bpf`` with ``verified_insns``."""
    bcc = import_bcc()
    fd, insns = load_insns(bpf.dump_func(name.encode()), name, prog_type, prog_flags=prog_flags)
    fn = bcc.BPF.Function(bpf, name.encode(), fd)
    fn.verified_insns = insns
    bpf.funcs[name.encode()] = fn
    return fn


def ensure_bpffs(pin_dir: Path) -> None:
    """bpffs must be mounted at /sys/fs/bpf for pinning (mount it if the host did not)."""
    import subprocess

    root = Path("/sys/fs/bpf")
    if not str(pin_dir).startswith(str(root)):
        return
    with open("/proc/mounts") as f:
        if any(line.split()[1] == str(root) and line.split()[2] == "bpf" for line in f):
            return
    subprocess.run(["mount", "-t", "bpf", "bpf", str(root)], check=True)
