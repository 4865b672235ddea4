"""Kubernetes mode end to end: the seed 002 lab (real FRR routers, four nodes) with every
`vipd run --kubernetes --kubeconfig` reading the API server instead of a directory, and the
manifests put there with the real `kubectl`.

No kube-apiserver can be installed here, so the API server is agent.lab.kubeapi (the real
HTTP/JSON protocol: discovery, list, chunked watches, bookmarks, 410 Gone), running inside
leaf01's namespace on 10.0.5.1:6443; rack1's nodes reach it through the routers. kubectl runs
in the same namespace. Steps build on each other:

0. kubectl apply of deploy/kubernetes/cilium-crds.yaml (the fake prunes by their schemas);
1. kubectl apply of the seed's CiliumBGPPeeringPolicy and Nodes: the routers learn the four
   PodCIDRs exactly as in file mode (the assertion of tests/e2e/controlplane/test_seed002_lab);
2. kubectl apply --server-side of the v2 resources, kubectl delete of the legacy policy: the
   same routes, now from the v2 instances;
2b. each node's CiliumBGPNodeConfig (written by its vipd with server-side apply) reports the
   established session, timers and route counts; a node relabelled out of every ClusterConfig
   loses its NodeConfig and session (the router withdraws its PodCIDR), and gets both back;
3. kubectl apply of a LoadBalancer Service: LB-IPAM allocates, every node announces the VIP;
   the server closes every watch (as at its timeoutSeconds): they resume from their
   resourceVersion without a re-list; kubectl delete: withdrawn;
4. vipd cut off from the API server (its watches end and are refused; the history is
   compacted) while kubectl deletes the Service: when the outage ends, the watches get 410 Gone,
   vipd re-lists, and the VIP is withdrawn;
5. the LB-IPAM address is written to the Service's status (read back with kubectl); agents
   restarted with empty state directories (a failover to new nodes) keep it;
6. one node writes status, the holder of the vipd-lbipam Lease; when it stops, another takes
   the Lease and writes the next Service's address; existing addresses stay.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from agent import demo
from agent.demo import NODES, Seed002Lab
from agent.lab import Lab, wait_until
from agent.lab.kubeapi import kubeconfig

ROOT = Path(__file__).resolve().parents[3]
# Debian's kubernetes-client (1.20) or any newer kubectl on PATH; VIPD_KUBECTL picks another
KUBECTL = os.environ.get("VIPD_KUBECTL", "kubectl")
API = "http://10.0.5.1:6443"


def _assert_pod_cidrs_everywhere(env):
    # the file-mode test's expectation, applied to Kubernetes mode
    sys.path.insert(0, str(ROOT / "tests" / "e2e" / "controlplane"))
    try:
        from test_seed002_lab import assert_pod_cidrs_everywhere
    finally:
        sys.path.pop(0)
    assert_pod_cidrs_everywhere(env)


class KubeLab:
    def __init__(self, env: Seed002Lab):
        self.env = env
        self.apihost = env.lab.hosts["leaf01"]
        self.kubeconfig = env.lab.workdir / "kubeconfig"
        self.kubeconfig.write_text(kubeconfig(API))

    def start_api(self) -> None:
        self.api_proc = self.apihost.spawn(
            [sys.executable, "-m", "agent.lab.kubeapi", "--listen", "0.0.0.0:6443",
             "--bookmark-interval", "1"],
            env={"PYTHONPATH": str(ROOT)}, log_path=self.env.lab.workdir / "kubeapi.log")
        wait_until(lambda: self.api_proc.poll() is not None or self.fake("GET", "/version"),
                   timeout=20, what="the API server fake answering")
        assert self.api_proc.poll() is None, (self.env.lab.workdir / "kubeapi.log").read_text()

    def fake(self, method: str, path: str):
        """A request to the fake from inside leaf01 (its namespace holds the address)."""
        code = ("import sys, urllib.request as u; r = u.urlopen(u.Request(sys.argv[1], "
                "method=sys.argv[2], data=b'' if sys.argv[2] == 'POST' else None), timeout=5); "
                "print(r.read().decode())")
        try:
            return json.loads(self.apihost.run(sys.executable, "-c", code, API + path, method))
        except Exception:  # noqa: BLE001 - not up yet
            return None

    def kubectl(self, *args: str, manifest: str | None = None) -> str:
        argv = [KUBECTL, "--kubeconfig", str(self.kubeconfig), *args]
        if manifest is not None:
            argv += ["-f", "-"]
        out = subprocess.run(self.apihost.exec_argv(argv), input=manifest, capture_output=True,
                             text=True, timeout=60)
        if out.returncode != 0:
            raise AssertionError(f"kubectl {' '.join(args)} failed: {out.stderr}")
        return out.stdout

    def start_nodes(self, names=None) -> None:
        chosen = {n: self.env.nodes[n] for n in (names or self.env.nodes)}
        for name, node in chosen.items():
            argv = [sys.executable, "-m", "agent.daemon", "run", "--kubernetes",
                    "--kubeconfig", str(self.kubeconfig), "--node-name", name,
                    "--api-socket", str(node.socket), "--state-dir", str(node.state_dir),
                    "--log-format", "json"]
            node.proc = node.host.spawn(argv, log_path=node.config_dir.parent / "vipd.log",
                                        env={"PYTHONPATH": str(ROOT)}, share_mounts=True)
        for name, node in chosen.items():
            wait_until(lambda: node.socket.exists() or node.proc.poll() is not None, timeout=60,
                       what=f"vipd API socket of {name} (after its first list)")
            assert node.proc.poll() is None, self.env.vipd_log(name)[-3000:]


@pytest.fixture(scope="module")
def kube():
    if shutil.which(KUBECTL) is None:
        raise RuntimeError(f"{KUBECTL} not found: apt-get install kubernetes-client "
                           "(scripts/install-deps)")
    with Lab("fk8s") as lab:
        env = Seed002Lab(lab).build(pods=False)
        k = KubeLab(env)
        k.start_api()
        # rack1's nodes reach the API at leaf01 over the routers
        wait_until(lambda: "10.0.5.0/24" in env.lab.hosts["leaf02"].run("ip", "route"),
                   timeout=60, what="leaf02 routing to the API server's subnet")
        # client-side apply (what most users type), no client-side schema: the fake serves
        # no OpenAPI document; the server validates, as with --validate=false on a real one
        # vipd's CRDs first: the fake then prunes every object by their schemas, as a real
        # API server would (a field a schema forgot is then missing in every step below)
        k.kubectl("apply", "--validate=false",
                  manifest=(ROOT / "deploy" / "kubernetes" / "cilium-crds.yaml").read_text())
        k.kubectl("apply", "--validate=false", manifest=demo.nodes_yaml())
        k.kubectl("apply", "--validate=false", manifest=demo.LEGACY_POLICY_YAML)
        k.start_nodes()
        try:
            yield k
        finally:
            env.report_dead_agents()


def announcers(env, prefix: str) -> set[str]:
    return env.vip_announcers(prefix)


def test_1_seed_policy_from_kubectl_gives_file_mode_routes(kube):
    env = kube.env
    wait_until(env.sessions_established, timeout=60, what="every node established with its leaf")
    wait_until(env.learned_pod_cidrs, timeout=60, what="all routers learning the four PodCIDRs")
    _assert_pod_cidrs_everywhere(env)
    for n in NODES:
        status = env.vipctl(n.name, "status")
        assert f"Config:      kubernetes {API} ({kube.kubeconfig})" in status, status
        assert "Reconcile errors: none" in status, status
        # the legacy policy's peers are named after their address
        assert [p["name"] for p in env.peers_json(n.name)["peers"]] == [n.leaf_address]


def test_2_v2_resources_replace_the_policy_live(kube):
    env = kube.env
    kube.kubectl("apply", "--server-side", "--validate=false", manifest=demo.V2_BGP_YAML)
    kube.kubectl("delete", "ciliumbgppeeringpolicies.cilium.io", "rack0-65005", "rack1-65010")

    def v2_everywhere():
        # the v2 peer names (legacy peers are named after their address)
        return all(p["name"] in ("leaf01", "leaf02") and p["sessionState"] == "established"
                   for n in NODES for p in env.peers_json(n.name)["peers"])
    wait_until(v2_everywhere, timeout=60, what="v2 instances established on every node")
    wait_until(env.sessions_established, timeout=60, what="sessions from the v2 resources")
    wait_until(env.learned_pod_cidrs, timeout=60, what="PodCIDRs from the v2 resources")
    _assert_pod_cidrs_everywhere(env)


def test_2b_node_configs_report_the_real_sessions_and_go_with_the_node(kube):
    """Each agent's CiliumBGPNodeConfig (server-side applied) shows its session with the real
    router as Cilium's agent reports it; a node that leaves every ClusterConfig loses its
    NodeConfig and its session, and the router withdraws its PodCIDR."""
    env = kube.env

    def node_config(name):
        return json.loads(kube.kubectl("get", "ciliumbgpnodeconfig", name, "-o", "json"))

    def v4_counts(peer):
        return next((c for c in peer.get("routeCount") or () if c["afi"] == "ipv4"), {})

    def established(name):
        # route counts change without a session change: the status catches up within its
        # 5 s refresh, so wait for them too
        peers = node_config(name)["status"]["bgpInstances"][0]["peers"]
        return all(p["peeringState"] == "established" and p.get("establishedTime")
                   and p.get("timers", {}).get("appliedHoldTimeSeconds")
                   and v4_counts(p).get("advertised", 0) >= 1 and v4_counts(p).get("received", 0) >= 1
                   for p in peers) and peers
    for n in NODES:
        # its PodCIDR advertised; the other nodes' PodCIDRs received (reflected)
        [peer] = wait_until(lambda: established(n.name), timeout=30,
                            what=f"{n.name}'s NodeConfig status: established, routes both ways")
        assert peer["peerAddress"] == n.leaf_address
        owner = node_config(n.name)["metadata"]["ownerReferences"][0]
        assert (owner["kind"], owner["name"], owner["controller"]) == \
            ("CiliumBGPClusterConfig", n.rack, True)
    leaving = NODES[3]
    def node_config_gone():
        # the NodeConfig is deleted by the status writer after the pass that withdrew the routes
        return "NotFound" in subprocess.run(
            kube.env.lab.hosts["leaf01"].exec_argv([KUBECTL, "--kubeconfig", str(kube.kubeconfig), "get",
                                                   "ciliumbgpnodeconfig", leaving.name]),
            capture_output=True, text=True, timeout=60).stderr

    kube.kubectl("label", "node", leaving.name, "rack=none", "--overwrite")
    try:
        wait_until(lambda: leaving.pod_cidr not in env.routes_by_prefix(leaving.leaf), timeout=30,
                   what=f"{leaving.leaf} withdrawing {leaving.name}'s PodCIDR")
        wait_until(node_config_gone, timeout=15, what=f"{leaving.name}'s NodeConfig deleted")
    finally:   # the later tests need all four nodes back
        kube.kubectl("label", "node", leaving.name, f"rack={leaving.rack}", "--overwrite")
    wait_until(env.learned_pod_cidrs, timeout=60, what=f"{leaving.name}'s PodCIDR back")
    wait_until(lambda: established(leaving.name), timeout=30, what="its NodeConfig back")


def test_3_service_applied_with_kubectl_is_announced_and_withdrawn(kube):
    env = kube.env
    kube.kubectl("apply", "--validate=false",
                 manifest=demo.service_yaml(traffic_policy="Cluster", endpoint_node="cilium-bgp-worker"))
    vip = env.vip()
    everyone = {n.address for n in NODES}
    wait_until(lambda: announcers(env, f"{vip}/32") == everyone, timeout=30,
               what="VIP announced by all four nodes")
    # the watches end (as at a server's timeoutSeconds): they resume from their resourceVersion
    # and see the deletion, with no re-list
    assert kube.fake("POST", "/fake/close-watches") == {"closed": True}
    kube.kubectl("delete", "service", "web")
    wait_until(lambda: not announcers(env, f"{vip}/32"), timeout=30, what="VIP withdrawn")
    assert not any("410 Gone" in env.vipd_log(n.name) for n in NODES)


def test_4_deletion_during_an_outage_is_seen_after_the_410_relist(kube):
    env = kube.env
    kube.kubectl("apply", "--validate=false",
                 manifest=demo.service_yaml(traffic_policy="Cluster", endpoint_node="cilium-bgp-worker"))
    vip = env.vip()
    wait_until(lambda: len(announcers(env, f"{vip}/32")) == 4, timeout=30, what="VIP announced")
    assert kube.fake("POST", "/fake/outage?seconds=4&userAgent=vipd") == {"outage": True}
    kube.kubectl("delete", "service", "web")
    # nothing reaches vipd during the outage: the VIP stays announced (last known state)
    assert len(announcers(env, f"{vip}/32")) == 4
    wait_until(lambda: not announcers(env, f"{vip}/32"), timeout=60,
               what="VIP withdrawn after the watches came back")
    for n in NODES:
        log = env.vipd_log(n.name)
        assert "watch expired (410 Gone); re-listing" in log, n.name
        assert "watch interrupted; resuming after back-off" in log, n.name


def test_5_lbipam_address_is_written_to_the_status_and_survives_lost_state(kube):
    env = kube.env

    def status_ip(name):
        return kube.kubectl("get", "service", name, "-o",
                            "jsonpath={.status.loadBalancer.ingress[*].ip}").strip()
    # a first Service takes the pool's first address, so web gets another one
    svc = demo.service_yaml(traffic_policy="Cluster", endpoint_node="cilium-bgp-worker")
    first = svc.split("---\n", 1)[1].split("---\n")[0].replace("name: web\n", "name: first\n")
    kube.kubectl("apply", "--validate=false", manifest=first)
    first_ip = wait_until(lambda: status_ip("first"), timeout=30, what="first's address in its status")
    kube.kubectl("apply", "--validate=false", manifest=svc)
    vip = wait_until(lambda: status_ip("web"), timeout=30, what="web's address in its status")
    assert vip != first_ip and vip == env.vip()
    wait_until(lambda: len(announcers(env, f"{vip}/32")) == 4, timeout=30, what="VIP announced")
    kube.kubectl("delete", "service", "first")
    # every agent replaced by one with an empty state directory (a failover to new nodes): web
    # is then the only Service, and would get the pool's first address but for its status
    for n in NODES:
        assert env.stop_node(n.name) == 0
        (env.nodes[n.name].state_dir / "lbipam-allocations.yaml").unlink()
    kube.start_nodes()
    assert env.vip() == vip
    wait_until(lambda: len(announcers(env, f"{vip}/32")) == 4, timeout=60,
               what="web's VIP announced again by the new agents")
    assert status_ip("web") == vip


def test_6_lease_holder_failover_keeps_allocations_and_writes_new_ones(kube):
    env = kube.env

    def holder():
        return kube.kubectl("get", "leases.coordination.k8s.io", "-n", "kube-system", "vipd-lbipam",
                            "-o", "jsonpath={.spec.holderIdentity}").strip()
    leader = wait_until(holder, timeout=30, what="a vipd holding the vipd-lbipam Lease")
    assert leader in env.nodes
    log_start = {n.name: len(env.vipd_log(n.name)) for n in NODES}
    web = kube.kubectl("get", "service", "web", "-o",
                       "jsonpath={.status.loadBalancer.ingress[*].ip}").strip()
    assert env.stop_node(leader) == 0      # a stopping leader hands the Lease over at once
    successor = wait_until(lambda: holder() not in ("", leader) and holder(), timeout=30,
                           what="another vipd taking the Lease")
    svc = demo.service_yaml(traffic_policy="Cluster", endpoint_node="cilium-bgp-worker")
    second = svc.split("---\n", 1)[1].split("---\n")[0].replace("name: web\n", "name: second\n")
    kube.kubectl("apply", "--validate=false", manifest=second)
    ip = wait_until(lambda: kube.kubectl("get", "service", "second", "-o",
                                         "jsonpath={.status.loadBalancer.ingress[*].ip}").strip(),
                    timeout=30, what=f"second's address written by the new leader {successor}")
    assert ip != web
    assert kube.kubectl("get", "service", "web", "-o",
                        "jsonpath={.status.loadBalancer.ingress[*].ip}").strip() == web
    log = env.vipd_log(successor)
    assert "Lease election: this node now writes Service status" in log
    # only the Lease holders wrote a status (since this test began)
    writers = {n.name for n in NODES
               if "Service status written" in env.vipd_log(n.name)[log_start[n.name]:]}
    assert writers and writers <= {leader, successor}, writers
    kube.start_nodes([leader])
    assert holder() == successor       # a returning node does not take the Lease back


def _granted(manifest: Path) -> tuple[set, set]:
    """(cluster-wide, {(namespace, ...)}) grants of the vipd ClusterRole and Role: tuples of
    (verb, group, resource)."""
    import yaml

    cluster, namespaced = set(), set()
    for doc in yaml.safe_load_all(manifest.read_text()):
        if not doc or doc.get("kind") not in ("ClusterRole", "Role"):
            continue
        for rule in doc["rules"]:
            for group in rule["apiGroups"]:
                for resource in rule["resources"]:
                    for verb in rule["verbs"]:
                        if doc["kind"] == "ClusterRole":
                            cluster.add((verb, group, resource))
                        else:
                            namespaced.add((doc["metadata"]["namespace"], verb, group, resource))
    return cluster, namespaced


def test_7_rbac_in_deploy_grants_exactly_what_vipd_used(kube):
    """Every request the agents made in tests 1-6 (the fake's audit, by User-Agent) is allowed
    by deploy/kubernetes/vipd.yaml, and every grant there was used: no missing permission
    (a 403 in a real cluster), no unneeded one."""
    audit = kube.fake("GET", "/fake/audit")
    used = {(verb, group, resource, ns) for agent, verb, group, resource, ns in audit["requests"]
            if agent == "vipd"}
    assert used, audit
    cluster, namespaced = _granted(ROOT / "deploy" / "kubernetes" / "vipd.yaml")
    missing = sorted(u for u in used if (u[0], u[1], u[2]) not in cluster
                     and (u[3], u[0], u[1], u[2]) not in namespaced)
    assert not missing, f"vipd made requests its RBAC does not allow: {missing}"
    unused = sorted(g for g in cluster if not any(u[:3] == g for u in used))
    unused += sorted(g for g in namespaced if not any(u[3] == g[0] and u[:3] == g[1:] for u in used))
    assert not unused, f"RBAC grants vipd never used (drop them): {unused}"
