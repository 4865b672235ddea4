"""HTTP through a VIP served by the real daemon (`vipd run --lb-interface ...`), the way users
run it: the seed 002 lab, eTP=Local with the endpoint on cilium-bgp-worker, whose XDP DNATs
to the local pod and whose tc egress must turn the pod's replies (100 KiB: non-linear skbs,
many segments) back into VIP:80. Before issue 8's fix every reply frame above 128 bytes left
with the pod's address and curl failed.

The same lab then checks what an operator sees of that traffic: `vipctl service list`,
`vipctl bpf lb list`, `vipctl bpf lb maglev get`, `vipctl bpf ct list`, `vipctl bpf drops`
and the Prometheus counters, all read from the kernel's maps of the running daemon."""

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from agent import demo
from agent.demo import NODES, Seed002Lab
from agent.lab import Lab, wait_until

POD_PORT = 8080
SIZE = 100 * 1024
METRICS_PORT = 9962
WORKER = "cilium-bgp-worker"


@pytest.fixture(scope="module")
def env():
    lab = Lab("dhttp")
    try:
        with lab:
            env = Seed002Lab(lab).build()
            env.prepare_datapath()
            node = next(n for n in NODES if n.name == "cilium-bgp-worker")
            www = lab.workdir / "www"
            www.mkdir()
            env.body = os.urandom(SIZE)
            (www / "100k").write_bytes(env.body)
            pod = lab.hosts[f"pod-{node.host}"]
            pod.spawn([sys.executable, "-m", "http.server", "--bind", "0.0.0.0", "--directory", str(www), str(POD_PORT)])
            wait_until(lambda: f":{POD_PORT}" in pod.run("ss", "-ltn"), what="http.server in the pod")
            svc = demo.service_yaml(traffic_policy="Local", endpoint_node=node.name)
            svc = svc.replace("targetPort: 80", f"targetPort: {POD_PORT}").replace(
                "ports:\n- port: 80\n  protocol: TCP\nendpoints", f"ports:\n- port: {POD_PORT}\n  protocol: TCP\nendpoints")
            assert f"targetPort: {POD_PORT}" in svc and f"- port: {POD_PORT}" in svc
            env.write_all("nodes.yaml", demo.nodes_yaml())
            env.write_all("bgp.yaml", demo.V2_BGP_YAML)
            env.write_all("svc.yaml", svc)
            env.start_nodes(None, "--metrics-addr", f"127.0.0.1:{METRICS_PORT}", lb=True)
            wait_until(env.sessions_established, timeout=120, what="sessions established")
            yield env
    finally:
        shutil.rmtree(Path("/sys/fs/bpf") / f"{lab.prefix}vipd", ignore_errors=True)


def test_http_get_of_100_kib_through_a_local_backend_vip(env):
    address = env.vip()
    wait_until(lambda: env.vip_announcers(f"{address}/32") == {"10.0.5.12"}, timeout=60,
               what="VIP announced by cilium-bgp-worker only")
    out = env.lab.workdir / "got"

    def get():
        out.unlink(missing_ok=True)
        env.client.run("curl", "-sS", "--fail", "--max-time", "10", "-o", str(out), f"http://{address}/100k",
                       check=False)
        return out.exists() and out.stat().st_size == SIZE
    wait_until(get, timeout=30, what="a 100 KiB GET through the VIP")
    for _ in range(5):
        env.client.run("curl", "-sS", "--fail", "--max-time", "10", "-o", str(out), f"http://{address}/100k")
        assert hashlib.sha256(out.read_bytes()).hexdigest() == hashlib.sha256(env.body).hexdigest()


def _get(env, address: str, path: str = "100k") -> None:
    out = env.lab.workdir / "got-inspect"
    env.client.run("curl", "-sS", "--fail", "--max-time", "10", "-o", str(out), f"http://{address}/{path}")
    assert out.stat().st_size == SIZE


def _frontend(env, address: str) -> dict:
    data = json.loads(env.vipctl(WORKER, "service", "list", "-o", "json"))
    [front] = [f for f in data["frontends"] if f["address"] == address and f["port"] == 80]
    return front


def _metrics(env) -> str:
    host = env.nodes[WORKER].host
    code = f"import urllib.request; print(urllib.request.urlopen('http://127.0.0.1:{METRICS_PORT}/metrics', timeout=10).read().decode())"
    return host.run(sys.executable, "-c", code, timeout=30)


def _metric(text: str, name: str, **labels) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and sample.labels == labels:
                return sample.value
    raise AssertionError(f"{name}{labels} not in metrics:\n{text[-3000:]}")


def test_operator_sees_the_service_its_backend_table_flows_and_counters(env):
    address = env.vip()
    wait_until(lambda: env.vip_announcers(f"{address}/32") == {"10.0.5.12"}, timeout=60,
               what="VIP announced by cilium-bgp-worker only")
    wait_until(lambda: _get(env, address) is None, timeout=30, what="a GET through the VIP")
    front = _frontend(env, address)
    pod = env.nodes[WORKER].spec.pod_address
    assert front["protocol"] == "TCP" and front["type"] == "LoadBalancer" and front["service"].count("/") == 1
    assert "SNAT" in front["flags"] and "Local" in front["flags"]
    [backend] = front["backends"]
    assert (backend["address"], backend["port"], backend["state"]) == (pod, POD_PORT, "active")
    # one backend owns every slot of a table of the size auto chose (>= 251, prime)
    assert front["maglevSize"] >= 251 and backend["maglevSlots"] == front["maglevSize"]

    # the counters count what clients send to the frontend: one more 100 KiB GET adds its
    # handshake, request, ACKs of the reply (fewer with GRO) and FIN: 6 packets at the least
    before = front["bytes"], front["packets"]
    _get(env, address)
    after = _frontend(env, address)
    sent = after["packets"] - before[1]
    assert sent >= 6 and after["bytes"] - before[0] >= 52 * sent, (before, after)

    table = env.vipctl(WORKER, "service", "list")
    assert re.search(rf"^{front['id']}\s+{re.escape(address)}:80/TCP\s+LoadBalancer\s+{re.escape(front['service'])}"
                     rf"\s+\S+\s+1 => {re.escape(pod)}:{POD_PORT}/TCP \(active\)$", table, re.M), table
    lb = env.vipctl(WORKER, "bpf", "lb", "list")
    assert lb.startswith("SERVICE ADDRESS")
    assert re.search(rf"^{re.escape(address)}:80/TCP\s+0\.0\.0\.0:0 \({front['id']}\) \(0\) \[LoadBalancer, SNAT, Local\]",
                     lb, re.M), lb
    assert re.search(rf"^\s+{re.escape(pod)}:{POD_PORT}/TCP \({front['id']}\) \(1\) slots={front['maglevSize']}$",
                     lb, re.M), lb

    by_id = json.loads(env.vipctl(WORKER, "bpf", "lb", "maglev", "get", str(front["id"]), "-o", "json"))
    by_frontend = json.loads(env.vipctl(WORKER, "bpf", "lb", "maglev", "get", f"{address}:80", "-o", "json"))
    assert by_id == by_frontend
    [t] = by_id["tables"]
    assert t["family"] == "v4" and t["table"] == [backend["id"]] * front["maglevSize"]
    assert env.vipctl(WORKER, "bpf", "lb", "maglev", "list").startswith("SVC ID")
    missing = env.vipctl(WORKER, "bpf", "lb", "maglev", "get", "65000", check=False)
    assert missing == ""   # NOT_FOUND goes to stderr with exit 1 (checked below)

    # a connection held open is in conntrack: the SERVICE entry of the client's flow
    holder = env.client.spawn([sys.executable, "-c",
                               "import socket,time,sys; s=socket.create_connection((sys.argv[1],80)); "
                               "print(s.getsockname()[1], flush=True); time.sleep(30)", address])
    try:
        def flow():
            ct = json.loads(env.vipctl(WORKER, "bpf", "ct", "list", "-o", "json"))
            return [e for e in ct["entries"] if e["direction"] == "service"
                    and e["destination"] == f"{address}:80" and e["serviceId"] == front["id"]
                    and e["backendId"] == backend["id"]]
        wait_until(flow, timeout=10, what="the held connection in vipctl bpf ct list")
        text = env.vipctl(WORKER, "bpf", "ct", "list")
        assert re.search(rf"^TCP SERVICE \S+ -> {re.escape(address)}:80 service={front['id']} backend={backend['id']}",
                         text, re.M), text
    finally:
        holder.kill()
        holder.wait()

    drops = json.loads(env.vipctl(WORKER, "bpf", "drops", "--all", "-o", "json"))
    assert {d["reason"] for d in drops["drops"]} >= {"NO_BACKEND", "SOURCE_RANGE", "FIB_LOOKUP"}
    assert any(c["hook"] == "xdp" and c["outcome"] == "ct_new" and c["packets"] > 0 for c in drops["counters"])
    assert env.vipctl(WORKER, "bpf", "drops").startswith("REASON")

    metrics = _metrics(env)
    frontend = f"{address}:80/TCP"
    assert _metric(metrics, "vipd_service_bytes_total", service=front["service"], frontend=frontend) >= after["bytes"]
    assert _metric(metrics, "vipd_service_packets_total", service=front["service"], frontend=frontend) >= after["packets"]
    assert _metric(metrics, "vipd_datapath_drops_total", reason="NO_BACKEND") >= 0
    assert _metric(metrics, "vipd_datapath_packets_total", hook="xdp", outcome="ct_new") > 0
    assert _metric(metrics, "vipd_datapath_conntrack_entries", direction="service") >= 1
    # the service's Maglev table was built (once: frontends with the same backends share it);
    # every pass step is timed, the pure plan and each reconciler
    assert _metric(metrics, "vipd_maglev_builds_total") >= 1
    # this agent programmed the service: its entries and Maglev slots were written
    assert _metric(metrics, "vipd_datapath_map_writes_total") >= 251
    for step in ("plan", "services", "neighbors", "advertisements", "services-delete"):
        assert _metric(metrics, "vipd_reconcile_duration_seconds_count", reconciler=step) >= 1


def test_inspection_errors_are_clear(env):
    node = env.nodes[WORKER]
    res = subprocess.run([sys.executable, "-m", "agent.api.cli", "--socket", str(node.socket),
                          "bpf", "lb", "maglev", "get", "65000"], capture_output=True, text=True, timeout=30)
    assert res.returncode == 1 and "NOT_FOUND" in res.stderr and "no service with id 65000" in res.stderr
    assert "Traceback" not in res.stderr
