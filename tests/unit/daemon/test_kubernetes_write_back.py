"""The pure halves of the Kubernetes write-back and of the fake's server-side apply, on the
cases the end-to-end tests (tests/e2e/kubernetes/test_status_writeback.py,
test_fake_apply.py) do not reach: shared ownership, who may delete, who writes conditions."""

import pytest

from agent.lab import ssa
from agent.sources.kubernetes_bgp_status import BgpStatus, desired_writes, merge_conditions

CC = {"apiVersion": "cilium.io/v2", "kind": "CiliumBGPClusterConfig", "metadata": {"name": "a"},
      "spec": {"bgpInstances": [{"name": "i", "localASN": 65001}]}}


def test_the_same_value_is_shared_a_different_one_conflicts_force_moves_it():
    live, managed = ssa.apply(None, CC, "alice", force=False, subresource="", api_version="cilium.io/v2")
    live["metadata"]["managedFields"] = managed
    # bob applies the same value: no conflict, both own it; alice dropping it keeps the field
    live, managed = ssa.apply(live, CC, "bob", force=False, subresource="", api_version="cilium.io/v2")
    live["metadata"]["managedFields"] = managed
    without = {**CC, "spec": {"bgpInstances": [{"name": "i"}]}}
    kept, managed = ssa.apply(live, without, "alice", force=False, subresource="",
                              api_version="cilium.io/v2")
    assert kept["spec"]["bgpInstances"] == [{"name": "i", "localASN": 65001}]
    kept["metadata"]["managedFields"] = managed
    changed = {**CC, "spec": {"bgpInstances": [{"name": "i", "localASN": 65002}]}}
    with pytest.raises(ssa.ApplyConflict) as err:
        ssa.apply(kept, changed, "alice", force=False, subresource="", api_version="cilium.io/v2")
    assert err.value.conflicts == [("bob", ("f:spec", "f:bgpInstances", 'k:{"name":"i"}', "f:localASN"))]
    new, managed = ssa.apply(kept, changed, "alice", force=True, subresource="", api_version="cilium.io/v2")
    assert new["spec"]["bgpInstances"][0]["localASN"] == 65002
    owners = {m["manager"]: ssa.decode(m["fieldsV1"]) for m in managed}
    assert ("f:spec", "f:bgpInstances", 'k:{"name":"i"}', "f:localASN") in owners["alice"]
    assert ("f:spec", "f:bgpInstances", 'k:{"name":"i"}', "f:localASN") not in owners["bob"]


def _live(objects):
    return lambda kind, name, namespace="": objects.get((kind, namespace, name))


def test_only_a_node_config_vipd_wrote_is_deleted_and_only_the_leader_writes_conditions():
    ours = {"metadata": {"name": "n", "ownerReferences": [{"kind": "CiliumBGPClusterConfig"}],
                         "managedFields": [{"manager": "vipd"}]}}
    operators = {"metadata": {"name": "n", "ownerReferences": [{"kind": "CiliumBGPClusterConfig"}],
                              "managedFields": [{"manager": "cilium-operator-generic"}]}}
    gone = BgpStatus("n")
    [write] = desired_writes(gone, _live({("CiliumBGPNodeConfig", "", "n"):
                                          ("cilium.io/v2", "ciliumbgpnodeconfigs", ours)}), leader=False)
    assert write.body is None and write.path == "/apis/cilium.io/v2/ciliumbgpnodeconfigs/n"
    assert desired_writes(gone, _live({("CiliumBGPNodeConfig", "", "n"):
                                       ("cilium.io/v2", "ciliumbgpnodeconfigs", operators)}),
                          leader=False) == []
    conds = BgpStatus("n", conditions={("CiliumBGPClusterConfig", "", "a"): [
        {"type": "cilium.io/NoMatchingNode", "status": "False", "reason": "NoMatchingNode",
         "message": "", "lastTransitionTime": "2026-01-01T00:00:00Z"}]})
    objects = _live({("CiliumBGPClusterConfig", "", "a"): ("cilium.io/v2", "ciliumbgpclusterconfigs", CC)})
    assert desired_writes(conds, objects, leader=False) == []
    [write] = desired_writes(conds, objects, leader=True)
    assert write.path == "/apis/cilium.io/v2/ciliumbgpclusterconfigs/a/status"


def test_a_condition_keeps_its_transition_time_while_its_status_holds():
    live = [{"type": "x", "status": "True", "lastTransitionTime": "2026-01-01T00:00:00Z"},
            {"type": "y", "status": "True", "lastTransitionTime": "2026-01-01T00:00:00Z"}]
    now = [{"type": "x", "status": "True", "lastTransitionTime": "2026-06-01T00:00:00Z"},
           {"type": "y", "status": "False", "lastTransitionTime": "2026-06-01T00:00:00Z"}]
    assert [c["lastTransitionTime"] for c in merge_conditions(now, live)] == [
        "2026-01-01T00:00:00Z", "2026-06-01T00:00:00Z"]
