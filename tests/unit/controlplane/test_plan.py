"""plan() -> NodePlan: the whole desired state of a node from the seed 002 manifests, with no
root, no event loop and no effect; a part that fails keeps the previous result and says why."""

import dataclasses
import ipaddress

import pytest

from agent import demo
from agent.config import ObjectSet, load_documents
from agent.controlplane.memo import Memo
from agent.controlplane.plan import DatapathSettings, PlanSettings, plan
from agent.controlplane.types import Family

pytestmark = pytest.mark.unit
NODE = "cilium-bgp-worker"
V4 = Family.IPV4_UNICAST


def objects(*texts):
    return ObjectSet.from_objects([o for t in texts for o in load_documents(t, "x.yaml").objects.all()])


def test_one_plan_holds_allocations_peers_paths_frontends_and_conditions():
    objs = objects(demo.nodes_yaml(), demo.V2_BGP_YAML, demo.service_yaml())
    p = plan(objs, None, PlanSettings(NODE, datapath=DatapathSettings()), memo=Memo(), generation=7)
    (vip,) = p.allocations["default/web"]
    assert ipaddress.ip_address(vip) in ipaddress.ip_network(demo.VIP_POOL_CIDR)
    (inst,) = p.node_config.instances
    (peer,) = inst.peers
    assert (inst.local_asn, peer.address) == (65005, "10.0.5.1")
    paths = p.paths(inst, peer)[V4]
    assert sorted(map(str, paths)) == sorted(["10.1.3.0/24", f"{vip}/32"])
    assert paths[ipaddress.ip_network(f"{vip}/32")].local_pref == 200
    # the announce rule: a VIP the datapath does not program is not in the desired paths
    assert list(map(str, p.paths(inst, peer, vip_ready=lambda ip: ip != vip)[V4])) == ["10.1.3.0/24"]
    # the datapath's frontends carry the LB-IPAM address; each is owned by its Service
    assert {str(k.vip) for k in p.frontends} >= {vip}
    assert set(p.owners.values()) == {"default/web"}
    assert p.cluster_conditions and p.failures == {} and p.generation == 7


def test_a_failing_part_keeps_the_previous_result_and_is_reported(monkeypatch):
    objs = objects(demo.nodes_yaml(), demo.V2_BGP_YAML, demo.service_yaml())
    settings = PlanSettings(NODE)
    first = plan(objs, None, settings)
    from agent.controlplane import lbipam

    def broken(*a, **kw):
        raise ValueError("pool bug")
    monkeypatch.setattr(lbipam, "allocate", broken)
    monkeypatch.setattr(lbipam, "allocate_changed", broken)
    second = plan(objs, None, settings, first)
    assert second.failures == {"lbipam": "pool bug"}
    assert second.lbipam is first.lbipam and second.allocations == first.allocations
    assert second.node_config is not None


def test_clusterconfig_order_is_carried_from_plan_to_plan():
    objs = objects(demo.nodes_yaml(), demo.V2_BGP_YAML)
    first = plan(objs, None, PlanSettings(NODE), cluster_config_order=("old-gone",))
    names = tuple(c.name for c in objs.cluster_configs)
    assert first.cluster_config_order == names
    assert plan(objs, None, PlanSettings(NODE), first).cluster_config_order == names


POOLS = """\
apiVersion: cilium.io/v2alpha1
kind: CiliumLoadBalancerIPPool
metadata: {name: blue}
spec:
  blocks: [{cidr: 10.9.0.0/29}]
  serviceSelector: {matchLabels: {color: blue}}
---
apiVersion: cilium.io/v2alpha1
kind: CiliumLoadBalancerIPPool
metadata: {name: any}
spec:
  blocks: [{cidr: 10.8.0.0/24}, {cidr: "fd00:8::/120"}]
"""


def svc_yaml(i: int, port: int = 80, color: str = "red", dual: bool = False) -> str:
    families = "\n  ipFamilyPolicy: PreferDualStack\n  ipFamilies: [IPv4, IPv6]" if dual else ""
    return (f"apiVersion: v1\nkind: Service\nmetadata: {{name: s{i}, namespace: ns, labels: {{color: {color}}}}}\n"
            f"spec:\n  type: LoadBalancer\n  ports: [{{port: {port}}}]{families}\n")


def test_one_changed_service_is_allocated_incrementally_exactly_as_a_full_allocation():
    """Random adds, removals and edits (pool selector, dual stack, a full pool): the plan's
    O(change) LB-IPAM path gives the same allocations and conditions as allocating all anew."""
    import random

    from agent.controlplane import lbipam

    rng = random.Random(11)
    docs = {i: svc_yaml(i, color=rng.choice(["red", "blue"])) for i in range(12)}
    parsed = {}
    pools = objects(POOLS)

    def current():
        for i, text in docs.items():   # unchanged text: the very same object (as the file source)
            if parsed.get(i, (None,))[0] != text:
                parsed[i] = (text, load_documents(text, "x.yaml").objects.all()[0])
        return pools.replace(services=[parsed[i][1] for i in sorted(docs)])

    settings = PlanSettings(NODE)
    p = plan(current(), None, settings)
    incremental = 0
    for step in range(60):
        op = rng.choice(["add", "add", "remove", "edit"])
        if op == "add":
            docs[100 + step] = svc_yaml(100 + step, color=rng.choice(["red", "blue"]), dual=rng.random() < 0.3)
        elif op == "remove" and docs:
            del docs[rng.choice(list(docs))]
        elif docs:
            i = rng.choice(list(docs))
            docs[i] = svc_yaml(i, port=rng.randint(1, 999), color=rng.choice(["red", "blue"]))
        objs = current()
        changed = [s for s in objs.services if all(s is not o for o in p.objects.services)]
        removed = {f"ns/{s.name}" for s in p.objects.services} - {f"ns/{s.name}" for s in objs.services}
        incremental += lbipam.allocate_changed(objs, p.lbipam, changed, removed, None) is not None
        full = lbipam.allocate(objs, p.allocations)
        p = plan(objs, None, settings, p)
        assert p.lbipam.allocations == full.allocations, step
        assert p.lbipam.service_conditions == full.service_conditions, step
        assert p.lbipam.pool_conditions == full.pool_conditions, step
    assert incremental > 20, "the incremental path was taken"


ADVERTS = """\
apiVersion: cilium.io/v2
kind: CiliumBGPAdvertisement
metadata: {name: services, labels: {advertise: bgp}}
spec:
  advertisements:
  - advertisementType: Service
    service: {addresses: [LoadBalancerIP]}
    selector: {matchExpressions: [{key: somekey, operator: NotIn, values: [never]}]}
    attributes: {communities: {standard: ["65000:99"]}, localPreference: 200}
  - advertisementType: Service
    service: {addresses: [ExternalIP], aggregationLengthIPv4: 24}
    selector: {matchLabels: {color: blue}}
    attributes: {communities: {standard: ["65000:7"]}}
"""


def svc_with_slice(i: int, *, color: str, ext: int, local: bool, ready: bool, node: str) -> str:
    return (f"apiVersion: v1\nkind: Service\nmetadata: {{name: s{i}, namespace: ns, labels: {{color: {color}}}}}\n"
            f"spec:\n  type: LoadBalancer\n  externalTrafficPolicy: {'Local' if local else 'Cluster'}\n"
            f"  externalIPs: [10.50.{ext % 3}.{ext}]\n  ports: [{{port: 80}}]\n---\n"
            f"apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n"
            f"metadata: {{name: s{i}-1, namespace: ns, labels: {{kubernetes.io/service-name: s{i}}}}}\n"
            f"addressType: IPv4\nports: [{{port: 80}}]\n"
            f"endpoints: [{{addresses: [10.1.3.9], conditions: {{ready: {str(ready).lower()}}}, nodeName: {node}}}]\n")


def test_paths_and_frontends_of_one_change_equal_those_computed_from_scratch():
    """Random Service and EndpointSlice edits (eTP Local endpoints moving between nodes, /24
    aggregation shared by several Services, removals): each plan's paths and datapath
    frontends, built from the previous plan's in O(changed), equal desired_paths() and
    desired_services() over all objects."""
    import random

    from agent.controlplane.advertisements import desired_paths

    rng = random.Random(5)
    base = objects(demo.nodes_yaml(), demo.V2_BGP_YAML.split("---\n", 4)[0] + "---\n"
                   + "---\n".join(demo.V2_BGP_YAML.split("---\n", 4)[1:3]), ADVERTS, POOLS)
    nodes = [NODE, "cilium-bgp-worker2"]

    def doc(i):
        return svc_with_slice(i, color=rng.choice(["red", "blue"]), ext=rng.randint(1, 60),
                              local=rng.random() < 0.5, ready=rng.random() < 0.8, node=rng.choice(nodes))
    docs = {i: doc(i) for i in range(10)}
    parsed = {}

    def current():
        for i, text in docs.items():
            if parsed.get(i, (None,))[0] != text:
                parsed[i] = (text, load_documents(text, "x.yaml").objects.all())
        objs = [o for i in sorted(docs) for o in parsed[i][1]]
        return base.replace(services=[o for o in objs if o.kind == "Service"],
                            endpoint_slices=[o for o in objs if o.kind == "EndpointSlice"])

    from agent.controlplane.frontends import desired_services

    settings = PlanSettings(NODE, datapath=DatapathSettings())
    p = None
    incremental = 0
    seen_kinds = set()   # prefix lengths advertised: PodCIDR /24 and the VIPs /32
    for step in range(40):
        p = plan(current(), None, settings, p)
        (inst,) = p.node_config.instances
        for peer in inst.peers:
            prev = (p.previous_paths or {}).get((inst.name, peer.address))
            got = p.paths(inst, peer)
            incremental += prev is not None and p.changed_services is not None and len(p.changed_services) < 3
            want = desired_paths(p.effective, NODE, inst, peer, None, settings.options, None)
            assert {f: dict(x) for f, x in got.items()} == want, step
            fresh = dataclasses.replace(p.effective)       # EndpointSlices per Service, indexed anew
            assert p.effective._slices_by_service == fresh._slices_by_service, step
            owners = {}
            assert p.frontends == desired_services(p.effective, NODE, owners=owners), step
            assert p.owners == owners, step
            kinds = {p.prefixlen for x in want.values() for p in x}
            seen_kinds = seen_kinds | kinds
        op = rng.choice(["add", "remove", "edit", "edit"])
        if op == "add":
            docs[100 + step] = doc(100 + step)
        elif op == "remove" and docs:
            del docs[rng.choice(list(docs))]
        elif docs:
            i = rng.choice(list(docs))
            docs[i] = doc(i)
    assert incremental > 20 and seen_kinds == {24, 32}


def test_paths_made_ahead_while_the_datapath_loads_are_used_only_if_nothing_is_held_back():
    """The daemon's start-up plan makes every peer's paths for once all VIPs are programmed
    (anticipate_paths) while the pass that runs during the datapath load announces no VIP.
    The pass after the load reuses them when the announce rule holds nothing back; when a VIP
    is not programmed after all, it is not in the paths."""
    from agent.controlplane.advertisements import desired_paths, nothing_ready

    objs = objects(demo.nodes_yaml(), demo.V2_BGP_YAML, demo.service_yaml())
    settings = PlanSettings(NODE, datapath=DatapathSettings())
    memo = Memo()
    first = plan(objs, None, settings, memo=memo, generation=1)
    first.anticipate_paths()
    (inst,) = first.node_config.instances
    (peer,) = inst.peers
    (vip,) = first.allocations["default/web"]
    assert list(map(str, first.paths(inst, peer, nothing_ready, object())[V4])) == ["10.1.3.0/24"]
    ahead = first.next_paths[(inst.name, peer.address)]

    everything = plan(objs, None, settings, first, memo=memo, generation=1)
    got = everything.paths(inst, peer, lambda ip: True, frozenset())
    assert {f: dict(x) for f, x in got.items()} == desired_paths(everything.effective, NODE, inst, peer)
    assert everything.path_states[(inst.name, peer.address)].base == ahead.serial   # reused, not rebuilt

    held_back = plan(objs, None, settings, first, memo=memo, generation=1)
    got = held_back.paths(inst, peer, lambda ip: ip != vip, frozenset({vip}))
    assert list(map(str, got[V4])) == ["10.1.3.0/24"]
