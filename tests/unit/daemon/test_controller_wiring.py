"""The controller wiring the real pure control plane to (recording) speakers, on the seed 002
manifests: what each node advertises, LB-IPAM persistence across restarts, status YAML, and the
API views built from it. Every pass is repeated to prove idempotency."""

import asyncio
import ipaddress

import yaml
from recording_speaker import RecordingSpeaker

from agent import demo
from agent.api import printers
from agent.api.model import vipd_pb2
from agent.api.provider import ControllerProvider
from agent.config import load_documents
from agent.controlplane.types import Family
from agent.reconcilers.controller import Controller
from agent.store import Store
from tests.unit.daemon.fake_datapath import upsert_each

V4 = Family.IPV4_UNICAST
N = ipaddress.ip_network


def make_store(*texts):
    store = Store()
    objs = [o for t in texts for o in load_documents(t, "x.yaml").objects.all()]
    from agent.config import ObjectSet
    store.replace(ObjectSet.from_objects(objs), fingerprint=str(hash(texts)), source="/cfg")
    return store


class World:
    def __init__(self, node, store, state_dir):
        self.calls = []
        self.speakers = []
        self.controller = Controller(node, store, state_dir=state_dir, speaker_factory=self.factory,
                                     clock=lambda: 2000.0)

    def factory(self, inst):
        sp = RecordingSpeaker(inst, self.calls)
        self.speakers.append(sp)
        return sp

    def reconcile(self):
        start = len(self.calls)
        asyncio.run(self.controller.reconcile_once())
        return self.calls[start:]

    def rib(self, peer="10.0.5.1", family=V4):
        return {str(p): a for p, a in self.speakers[-1].adj_rib_out(peer, family).items()}


def test_legacy_peering_policy_from_seed_002_advertises_each_nodes_pod_cidr(tmp_path):
    for spec in demo.NODES:
        w = World(spec.name, make_store(demo.nodes_yaml(), demo.LEGACY_POLICY_YAML), tmp_path / spec.host)
        calls = w.reconcile()
        assert [c[1] for c in calls] == ["start", "add_neighbor", "advertise"]
        assert w.reconcile() == []
        assert list(w.rib(spec.leaf_address)) == [spec.pod_cidr]
        run = w.controller.neighbors.running[next(iter(w.controller.neighbors.running))]
        assert run.local_asn == (65005 if spec.rack == "rack0" else 65010)
        assert w.speakers[0].instance.router_id == spec.address


def test_v2_resources_with_service_etp_local_and_cluster(tmp_path):
    store_local = make_store(demo.nodes_yaml(), demo.V2_BGP_YAML, demo.service_yaml(traffic_policy="Local"))
    worker = World("cilium-bgp-worker", store_local, tmp_path / "w")
    cp = World("cilium-bgp-control-plane", store_local, tmp_path / "cp")
    worker.reconcile(), cp.reconcile()
    assert worker.reconcile() == [] and cp.reconcile() == []
    vip = worker.controller.allocations["default/web"][0]
    assert ipaddress.ip_address(vip) in N(demo.VIP_POOL_CIDR)
    assert cp.controller.allocations["default/web"] == (vip,)          # every node computes the same IP
    # eTP=Local: only the node with the ready endpoint announces the VIP
    assert set(worker.rib()) == {"10.1.3.0/24", f"{vip}/32"}
    assert set(cp.rib()) == {"10.1.0.0/24"}
    attrs = worker.rib()[f"{vip}/32"]
    assert attrs.local_pref == 200 and (65000 << 16 | 99) in attrs.communities
    assert (65000, 1, 1) in attrs.large_communities
    # eTP=Cluster: every selected node announces it
    store_cluster = make_store(demo.nodes_yaml(), demo.V2_BGP_YAML, demo.service_yaml(traffic_policy="Cluster"))
    cp.controller.store = store_cluster
    calls = cp.reconcile()
    assert calls == [("65005", "advertise", "10.0.5.1", V4, f"{vip}/32")]   # no session touched
    assert cp.reconcile() == []


def test_lbipam_allocation_survives_restart_and_status_yaml_is_written(tmp_path):
    store = make_store(demo.nodes_yaml(), demo.V2_BGP_YAML, demo.service_yaml())
    w = World("cilium-bgp-worker", store, tmp_path)
    w.reconcile()
    saved = yaml.safe_load((tmp_path / "lbipam-allocations.yaml").read_text())
    assert saved == {"allocations": {"default/web": list(w.controller.allocations["default/web"])}}
    status = yaml.safe_load((tmp_path / "status.yaml").read_text())
    assert status["node"] == "cilium-bgp-worker" and status["appliedGeneration"] == 1
    assert status["ciliumBGPNodeConfig"]["status"]["conditions"][0]["type"] == "cilium.io/BGPReconcileError"
    assert status["ciliumBGPNodeConfig"]["status"]["conditions"][0]["status"] == "False"
    assert status["services"]["default/web"]["loadBalancerIngress"] == saved["allocations"]["default/web"]
    # a new agent on the same state dir reuses the allocation
    restarted = World("cilium-bgp-worker", store, tmp_path)
    assert restarted.controller.allocations == w.controller.allocations


def test_api_views_from_the_controller(tmp_path):
    store = make_store(demo.nodes_yaml(), demo.V2_BGP_YAML, demo.service_yaml())
    w = World("cilium-bgp-worker", store, tmp_path)
    w.reconcile()
    provider = ControllerProvider(w.controller)
    peers = provider.list_peers()
    (p,) = peers.peers
    assert (p.local_asn, p.peer_asn, p.peer_address, p.peer_port, p.instance) == (65005, 65005, "10.0.5.1", 179, "65005")
    assert [f.afi for f in p.families] == ["ipv4", "ipv6"]
    assert [f.advertised for f in p.families] == [2, 0]
    avail = provider.list_routes(vipd_pb2.ListRoutesRequest(table=vipd_pb2.AVAILABLE, afi="ipv4", safi="unicast"))
    assert sorted(r.prefix for r in avail.routes) == sorted(["10.1.3.0/24", w.controller.allocations["default/web"][0] + "/32"])
    assert all(r.next_hop == "0.0.0.0" for r in avail.routes)
    adv = provider.list_routes(vipd_pb2.ListRoutesRequest(table=vipd_pb2.ADVERTISED, afi="ipv4", safi="unicast",
                                                          peer="10.0.5.1"))
    vip_route = next(r for r in adv.routes if r.prefix.endswith("/32"))
    assert vip_route.has_local_pref and vip_route.local_pref == 200 and vip_route.as_path == []
    assert "{Communities: 65000:99}" in vip_route.attrs
    table = printers.routes_table(adv.routes, advertised=True)
    assert table.splitlines()[0].split() == ["VRouter", "Peer", "Prefix", "NextHop", "Age", "Attrs"]
    pols = provider.list_route_policies(vipd_pb2.ListRoutePoliciesRequest())
    assert pols.policies, "route policies are computed for the peer"
    text = printers.route_policies_table(pols.policies)
    assert "10.1.3.0/24 (24..24)" in text
    status = provider.get_status()
    assert any(r.kind == "CiliumBGPClusterConfig" for r in status.resources)


def test_metrics_use_cilium_names_and_labels(tmp_path):
    from prometheus_client import CollectorRegistry, generate_latest

    from agent.api.metrics import ControllerCollector

    store = make_store(demo.nodes_yaml(), demo.V2_BGP_YAML, demo.service_yaml())
    w = World("cilium-bgp-worker", store, tmp_path)
    w.reconcile()
    registry = CollectorRegistry()
    registry.register(ControllerCollector(w.controller))
    text = generate_latest(registry).decode()
    assert ('vipd_bgp_control_plane_session_state{neighbor="10.0.5.1:179",neighbor_asn="65005",'
            'vrouter="65005"} 1.0') in text
    assert ('vipd_bgp_control_plane_advertised_routes{afi="ipv4",neighbor="10.0.5.1:179",safi="unicast",'
            'vrouter="65005"} 2.0') in text
    assert "vipd_config_generation 1.0" in text
    for step in ("plan", "state", "neighbors", "advertisements"):   # one pass, each step timed once
        assert f'vipd_reconcile_duration_seconds_count{{reconciler="{step}"}} 1.0' in text


def test_metrics_endpoint_serves_over_http(tmp_path):
    import urllib.request

    from agent.api.metrics import serve_metrics

    store = make_store(demo.nodes_yaml(), demo.V2_BGP_YAML)
    w = World("cilium-bgp-worker", store, tmp_path)
    w.reconcile()
    server = serve_metrics("127.0.0.1:0", w.controller)
    try:
        body = urllib.request.urlopen(f"http://127.0.0.1:{server.server_port}/metrics", timeout=5).read().decode()
    finally:
        server.shutdown()
    assert 'vipd_bgp_control_plane_session_state{neighbor="10.0.5.1:179"' in body


TWO_INSTANCES = """\
apiVersion: cilium.io/v2
kind: CiliumBGPClusterConfig
metadata: {name: two}
spec:
  nodeSelector: {matchLabels: {rack: rack0}}
  bgpInstances:
  - name: a
    localASN: 65005
    peers: [{name: leaf, peerASN: 65005, peerAddress: 10.0.5.1, peerConfigRef: {name: route-reflector}}]
  - name: b
    localASN: 65100
    localPort: 1790
    peers: [{name: other, peerASN: 65200, peerAddress: 10.0.5.2, peerConfigRef: {name: route-reflector}}]
"""


def test_routes_with_several_instances_need_a_vrouter_for_a_peer_filter(tmp_path):
    import pytest

    v2 = demo.V2_BGP_YAML.split("---\n", 2)[2]          # keep PeerConfig + Advertisements only
    store = make_store(demo.nodes_yaml(), TWO_INSTANCES, v2)
    w = World("cilium-bgp-worker", store, tmp_path)
    w.reconcile()
    provider = ControllerProvider(w.controller)
    assert sorted((p.instance, p.local_asn, p.peer_address) for p in provider.list_peers().peers) == [
        ("a", 65005, "10.0.5.1"), ("b", 65100, "10.0.5.2")]
    req = vipd_pb2.ListRoutesRequest(table=vipd_pb2.ADVERTISED, afi="ipv4", safi="unicast", peer="10.0.5.2")
    with pytest.raises(LookupError, match="multiple virtual routers configured, router ASN must be specified"):
        provider.list_routes(req)
    req.vrouter = 65100
    routes = provider.list_routes(req).routes
    assert [(r.vrouter, r.peer, r.prefix, r.as_path) for r in routes] == [(65100, "10.0.5.2", "10.1.3.0/24", [65100])]
    assert not routes[0].has_local_pref, "no LOCAL_PREF toward an eBGP peer"
    with pytest.raises(LookupError, match="no peer 10.9.9.9"):
        provider.list_routes(vipd_pb2.ListRoutesRequest(table=vipd_pb2.ADVERTISED, afi="ipv4", safi="unicast",
                                                        vrouter=65100, peer="10.9.9.9"))


def test_metrics_scraped_from_another_thread_read_on_the_event_loop(tmp_path):
    import threading
    import urllib.request

    from agent.api.metrics import serve_metrics

    store = make_store(demo.nodes_yaml(), demo.V2_BGP_YAML)
    w = World("cilium-bgp-worker", store, tmp_path)

    async def scenario():
        await w.controller.reconcile_once()
        loop = asyncio.get_running_loop()
        server = serve_metrics("127.0.0.1:0", w.controller, loop)
        seen = []
        orig = w.controller.peer_states

        def recording():
            seen.append(threading.current_thread() is threading.main_thread())
            return orig()
        w.controller.peer_states = recording
        try:
            url = f"http://127.0.0.1:{server.server_port}/metrics"
            body = await asyncio.to_thread(lambda: urllib.request.urlopen(url, timeout=5).read().decode())
        finally:
            server.shutdown()
        return body, seen
    body, seen = asyncio.run(scenario())
    assert "vipd_bgp_control_plane_session_state" in body and seen == [True]


def test_with_a_datapath_a_vip_that_cannot_be_programmed_is_withdrawn_and_reported(tmp_path):
    """The announce rule through the controller: the datapath refuses web's frontend, so its
    LB-IPAM VIP leaves the Adj-RIB-Out (the PodCIDR stays), and the failure shows in the node
    condition, the Service condition, the reconcile errors and the metrics; fixed, it returns."""
    from prometheus_client import CollectorRegistry, generate_latest

    from agent.api.metrics import ControllerCollector
    from agent.datapath.capacity import Capacity
    from agent.reconcilers.services import ServiceReconciler

    class Datapath:
        capacity = Capacity(1 << 20, 1 << 20, 1 << 22, 1 << 30)
        reloads = 0
        broken = False

        def __init__(self):
            self.programmed = {}

        def services(self):
            return dict(self.programmed)

        def upsert_service(self, svc):
            if self.broken:
                raise OSError("no space left in the maps")
            self.programmed[svc.key] = svc

        upsert_services = upsert_each   # as Datapath.upsert_services: failures per service

        def delete_service(self, key):
            return self.programmed.pop(key, None) is not None

    store = make_store(demo.nodes_yaml(), demo.V2_BGP_YAML, demo.service_yaml())
    w = World("cilium-bgp-worker", store, tmp_path)
    dp = Datapath()
    w.controller.services = ServiceReconciler(dp, "cilium-bgp-worker")
    w.reconcile()
    vip = w.controller.lbipam.allocations["default/web"][0]
    assert f"{vip}/32" in w.rib() and len(w.rib()) == 2

    dp.broken = True
    dp.programmed.clear()          # e.g. the maps were lost: every frontend must be re-programmed
    w.controller.store.replace(w.controller.store.objects(), fingerprint="2", source="/cfg")
    w.reconcile()
    assert list(w.rib()) == ["10.1.3.0/24"]                       # withdrawn; the PodCIDR stays
    doc = w.controller.status_document()
    cond = next(c for c in doc["services"]["default/web"]["conditions"] if c["type"] == "vipd.io/DatapathProgrammed")
    assert (cond["status"], cond["reason"]) == ("False", "DatapathError")
    assert "no space left in the maps" in cond["message"]
    node_cond = doc["ciliumBGPNodeConfig"]["status"]["conditions"][0]
    assert node_cond["status"] == "True" and "Service/default/web: services: not programmed" in node_cond["message"]
    assert [(e["reconciler"], e["instance"]) for e in doc["reconcileErrors"]] == [("services", "Service/default/web")]
    registry = CollectorRegistry()
    registry.register(ControllerCollector(w.controller))
    text = generate_latest(registry).decode()
    assert "vipd_services_unprogrammed 1.0" in text
    assert 'vipd_service_program_failures_total{reason="DatapathError"} 1.0' in text   # the LB IP
    assert 'vipd_datapath_capacity{map="services"} 1.048576e+06' in text
    assert "vipd_maglev_builds_total 0.0" in text      # this fake datapath builds no tables
    assert "vipd_datapath_map_writes_total 0.0" in text   # ... and writes no map
    assert 'vipd_reconcile_duration_seconds_count{reconciler="services-delete"} 2.0' in text

    dp.broken = False
    w.controller.store.replace(w.controller.store.objects(), fingerprint="3", source="/cfg")
    w.reconcile()
    assert f"{vip}/32" in w.rib()
    doc = w.controller.status_document()
    cond = next(c for c in doc["services"]["default/web"]["conditions"] if c["type"] == "vipd.io/DatapathProgrammed")
    assert cond["status"] == "True" and doc["reconcileErrors"] == []


def test_one_service_change_at_a_time_keeps_the_adj_rib_out_equal_to_a_full_computation(tmp_path):
    """Through the controller: Services added, edited (endpoint moved off this node under eTP
    Local) and removed one at a time; after each pass the speaker's Adj-RIB-Out and the
    `available` view equal the paths computed from scratch, though the pass applied only what
    changed (the calls per pass stay few)."""
    import random

    from agent.config import ObjectSet
    from agent.controlplane import desired_paths

    rng = random.Random(3)
    base = [o for t in (demo.nodes_yaml(), demo.V2_BGP_YAML) for o in load_documents(t, "x.yaml").objects.all()]
    base += [o for o in load_documents(demo.service_yaml(), "x.yaml").objects.all() if o.kind == "CiliumLoadBalancerIPPool"]

    def svc(i, here):
        node = "cilium-bgp-worker" if here else "cilium-bgp-worker2"
        return (f"apiVersion: v1\nkind: Service\nmetadata: {{name: s{i}, namespace: ns}}\nspec:\n  type: LoadBalancer\n"
                f"  externalTrafficPolicy: Local\n  ports: [{{port: 80}}]\n---\napiVersion: discovery.k8s.io/v1\n"
                f"kind: EndpointSlice\nmetadata: {{name: s{i}-1, namespace: ns, labels: {{kubernetes.io/service-name: s{i}}}}}\n"
                f"addressType: IPv4\nports: [{{port: 80}}]\nendpoints: [{{addresses: [10.1.3.9], nodeName: {node}}}]\n")
    docs = {i: svc(i, True) for i in range(6)}
    parsed: dict = {}
    store = Store()

    def publish(gen):
        for i, text in docs.items():
            if parsed.get(i, (None,))[0] != text:
                parsed[i] = (text, load_documents(text, "x.yaml").objects.all())
        store.replace(ObjectSet.from_objects(base + [o for i in sorted(docs) for o in parsed[i][1]]),
                      fingerprint=str(gen), source="/cfg")

    publish(0)
    w = World("cilium-bgp-worker", store, tmp_path)
    w.reconcile()
    for gen in range(1, 25):
        i = rng.choice(list(docs))
        op = rng.choice(["add", "edit", "remove"])
        if op == "add":
            docs[100 + gen] = svc(100 + gen, True)
        elif op == "edit":
            docs[i] = svc(i, rng.random() < 0.5)
        elif len(docs) > 1:
            del docs[i]
        publish(gen)
        calls = w.reconcile()
        c = w.controller
        (inst,) = c.node_config.instances
        (peer,) = inst.peers
        want = desired_paths(c.effective_objects, "cilium-bgp-worker", inst, peer)[V4]
        assert w.rib() == {str(p): a for p, a in want.items()}, gen
        avail = c.advertisements.view().available[inst.name]
        assert {str(p) for (f, p) in avail if f == V4} == {str(p) for p in want}, gen
        assert len([x for x in calls if x[1] in ("advertise", "withdraw")]) <= 2, (gen, calls)
