"""`vipd run --lb-interface --bpf-cache-dir DIR` compiles the BPF programs once and starts from
the cache afterwards (agent/datapath/objcache.py), and says which in its log.

ScaleLab (agent/lab/scale.py): FRR router -- node (vipd, XDP + tc on eth-router) -- one pod.
First start with an empty cache directory: the log says "bpf programs compiled" and names the
entry it stored there; FRR gets the VIP and a TCP connection to it is answered by the pod.
After a stop, the second start logs "bpf programs loaded from cache" with the same key and no
compile, and the VIP is served again by the programs loaded from the cache.
"""

from __future__ import annotations

import json
import signal

import pytest

from agent.lab import Lab, wait_until
from agent.lab.scale import ScaleLab, service_docs, vip_of


def _events(text: str) -> list[dict]:
    out = []
    for line in text.splitlines():
        try:
            ev = json.loads(line)
        except ValueError:
            continue
        if isinstance(ev, dict):
            out.append(ev)
    return out


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


def _start_and_serve(env: ScaleLab, cache_dir) -> None:
    env.start("--bpf-cache-dir", str(cache_dir))
    wait_until(lambda: env.accepted() >= 1 or env.proc.poll() is not None, timeout=120, interval=0.5,
               what="the VIP at FRR")
    assert env.proc.poll() is None, env.log()[-3000:]
    env.wait_routed(f"{vip_of(0)}/32")     # zebra installs the route a moment after bgpd accepts it
    assert env.connect(vip_of(0)) == ["p0"], env.log()[-3000:]


def test_vipd_run_compiles_once_then_starts_from_the_cache_and_serves(env, tmp_path):
    cache_dir = tmp_path / "bpf-cache"
    _start_and_serve(env, cache_dir)
    first = _events(env.log())
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
    second = _events(env.log()[seen:])
    hits = [e for e in second if e.get("event") == "bpf programs loaded from cache"]
    assert [e["cache_key"] for e in hits] == [key], second[-20:]
    assert not [e for e in second if e.get("event") == "bpf programs compiled"]
    loaded = [e for e in second if e.get("event") == "datapath loaded"]
    assert loaded and loaded[0]["programs_from"] == "cache" and loaded[0]["loader_child_peak_rss_mb"] == 0
