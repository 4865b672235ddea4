"""The program cache's key and store (agent/datapath/objcache.py) without a kernel: what the
key depends on, entries that round-trip, and the bound on how many are kept."""

from __future__ import annotations

import os
from pathlib import Path

from agent.datapath.api import Features
from agent.datapath.child import program_key
from agent.datapath.objcache import CompiledPrograms, MapDecl, ProgramCache, ProgramCode


def test_the_key_ignores_pin_paths_and_sizes_but_not_flags():
    base = Features()
    key = program_key(base.defines(Path("/sys/fs/bpf/vipd/a")))
    # other pin directory, other capacity: the same code (sizes are placeholders when compiling)
    assert program_key(Features(max_services=7, maglev_slots=1 << 10).defines(Path("/x/b"), Path("/x/c"))) == key
    assert program_key(Features(hash_seed=1).defines(Path("/a"))) != key
    assert program_key(Features(ct_size=1 << 10).defines(Path("/a"))) != key
    assert program_key(Features(derive_local_replies=False).defines(Path("/a"))) != key


def _entry(key: str) -> CompiledPrograms:
    m = MapDecl(name="maglev_v1", map_type=2, key_size=4, value_size=4, max_entries=1049, map_flags=1 << 10,
                pin="SIZED_PIN_DIR", sized=("MAGLEV_SLOTS", 1), key_desc="unsigned int", leaf_desc="unsigned int")
    p = ProgramCode(agent_name="xdp", func="xdp_lb", source="xdp_lb.c", prog_type=6, prog_flags=32,
                    license="GPL", insns=bytes(range(32)), relocs=((0, "maglev_v1"),))
    return CompiledPrograms(key, "xdp_lb.c", {"xdp_lb.c": (m,)}, (p,), 4.5)


def test_an_entry_round_trips_with_its_map_flags(tmp_path):
    cache = ProgramCache(tmp_path / "c")
    entry = _entry("a" * 64)
    path = cache.put(entry)
    assert path == cache.path(entry.key) and os.stat(path).st_mode & 0o777 == 0o600
    assert os.stat(cache.directory).st_mode & 0o777 == 0o700
    assert cache.get(entry.key) == entry            # BPF_F_MMAPABLE (1 << 10) carried as declared
    assert cache.get("b" * 64) is None


def test_only_the_newest_entries_are_kept(tmp_path):
    cache = ProgramCache(tmp_path / "c", keep=3)
    for i, k in enumerate("abc"):
        cache.put(_entry(k * 64))
        os.utime(cache.path(k * 64), (1000 + i, 1000 + i))
    cache.get("a" * 64)                              # a hit makes "a" the newest used
    cache.put(_entry("d" * 64))
    assert sorted(p.name[0] for p in cache.entries()) == ["a", "c", "d"]   # b: the least recently used
