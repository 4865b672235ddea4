"""`vipd run --lb-interface --bpf-cache-dir DIR` compiles the BPF programs once and starts from
the cache afterwards (agent/datapath/objcache.py), and says which in its log.

ScaleLab (agent/lab/scale.py): FRR router -- node (vipd, XDP + tc on eth-router) -- one pod.
First start with an empty cache directory: the log says "bpf programs compiled" and names the
entry it stored there; FRR gets the VIP and a TCP connection to it is answered by the pod.
After a stop, the second start logs "bpf programs loaded from cache" with the same key and no
compile, and the VIP is served again by the programs loaded from the cache.

`vipd prepare` through the real CLI fills the cache `vipd run` reads by default
(<state-dir>/bpf-cache; $VIPD_BPF_CACHE_DIR, the test session's shared cache, unset for those
tests), so the node's first start loads its programs without compiling and serves the VIP; a
second prepare finds the entry ("cached"); a damaged entry is compiled again; a cache directory
`vipd run` would not trust is refused with a message naming it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from agent.datapath.objcache import ENV_VAR, SUFFIX
from agent.lab import Lab, wait_until
from agent.lab.scale import ScaleLab, log_events, service_docs, vip_of


@pytest.fixture
def env():
    lab = Lab("pcache")
    env = None
    try:
        with lab:
            env = ScaleLab(lab, pods=1)
            env.write("services.yaml", service_docs(0, ports=1, pods=env.pod_ips, node_name="node1"))
            yield env
    finally:
        if env is not None:
            env.cleanup_pins()


REPO = Path(__file__).resolve().parents[3]


def _start_and_serve(env: ScaleLab, cache_dir=None) -> None:
    env.start(*(["--bpf-cache-dir", str(cache_dir)] if cache_dir is not None else []))
    wait_until(lambda: env.accepted() >= 1 or env.proc.poll() is not None, timeout=120, interval=0.5,
               what="the VIP at FRR")
    assert env.proc.poll() is None, env.log()[-3000:]
    env.wait_routed(f"{vip_of(0)}/32")     # zebra installs the route a moment after bgpd accepts it
    assert env.connect(vip_of(0)) == ["p0"], env.log()[-3000:]


def test_vipd_run_compiles_once_then_starts_from_the_cache_and_serves(env, tmp_path):
    cache_dir = tmp_path / "bpf-cache"
    _start_and_serve(env, cache_dir)
    first = log_events(env.log())
    compiled = [e for e in first if e.get("event") == "bpf programs compiled"]
    assert len(compiled) == 1 and compiled[0]["cache_dir"] == str(cache_dir), compiled
    key = compiled[0]["cache_key"]
    assert compiled[0]["stored"] == str(cache_dir / f"{key}.bpfc")
    assert (cache_dir / f"{key}.bpfc").is_file()
    assert not [e for e in first if e.get("event") == "bpf programs loaded from cache"]

    seen = len(env.log())
    env.proc.send_signal(signal.SIGTERM)
    assert env.proc.wait(timeout=60) == 0, env.log()[seen - 3000:]
    wait_until(lambda: env.accepted() == 0, timeout=60, interval=0.5, what="the session down after the stop")

    _start_and_serve(env, cache_dir)
    second = log_events(env.log()[seen:])
    hits = [e for e in second if e.get("event") == "bpf programs loaded from cache"]
    assert [e["cache_key"] for e in hits] == [key], second[-20:]
    assert not [e for e in second if e.get("event") == "bpf programs compiled"]
    loaded = [e for e in second if e.get("event") == "datapath loaded"]
    assert loaded and loaded[0]["programs_from"] == "cache" and loaded[0]["loader_child_peak_rss_mb"] == 0


def prepare(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != ENV_VAR}
    env["PYTHONPATH"] = str(REPO)
    return subprocess.run([sys.executable, "-m", "agent.daemon", "prepare", *args], capture_output=True,
                          text=True, timeout=300, env=env, cwd=REPO)


def test_prepare_then_first_start_loads_from_the_cache_and_serves(env, monkeypatch):
    monkeypatch.delenv(ENV_VAR, raising=False)   # `vipd run` below inherits the environment
    args = ("--state-dir", str(env.state_dir), "--bpf-pin-root", str(env.pin_root))
    first = prepare(*args)
    assert first.returncode == 0, first.stderr
    cache_dir = env.state_dir / "bpf-cache"
    entries = list(cache_dir.glob(f"*{SUFFIX}"))
    assert len(entries) == 1 and "compiled in" in first.stdout and str(entries[0]) in first.stdout, first.stdout
    assert (cache_dir.stat().st_mode & 0o777) == 0o700
    # the compile's scratch pins are gone; no instance's maps were pinned by it
    assert not env.pin_root.exists() or not list(env.pin_root.iterdir())

    again = prepare(*args)
    assert again.returncode == 0, again.stderr
    assert again.stdout.startswith("vipd prepare: cached: ") and str(entries[0]) in again.stdout, again.stdout
    assert list(cache_dir.glob(f"*{SUFFIX}")) == entries

    _start_and_serve(env)   # no --bpf-cache-dir: the default, <state-dir>/bpf-cache
    events = log_events(env.log())
    loaded = [e for e in events if e.get("event") == "datapath loaded"]
    assert loaded and loaded[0]["programs_from"] == "cache", loaded
    assert loaded[0]["loader_child_peak_rss_mb"] == 0
    assert [e["entry"] for e in events if e.get("event") == "bpf programs loaded from cache"] == [str(entries[0])]
    assert not [e for e in events if e.get("event") == "bpf programs compiled"]


def test_prepare_replaces_a_damaged_entry_and_refuses_an_untrusted_cache_dir(env, tmp_path):
    pins = ("--bpf-pin-root", str(env.pin_root))
    cache_dir = tmp_path / "cache"
    assert prepare("--bpf-cache-dir", str(cache_dir), *pins).returncode == 0
    [entry] = cache_dir.glob(f"*{SUFFIX}")
    entry.write_bytes(entry.read_bytes()[:1000])          # truncated: its checksum fails
    redo = prepare("--bpf-cache-dir", str(cache_dir), *pins)
    assert redo.returncode == 0 and "compiled in" in redo.stdout, (redo.stdout, redo.stderr)
    assert "cached" in prepare("--bpf-cache-dir", str(cache_dir), *pins).stdout

    cache_dir.chmod(0o775)                                 # `vipd run` would not load from it
    bad = prepare("--bpf-cache-dir", str(cache_dir), *pins)
    assert bad.returncode == 1 and bad.stdout == "", bad.stdout
    assert f"vipd prepare: BPF program cache directory {cache_dir} is writable by group or others" in bad.stderr
    assert "Traceback" not in bad.stderr, bad.stderr

    off = prepare("--bpf-cache-dir", "", *pins)
    assert off.returncode == 1 and "the program cache is turned off" in off.stderr, off.stderr
