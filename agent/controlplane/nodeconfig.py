"""Node config derivation: Cilium's operator role, computed by each agent for its own node.

Sources, in Cilium's order of precedence for one node:

1. exactly one legacy CiliumBGPPeeringPolicy selecting the node (it wins over ClusterConfigs,
   as documented for Cilium 1.16-1.18); two or more -> nothing applies (Cilium's error);
2. the first CiliumBGPClusterConfig selecting the node (oldest creationTimestamp, then name);
   later ones selecting the same node are not applied here (ConflictingClusterConfig);
3. a hand-written CiliumBGPNodeConfig named after the node (vipd extension for file mode).
"""

from __future__ import annotations

import hashlib
import ipaddress
from dataclasses import dataclass
from typing import Iterable

from agent.config import ObjectSet
from agent.config.bfd import BFD_ANNOTATION, parse_bfd_annotation
from agent.config.cilium import (
    DEFAULT_V2_FAMILIES,
    WELL_KNOWN_COMMUNITIES,
    CiliumBGPClusterConfig,
    CiliumBGPNodeConfig,
    CiliumBGPPeeringPolicy,
    Communities,
    parse_large_community,
    parse_standard_community,
)
from agent.config.core import Node
from agent.config.meta import selector_matches
from agent.controlplane.types import (
    AgentOptions,
    BgpInstance,
    ConfigIssue,
    FamilySpec,
    LegacyAdvertisements,
    LegacyPathAttributes,
    NodeConfigResult,
    PeerSpec,
)

MULTIPLE_POLICIES_ERROR = ("more then one CiliumBGPPeeringPolicy applies to this node, please "
                           "ensure only a single Policy matches this node's labels")
VIRTUAL_ROUTER_ANNOTATION = "cilium.io/bgp-virtual-router."
MAX_INSTANCES = 16


def node_labels(objects: ObjectSet, node_name: str) -> dict[str, str]:
    node = objects.node(node_name)
    return dict(node.labels) if node else {}


def cluster_config_selects(cc: CiliumBGPClusterConfig, labels: dict[str, str]) -> bool:
    # nil or empty selector selects every node (operator uses labels.Everything() for nil)
    return selector_matches(cc.spec.node_selector, labels, nil_matches=True)


def node_owners(objects: ObjectSet) -> dict[str, str]:
    """node name -> name of the ClusterConfig that owns it (first selecting config wins)."""
    owners: dict[str, str] = {}
    for node in objects.nodes:
        for cc in objects.cluster_configs:
            if cluster_config_selects(cc, node.labels):
                owners.setdefault(node.name, cc.name)
    return owners


def derive_node_config(objects: ObjectSet, node_name: str, options: AgentOptions = AgentOptions(),
                       *, router_id_mac: str | None = None,
                       interfaces: dict[str, list[str]] | None = None,
                       default_gateways: dict[str, str] | None = None,
                       ipv6_routers: dict[str, list[str]] | None = None) -> NodeConfigResult:
    """This node's BGP instances and peers (see module docstring for the precedence rules).

    ``interfaces``: interface name -> addresses on this node, used for PeerConfig
    ``transport.sourceInterface``; None means "unknown" (the option is then ignored with a warning).
    ``default_gateways``: {"ipv4": addr, "ipv6": addr} of this node's lowest-metric default
    routes, for peers with ``autoDiscovery.mode: DefaultGateway``.
    ``ipv6_routers``: interface -> link-local addresses of the IPv6 routers heard on it, for
    ``autoDiscovery.mode: Unnumbered`` and ``peerInterface``; None means "unknown" (offline
    validation: such peers are skipped with a warning).
    """
    host = _Host(interfaces, default_gateways or {}, ipv6_routers)
    issues: list[ConfigIssue] = []
    node = objects.node(node_name)
    if node is None:
        issues.append(ConfigIssue("warning", "", f"no Node object named {node_name!r}: node "
                                  "selectors see no labels and the router ID cannot come from "
                                  "the node address"))
    labels = dict(node.labels) if node else {}

    policies = [p for p in objects.peering_policies
                if selector_matches(p.spec.node_selector, labels, nil_matches=True)]
    selecting = [c for c in objects.cluster_configs if cluster_config_selects(c, labels)]

    if len(policies) > 1:
        names = ", ".join(p.name for p in policies)
        issues.append(ConfigIssue("error", "CiliumBGPPeeringPolicy",
                                  f"{MULTIPLE_POLICIES_ERROR} (matching: {names})"))
        return NodeConfigResult(node_name, (), None, tuple(issues))
    if policies:
        policy = policies[0]
        if selecting:
            issues.append(ConfigIssue(
                "warning", f"CiliumBGPPeeringPolicy/{policy.name}",
                "CiliumBGPPeeringPolicy and CiliumBGPClusterConfig "
                f"({', '.join(c.name for c in selecting)}) both select this node; the "
                "CiliumBGPPeeringPolicy takes precedence (do not use them together)"))
        instances = _from_peering_policy(objects, policy, node, options, router_id_mac, issues)
        return NodeConfigResult(node_name, instances, f"CiliumBGPPeeringPolicy/{policy.name}",
                                tuple(issues))
    if selecting:
        owner = selecting[0]
        for other in selecting[1:]:
            issues.append(ConfigIssue(
                "error", f"CiliumBGPClusterConfig/{other.name}",
                f"not applied on this node: it is already selected by CiliumBGPClusterConfig "
                f"{owner.name!r} (ConflictingClusterConfig)"))
        instances = _from_cluster_config(objects, owner, node, node_name, options, router_id_mac,
                                         host, issues)
        return NodeConfigResult(node_name, instances, f"CiliumBGPClusterConfig/{owner.name}",
                                tuple(issues))
    explicit = next((n for n in objects.node_configs if n.name == node_name), None)
    if explicit is not None:
        instances = _from_node_config(objects, explicit, node, options, router_id_mac, host,
                                      issues)
        return NodeConfigResult(node_name, instances, f"CiliumBGPNodeConfig/{explicit.name}",
                                tuple(issues))
    return NodeConfigResult(node_name, (), None, tuple(issues))


# ------------------------------------------------------------------------------------ router ID


def router_id_for(node: Node | None, override: str | None, mac: str | None,
                  issues: list[ConfigIssue], where: str) -> str | None:
    """Override, else the node's IPv4 address, else (IPv6-only) the low 4 bytes of a MAC, else a
    hash of the node's IPv6 address."""
    if override:
        return override
    if node is not None:
        v4 = node.addresses(4)
        if v4:
            return v4[0]
    if mac:
        octets = [int(x, 16) for x in mac.replace("-", ":").split(":")]
        if len(octets) >= 4 and any(octets[-4:]):
            return ".".join(str(o) for o in octets[-4:])
    if node is not None:
        for v6 in node.addresses(6):
            # No cilium_host MAC here: hash the whole address, since the last 4 bytes of IPv6
            # node addresses (…::2) repeat across subnets and router IDs must be unique.
            digest = hashlib.sha256(ipaddress.IPv6Address(v6).packed).digest()[:4]
            if any(digest):
                rid = str(ipaddress.IPv4Address(digest))
                issues.append(ConfigIssue("warning", where, f"IPv6-only node: router ID {rid} "
                                          f"derived from {v6}; set routerID in a "
                                          "CiliumBGPNodeConfigOverride to choose it"))
                return rid
    issues.append(ConfigIssue("error", where, "cannot choose a router ID: the node has no IPv4 "
                              "address; set routerID in a CiliumBGPNodeConfigOverride"))
    return None


# ------------------------------------------------------------------------- ClusterConfig (v2)


@dataclass(frozen=True)
class _Host:
    """Facts about this host that the pure rules need (supplied by the daemon)."""

    interfaces: dict[str, list[str]] | None
    default_gateways: dict[str, str]
    ipv6_routers: dict[str, list[str]] | None = None


def _from_cluster_config(objects, cc, node, node_name, options, mac, host, issues):
    where = f"CiliumBGPClusterConfig/{cc.name}"
    override = objects.node_config_override(node_name)
    ov_instances = {i.name: i for i in (override.spec.bgp_instances if override else [])}
    for name in ov_instances:
        if name not in {i.name for i in cc.spec.bgp_instances}:
            issues.append(ConfigIssue("warning", f"CiliumBGPNodeConfigOverride/{node_name}",
                                      f"bgpInstances {name!r} matches no instance of {where}; "
                                      "ignored"))
    out = []
    for inst in cc.spec.bgp_instances[:MAX_INSTANCES]:
        ov = ov_instances.get(inst.name)
        ov_peers = {p.name: p for p in (ov.peers or [])} if ov else {}
        for pname in ov_peers:
            if pname not in {p.name for p in inst.peers}:
                issues.append(ConfigIssue("warning", f"CiliumBGPNodeConfigOverride/{node_name}",
                                          f"peer {pname!r} of instance {inst.name!r} matches no "
                                          "peer; ignored"))
        local_asn = ov.local_asn if ov and ov.local_asn is not None else inst.local_asn
        if local_asn is None:
            issues.append(ConfigIssue("error", where, f"instance {inst.name!r}: missing ASN in "
                                      "desired config (set localASN)"))
            continue
        local_port = ov.local_port if ov and ov.local_port is not None else inst.local_port
        router_id = router_id_for(node, ov.router_id if ov else None, mac, issues,
                                  f"{where} instance {inst.name!r}")
        if router_id is None:
            continue
        peers = []
        for p in inst.peers:
            local_address = ov_peers[p.name].local_address if p.name in ov_peers else None
            spec = _resolve_peer(objects, options, where, inst.name, p.name, p.peer_address,
                                 p.auto_discovery, p.peer_asn,
                                 p.peer_config_ref.name if p.peer_config_ref else None,
                                 local_address, host, issues)
            if spec is not None:
                peers.append(spec)
        out.append(BgpInstance(inst.name, local_asn, router_id, local_port, tuple(peers),
                               None, where))
    return tuple(out)


def _from_node_config(objects, nc: CiliumBGPNodeConfig, node, options, mac, host, issues):
    where = f"CiliumBGPNodeConfig/{nc.name}"
    out = []
    for inst in nc.spec.bgp_instances:
        if inst.local_asn is None:
            issues.append(ConfigIssue("error", where, f"instance {inst.name!r}: missing ASN in "
                                      "desired config (set localASN)"))
            continue
        router_id = router_id_for(node, inst.router_id, mac, issues, where)
        if router_id is None:
            continue
        peers = []
        for p in inst.peers:
            spec = _resolve_peer(objects, options, where, inst.name, p.name, p.peer_address,
                                 p.auto_discovery, p.peer_asn,
                                 p.peer_config_ref.name if p.peer_config_ref else None,
                                 p.local_address, host, issues, peer_interface=p.peer_interface)
            if spec is not None:
                peers.append(spec)
        out.append(BgpInstance(inst.name, inst.local_asn, router_id, inst.local_port,
                               tuple(peers), None, where))
    return tuple(out)


def _password(objects, options, ref, where, issues) -> tuple[bool, str | None]:
    """(ok, password). A missing Secret means "no password" (Cilium continues unauthenticated);
    a Secret without the "password" key is an error and the peer is not configured."""
    if not ref:
        return True, None
    secret = objects.secret(options.secrets_namespace, ref)
    if secret is None:
        issues.append(ConfigIssue("warning", where, f'Failed to fetch secret '
                                  f'"{options.secrets_namespace}/{ref}": not found (will continue '
                                  "with empty password)"))
        return True, None
    pw = secret.value("password")
    if not pw:
        issues.append(ConfigIssue("error", where, f'Secret "{options.secrets_namespace}/{ref}": '
                                  'missing password key "password"; peer not configured'))
        return False, None
    return True, pw


def _usable_source(addresses: Iterable[str], version: int) -> list[str]:
    out = []
    for a in addresses:
        ip = ipaddress.ip_interface(a).ip
        if ip.version != version or ip.is_loopback or ip.is_multicast:
            continue
        if ip.version == 6 and (ip.is_link_local or ip.ipv4_mapped is not None):
            continue
        if str(ip) not in out:
            out.append(str(ip))
    return out


def _link_local_peer(host: _Host, ifname: str, address: str | None, why: str, peer_where: str,
                     issues: list[ConfigIssue]) -> str | None:
    """The zone-scoped peer address ``fe80::x%ifname`` of an unnumbered peer: ``address`` if
    given (peerInterface with peerAddress), else the IPv6 router heard on ``ifname`` (its
    Router Advertisements or router-flagged Neighbor Advertisements, from the host facts)."""
    if host.interfaces is not None and ifname not in host.interfaces:
        issues.append(ConfigIssue("error", peer_where, f"{why}: interface {ifname!r} does not "
                                  "exist on this node; peer skipped"))
        return None
    if address is not None:
        return f"{ipaddress.ip_address(address.split('%')[0])}%{ifname}"
    if host.ipv6_routers is None:
        issues.append(ConfigIssue("warning", peer_where, f"{why}: the peer is discovered at run "
                                  f"time from IPv6 Router Advertisements on {ifname!r}; skipped "
                                  "here (no host facts)"))
        return None
    routers = host.ipv6_routers.get(ifname) or []
    if not routers:
        issues.append(ConfigIssue("error", peer_where, f"{why}: no IPv6 router heard on "
                                  f"{ifname!r} yet; the router must send Router Advertisements "
                                  "there (FRR does for `neighbor IFACE interface`; else `ipv6 nd "
                                  "ra-interval` / `no ipv6 nd suppress-ra`) and the interface "
                                  "must accept them (accept_ra); peer skipped until one is heard"))
        return None
    if len(routers) > 1:
        issues.append(ConfigIssue("warning", peer_where, f"{why}: several IPv6 routers on "
                                  f"{ifname!r} ({', '.join(routers)}); peering with {routers[0]}"))
    return f"{routers[0]}%{ifname}"


def _resolve_peer(objects, options, where, instance, name, address, auto_discovery, peer_asn,
                  ref, local_address, host, issues, *, peer_interface=None) -> PeerSpec | None:
    peer_where = f"{where} instance {instance!r} peer {name!r}"
    interfaces = host.interfaces
    if peer_interface is not None and auto_discovery is None:
        address = _link_local_peer(host, peer_interface, address, "peerInterface", peer_where, issues)
        if address is None:
            return None
    if address is None and auto_discovery is not None and auto_discovery.mode == "Unnumbered":
        address = _link_local_peer(host, auto_discovery.unnumbered.interface, None,
                                   "autoDiscovery Unnumbered", peer_where, issues)
        if address is None:
            return None
    if address is None and auto_discovery is not None and \
            auto_discovery.mode == "DefaultGateway":
        fam = auto_discovery.default_gateway.address_family
        gw = host.default_gateways.get(fam)
        if gw is None:
            issues.append(ConfigIssue("error", peer_where, f"autoDiscovery DefaultGateway: no "
                                      f"{fam} default gateway on this node; peer skipped"))
            return None
        if ipaddress.ip_address(gw).is_link_local:
            issues.append(ConfigIssue("error", peer_where, f"autoDiscovery DefaultGateway: "
                                      f"link-local gateway {gw} is not supported; peer skipped"))
            return None
        address = gw
    if address is None:
        if auto_discovery is not None:
            issues.append(ConfigIssue("error", peer_where, f"autoDiscovery mode "
                                      f"{auto_discovery.mode} is not supported by vipd; set "
                                      "peerAddress. Peer skipped"))
        else:
            issues.append(ConfigIssue("error", peer_where, "peerAddress is required (no "
                                      "autoDiscovery); peer skipped"))
        return None
    peer_ip = ipaddress.ip_address(address)
    if peer_ip.version == 6 and peer_ip.is_link_local and not peer_ip.scope_id:
        issues.append(ConfigIssue("error", peer_where, f"link-local peerAddress {address} needs "
                                  "its interface: write it as fe80::…%IFACE, or use "
                                  "autoDiscovery Unnumbered / peerInterface; peer skipped"))
        return None
    if peer_ip.version == 6 and peer_ip.scope_id and not peer_ip.is_link_local:
        issues.append(ConfigIssue("error", peer_where, f"peerAddress {address}: a zone (%…) is "
                                  "only meaningful on a link-local (fe80::/10) address; peer "
                                  "skipped"))
        return None
    link_local = bool(peer_ip.version == 6 and peer_ip.scope_id)
    if ref is not None:
        pc = objects.peer_config(ref)
        if pc is None:
            issues.append(ConfigIssue("error", peer_where, f"referenced CiliumBGPPeerConfig "
                                      f"{ref!r} does not exist; peer skipped"))
            return None
        spec = pc.spec
    else:
        pc = spec = None   # Cilium's built-in defaults (and no advertisements)
    transport = spec.transport if spec else None
    timers = spec.timers if spec else None
    gr = spec.graceful_restart if spec else None
    families = tuple(FamilySpec(f.afi, f.safi, f.advertisements) for f in spec.families) \
        if spec and spec.families else tuple(FamilySpec(a, s) for a, s in DEFAULT_V2_FAMILIES)
    ok, password = _password(objects, options, spec.auth_secret_ref if spec else None,
                             f"CiliumBGPPeerConfig/{ref}", issues)
    if not ok:
        return None
    if link_local and transport is not None and transport.source_interface:
        issues.append(ConfigIssue("warning", peer_where, f"sourceInterface "
                                  f"{transport.source_interface!r} is ignored for the link-local "
                                  f"peer {address}: the session comes from our link-local address "
                                  "on that interface"))
    elif local_address is None and transport is not None and transport.source_interface:
        ifname = transport.source_interface
        if interfaces is None:
            issues.append(ConfigIssue("warning", peer_where, f"sourceInterface {ifname!r}: "
                                      "interface addresses unknown; using the route lookup"))
        else:
            version = ipaddress.ip_address(address).version
            usable = _usable_source(interfaces.get(ifname, []), version)
            if len(usable) != 1:
                issues.append(ConfigIssue("error", peer_where, f"sourceInterface {ifname!r} has "
                                          f"{len(usable)} usable IPv{version} addresses (need "
                                          "exactly one); peer skipped"))
                return None
            local_address = usable[0]
    for f in families:
        if f.family is None:
            issues.append(ConfigIssue("warning", peer_where, f"family {f.afi}/{f.safi} is not "
                                      "supported (only ipv4/unicast and ipv6/unicast); ignored"))
    bfd = None
    if pc is not None and BFD_ANNOTATION in pc.metadata.annotations:
        try:
            bfd = parse_bfd_annotation(pc.metadata.annotations[BFD_ANNOTATION])
        except ValueError as exc:
            issues.append(ConfigIssue("error", f"CiliumBGPPeerConfig/{ref}", f"metadata.annotations"
                                      f"[{BFD_ANNOTATION}]: {exc}; BFD is off for peer {name} until fixed"))
    if bfd is not None and link_local:
        issues.append(ConfigIssue("warning", peer_where, f"BFD ({BFD_ANNOTATION}) is not supported "
                                  f"for the link-local peer {address} yet; BFD is off for it"))
        bfd = None
    return PeerSpec(
        name=name, address=str(peer_ip), peer_asn=peer_asn,
        port=transport.peer_port if transport else 179, local_address=local_address,
        password=password, auth_secret_ref=spec.auth_secret_ref if spec else None,
        ebgp_multihop=spec.ebgp_multihop if spec else 1,
        hold_time=timers.hold_time_seconds if timers else 90,
        keepalive=timers.keep_alive_time_seconds if timers else 30,
        connect_retry=timers.connect_retry_time_seconds if timers else 120,
        graceful_restart=bool(gr and gr.enabled),
        restart_time=gr.restart_time_seconds if gr else 120,
        families=families, peer_config_ref=ref, bfd=bfd)


# --------------------------------------------------------------------- PeeringPolicy (v1)


def parse_virtual_router_annotation(value: str) -> dict[str, str]:
    """'router-id=A.B.C.D,local-port=179' -> dict; the last duplicate key wins."""
    out: dict[str, str] = {}
    for part in value.split(","):
        if "=" in part:
            k, _, v = part.partition("=")
            out[k.strip()] = v.strip()
    return out


def communities_of(c: Communities | None
                   ) -> tuple[tuple[int, ...], tuple[tuple[int, int, int], ...]]:
    """(standard + well-known values, large communities), each de-duplicated and sorted."""
    if c is None:
        return (), ()
    std = {parse_standard_community(s) for s in c.standard or []}
    std |= {WELL_KNOWN_COMMUNITIES[w] for w in c.well_known or []}
    large = {parse_large_community(s) for s in c.large or []}
    return tuple(sorted(std)), tuple(sorted(large))


def _from_peering_policy(objects, policy: CiliumBGPPeeringPolicy, node, options, mac, issues):
    where = f"CiliumBGPPeeringPolicy/{policy.name}"
    out = []
    annotations = node.metadata.annotations if node else {}
    for vr in policy.spec.virtual_routers[:MAX_INSTANCES]:
        ann = parse_virtual_router_annotation(
            annotations.get(f"{VIRTUAL_ROUTER_ANNOTATION}{vr.local_asn}", ""))
        rid = ann.get("router-id")
        if rid is not None:
            try:
                ipaddress.IPv4Address(rid)
            except ValueError:
                issues.append(ConfigIssue("error", where, f"node annotation "
                                          f"{VIRTUAL_ROUTER_ANNOTATION}{vr.local_asn}: router-id "
                                          f"{rid!r} is not an IPv4 address; ignored"))
                rid = None
        port = None
        if "local-port" in ann:
            try:
                port = int(ann["local-port"])
                if not 1 <= port <= 65535:
                    raise ValueError
            except ValueError:
                issues.append(ConfigIssue("error", where, f"node annotation local-port "
                                          f"{ann['local-port']!r} must be 1..65535; ignored"))
                port = None
        router_id = router_id_for(node, rid, mac, issues, f"{where} virtualRouter {vr.local_asn}")
        if router_id is None:
            continue
        peers = []
        for n in vr.neighbors:
            ok, password = _password(objects, options, n.auth_secret_ref, where, issues)
            if not ok:
                continue
            fams = tuple(FamilySpec(f.afi, f.safi) for f in n.families) if n.families else (
                FamilySpec("ipv4", "unicast"), FamilySpec("ipv6", "unicast"))
            pattrs = []
            for pa in n.advertised_path_attributes or []:
                std, large = communities_of(pa.communities)
                pattrs.append(LegacyPathAttributes(pa.selector_type, pa.selector, std, large,
                                                   pa.local_preference))
            gr = n.graceful_restart
            peers.append(PeerSpec(
                name=n.address, address=n.address, peer_asn=n.peer_asn, port=n.peer_port,
                password=password, auth_secret_ref=n.auth_secret_ref,
                ebgp_multihop=n.e_bgp_multihop_ttl, hold_time=n.hold_time_seconds,
                keepalive=n.keep_alive_time_seconds, connect_retry=n.connect_retry_time_seconds,
                graceful_restart=bool(gr and gr.enabled),
                restart_time=(gr.restart_time_seconds or 120) if gr else 120,
                families=fams, legacy_path_attributes=tuple(pattrs)))
        legacy = LegacyAdvertisements(vr.export_pod_cidr, vr.service_selector,
                                      tuple(vr.service_advertisements))
        if vr.pod_ip_pool_selector is not None:
            issues.append(ConfigIssue("warning", where, "podIPPoolSelector: multi-pool IPAM is "
                                      "not supported by vipd; ignored"))
        out.append(BgpInstance(str(vr.local_asn), vr.local_asn, router_id, port, tuple(peers),
                               legacy, where))
    return tuple(out)
