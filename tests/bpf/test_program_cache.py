"""The compiled-program cache (agent/datapath/objcache.py) as a Datapath uses it.

* A changed header under bpf/ is a miss: the loader child compiles and the entry is stored;
  the next load of the same sources is a hit that starts no child (so neither bcc nor clang
  runs), logs "bpf programs loaded from cache <key>", loads programs the verifier walks
  exactly as the compiled ones, and they carry traffic (the local-NAT packet test).
* An entry whose programs the kernel refuses is compiled again and replaced.
* A truncated, corrupted, foreign-version or misnamed entry, an entry writable by others and a
  cache directory writable by others are all misses with a warning naming the file: never a
  crash, never bytecode from a file someone else could have written.

tests/bpf/test_programs_compile.py keeps compiling every program in bpf/ with bcc directly
(never through the cache).
"""

from __future__ import annotations

import logging
import os
import shutil
from dataclasses import replace
from pathlib import Path

import pytest

from agent.datapath.api import Datapath
from agent.datapath.child import LoaderChild, program_key, start_loading
from agent.datapath.loader import BPF_DIR
from agent.datapath.objcache import CompiledPrograms, ProgramCache
from tests.bpf.conftest import PIN_ROOT, TEST_FEATURES
from tests.bpf import test_local_nat as local_nat


def _events(caplog, level=logging.INFO) -> list[dict]:
    return [r.msg for r in caplog.records if isinstance(r.msg, dict) and r.levelno >= level]


def _named(events: list[dict], event: str) -> list[dict]:
    return [e for e in events if e.get("event") == event]


@pytest.fixture(scope="module")
def edited_bpf(tmp_path_factory) -> Path:
    """A copy of bpf/ with one code line of a header changed (a default the agent overrides)."""
    d = tmp_path_factory.mktemp("src") / "bpf"
    shutil.copytree(BPF_DIR, d)
    consts = d / "include" / "consts.h"
    old = consts.read_text()
    line = '#define PIN_DIR "/sys/fs/bpf/vipd/default"\n'
    assert line in old, "consts.h changed: pick another comment-free line to edit"
    consts.write_text(old.replace(line, '#define PIN_DIR "/sys/fs/bpf/vipd/edited"\n'))
    return d


@pytest.fixture
def datapaths():
    made: list[Datapath] = []

    def make(tag: str, **kw) -> Datapath:
        dp = Datapath(f"pc-{tag}-{os.getpid()}", pin_root=PIN_ROOT, features=TEST_FEATURES, **kw)
        made.append(dp)
        dp.load()
        return dp
    yield make
    for dp in made:
        dp.destroy()


def test_a_changed_header_misses_then_hits_without_a_child_and_serves_traffic(
        module_dp, edited_bpf, tmp_path, caplog, datapaths):
    # module_dp was loaded through the session's cache: its entry is for the unedited sources
    cache = ProgramCache(tmp_path / "cache")
    original = module_dp._loaded.cache_key
    session = ProgramCache.from_env()
    assert session is not None, "tests/conftest.py sets VIPD_BPF_CACHE_DIR for the session"
    cache.directory.mkdir(mode=0o700)
    shutil.copy(session.path(original), cache.path(original))
    edited = program_key(module_dp.loader_defines(), edited_bpf)
    assert edited != original

    caplog.set_level(logging.INFO)
    children = LoaderChild.spawned
    miss = datapaths("miss", bpf_cache=cache, bpf_dir=edited_bpf)
    assert LoaderChild.spawned == children + 1 and not miss._loaded.from_cache
    assert miss._loaded.compile_s > 0
    compiled = _named(_events(caplog), "bpf programs compiled")
    assert [e["cache_key"] for e in compiled] == [edited]
    assert cache.path(edited).exists() and cache.path(original).exists()

    caplog.clear()
    hit = datapaths("hit", bpf_cache=cache, bpf_dir=edited_bpf)
    assert LoaderChild.spawned == children + 1, "a cache hit started a loader child (bcc + clang)"
    assert hit._loaded.from_cache and hit._loaded.compile_s == 0
    events = _events(caplog)
    assert [e["cache_key"] for e in _named(events, "bpf programs loaded from cache")] == [edited]
    assert not _named(events, "bpf programs compiled")
    # the same programs: the verifier walked exactly as many instructions
    assert {k: p.verified_insns for k, p in hit._loaded.programs.items()} == \
        {k: p.verified_insns for k, p in module_dp._loaded.programs.items()}
    for client, vip, backend, l4 in ((local_nat.CLIENT4, local_nat.VIP4, "10.1.0.5", "tcp"),
                                     (local_nat.CLIENT6, local_nat.VIP6, "fd00:1::5", "udp")):
        local_nat.test_dnat_to_local_backend_and_reverse_nat_of_the_reply(hit, client, vip, backend, l4)
        hit.reconcile([])


def _damaged(entry: bytes) -> dict:
    head, _, body = entry.partition(b"\n")
    flipped = bytearray(body)
    flipped[len(flipped) // 2] ^= 0x01
    return {
        "truncated": entry[: len(entry) // 2],
        "one bit flipped": head + b"\n" + bytes(flipped),
        "empty": b"",
        "another format version": head.replace(b" 1 ", b" 999 ", 1) + b"\n" + body,
    }


def _start(module_dp, cache):
    p = start_loading(module_dp.loader_defines(), cache=cache)
    p.kill()   # a miss started a compiling child: not needed here
    return p


def test_bad_or_untrusted_entries_are_misses_with_a_warning(module_dp, tmp_path, caplog):
    key = module_dp._loaded.cache_key
    good = ProgramCache.from_env().path(key).read_bytes()
    cache = ProgramCache(tmp_path / "cache")
    cache.directory.mkdir(mode=0o700)
    caplog.set_level(logging.INFO)

    for what, data in _damaged(good).items():
        caplog.clear()
        cache.path(key).write_bytes(data)
        os.chmod(cache.path(key), 0o600)
        assert not _start(module_dp, cache).from_cache, what
        warned = _named(_events(caplog, logging.WARNING), "bpf program cache entry invalid, ignored and removed; compiling")
        assert len(warned) == 1 and warned[0]["entry"] == str(cache.path(key)), (what, _events(caplog))
        assert not cache.path(key).exists(), f"{what}: the bad entry was kept"

    # an intact entry under another key's name is not that key's programs
    other = "0" * 64
    cache.path(other).write_bytes(good)
    os.chmod(cache.path(other), 0o600)
    assert cache.get(other) is None and not cache.path(other).exists()

    # the intact entry hits ...
    cache.path(key).write_bytes(good)
    os.chmod(cache.path(key), 0o600)
    assert _start(module_dp, cache).from_cache
    # ... but not when others may write it, or the directory holding it
    for path, mode, reason in ((cache.path(key), 0o666, "entry not trusted"),
                               (cache.directory, 0o777, "directory not trusted")):
        caplog.clear()
        os.chmod(path, mode)
        assert not _start(module_dp, cache).from_cache, reason
        warned = [e for e in _events(caplog, logging.WARNING) if "not trusted" in e["event"]]
        assert warned and "writable by group or others" in warned[0]["reason"], _events(caplog)
        os.chmod(path, 0o600 if path.is_file() else 0o700)
    assert _start(module_dp, cache).from_cache


def test_an_entry_the_kernel_refuses_is_compiled_again_and_replaced(module_dp, tmp_path, caplog, datapaths):
    key = module_dp._loaded.cache_key
    good = CompiledPrograms.from_bytes(ProgramCache.from_env().path(key).read_bytes())
    exit_only = bytes([0x95, 0, 0, 0, 0, 0, 0, 0])   # "exit" without setting r0: the verifier refuses it
    bad = replace(good, programs=tuple(replace(p, insns=exit_only, relocs=()) if p.func == "xdp_lb" else p
                                       for p in good.programs))
    cache = ProgramCache(tmp_path / "cache")
    cache.put(bad)
    caplog.set_level(logging.INFO)
    children = LoaderChild.spawned
    dp = datapaths("refused", bpf_cache=cache)
    assert LoaderChild.spawned == children + 1 and not dp._loaded.from_cache
    warned = _named(_events(caplog, logging.WARNING), "bpf programs from the cache did not load; compiling them again")
    assert len(warned) == 1 and "xdp_lb" in warned[0]["error"], _events(caplog)
    assert cache.get(key) == replace(good, compile_s=cache.get(key).compile_s)
    local_nat.test_dnat_to_local_backend_and_reverse_nat_of_the_reply(dp, local_nat.CLIENT4, local_nat.VIP4,
                                                                       "10.1.0.5", "tcp")
