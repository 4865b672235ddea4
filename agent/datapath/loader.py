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

BPF_DIR = Path(__file__).resolve().parents[2] / "bpf"
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


def compile_program(source: str, defines: dict[str, object], extra_cflags: list[str] = ()):
    """Compile one bundled source with bcc; returns the ``bcc.BPF`` object (maps created/pinned)."""
    bcc = import_bcc()
    cflags = ["-Wno-unused-function", "-Wno-unused-variable", *cflag_defines(defines), *extra_cflags]
    # bcc needs the kernel headers; a Debian -amd64 tree works when build/ points at it.
    if not Path(f"/lib/modules/{os.uname().release}/build").exists() and not os.environ.get("BCC_KERNEL_SOURCE"):
        raise RuntimeError(
            f"bcc needs kernel headers: /lib/modules/{os.uname().release}/build is missing "
            "(run scripts/install-deps, or set BCC_KERNEL_SOURCE)")
    return bcc.BPF(text=source.encode(), cflags=cflags)


# struct bpf_prog_info (include/uapi/linux/bpf.h, Linux >= 5.16): verified_insns is the u32 at
# offset 216 (after recursion_misses); the kernel fills only as many bytes as we pass.
_PROG_INFO_SIZE = 232
_VERIFIED_INSNS_OFF = 216


def verified_insns(prog_fd: int) -> int:
    """The verifier's "processed N insns" for a loaded program (bpf_prog_info.verified_insns)."""
    import ctypes

    from bcc.libbcc import lib
    buf = (ctypes.c_uint8 * _PROG_INFO_SIZE)()
    size = ctypes.c_uint32(_PROG_INFO_SIZE)
    fn = lib.bpf_obj_get_info
    fn.restype = ctypes.c_int
    fn.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.POINTER(ctypes.c_uint32)]
    if fn(prog_fd, ctypes.byref(buf), ctypes.byref(size)) != 0:
        raise OSError(ctypes.get_errno(), "BPF_OBJ_GET_INFO_BY_FD on a program failed")
    if size.value < _VERIFIED_INSNS_OFF + 4:
        raise RuntimeError("kernel too old: bpf_prog_info has no verified_insns (Linux >= 5.16)")
    return int.from_bytes(bytes(buf[_VERIFIED_INSNS_OFF:_VERIFIED_INSNS_OFF + 4]), "little")
