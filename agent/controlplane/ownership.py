"""Which CiliumBGPClusterConfig came first, when the objects carry no creationTimestamp.

In Kubernetes the oldest ClusterConfig selecting a node owns it. Manifest files have no
creation time, so vipd remembers the order in which it first saw each ClusterConfig (persisted
in the state dir by the controller) and uses that instead of the name: adding a config whose
name sorts first never takes a node away from the config that already runs there. Pure: the
previous order in, the new order and the reordered objects out.
"""

from __future__ import annotations

import dataclasses

from agent.config.loader import ObjectSet

__all__ = ["order_cluster_configs"]


def order_cluster_configs(objects: ObjectSet, first_seen: tuple[str, ...]
                          ) -> tuple[ObjectSet, tuple[str, ...]]:
    """Return ``objects`` with ``cluster_configs`` ordered oldest first and the updated
    first-seen order. Timestamped configs keep Kubernetes' order and come first; the others
    follow in first-seen order; configs seen for the first time in the same snapshot are
    appended by name. Names that are gone are forgotten (like a deleted Kubernetes object,
    a config that comes back is new)."""
    present = [cc.name for cc in objects.cluster_configs]
    names = set(present)
    order = [n for n in first_seen if n in names]
    known = set(order)
    order += sorted(n for n in present if n not in known)  # objects are sorted by name already
    rank = {n: i for i, n in enumerate(order)}

    def key(cc):
        ts = cc.metadata.creation_timestamp
        return (ts is None, ts or "", rank[cc.name])

    ordered = tuple(sorted(objects.cluster_configs, key=key))
    if ordered != objects.cluster_configs:
        objects = dataclasses.replace(objects, cluster_configs=ordered)
    return objects, tuple(order)
