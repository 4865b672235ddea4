"""The daemon process: API socket up after the first pass, config edits applied live, SIGTERM =
graceful-restart stop (speakers stopped without NOTIFICATION), socket removed, state dir locked.

The daemon runs as a real subprocess (signals are real) with recording speakers injected
through ``run_agent(speaker_factory=...)``; the real speaker is covered by the e2e lab."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from agent import demo

HERE = Path(__file__).parent
ROOT = HERE.parents[2]

DRIVER = r"""
import asyncio, sys, json
sys.path.insert(0, {here!r})
from recording_speaker import RecordingSpeaker
from agent import daemon
calls = []
def factory(inst):
    return RecordingSpeaker(inst, calls)
code = daemon.main(sys.argv[1:], speaker_factory=factory)
print("CALLS " + json.dumps([[str(x) for x in c] for c in calls]), flush=True)
sys.exit(code)
"""


def wait_for(pred, timeout=15.0, what="condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = pred()
        if v:
            return v
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def vipctl(sock, *args):
    return subprocess.run([sys.executable, "-m", "agent.api.cli", "--socket", str(sock), *args],
                          capture_output=True, text=True, timeout=30, cwd=ROOT)


def start(tmp_path, node="cilium-bgp-worker"):
    cfg, state, sock = tmp_path / "cfg", tmp_path / "state", tmp_path / "run" / "vipd.sock"
    cfg.mkdir(exist_ok=True)
    (cfg / "nodes.yaml").write_text(demo.nodes_yaml())
    (cfg / "bgp.yaml").write_text(demo.V2_BGP_YAML)
    argv = [sys.executable, "-c", DRIVER.format(here=str(HERE)), "run", "--config", str(cfg), "--node-name", node,
            "--api-socket", str(sock), "--state-dir", str(state), "--log-format", "json"]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT)
    return proc, cfg, state, sock


def test_daemon_serves_applies_edits_and_stops_gracefully_on_sigterm(tmp_path):
    proc, cfg, state, sock = start(tmp_path)
    try:
        wait_for(lambda: sock.exists() or proc.poll() is not None, what="API socket")
        assert proc.poll() is None, proc.stdout.read()
        peers = json.loads(vipctl(sock, "bgp", "peers", "-o", "json").stdout)
        assert [(p["peerAddress"], p["localASN"]) for p in peers["peers"]] == [("10.0.5.1", 65005)]
        # a live edit: the service manifest appears, its VIP gets advertised without a restart
        (cfg / "svc.yaml").write_text(demo.service_yaml(traffic_policy="Cluster"))

        def vip_routes():
            out = vipctl(sock, "bgp", "routes", "available", "ipv4", "unicast", "-o", "json").stdout
            return [r["prefix"] for r in json.loads(out)["routes"] if r["prefix"].endswith("/32")]
        assert wait_for(vip_routes, what="VIP advertised after the edit") == ["172.20.0.0/32"]
        status = json.loads(vipctl(sock, "status", "-o", "json").stdout)
        assert status["configGeneration"] == 2 and status["reconcileErrors"] == []
        assert (state / "status.yaml").exists() and (state / "lbipam-allocations.yaml").exists()
        # a second daemon on the same state dir refuses to start
        other = subprocess.run([sys.executable, "-m", "agent.daemon", "run", "--config", str(cfg),
                                "--node-name", "x", "--api-socket", str(tmp_path / "other.sock"),
                                "--state-dir", str(state)], capture_output=True, text=True, timeout=60, cwd=ROOT)
        assert other.returncode != 0 and f"another vipd (pid {proc.pid}) is running with state dir" in other.stderr
        # a second daemon on the same API socket (own state dir) refuses too, before it peers
        # with anyone, and the first one keeps serving the socket
        other = subprocess.run([sys.executable, "-m", "agent.daemon", "run", "--config", str(cfg),
                                "--node-name", "x", "--api-socket", str(sock),
                                "--state-dir", str(tmp_path / "state2")],
                               capture_output=True, text=True, timeout=60, cwd=ROOT)
        assert other.returncode == 1, other.stderr
        assert f"another vipd (pid {proc.pid}) serves {sock}" in other.stderr
        assert "vipd running" not in other.stderr
        assert json.loads(vipctl(sock, "status", "-o", "json").stdout)["configGeneration"] == 2
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=20)
    assert proc.returncode == 0, out
    calls = json.loads(next(l for l in out.splitlines() if l.startswith("CALLS "))[6:])
    assert calls[-1] == ["65005", "stop", "False"], "SIGTERM must stop the speaker without NOTIFICATION"
    assert '"graceful": true' in out and "vipd stopped" in out
    assert not sock.exists()


def test_bad_edit_keeps_running_state_and_reports_the_error(tmp_path):
    proc, cfg, state, sock = start(tmp_path)
    try:
        wait_for(lambda: sock.exists() or proc.poll() is not None, what="API socket")
        (cfg / "broken.yaml").write_text("apiVersion: cilium.io/v2\nkind: CiliumBGPPeerConfig\n"
                                         "metadata: {name: bad}\nspec:\n  timers: {holdTimeSeconds: 1}\n")

        def errors():
            st = json.loads(vipctl(sock, "status", "-o", "json").stdout)
            return st["configErrors"]
        (err,) = wait_for(errors, what="config error reported")
        assert err["file"].endswith("broken.yaml") and "CiliumBGPPeerConfig/bad" in err["object"]
        assert "holdTimeSeconds" in err["message"]
        text = vipctl(sock, "status").stdout
        assert "broken.yaml" in text
        peers = json.loads(vipctl(sock, "bgp", "peers", "-o", "json").stdout)["peers"]
        assert len(peers) == 1, "the valid objects still apply"
        # a half-written / broken edit of the live BGP config does not tear the session down
        (cfg / "bgp.yaml").write_text("apiVersion: cilium.io/v2\nkind: [oops\n")

        def kept():
            st = json.loads(vipctl(sock, "status", "-o", "json").stdout)
            return [e for e in st["configErrors"] if "previous valid version stays applied" in e["message"]]
        assert {e["object"] for e in wait_for(kept, what="rejected edit reported")} >= {
            "CiliumBGPClusterConfig/rack0", "CiliumBGPPeerConfig/route-reflector"}
        peers = json.loads(vipctl(sock, "bgp", "peers", "-o", "json").stdout)["peers"]
        assert [p["peerAddress"] for p in peers] == ["10.0.5.1"]
    finally:
        proc.send_signal(signal.SIGINT)
        proc.communicate(timeout=20)
    assert proc.returncode == 0


def test_systemd_readiness_and_stopping_notifications(tmp_path):
    import socket as _socket

    notify = tmp_path / "notify.sock"
    listener = _socket.socket(_socket.AF_UNIX, _socket.SOCK_DGRAM)
    listener.bind(str(notify))
    listener.settimeout(20)
    os.environ["NOTIFY_SOCKET"] = str(notify)
    try:
        proc, cfg, state, sock = start(tmp_path)
    finally:
        del os.environ["NOTIFY_SOCKET"]
    try:
        assert listener.recv(100) == b"READY=1"
        assert sock.exists(), "READY only once the API socket is up"
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=20)
    assert listener.recv(100) == b"STOPPING=1"
    listener.close()


def test_a_stale_api_socket_left_by_a_crashed_agent_is_replaced(tmp_path):
    import socket as socketlib

    sock = tmp_path / "run" / "vipd.sock"
    sock.parent.mkdir()
    with socketlib.socket(socketlib.AF_UNIX) as s:  # bound, never listening: what a crash leaves
        s.bind(str(sock))
    proc, cfg, state, sock = start(tmp_path)
    try:
        wait_for(lambda: vipctl(sock, "status", "-o", "json").returncode == 0 or proc.poll() is not None,
                 what="API answering")
        assert proc.poll() is None, proc.stdout.read()
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=20)
    assert proc.returncode == 0


EARLIER_CLUSTER_CONFIG = """\
apiVersion: cilium.io/v2
kind: CiliumBGPClusterConfig
metadata:
  name: aaa-new
spec:
  nodeSelector:
    matchLabels:
      rack: rack0
  bgpInstances:
  - name: "65099"
    localASN: 65099
    peers:
    - name: other
      peerASN: 65098
      peerAddress: 10.0.5.99
"""


def test_a_cluster_config_with_an_earlier_name_does_not_take_the_node_even_across_restarts(tmp_path):
    """Files have no creationTimestamp: the first-seen order (state dir) decides the owner."""
    def conflict(sock):
        st = json.loads(vipctl(sock, "status", "-o", "json").stdout)
        res = {(r["kind"], r["name"]): {c["type"]: c["status"] for c in r["conditions"]} for r in st["resources"]}
        cond = "cilium.io/ConflictingClusterConfig"
        owner_ok = res.get(("CiliumBGPClusterConfig", "rack0"), {}).get(cond) == "False"
        return owner_ok and res.get(("CiliumBGPClusterConfig", "aaa-new"), {}).get(cond) == "True" and st

    proc, cfg, state, sock = start(tmp_path)
    try:
        wait_for(lambda: sock.exists() or proc.poll() is not None, what="API socket")
        (cfg / "aaa.yaml").write_text(EARLIER_CLUSTER_CONFIG)
        st = wait_for(lambda: conflict(sock), what="ConflictingClusterConfig on the new config")
        assert "Selecting the same node(s) with ClusterConfig(s): [rack0]" in json.dumps(st)
        peers = json.loads(vipctl(sock, "bgp", "peers", "-o", "json").stdout)["peers"]
        assert [(p["peerAddress"], p["localASN"]) for p in peers] == [("10.0.5.1", 65005)]
        assert "aaa-new" in vipctl(sock, "status").stdout
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=20)
    calls = json.loads(next(l for l in out.splitlines() if l.startswith("CALLS "))[6:])
    assert not [c for c in calls if c[0] == "65099"], "the new config never ran here"
    assert [c[1] for c in calls if c[0] == "65005"].count("start") == 1, "the working one was never restarted"
    # a restart reads the same order from the state dir
    proc, cfg, state, sock = start(tmp_path)
    try:
        wait_for(lambda: sock.exists() or proc.poll() is not None, what="API socket")
        wait_for(lambda: conflict(sock), what="the same owner after a restart")
        peers = json.loads(vipctl(sock, "bgp", "peers", "-o", "json").stdout)["peers"]
        assert [p["localASN"] for p in peers] == [65005]
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=20)


FAILING_PASS_DRIVER = r"""
import sys, os
sys.path.insert(0, {here!r})
from recording_speaker import RecordingSpeaker
from agent import daemon
from agent.reconcilers.controller import Controller
real = Controller.reconcile_once
async def failing(self):
    if not os.path.exists({fixed!r}):  # an effect that keeps failing until the operator fixes it
        raise OSError("cannot write /var/lib/vipd: No space left on device")
    return await real(self)
Controller.reconcile_once = failing
sys.exit(daemon.main(sys.argv[1:], speaker_factory=lambda inst: RecordingSpeaker(inst, [])))
"""


def test_a_failing_reconcile_pass_is_in_status_conditions_and_metrics_until_it_succeeds(tmp_path):
    import socket as socketlib
    import urllib.request

    with socketlib.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg, state, sock = tmp_path / "cfg", tmp_path / "state", tmp_path / "vipd.sock"
    cfg.mkdir()
    (cfg / "nodes.yaml").write_text(demo.nodes_yaml())
    (cfg / "bgp.yaml").write_text(demo.V2_BGP_YAML)
    fixed = tmp_path / "fixed"
    argv = [sys.executable, "-c", FAILING_PASS_DRIVER.format(here=str(HERE), fixed=str(fixed)), "run",
            "--config", str(cfg), "--node-name", "cilium-bgp-worker", "--api-socket", str(sock),
            "--state-dir", str(state), "--metrics-addr", f"127.0.0.1:{port}"]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT)

    def metrics():
        return urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    try:
        wait_for(lambda: sock.exists() or proc.poll() is not None, what="API socket")
        assert proc.poll() is None, proc.stdout.read()
        text = vipctl(sock, "status").stdout
        assert "Reconcile errors: none" not in text and "No space left on device" in text, text
        st = json.loads(vipctl(sock, "status", "-o", "json").stdout)
        assert [e["reconciler"] for e in st["reconcileErrors"]] == ["controller"]
        node_conds = [c for r in st["resources"] if r["kind"] == "CiliumBGPNodeConfig" for c in r["conditions"]]
        assert [(c["type"], c["status"]) for c in node_conds] == [("cilium.io/BGPReconcileError", "True")]
        body = metrics()
        assert 'vipd_reconcile_errors_total{reconciler="controller"}' in body
        assert "vipd_reconcile_failures 1.0" in body
        fixed.touch()  # the retry (backoff 1, 2, 4 ... s) succeeds: everything says healthy again
        wait_for(lambda: "Reconcile errors: none" in vipctl(sock, "status").stdout, timeout=40,
                 what="the error cleared after a successful pass")
        assert "vipd_reconcile_failures 0.0" in metrics()
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=20)
    assert proc.returncode == 0, out


def test_vipd_profile_writes_a_profile_of_the_start_up_with_its_worker_threads(tmp_path, monkeypatch):
    """VIPD_PROFILE=FILE (docs/operations.md "Profiling the start-up"): the agent writes a
    cProfile of its start-up, the worker threads' work included, once the first passes are
    done; ``{pid}`` becomes the agent's PID so a restart does not overwrite it."""
    import pstats

    monkeypatch.setenv("VIPD_PROFILE", str(tmp_path / "startup.{pid}.prof"))
    proc, cfg, state, sock = start(tmp_path)
    try:
        wait_for(lambda: sock.exists() or proc.poll() is not None, what="API socket")
        assert proc.poll() is None, proc.stdout.read()
        written = tmp_path / f"startup.{proc.pid}.prof"
        assert written.exists()
        functions = {(Path(file).name, name) for file, _line, name in pstats.Stats(str(written)).stats}
        assert ("controller.py", "reconcile_once") in functions     # the event loop's thread
        assert ("loader.py", "assemble") in functions               # a worker thread (asyncio.to_thread)
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=20)
    assert "start-up profile written" in out
