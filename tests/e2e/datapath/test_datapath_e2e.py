"""The datapath end to end: real TCP/UDP connections to Service VIPs through vipd's XDP/tc programs.

Lab (see dp_topology.py): client -> router -> node-a / node-b on a LAN -> pods a1, a2 (node-a)
and b1, b2 (node-b), routed natively. The router sends the VIP range to node-a, which load
balances; each node runs its own agent process (lbagent.py) with its own pinned maps.

Services (TCP :80 and UDP :53, backends on :8080):
  10.96.0.10  local: a1, a2 (DNAT on node-a, replies reverse-translated on node-a's uplink)
  10.96.0.11  SNAT:  b1, b2 (DNAT+SNAT on node-a, replies come back through node-a)
  10.96.0.12  DSR:   b1, b2 (VIP carried to node-b, replies go straight to the router)
  10.96.0.20  mixed SNAT: a1, a2, b1, b2 (distribution, conntrack stickiness, removal)
  fd96::10 / fd96::11 / fd96::12: the local, SNAT and DSR services again over IPv6
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from agent.datapath.api import Datapath, Features
from agent.datapath.flowhash import flow_hash
from agent.datapath.model import Backend, Service, ServiceKey
from agent.lab import Lab, wait_until
from agent.lb.maglev import build_table

import dp_topology as topology
import lbagent
from dp_topology import CLIENT, CLIENT6, NODE_ADDR, NODE_ADDR6, PODS, POD_PORT, pod_address

HERE = Path(__file__).resolve().parent
LOCAL, SNAT, DSR, MIX = "10.96.0.10", "10.96.0.11", "10.96.0.12", "10.96.0.20"
LOCAL6, SNAT6, DSR6 = "fd96::10", "fd96::11", "fd96::12"
SERVICE_PODS = {LOCAL: ("a1", "a2"), SNAT: ("b1", "b2"), DSR: ("b1", "b2"), MIX: ("a1", "a2", "b1", "b2"),
                LOCAL6: ("a1", "a2"), SNAT6: ("b1", "b2"), DSR6: ("b1", "b2")}
MODES = {LOCAL: "snat", SNAT: "snat", DSR: "dsr", MIX: "snat", LOCAL6: "snat", SNAT6: "snat", DSR6: "dsr"}
PORTS = {"tcp": 80, "udp": 53}


def services_for(node: str, mix_pods=SERVICE_PODS[MIX], weights: dict[str, int] | None = None) -> list[dict]:
    out = []
    for vip, pods in SERVICE_PODS.items():
        pods = mix_pods if vip == MIX else pods
        for proto, port in PORTS.items():
            out.append({"vip": vip, "port": port, "proto": proto, "mode": MODES[vip], "backends": [
                {"addr": pod_address(p, 6 if ":" in vip else 4), "port": POD_PORT, "local": PODS[p][0] == node,
                 "weight": (weights or {}).get(p, 1)} for p in pods]})
    return out


class Node:
    """One node's agent: a config file and the one-shot/holding agent process."""

    def __init__(self, env, name: str):
        self.env, self.name = env, name
        self.host = env.nodes[name]
        self.instance = f"e2e-{name}-{self.host.ns}"
        self.pin_root = f"/sys/fs/bpf/vipd-e2e-{self.host.ns}"
        self.config_path = env.lab.workdir / f"{name}.json"

    def config(self, **kw) -> dict:
        return {"instance": self.instance, "pin_root": self.pin_root, "netns": self.host.ns,
                "node_v4": NODE_ADDR[self.name], "node_v6": NODE_ADDR6[self.name], "xdp": ["eth-lan"], "tc_ingress": ["eth-lan"],
                "tc_egress": ["eth-lan"], "services": services_for(self.name, **kw)}

    def start_apply(self, **kw) -> subprocess.Popen:
        self.config_path.write_text(json.dumps(self.config(**kw)))
        return subprocess.Popen([sys.executable, str(HERE / "lbagent.py"), str(self.config_path)],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def finish_apply(self, proc: subprocess.Popen) -> dict:
        out, err = proc.communicate(timeout=180)
        if proc.returncode != 0:
            raise RuntimeError(f"agent on {self.name} failed:\n{err[-3000:]}")
        return _result(out.splitlines())

    def apply(self, **kw) -> dict:
        """Run one agent process to completion (load/adopt, attach, reconcile, exit)."""
        return self.finish_apply(self.start_apply(**kw))

    def spawn_holding(self) -> subprocess.Popen:
        self.config_path.write_text(json.dumps(self.config()))
        return subprocess.Popen([sys.executable, str(HERE / "lbagent.py"), str(self.config_path), "--hold"],
                                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)

    def destroy(self) -> None:
        """Unpin the maps. The programs go with the node's interfaces when the lab deletes
        its namespaces; no compile needed just to clean up."""
        shutil.rmtree(self.pin_root, ignore_errors=True)


def _result(lines) -> dict:
    for line in lines:
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    raise RuntimeError("agent printed no RESULT line")


@pytest.fixture(scope="module")
def env():
    with Lab("dpe2e") as lab:
        env = topology.build(lab)
        env.agents = {name: Node(env, name) for name in NODE_ADDR}
        try:
            started = [(node, node.start_apply()) for node in env.agents.values()]  # both nodes at once
            for node, proc in started:
                node.finish_apply(proc)
            yield env
        finally:
            for node in env.agents.values():
                try:
                    node.destroy()
                except Exception as exc:  # noqa: BLE001 - report, keep tearing down
                    print(f"destroy {node.name}: {exc}", file=sys.stderr)


def traffic(env, *args, timeout=120) -> object:
    out = env.client.run(sys.executable, str(HERE / "traffic.py"), *map(str, args), timeout=timeout)
    return json.loads(out)


def pod_by_addr() -> dict[str, str]:
    return {pod_address(pod, fam): pod for pod in PODS for fam in (4, 6)}


def predicted(vip: str, proto: str, sports, pods=None, weights: dict[str, int] | None = None) -> dict[int, str]:
    """Which pod the Maglev model (agent.lb.maglev + the flow hash) says serves each source port."""
    pods = pods or SERVICE_PODS[vip]
    fam = 6 if ":" in vip else 4
    svc = Service(ServiceKey(vip, PORTS[proto], 6 if proto == "tcp" else 17),
                  tuple(Backend(pod_address(p, fam), POD_PORT, weight=(weights or {}).get(p, 1)) for p in pods))
    backends = svc.selectable_backends()
    table = build_table([(b.name, b.weight) for b in backends], svc.maglev_m)
    seed = Features().hash_seed
    names = pod_by_addr()
    client = CLIENT6 if fam == 6 else CLIENT
    return {sp: names[str(backends[table[flow_hash(client, sp, PORTS[proto], int(svc.key.proto), seed)
                                           % svc.maglev_m]].addr)] for sp in sports}


# -- connectivity in every mode ---------------------------------------------------------------------

@pytest.mark.parametrize("proto", ["tcp", "udp"])
@pytest.mark.parametrize("vip", [LOCAL, SNAT, DSR, LOCAL6, SNAT6, DSR6],
                         ids=["local", "snat", "dsr", "local-v6", "snat-v6", "dsr-v6"])
def test_connections_succeed_and_come_from_the_vip(env, vip, proto):
    sport0 = {LOCAL: 21000, SNAT: 22000, DSR: 23000, LOCAL6: 26000, SNAT6: 27000, DSR6: 28000}[vip] \
        + (500 if proto == "udp" else 0)
    results = traffic(env, "burst", vip, PORTS[proto], proto, sport0, 40)
    failures = [r for r in results if "served_by" not in r]
    assert not failures, failures[:5]
    assert {r["from"] for r in results} == {vip}          # the client only ever sees the VIP
    served = Counter(r["served_by"] for r in results)
    assert set(served) == set(SERVICE_PODS[vip]), served  # both backends get flows
    # and each flow went exactly where the Maglev model says
    assert {r["sport"]: r["served_by"] for r in results} == predicted(vip, proto, range(sport0, sport0 + 40))


# -- cold neighbour table ---------------------------------------------------------------------------

@pytest.mark.parametrize("vip", [SNAT, DSR], ids=["snat", "dsr"])
def test_cold_neighbour_table_does_not_drop_the_first_packet(env, vip):
    """bpf_fib_lookup finds no neighbour entry for the backend's node: the packet must go on
    through the stack (which resolves it), not be dropped and retransmitted a second later."""
    node_a = env.nodes["node-a"]
    node_a.run("ip", "neigh", "flush", "dev", "eth-lan")
    resolved = [line.split()[0] for line in node_a.run("ip", "neigh", "show", "dev", "eth-lan").splitlines()
                if "lladdr" in line]
    assert NODE_ADDR["node-b"] not in resolved
    results = traffic(env, "burst", vip, 80, "tcp", 25000 if vip == SNAT else 25100, 5)
    assert all("served_by" in r for r in results), results
    assert results[0]["seconds"] < 0.9, results[0]  # no SYN retransmission (1 s) was needed


# -- DSR: replies bypass the load-balancing node ---------------------------------------------------

def _capture(env, vips, action) -> list:
    from scapy.all import IP, Ether, IPv6, rdpcap
    pcap = env.lab.workdir / f"router-{time.monotonic_ns()}.pcap"
    flt = " or ".join(f"host {v}" for v in vips)
    proc = env.router.spawn(["tcpdump", "-Z", "root", "--immediate-mode", "-i", "eth-lan", "-n", "-U", "-w", str(pcap), flt])
    wait_until(lambda: "listening on" in Path(proc.log_path).read_text(), timeout=10, what="tcpdump")
    action()
    # the last replies (FIN/ACKs) can land after the client returned: stop once tcpdump's file
    # has stopped growing for 0.5 s (a fixed 0.3 s lost one reply on a loaded machine)
    size, still_since, deadline = -1, time.monotonic(), time.monotonic() + 5
    while time.monotonic() < deadline:
        now_size = pcap.stat().st_size if pcap.exists() else 0
        if now_size != size:
            size, still_since = now_size, time.monotonic()
        elif time.monotonic() - still_since >= 0.5:
            break
        time.sleep(0.05)
    proc.terminate()
    proc.wait(timeout=5)
    out = []
    for p in rdpcap(str(pcap)):
        l3 = p[IP] if IP in p else p[IPv6] if IPv6 in p else None
        if l3 is not None:
            out.append((p[Ether].src, p[Ether].dst, l3.src, l3.dst))
    return out


def mac(host, ifname="eth-lan") -> str:
    return json.loads(host.run("ip", "-j", "link", "show", ifname))[0]["address"]


@pytest.mark.parametrize("snat,dsr", [(SNAT, DSR), (SNAT6, DSR6)], ids=["v4", "v6"])
def test_dsr_reply_bypasses_the_lb_node(env, snat, dsr):
    mac_a, mac_b = mac(env.nodes["node-a"]), mac(env.nodes["node-b"])

    def act():
        for proto, base in (("tcp", 24000), ("udp", 24500)):
            for vip in (snat, dsr):
                res = traffic(env, "burst", vip, PORTS[proto], proto, base + (100 if vip == dsr else 0), 10)
                assert all("served_by" in r for r in res), res
    pkts = _capture(env, [snat, dsr], act)
    replies = {vip: {src_mac for src_mac, _, src, _ in pkts if src == vip} for vip in (snat, dsr)}
    requests = {vip: {dst_mac for _, dst_mac, _, dst in pkts if dst == vip} for vip in (snat, dsr)}
    assert requests[dsr] == requests[snat] == {mac_a}  # the router sends every request to node-a
    assert replies[snat] == {mac_a}                    # SNAT: replies come back through node-a
    assert replies[dsr] == {mac_b}                     # DSR: node-b answers the router directly
    assert sum(1 for _, _, src, _ in pkts if src == dsr) >= 40


# -- Maglev distribution ----------------------------------------------------------------------------

def test_1000_connections_spread_as_the_maglev_model_predicts(env):
    sports = range(30000, 31000)
    results = traffic(env, "burst", MIX, 80, "tcp", sports.start, len(sports))
    assert all("served_by" in r for r in results), [r for r in results if "served_by" not in r][:5]
    want = predicted(MIX, "tcp", sports)
    got = {r["sport"]: r["served_by"] for r in results}
    mismatched = [sp for sp in sports if got[sp] != want[sp]]
    assert not mismatched, f"{len(mismatched)} flows not on the predicted backend, e.g. {mismatched[:5]}"
    # Statistical bound: with 4 equal backends each count ~ Binomial(1000, 1/4); allow 4 sigma.
    counts = Counter(got.values())
    sigma = math.sqrt(1000 * 0.25 * 0.75)
    for pod in SERVICE_PODS[MIX]:
        assert abs(counts[pod] - 250) <= 4 * sigma, counts


# -- table changes: conntrack keeps flows, removal breaks only the removed backend's flows ---------

def test_removing_a_backend_breaks_only_its_connections(env):
    node_a = env.agents["node-a"]
    # This test process adopts node-a's pinned maps itself (no agent is running): one compile
    # instead of one per change.
    dp = Datapath(instance=node_a.instance, pin_root=node_a.pin_root)
    dp.load()

    def program(**kw) -> None:
        for d in services_for("node-a", **kw):
            if d["vip"] == MIX and d["proto"] == "tcp":
                dp.upsert_service(lbagent.service_from(d))

    holder = subprocess.Popen(env.client.exec_argv([sys.executable, str(HERE / "traffic.py"), "hold", MIX, "80",
                                                    "40000", "80"]), stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        initial = {r["sport"]: r["served_by"] for r in json.loads(holder.stdout.readline())}
        assert set(initial.values()) == set(SERVICE_PODS[MIX])

        def probe() -> dict[int, str]:
            holder.stdin.write("probe\n")
            holder.stdin.flush()
            return {r["sport"]: r.get("served_by") or r["error"] for r in json.loads(holder.stdout.readline())}

        # Reweighting moves many Maglev slots; established flows stay on their backend (conntrack).
        program(weights={"a1": 4})
        reweighted = predicted(MIX, "tcp", initial, weights={"a1": 4})
        moved = [sp for sp in initial if reweighted[sp] != initial[sp]]
        assert len(moved) >= 10, "the reweight should move some held flows' slots"
        assert probe() == initial
        # Remove b2: every connection not on b2 keeps working on its backend.
        program(mix_pods=("a1", "a2", "b1"))
        after = probe()
        survivors = {sp: pod for sp, pod in initial.items() if pod != "b2"}
        assert {sp: after[sp] for sp in survivors} == survivors
        # New connections never go to b2 any more, and follow the new table.
        new = traffic(env, "burst", MIX, 80, "tcp", 41000, 100)
        assert all(r.get("served_by") in ("a1", "a2", "b1") for r in new), new[:5]
        assert {r["sport"]: r["served_by"] for r in new} == predicted(MIX, "tcp", range(41000, 41100),
                                                                     pods=("a1", "a2", "b1"))
    finally:
        holder.stdin.close()
        holder.terminate()
        holder.wait(timeout=5)
        program()
        dp.close()


# -- agent restart ---------------------------------------------------------------------------------

def test_agent_restart_during_a_stream_loses_no_connection(env):
    """Kill -9 the agent and start a new one while the client keeps opening connections to a
    local-backend VIP (tc reverse NAT on node-a) and a DSR VIP (XDP on node-a, tc on node-b)."""
    node_a = env.agents["node-a"]
    holding = node_a.spawn_holding()
    first = _result(iter(holding.stdout.readline, ""))
    stream = subprocess.Popen(env.client.exec_argv([sys.executable, str(HERE / "traffic.py"), "stream",
                                                    f"{LOCAL},{DSR}", "80", "stdin"]),
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        events = [("stream", time.time())]
        time.sleep(1.0)
        holding.kill()                      # a crash: no cleanup at all
        holding.wait(timeout=5)
        events.append(("killed", time.time()))
        second = node_a.apply()             # a new process adopts the pinned maps and re-attaches
        events.append(("second applied", time.time()))
        time.sleep(1.0)
        out, _ = stream.communicate(input="", timeout=60)
    finally:
        if holding.poll() is None:
            holding.kill()
        if stream.poll() is None:
            stream.kill()
    result = json.loads(out)
    timeline = [(what, round(t - result["start"], 2)) for what, t in events]
    assert result["failures"] == [], (result["failures"][:5], timeline)
    assert result["ok"] > 100
    n = len(services_for("node-a"))
    assert first["services"] == second["adopted_services"] == n
    assert second["slots_written"] == 0     # nothing changed: the new process writes nothing


# -- SNAT port reuse -------------------------------------------------------------------------------

def test_snat_ports_are_reused_after_connections_close(env):
    """More short SNAT connections than the SNAT port range holds (61000-65535: 4536 ports):
    ports of closed flows must be reused, or new flows die with SNAT_NO_PORT. Paced at
    350/s, below the sustainable 4536 ports / 10 s close timeout, so any failure is a leak."""
    features = Features()
    n_ports = features.snat_port_max - features.snat_port_min + 1
    clients = 3  # three sequential clients at once: the Python client is the bottleneck
    procs = [subprocess.Popen(env.client.exec_argv([sys.executable, str(HERE / "traffic.py"), "stream", SNAT, "80",
                                                    "120", str((n_ports + 300) // clients + 1), str(350 / clients)]),
                              stdout=subprocess.PIPE, text=True) for _ in range(clients)]
    results = [json.loads(p.communicate(timeout=180)[0]) for p in procs]
    failures = [f for r in results for f in r["failures"]]
    ok = sum(r["ok"] for r in results)
    assert failures == [], (len(failures), failures[:5], "ok", ok)
    assert ok >= n_ports + 300, ok
