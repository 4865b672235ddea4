"""Offline semantic checks for ``vipctl config validate``: what the schema cannot see.

Runs the node-config derivation for every Node in the set (so a missing PeerConfig, two
PeeringPolicies on one node or a router-ID problem are found before any agent starts) and adds
every status condition that would be True.
"""

from __future__ import annotations

from agent.config import ObjectSet
from agent.controlplane import lbipam
from agent.controlplane.conditions import cluster_config_conditions, peer_config_conditions
from agent.controlplane.nodeconfig import derive_node_config
from agent.controlplane.types import AgentOptions, ConfigIssue


def validate_objects(objects: ObjectSet, options: AgentOptions = AgentOptions()
                     ) -> list[ConfigIssue]:
    """Sorted, de-duplicated issues; ``severity`` "error" means something would not apply."""
    found: set[ConfigIssue] = set()
    for node in objects.nodes:
        for issue in derive_node_config(objects, node.name, options).issues:
            found.add(ConfigIssue(issue.severity, issue.object,
                                  f"on node {node.name}: {issue.message}"))
    for kind, conds in (("CiliumBGPClusterConfig", cluster_config_conditions(objects, options)),
                        ("CiliumBGPPeerConfig", peer_config_conditions(objects, options))):
        for name, cs in conds.items():
            for c in cs:
                if c.status == "True":
                    found.add(ConfigIssue("warning", f"{kind}/{name}", f"{c.type}: {c.message}"))
    lb = lbipam.allocate(objects)
    for pool, cs in lb.pool_conditions.items():
        for c in cs:
            if c.type == lbipam.POOL_CONFLICT and c.status == "True":
                found.add(ConfigIssue("error", f"CiliumLoadBalancerIPPool/{pool}", c.message))
    for key, c in lb.service_conditions.items():
        if c.status == "False":
            found.add(ConfigIssue("warning", f"Service/{key}", f"{c.type}: {c.reason}: "
                                  f"{c.message}"))
    return sorted(found, key=lambda i: (i.severity != "error", i.object, i.message))
