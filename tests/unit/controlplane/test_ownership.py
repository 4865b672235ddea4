"""First-seen order of ClusterConfigs (files have no creationTimestamp): the owner of a node."""

import pytest

from agent.controlplane import derive_node_config
from agent.controlplane.ownership import order_cluster_configs

from cp_builders import cluster_config, instance, node, objs, peer

pytestmark = pytest.mark.unit


def _set(*names, ts=None):
    return objs(node("n1"), *(cluster_config(n, [instance(n, asn=65000 + i, peers=[peer()])],
                                             ts=(ts or {}).get(n))
                              for i, n in enumerate(names, start=1)))


def test_a_config_added_later_with_an_earlier_name_does_not_take_the_node():
    first, order = order_cluster_configs(_set("rack0"), ())
    assert order == ("rack0",) and derive_node_config(first, "n1").instances[0].name == "rack0"
    later, order = order_cluster_configs(_set("aaa", "rack0"), order)
    assert order == ("rack0", "aaa")
    assert [c.name for c in later.cluster_configs] == ["rack0", "aaa"]
    assert derive_node_config(later, "n1").instances[0].name == "rack0"


def test_configs_seen_together_go_by_name_timestamps_first_and_removed_names_are_forgotten():
    _, order = order_cluster_configs(_set("b", "a"), ())
    assert order == ("a", "b")
    ordered, order = order_cluster_configs(_set("a", "b", "c", ts={"c": "2024-01-01T00:00:00Z"}), order)
    assert [c.name for c in ordered.cluster_configs] == ["c", "a", "b"]  # Kubernetes objects: by age
    _, order = order_cluster_configs(_set("b", "c"), order)
    assert order == ("b", "c")
