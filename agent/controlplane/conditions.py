"""Status conditions with Cilium's types, reasons and messages, and the CiliumBGPNodeConfig
status/spec as data. In file mode the daemon serves these over the API and writes them as YAML
into the state directory."""

from __future__ import annotations

import datetime as _dt
from typing import Any

from agent.config import ObjectSet
from agent.controlplane.nodeconfig import cluster_config_selects, node_owners
from agent.controlplane.types import AgentOptions, Condition, Family, NodeConfigResult

NO_MATCHING_NODE = "cilium.io/NoMatchingNode"
MISSING_PEER_CONFIGS = "cilium.io/MissingPeerConfigs"
CONFLICTING_CLUSTER_CONFIG = "cilium.io/ConflictingClusterConfig"
MISSING_AUTH_SECRET = "cilium.io/MissingAuthSecret"
BGP_RECONCILE_ERROR = "cilium.io/BGPReconcileError"
RECONCILE_ERROR_MAX = 32 * 1024


def _go_list(items) -> str:
    """Go's %v of a []string: [a b]."""
    return "[" + " ".join(items) + "]"


def cluster_config_conditions(objects: ObjectSet, options: AgentOptions = AgentOptions()
                              ) -> dict[str, tuple[Condition, ...]]:
    """ClusterConfig name -> its conditions (sorted by type), recomputed from scratch."""
    if not options.status_report:
        return {cc.name: () for cc in objects.cluster_configs}
    owners = node_owners(objects)
    out: dict[str, tuple[Condition, ...]] = {}
    for cc in objects.cluster_configs:
        gen = cc.metadata.generation
        selected = [n for n in objects.nodes if cluster_config_selects(cc, n.labels)]
        conds = [Condition(NO_MATCHING_NODE, "False" if selected else "True", "NoMatchingNode",
                           "No node matches spec.nodeSelector", gen)]
        missing = sorted({p.peer_config_ref.name for inst in cc.spec.bgp_instances
                          for p in inst.peers
                          if p.peer_config_ref and objects.peer_config(p.peer_config_ref.name)
                          is None})
        conds.append(Condition(
            MISSING_PEER_CONFIGS, "True" if missing else "False", "MissingPeerConfigs",
            f"Referenced CiliumBGPPeerConfig(s) are missing: {_go_list(missing)}" if missing
            else "", gen))
        others = sorted({owners[n.name] for n in selected if owners.get(n.name) not in
                         (None, cc.name)})
        conds.append(Condition(
            CONFLICTING_CLUSTER_CONFIG, "True" if others else "False",
            "ConflictingClusterConfigs",
            f"Selecting the same node(s) with ClusterConfig(s): {_go_list(others)}" if others
            else "", gen))
        out[cc.name] = tuple(sorted(conds, key=lambda c: c.type))
    return out


def peer_config_conditions(objects: ObjectSet, options: AgentOptions = AgentOptions()
                           ) -> dict[str, tuple[Condition, ...]]:
    if not options.status_report:
        return {pc.name: () for pc in objects.peer_configs}
    out = {}
    for pc in objects.peer_configs:
        ref = pc.spec.auth_secret_ref
        missing = bool(ref) and objects.secret(options.secrets_namespace, ref) is None
        out[pc.name] = (Condition(MISSING_AUTH_SECRET, "True" if missing else "False",
                                  "MissingAuthSecret",
                                  f'Referenced Auth Secret "{ref}" is missing' if missing else "",
                                  pc.metadata.generation),)
    return out


def reconcile_error_condition(errors: dict[str, list[str]]) -> Condition:
    """BGPReconcileError: lines "<instance>: <error>" sorted, capped at 32 KiB."""
    lines = [f"{inst}: {err}\n" for inst in sorted(errors) for err in errors[inst]]
    msg = "".join(lines)
    if len(msg.encode()) > RECONCILE_ERROR_MAX:
        msg = msg.encode()[:RECONCILE_ERROR_MAX].decode(errors="ignore")
    return Condition(BGP_RECONCILE_ERROR, "True" if lines else "False", "BGPReconcileError", msg)


def _rfc3339(ts: float) -> str:
    return _dt.datetime.fromtimestamp(ts, _dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


_FAMILY_AFI_SAFI = {Family.IPV4_UNICAST: ("ipv4", "unicast"),
                    Family.IPV6_UNICAST: ("ipv6", "unicast")}


def node_config_status(node_config: NodeConfigResult,
                       peer_states: dict[str, list[Any]] | list[Any],
                       reconcile_errors: dict[str, list[str]] | None = None,
                       now: float | None = None) -> dict[str, Any]:
    """CiliumBGPNodeConfig .status. ``peer_states``: instance name -> the speaker's PeerState
    list (agent.bgp.api.PeerState), or one flat list (matched by local ASN and address).
    ``now`` is used for establishedTime when the speaker gives only an uptime."""
    instances = []
    for inst in node_config.instances:
        if isinstance(peer_states, dict):
            mine = peer_states.get(inst.name, [])
        else:
            mine = [s for s in peer_states
                    if getattr(s, "local_asn", inst.local_asn) == inst.local_asn]
        states = {s.address: s for s in mine}
        peers = []
        for p in inst.peers:
            s = states.get(p.address)
            entry: dict[str, Any] = {"name": p.name, "peerAddress": p.address,
                                     "peerASN": p.peer_asn}
            if s is None:
                entry["peeringState"] = "unknown"
                peers.append(entry)
                continue
            if p.peer_asn == 0 and getattr(s, "peer_asn", 0):
                entry["peerASN"] = s.peer_asn   # learned from OPEN
            entry["peeringState"] = s.state
            timers = {}
            if s.hold_time is not None:
                timers["appliedHoldTimeSeconds"] = s.hold_time
            if s.keepalive is not None:
                timers["appliedKeepaliveSeconds"] = s.keepalive
            if timers:
                entry["timers"] = timers
            if s.state == "established":
                est = s.established_at
                if est is None and s.uptime_seconds is not None and now is not None:
                    est = now - s.uptime_seconds
                if est is not None:
                    entry["establishedTime"] = _rfc3339(est)
            counts = []
            for fam, c in sorted(s.families.items(), key=lambda kv: kv[0].value):
                afi, safi = _FAMILY_AFI_SAFI.get(fam, (str(fam), ""))
                counts.append({"afi": afi, "safi": safi, "received": c.received,
                               "advertised": c.advertised})
            if counts:
                entry["routeCount"] = counts
            peers.append(entry)
        instances.append({"name": inst.name, "localASN": inst.local_asn, "peers": peers})
    status: dict[str, Any] = {"bgpInstances": instances}
    status["conditions"] = [reconcile_error_condition(reconcile_errors or {}).to_dict()]
    return status


def node_config_object(node_config: NodeConfigResult) -> dict[str, Any]:
    """The CiliumBGPNodeConfig the operator would write for this node (spec only)."""
    meta: dict[str, Any] = {"name": node_config.node_name}
    if node_config.source and node_config.source.startswith("CiliumBGPClusterConfig/"):
        meta["ownerReferences"] = [{"apiVersion": "cilium.io/v2",
                                    "kind": "CiliumBGPClusterConfig",
                                    "name": node_config.source.split("/", 1)[1],
                                    "controller": True}]
    instances = []
    for inst in node_config.instances:
        d: dict[str, Any] = {"name": inst.name, "localASN": inst.local_asn,
                             "routerID": inst.router_id}
        if inst.local_port is not None:
            d["localPort"] = inst.local_port
        peers = []
        for p in inst.peers:
            pd: dict[str, Any] = {"name": p.name, "peerAddress": p.address, "peerASN": p.peer_asn}
            if p.local_address:
                pd["localAddress"] = p.local_address
            if p.peer_config_ref:
                pd["peerConfigRef"] = {"name": p.peer_config_ref}
            peers.append(pd)
        d["peers"] = peers
        instances.append(d)
    return {"apiVersion": "cilium.io/v2", "kind": "CiliumBGPNodeConfig", "metadata": meta,
            "spec": {"bgpInstances": instances}}
