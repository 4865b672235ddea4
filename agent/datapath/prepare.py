"""``vipd prepare``: compile the BPF programs into the program cache once, at install time.

A first ``vipd run --lb-interface`` on a node without a cache entry waits for the loader
child's clang compile (~6-9 s of CPU, ~240 MB): the VIPs are announced only once the datapath
serves them. ``vipd prepare`` does that compile ahead (the DaemonSet's init container, the
``vipd-prepare.service`` oneshot before ``vipd.service``) and stores it under the same key a
start looks up (agent/datapath/objcache.py): the key depends on the BPF sources, the
non-size compile flags, bcc and the kernel, not on the node name, the pin directory nor the
map sizes, so one entry serves every later start on this kernel.

The compile runs in the same loader child the agent uses (agent/datapath/child.py). bcc
opens or creates the maps pinned under PIN_DIR while compiling, so prepare gives it a
scratch pin directory of its own (``<pin root>/_prepare-<pid>``), removed afterwards: prepare
never touches a running agent's pinned maps.
"""

from __future__ import annotations

import os
import shutil
import stat
import time
from dataclasses import dataclass
from pathlib import Path

from agent.datapath.objcache import ProgramCache, untrusted

__all__ = ["PrepareError", "Prepared", "prepare_programs", "SCRATCH_PREFIX"]

SCRATCH_PREFIX = "_prepare-"   # "_": no Kubernetes node name (an instance directory) has one


class PrepareError(RuntimeError):
    """Why the programs could not be prepared (a message for the operator)."""


@dataclass(frozen=True)
class Prepared:
    cached: bool        # the entry was there already (nothing compiled)
    path: Path          # the entry file
    key: str
    compile_s: float    # 0 when cached
    seconds: float      # wall time of the whole command


def check_cache_dir(cache: ProgramCache) -> None:
    """Create ``cache.directory`` (0700) when missing; raise PrepareError when a start would not
    use it (not a directory, a symlink, not ours, writable by others)."""
    d = cache.directory
    try:
        d.mkdir(mode=0o700, parents=True, exist_ok=True)
    except FileExistsError:
        pass
    except OSError as exc:
        raise PrepareError(f"cannot create the BPF program cache directory {d}: {exc.strerror or exc}") from None
    try:
        st = os.lstat(d)
    except OSError as exc:
        raise PrepareError(f"BPF program cache directory {d}: {exc.strerror or exc}") from None
    if not stat.S_ISDIR(st.st_mode):
        raise PrepareError(f"BPF program cache directory {d} is not a directory (or is a symlink); "
                           "remove it or choose another --bpf-cache-dir")
    why = untrusted(st)
    if why:
        raise PrepareError(f"BPF program cache directory {d} is {why}: vipd would not load programs "
                           f"from it. Make it root-owned mode 0700 (chown root: {d}; chmod 0700 {d}) "
                           "or choose another --bpf-cache-dir")
    if not os.access(d, os.W_OK | os.X_OK):
        raise PrepareError(f"BPF program cache directory {d} is not writable by this user")


def _remove_stale_scratch(pin_root: Path) -> None:
    """Scratch pin directories of a prepare that was killed mid-compile."""
    from agent.datapath.child import _alive

    if pin_root.is_dir():
        for d in pin_root.glob(SCRATCH_PREFIX + "*"):
            pid = d.name[len(SCRATCH_PREFIX):]
            if pid.isdigit() and not _alive(int(pid)):
                shutil.rmtree(d, ignore_errors=True)


def prepare_programs(cache: ProgramCache, *, pin_root: str | os.PathLike, instance: str = "prepare",
                     bpf_dir: Path | None = None) -> Prepared:
    """Make sure ``cache`` holds the programs a ``vipd run`` with the default datapath
    features would load; compile them (in the loader child) when it does not."""
    from agent.datapath.api import Datapath
    from agent.datapath.child import LoaderChild, LoaderError, program_key
    from agent.datapath.loader import ensure_bpffs

    t0 = time.monotonic()
    check_cache_dir(cache)
    # the defines of the agent's own Datapath (the key ignores PIN_DIR and the sizes)
    defines = Datapath(instance=instance, pin_root=pin_root, bpf_cache=None, bpf_dir=bpf_dir).loader_defines()
    key = program_key(defines, bpf_dir)
    if cache.get(key) is not None:
        return Prepared(True, cache.path(key), key, 0.0, time.monotonic() - t0)
    scratch = Path(pin_root) / f"{SCRATCH_PREFIX}{os.getpid()}"
    _remove_stale_scratch(Path(pin_root))
    try:
        ensure_bpffs(scratch)
        scratch.mkdir(parents=True, exist_ok=True)
    except Exception as exc:  # noqa: BLE001 - mount or mkdir: say where
        raise PrepareError(f"cannot make the scratch pin directory {scratch} (bpffs at /sys/fs/bpf is "
                           f"needed to compile): {exc}") from None
    try:
        child = LoaderChild({**defines, "PIN_DIR": str(scratch), "SIZED_PIN_DIR": str(scratch)}, key, bpf_dir)
        try:
            compiled = child.compiled()
        except LoaderError as exc:
            raise PrepareError(str(exc)) from None
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    if cache.put(compiled) is None:
        raise PrepareError(f"could not store the compiled programs in {cache.directory} (the log says why)")
    return Prepared(False, cache.path(key), key, compiled.compile_s, time.monotonic() - t0)
