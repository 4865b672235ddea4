"""`vipd run` keeps its parsed configuration files in STATE_DIR/config-cache: a restart serves
unchanged files from there instead of parsing them (the "configuration loaded" log line counts
both), an edited file is parsed again, a damaged entry is parsed again, entries of files that are
gone are removed, and nobody but vipd can read the entries (they hold Secrets)."""

import json
import signal
import stat
import subprocess
import sys

from agent import demo
from tests.unit.daemon.test_daemon import DRIVER, HERE, ROOT, vipctl, wait_for


def start(tmp_path):
    """test_daemon.start, but the config files are written once (the test edits them)."""
    cfg, state, sock = tmp_path / "cfg", tmp_path / "state", tmp_path / "run" / "vipd.sock"
    if not cfg.exists():
        cfg.mkdir()
        (cfg / "nodes.yaml").write_text(demo.nodes_yaml())
        (cfg / "bgp.yaml").write_text(demo.V2_BGP_YAML)
    argv = [sys.executable, "-c", DRIVER.format(here=str(HERE)), "run", "--config", str(cfg),
            "--node-name", "cilium-bgp-worker", "--api-socket", str(sock), "--state-dir",
            str(state), "--log-format", "json"]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            cwd=ROOT)
    return proc, cfg, state, sock


def run_once(tmp_path) -> tuple[dict, list]:
    """Start the daemon, read what it serves, stop it: -> (its "configuration loaded" record,
    the BGP peers it runs)."""
    proc, cfg, state, sock = start(tmp_path)
    try:
        wait_for(lambda: sock.exists() or proc.poll() is not None, what="API socket")
        peers = json.loads(vipctl(sock, "bgp", "peers", "-o", "json").stdout)["peers"]
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=20)
    loaded = [json.loads(line) for line in out.splitlines()
              if line.startswith("{") and '"configuration loaded"' in line]
    assert loaded, out[-3000:]
    return loaded[0], sorted((p["peerAddress"], p["localASN"]) for p in peers)


def test_a_restart_reads_unchanged_files_from_the_parse_cache(tmp_path):
    first, peers = run_once(tmp_path)
    assert (first["files"], first["parsed"], first["cached"]) == (2, 2, 0), first
    assert peers == [("10.0.5.1", 65005)]
    cache = tmp_path / "state" / "config-cache"
    entries = sorted(cache.iterdir())
    assert len(entries) == 2
    assert stat.S_IMODE(cache.stat().st_mode) == 0o700
    assert all(stat.S_IMODE(e.stat().st_mode) == 0o600 for e in entries)

    again, peers_again = run_once(tmp_path)
    assert (again["parsed"], again["cached"]) == (0, 2), again
    assert peers_again == peers and again["objects"] == first["objects"]

    # an edit: that file is parsed, the other one still comes from the cache
    bgp = tmp_path / "cfg" / "bgp.yaml"
    bgp.write_text(bgp.read_text().replace("peerAddress: 10.0.5.1", "peerAddress: 10.0.5.2"))
    edited, peers_edited = run_once(tmp_path)
    assert (edited["parsed"], edited["cached"]) == (1, 1), edited
    assert peers_edited == [("10.0.5.2", 65005)]
    assert len(list(cache.iterdir())) == 2, "the entry of the old bgp.yaml is removed"

    # a damaged entry (a torn write, a full disk) is a miss, never a wrong configuration
    for entry in cache.iterdir():
        entry.write_bytes(entry.read_bytes()[:100])
    damaged, peers_damaged = run_once(tmp_path)
    assert (damaged["parsed"], damaged["cached"]) == (2, 0), damaged
    assert peers_damaged == peers_edited
