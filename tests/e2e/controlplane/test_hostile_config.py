"""Hostile configuration input never takes a node off BGP.

`vipd run --lb-interface` with a real FRR peer (agent/lab/scale.py ScaleLab) serves three
LoadBalancer VIPs. The config directory is then fed, one after another, the hostile files of
tests/corpus.py (alias bombs, deep nesting, 11 MiB / 50 MB files, 100,001 documents, 10,001
files, non-UTF-8, NUL bytes, …), a sample of its per-field mutations, and bad edits of the live
bgp.yaml (truncated to 0 bytes, written in two chunks, a duplicate key, InternalIP
10.233.2.311, localPort 70000, localASN: true). Throughout:

* FRR's session to the node is never reset (connectionsEstablished / connectionsDropped are
  unchanged) and keeps all three prefixes;
* a TCP connection opened through a VIP before the first bad file still echoes at the end, and
  new connections to the VIPs are answered;
* each bad file is reported by the API (`GetStatus` config errors name the file);
* the event loop never stalls for 100 ms: the daemon's own probe (a 10 ms sleep that measures
  how late it wakes) says so — the part of any lateness during which the loop's thread ran
  vipd's code (vipd_event_loop_busy_lag_seconds_max; the rest is waiting for a CPU on this
  shared 2-CPU machine, printed as vipd_event_loop_lag_seconds_max) — and from outside, a client calling
  ListPeers over the unix socket every 20 ms never waits 500 ms;

and at the end a fixed file is applied (a fourth Service reaches FRR).
"""

from __future__ import annotations

import random
import threading
import time

import grpc
import pytest

from agent.api import vipd_pb2, vipd_pb2_grpc
from agent.lab import Lab, wait_until
from agent.lab.scale import NODE_IP, ScaleLab, service_docs, vip_of
from tests.corpus import all_cases, hostile

MAX_LOOP_LAG_S = 0.100       # the daemon's own stall (vipd_event_loop_busy_lag_seconds_max)
MAX_API_LATENCY_S = 0.500    # seen from the test process, which shares the 2 CPUs
METRICS_PORT = 9962          # inside the node's namespace


class ApiProbe:
    """ListPeers every 20 ms on one channel; the slowest answer and the failures."""

    def __init__(self, socket_path: str):
        self.channel = grpc.insecure_channel(f"unix://{socket_path}")
        self.stub = vipd_pb2_grpc.VipdStub(self.channel)
        self.latencies: list[tuple[float, str]] = []
        self.failures: list[str] = []
        self.label = "start"
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            t0 = time.monotonic()
            try:
                self.stub.ListPeers(vipd_pb2.ListPeersRequest(), timeout=5)
                self.latencies.append((time.monotonic() - t0, self.label))
            except grpc.RpcError as exc:
                self.failures.append(f"{self.label}: {exc.code().name}")
            self._stop.wait(0.02)

    def status(self) -> vipd_pb2.GetStatusResponse:
        return self.stub.GetStatus(vipd_pb2.GetStatusRequest(), timeout=10)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(10)
        self.channel.close()


def frr_counters(env: ScaleLab) -> tuple:
    s = env.frr.sessions()[NODE_IP]
    return s.state, s.raw.get("connectionsEstablished"), s.raw.get("connectionsDropped"), s.accepted


BGP_EDITS = {
    "duplicate key": lambda text: text.replace("kind: Node\n", "kind: Node\nkind: Node\n", 1),
    "InternalIP 10.233.2.311": lambda text: text.replace(f"address: {NODE_IP}}}",
                                                         "address: 10.233.2.311}", 1),
    "localPort 70000": lambda text: text.replace("  - name: i1\n", "  - name: i1\n    localPort: 70000\n", 1),
    "localASN: true": lambda text: text.replace("localASN: 65001", "localASN: true", 1),
    "localASN as a string": lambda text: text.replace("localASN: 65001", 'localASN: "65001"', 1),
    "kind typo": lambda text: text.replace("kind: CiliumBGPPeerConfig", "kind: CiliumBGPPeerconfig", 1),
}


@pytest.fixture(scope="module")
def env():
    lab = Lab("bhost")
    env = None
    try:
        with lab:
            env = ScaleLab(lab)
            env.write("services.yaml", "".join(
                service_docs(i, ports=1, pods=env.pod_ips, node_name="node1") for i in range(3)))
            env.start(metrics_port=METRICS_PORT)
            wait_until(lambda: env.accepted() >= 3 or env.proc.poll() is not None, timeout=90,
                       interval=0.5, what="3 prefixes at FRR")
            assert env.proc.poll() is None, env.log()[-3000:]
            yield env
    finally:
        if env is not None:
            env.cleanup_pins()


def _feed(env: ScaleLab, probe: ApiProbe, label: str, write, names: tuple[str, ...]) -> None:
    """Apply one bad change and wait until the daemon reported it (a new generation whose
    config errors contain every string of ``names``)."""
    probe.label = label
    before = probe.status().config_generation
    write()

    def reported():
        st = probe.status()
        text = "\n".join(f"{e.file}: {e.object}: {e.message}" for e in st.config_errors)
        return st.config_generation > before and all(n in text for n in names)
    wait_until(reported, timeout=30, interval=0.1,
               what=f"{label}: an error naming {names} in GetStatus")


def test_hostile_input_keeps_sessions_traffic_and_api_and_the_fix_applies(env):
    config = env.config_dir
    good_bgp = (config / "bgp.yaml").read_text()
    baseline = frr_counters(env)
    assert baseline[0] == "established" and baseline[3] == 3, baseline
    long_conn = env.long_connection(vip_of(0))
    greeting = long_conn.stdout.readline().strip()
    assert greeting.startswith("p"), greeting

    cases = [c for c in hostile() if c.must_fail]
    cases += random.Random(7).sample([c for c in all_cases() if c.must_fail and c.write is None
                                      and not c.id.startswith(("Node:", "bomb", "deep", "huge"))],
                                     40)
    with ApiProbe(str(env.socket)) as probe:
        for n, case in enumerate(cases):
            def write(case=case):
                if case.write is not None:
                    case.write(config)
                for name, data in case.files.items():
                    (config / name).write_bytes(data)
            names = tuple(x for x in case.names if x != "case.yaml")
            _feed(env, probe, case.id, write, ("case.yaml" if case.files else "", *names))
            for extra in (set(config.iterdir()) - {config / "bgp.yaml", config / "services.yaml",
                                                  config / "case.yaml"}):
                extra.unlink()                    # the 10,001 files
            if n % 15 == 0:
                assert frr_counters(env) == baseline, (case.id, frr_counters(env), baseline)
        (config / "case.yaml").unlink()

        # the live file, edited badly: every edit is rejected and the previous version stays
        for label, edit in BGP_EDITS.items():
            _feed(env, probe, label, lambda edit=edit: env.write("bgp.yaml", edit(good_bgp)),
                  ("bgp.yaml",))
        _feed(env, probe, "truncated to 0 bytes",
              lambda: (config / "bgp.yaml").write_bytes(b""), ("bgp.yaml", "empty"))
        probe.label = "written in two chunks"
        with open(config / "bgp.yaml", "w") as fh:     # truncate, half, pause, the rest
            fh.write(good_bgp[: len(good_bgp) // 2])
            fh.flush()
            time.sleep(0.05)
            fh.write(good_bgp[len(good_bgp) // 2:])
        time.sleep(2)
        assert frr_counters(env) == baseline, (frr_counters(env), baseline)
        assert not [e for e in probe.status().config_errors if e.file.endswith("bgp.yaml")]

        # VIP traffic: the connection opened before still echoes, new ones are answered
        long_conn.stdin.write("still-there\n")
        long_conn.stdin.flush()
        assert long_conn.stdout.readline().strip() == "still-there"
        for i in range(3):
            assert env.connect(vip_of(i))[0].startswith("p"), env.log()[-3000:]

        # the fix: a good file applies
        probe.label = "fix"
        env.write("more.yaml", service_docs(3, ports=1, pods=env.pod_ips, node_name="node1"))
        env.wait_routed(f"{vip_of(3)}/32")
        assert env.connect(vip_of(3))[0].startswith("p")
        state, established, dropped, accepted = frr_counters(env)
        assert (state, established, dropped, accepted) == (*baseline[:3], 4)

    assert not probe.failures, probe.failures[:10]
    worst = sorted(probe.latencies, reverse=True)[:5]
    print(f"\n{len(cases) + len(BGP_EDITS) + 2} bad inputs; API probe: {len(probe.latencies)} calls, "
          f"slowest {[f'{s * 1000:.0f} ms ({label})' for s, label in worst]}")
    metrics = {line.split()[0]: float(line.split()[1]) for line in
               env.metrics(METRICS_PORT).splitlines() if line.startswith("vipd_event_loop")}
    lag, busy = (metrics["vipd_event_loop_lag_seconds_max"],
                 metrics["vipd_event_loop_busy_lag_seconds_max"])
    print(f"daemon event loop: latest wake-up {lag * 1000:.0f} ms late, of which the loop ran "
          f"vipd's code {busy * 1000:.0f} ms")
    assert busy < MAX_LOOP_LAG_S, env.log()[-3000:]
    assert worst[0][0] < MAX_API_LATENCY_S, worst
    assert "Traceback" not in env.log()
