"""What vipd writes back in Kubernetes mode, read with the real kubectl: two `vipd run
--kubernetes` agents against the API server fake on loopback, after `kubectl apply` of
deploy/kubernetes/cilium-crds.yaml (so the fake prunes by those schemas, as a real server
would). Peers are unreachable loopback addresses: this is about the API objects, not routes
(tests/e2e/kubernetes/test_kubernetes_mode.py has the peering with real routers).

1. each agent's CiliumBGPNodeConfig (owner reference with the ClusterConfig's uid, spec,
   peer status, BGPReconcileError) and the ClusterConfig / pool conditions, by server-side
   apply; a Service's cilium.io/IPAMRequestSatisfied condition, removed when LB-IPAM no longer
   handles it;
2. a field of the NodeConfig taken by another field manager (kubectl patch): vipd's apply
   conflicts (409), is logged with the manager's name, and is retried with force;
3. Cilium's ClusterConfig conditions when a PeerConfig is missing and no node matches; a node
   that leaves every ClusterConfig has its NodeConfig deleted, and its BGP instance stops
   (the deleted NodeConfig is not read back as configuration);
4. the Lease holder stops: the other agent writes the next condition change, and the
   conditions that did not change keep their lastTransitionTime;
5. SIGHUP lists every kind again: a change the watches never delivered is seen;
6. a hand-written NodeConfig (no owner) is run, gets its status, and is never deleted.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from agent import demo
from agent.lab import wait_until
from agent.lab.kubeapi import RESOURCES, FakeApiServer, kubeconfig

ROOT = Path(__file__).resolve().parents[3]
KUBECTL = os.environ.get("VIPD_KUBECTL", "kubectl")
FIRST, SECOND = "cilium-bgp-control-plane", "cilium-bgp-worker2"     # rack0, rack1
PEERS = {"10.0.5.1": "127.0.0.51", "10.0.10.1": "127.0.0.52"}          # nobody listens there
EXTRA = """\
apiVersion: cilium.io/v2
kind: CiliumBGPClusterConfig
metadata:
  name: d-extra
spec:
  nodeSelector:
    matchLabels: {rack: nowhere}
  bgpInstances:
  - name: "65099"
    localASN: 65099
    peers:
    - {name: p, peerASN: 65099, peerAddress: 127.0.0.53, peerConfigRef: {name: d-missing}}
"""


class Cluster:
    def __init__(self, server: FakeApiServer, workdir: Path):
        self.server, self.workdir = server, workdir
        self.kubeconfig = workdir / "kubeconfig"
        self.kubeconfig.write_text(kubeconfig(server.url))
        self.agents: dict[str, subprocess.Popen] = {}

    def kubectl(self, *args: str, manifest: str | None = None) -> str:
        out = subprocess.run([KUBECTL, "--kubeconfig", str(self.kubeconfig), *args,
                              *(["-f", "-"] if manifest is not None else [])],
                             input=manifest, capture_output=True, text=True, timeout=60)
        if out.returncode != 0:
            raise AssertionError(f"kubectl {' '.join(args)} failed: {out.stderr}")
        return out.stdout

    def get(self, kind: str, name: str) -> dict | None:
        out = subprocess.run([KUBECTL, "--kubeconfig", str(self.kubeconfig), "get", kind, name,
                              "-o", "json", "--show-managed-fields"], capture_output=True, text=True, timeout=60)
        if out.returncode != 0:
            assert "NotFound" in out.stderr, out.stderr
            return None
        return json.loads(out.stdout)

    def conditions(self, kind: str, name: str) -> dict[str, dict]:
        return {c["type"]: c for c in ((self.get(kind, name) or {}).get("status") or {})
                .get("conditions", [])}

    def start(self, node: str) -> None:
        d = self.workdir / node
        d.mkdir(exist_ok=True)
        (d / "vipd.sock").unlink(missing_ok=True)
        self.agents[node] = subprocess.Popen(
            [sys.executable, "-m", "agent.daemon", "run", "--kubernetes", "--kubeconfig",
             str(self.kubeconfig), "--node-name", node, "--api-socket", str(d / "vipd.sock"),
             "--state-dir", str(d / "state"), "--log-format", "json"],
            stdout=open(d / "vipd.log", "ab"), stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONPATH": str(ROOT)})
        wait_until(lambda: (d / "vipd.sock").exists() or self.agents[node].poll() is not None,
                   timeout=60, what=f"vipd {node} serving")
        assert self.agents[node].poll() is None, self.log(node)[-3000:]

    def stop(self, node: str) -> int:
        proc = self.agents.pop(node)
        proc.send_signal(signal.SIGTERM)
        try:
            return proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            raise AssertionError(f"vipd {node} did not stop within 30 s of SIGTERM:\n"
                                 + self.log(node)[-3000:]) from None

    def log(self, node: str) -> str:
        return (self.workdir / node / "vipd.log").read_text(errors="replace")

    def vipctl(self, node: str, *args: str) -> str:
        return subprocess.run([sys.executable, "-m", "agent.api.cli", "--socket",
                               str(self.workdir / node / "vipd.sock"), *args], capture_output=True,
                              text=True, timeout=30, check=True,
                              env={**os.environ, "PYTHONPATH": str(ROOT)}).stdout

    def holder(self) -> str:
        return self.kubectl("get", "leases.coordination.k8s.io", "-n", "kube-system",
                            "vipd-lbipam", "-o", "jsonpath={.spec.holderIdentity}").strip()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    if shutil.which(KUBECTL) is None:
        raise RuntimeError(f"{KUBECTL} not found: apt-get install kubernetes-client "
                           "(scripts/install-deps)")
    with FakeApiServer("127.0.0.1", 0, bookmark_interval=0.5) as server:
        c = Cluster(server, tmp_path_factory.mktemp("d-status"))
        crds = c.kubectl("apply", "--validate=false",
                         manifest=(ROOT / "deploy/kubernetes/cilium-crds.yaml").read_text())
        assert crds.count("customresourcedefinition.apiextensions.k8s.io/") == 7, crds
        bgp = demo.V2_BGP_YAML
        for real, loopback in PEERS.items():
            bgp = bgp.replace(real, loopback)
        c.kubectl("apply", "--validate=false", manifest=demo.nodes_yaml())
        c.kubectl("apply", "--server-side", "--validate=false", manifest=bgp)
        pool = demo.service_yaml(traffic_policy="Cluster", endpoint_node=FIRST).split("---\n")[0]
        assert "kind: CiliumLoadBalancerIPPool" in pool
        c.kubectl("apply", "--validate=false", manifest=pool)
        try:
            # one agent first: it holds the Lease and stamps the conditions; the second starts
            # over a second later, so its own timestamps would differ (test 4)
            c.start(FIRST)
            wait_until(lambda: c.holder() == FIRST, timeout=30, what=f"{FIRST} holding the Lease")
            wait_until(lambda: c.conditions("ciliumbgpclusterconfig", "rack0"), timeout=30,
                       what="rack0's conditions")
            time.sleep(1.1)
            c.start(SECOND)
            yield c
        finally:
            hung = []
            for node in list(c.agents):     # every one, even when one does not stop
                try:
                    c.stop(node)
                except AssertionError as exc:
                    hung.append(str(exc))
            assert not hung, "\n".join(hung)


def test_1_node_configs_and_conditions_are_applied(cluster):
    c = cluster
    for node, rack, peer in ((FIRST, "rack0", "127.0.0.51"), (SECOND, "rack1", "127.0.0.52")):
        nc = wait_until(lambda: (o := c.get("ciliumbgpnodeconfig", node)) and o.get("status") and o,
                        timeout=30, what=f"{node}'s CiliumBGPNodeConfig with status")
        owner = c.get("ciliumbgpclusterconfig", rack)
        assert nc["metadata"]["ownerReferences"] == [{
            "apiVersion": "cilium.io/v2", "kind": "CiliumBGPClusterConfig", "name": rack,
            "uid": owner["metadata"]["uid"], "controller": True, "blockOwnerDeletion": True}]
        [instance] = nc["spec"]["bgpInstances"]
        assert [p["peerAddress"] for p in instance["peers"]] == [peer]
        [status] = nc["status"]["bgpInstances"]
        [peer_status] = status["peers"]
        assert peer_status["peerAddress"] == peer
        assert peer_status["peeringState"] in ("idle", "connect", "active")
        [cond] = nc["status"]["conditions"]
        assert (cond["type"], cond["status"]) == ("cilium.io/BGPReconcileError", "False")
        managers = {(m["manager"], m["operation"], m.get("subresource", ""))
                    for m in nc["metadata"]["managedFields"]}
        assert managers == {("vipd", "Apply", ""), ("vipd", "Apply", "status")}
    conds = c.conditions("ciliumbgpclusterconfig", "rack0")
    assert {t: (x["status"], x["observedGeneration"]) for t, x in conds.items()} == {
        "cilium.io/NoMatchingNode": ("False", 1), "cilium.io/MissingPeerConfigs": ("False", 1),
        "cilium.io/ConflictingClusterConfig": ("False", 1)}
    assert c.conditions("ciliumbgppeerconfig", "route-reflector")[
        "cilium.io/MissingAuthSecret"]["status"] == "False"
    pool = wait_until(lambda: c.conditions("ciliumloadbalancerippool", "vips"), timeout=30,
                      what="the pool's conditions")
    assert {"cilium.io/IPsTotal", "cilium.io/IPsAvailable", "cilium.io/IPsUsed"} <= set(pool)


def test_1b_lbipam_condition_on_the_service_comes_and_goes(cluster):
    """Cilium's Service condition, next to the address: satisfied while LB-IPAM handles the
    Service, removed when it no longer does (type changed to ClusterIP)."""
    c = cluster
    svc = demo.service_yaml(traffic_policy="Cluster", endpoint_node=FIRST).split("---\n")[1]
    c.kubectl("apply", "--validate=false", manifest=svc.replace("name: web\n", "name: d-web\n"))
    cond = wait_until(lambda: c.conditions("service", "d-web").get("cilium.io/IPAMRequestSatisfied"),
                      timeout=30, what="d-web's IPAMRequestSatisfied condition")
    assert (cond["status"], cond["reason"]) == ("True", "satisfied")
    assert c.get("service", "d-web")["status"]["loadBalancer"]["ingress"]
    c.kubectl("patch", "service", "d-web", "--type=merge", "-p", '{"spec": {"type": "ClusterIP"}}')
    wait_until(lambda: "cilium.io/IPAMRequestSatisfied" not in c.conditions("service", "d-web"),
               timeout=30, what="the condition removed once LB-IPAM no longer handles d-web")
    c.kubectl("delete", "service", "d-web")


def test_2_a_field_taken_by_another_manager_is_forced_back(cluster):
    c = cluster
    patch = {"spec": {"bgpInstances": [{"name": "65005", "localASN": 65077, "routerID": "10.0.5.11",
                                        "peers": [{"name": "leaf01", "peerASN": 65005,
                                                   "peerAddress": "127.0.0.51",
                                                   "peerConfigRef": {"name": "route-reflector"}}]}]}}
    c.kubectl("patch", "ciliumbgpnodeconfig", FIRST, "--type=merge", "-p", json.dumps(patch))
    wait_until(lambda: c.get("ciliumbgpnodeconfig", FIRST)["spec"]["bgpInstances"][0]["localASN"]
               == 65005, timeout=30, what="vipd taking localASN back")
    log = c.log(FIRST)
    assert "server-side apply conflict; applying again with force" in log
    assert 'conflict with \\"kubectl-patch\\"' in log and "localASN" in log


def test_3_cluster_config_conditions_and_a_node_leaving(cluster):
    c = cluster
    c.kubectl("apply", "--server-side", "--validate=false", manifest=EXTRA)
    conds = wait_until(lambda: (x := c.conditions("ciliumbgpclusterconfig", "d-extra")) and x,
                       timeout=30, what="d-extra's conditions")
    assert conds["cilium.io/NoMatchingNode"]["status"] == "True"
    assert conds["cilium.io/MissingPeerConfigs"]["status"] == "True"
    assert conds["cilium.io/MissingPeerConfigs"]["message"] == \
        "Referenced CiliumBGPPeerConfig(s) are missing: [d-missing]"
    # SECOND leaves rack1 (and so every ClusterConfig): its NodeConfig goes, its instance stops
    c.kubectl("label", "node", SECOND, "rack=elsewhere", "--overwrite")
    wait_until(lambda: c.get("ciliumbgpnodeconfig", SECOND) is None, timeout=30,
               what=f"{SECOND}'s NodeConfig deleted")
    wait_until(lambda: json.loads(c.vipctl(SECOND, "bgp", "peers", "-o", "json"))["peers"] == [],
               timeout=30, what=f"{SECOND} without BGP peers")
    assert "CiliumBGPNodeConfig deleted" in c.log(SECOND)
    c.kubectl("label", "node", SECOND, "rack=rack1", "--overwrite")
    wait_until(lambda: c.get("ciliumbgpnodeconfig", SECOND), timeout=30,
               what=f"{SECOND}'s NodeConfig back")


def test_4_leader_failover_keeps_conditions(cluster):
    c = cluster
    assert c.holder() == FIRST
    before = c.conditions("ciliumbgpclusterconfig", "rack0")
    extra_before = c.conditions("ciliumbgpclusterconfig", "d-extra")
    assert c.stop(FIRST) == 0
    wait_until(lambda: c.holder() == SECOND, timeout=30, what=f"{SECOND} taking the Lease")
    # a change only the new holder can write: the missing PeerConfig appears
    c.kubectl("apply", "--server-side", "--validate=false", manifest=(
        "apiVersion: cilium.io/v2\nkind: CiliumBGPPeerConfig\nmetadata:\n  name: d-missing\n"
        "spec: {}\n"))
    wait_until(lambda: c.conditions("ciliumbgpclusterconfig", "d-extra")[
        "cilium.io/MissingPeerConfigs"]["status"] == "False", timeout=30,
        what=f"{SECOND} writing MissingPeerConfigs=False")
    after = c.conditions("ciliumbgpclusterconfig", "d-extra")
    assert after["cilium.io/NoMatchingNode"] == extra_before["cilium.io/NoMatchingNode"]
    assert after["cilium.io/MissingPeerConfigs"]["lastTransitionTime"] >= \
        extra_before["cilium.io/MissingPeerConfigs"]["lastTransitionTime"]
    # the unchanged conditions were not restamped by the new holder (it started later)
    assert c.conditions("ciliumbgpclusterconfig", "rack0") == before
    c.start(FIRST)


def test_5_sighup_lists_every_kind_again(cluster):
    c = cluster
    wait_until(lambda: c.get("ciliumbgpnodeconfig", FIRST), timeout=30, what="FIRST's NodeConfig")
    # the Node leaves rack0, and the watch event saying so is lost (as behind a faulty proxy)
    node, storage = next(r for r in RESOURCES if r.kind == "Node"), c.server.storage
    with storage.lock:
        storage.rv += 1
        meta = storage.objects[node][("", FIRST)]["metadata"]
        meta["labels"]["rack"], meta["resourceVersion"] = "elsewhere", str(storage.rv)
    time.sleep(2)
    assert c.get("ciliumbgpnodeconfig", FIRST) is not None     # nothing told vipd
    c.agents[FIRST].send_signal(signal.SIGHUP)
    wait_until(lambda: c.get("ciliumbgpnodeconfig", FIRST) is None, timeout=30,
               what="FIRST's NodeConfig deleted after the re-list")
    assert "SIGHUP: listing every kind again" in c.log(FIRST)


def test_6_a_hand_written_node_config_is_run_reported_and_left_alone(cluster):
    """No ClusterConfig selects FIRST now (test 5): a CiliumBGPNodeConfig written by hand (no
    owner) is its configuration; vipd reports its status there and never deletes or rewrites it."""
    c = cluster
    c.kubectl("apply", "--validate=false", manifest=(
        f"apiVersion: cilium.io/v2\nkind: CiliumBGPNodeConfig\nmetadata: {{name: {FIRST}}}\n"
        "spec:\n  bgpInstances:\n  - name: hand\n    localASN: 65123\n    peers:\n"
        "    - {name: p, peerAddress: 127.0.0.54, peerASN: 65123}\n"))
    nc = wait_until(lambda: (o := c.get("ciliumbgpnodeconfig", FIRST)) and o.get("status") and o,
                    timeout=30, what="the hand-written NodeConfig's status")
    [instance] = nc["status"]["bgpInstances"]
    assert (instance["name"], instance["peers"][0]["peerAddress"]) == ("hand", "127.0.0.54")
    assert "ownerReferences" not in nc["metadata"]
    assert nc["spec"]["bgpInstances"][0]["localASN"] == 65123
    assert {(m["manager"], m.get("subresource", "")) for m in nc["metadata"]["managedFields"]
            if m["manager"] == "vipd"} == {("vipd", "status")}
    peers = json.loads(c.vipctl(FIRST, "bgp", "peers", "-o", "json"))["peers"]
    assert [(p["instance"], p["peerAddress"]) for p in peers] == [("hand", "127.0.0.54")]
    time.sleep(2)
    later = c.get("ciliumbgpnodeconfig", FIRST)
    assert later is not None and later["spec"] == nc["spec"]
    assert "ownerReferences" not in later["metadata"]
