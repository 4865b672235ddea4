"""Output types of the pure control plane (what the daemon's reconcilers consume).

Everything here is a frozen dataclass: values, comparable with ``==`` so a reconciler can diff
desired against running state, and printable as data (``to_data``) for the API and golden
files. The BGP-facing value types (``Family``, ``PathAttributes``, ``Origin``,
``NeighborConfig``) come from the speaker contract ``agent.bgp.api``
(docs/internal/speaker-api.md).
"""

from __future__ import annotations

import dataclasses
import enum
from dataclasses import dataclass, field
from ipaddress import IPv4Network, IPv6Network
from typing import Any

from agent.config.meta import LabelSelector

from agent.bgp.api import Family, NeighborConfig, Origin, PathAttributes  # speaker contract

Prefix = IPv4Network | IPv6Network

__all__ = [
    "Family", "Origin", "PathAttributes", "NeighborConfig", "Prefix",
    "AgentOptions", "Condition", "ConfigIssue", "FamilySpec", "PeerSpec", "LegacyAdvertisements",
    "LegacyPathAttributes", "BgpInstance", "NodeConfigResult", "DesiredPaths", "PolicyPrefix",
    "PolicyStatement", "RoutePolicy", "LbIpamResult", "family_of", "family_name",
]


def family_of(afi: str, safi: str) -> Family | None:
    """Cilium's afi/safi strings -> speaker Family (None for families vipd cannot speak)."""
    return {("ipv4", "unicast"): Family.IPV4_UNICAST,
            ("ipv6", "unicast"): Family.IPV6_UNICAST}.get((afi, safi))


def family_name(family: Family) -> str:
    """'ipv4/unicast' as printed by Cilium's CLI."""
    return {Family.IPV4_UNICAST: "ipv4/unicast", Family.IPV6_UNICAST: "ipv6/unicast"}[family]


@dataclass(frozen=True)
class AgentOptions:
    """The agent flags of Cilium that change control-plane results (defaults = Cilium's)."""

    # enable-no-service-endpoints-routable: advertise VIPs of services with zero endpoints
    no_service_endpoints_routable: bool = True
    # enable-bgp-legacy-origin-attribute: ORIGIN=INCOMPLETE for LoadBalancerIP routes
    legacy_origin_attribute: bool = False
    # bgp-secrets-namespace: where authSecretRef Secrets live
    secrets_namespace: str = "kube-system"
    # enable-bgp-control-plane-status-report
    status_report: bool = True


@dataclass(frozen=True, slots=True)
class Condition:
    """metav1.Condition as computed (timestamps are the daemon's business)."""

    type: str
    status: str  # "True" | "False" | "Unknown"
    reason: str
    message: str
    observed_generation: int | None = None

    def to_dict(self) -> dict[str, Any]:
        d = {"type": self.type, "status": self.status, "reason": self.reason,
             "message": self.message}
        if self.observed_generation is not None:
            d["observedGeneration"] = self.observed_generation
        return d


@dataclass(frozen=True)
class ConfigIssue:
    """A problem found while deriving configuration (not a schema error: those are
    ``agent.config.ConfigError``). ``severity`` is "error" (something was not applied) or
    "warning" (applied with a fallback)."""

    severity: str
    object: str  # "CiliumBGPClusterConfig/name" or "" for node-level issues
    message: str

    def __str__(self) -> str:
        return f"{self.severity}: {self.object}: {self.message}" if self.object else \
            f"{self.severity}: {self.message}"


@dataclass(frozen=True)
class FamilySpec:
    afi: str   # "ipv4" | "ipv6" (other Cilium AFIs are kept but never advertised)
    safi: str  # "unicast"
    # Selector over CiliumBGPAdvertisement labels; None = nothing advertised (Cilium's rule).
    advertisements: LabelSelector | None = None

    @property
    def family(self) -> Family | None:
        return family_of(self.afi, self.safi)


@dataclass(frozen=True)
class PeerSpec:
    """One resolved peer of one instance on this node (PeerConfig defaults applied)."""

    name: str
    address: str                       # bare IP, no prefix length
    peer_asn: int                      # 0 = learn from OPEN
    port: int = 179
    local_address: str | None = None   # NodeConfigOverride peers[].localAddress
    password: str | None = field(default=None, repr=False)  # the Secret's "password" key
    auth_secret_ref: str | None = None
    ebgp_multihop: int = 1             # TTL; <=1 means multihop disabled
    hold_time: int = 90
    keepalive: int = 30
    connect_retry: int = 120
    graceful_restart: bool = False
    restart_time: int = 120
    families: tuple[FamilySpec, ...] = ()
    peer_config_ref: str | None = None
    # Legacy CiliumBGPPeeringPolicy neighbors[].advertisedPathAttributes (empty for v2 peers).
    legacy_path_attributes: tuple["LegacyPathAttributes", ...] = ()
    # agent.bfd.BfdTimers from the vipd.io/bfd annotation (a vipd extension: omitted from data
    # when unset, so a Cilium-only configuration renders exactly as before)
    bfd: object | None = field(default=None, metadata={"omit_if_none": True})

    @property
    def speaker_families(self) -> tuple[Family, ...]:
        out: list[Family] = []
        for f in self.families:
            if f.family is not None and f.family not in out:
                out.append(f.family)
        return tuple(out)

    def is_ibgp(self, local_asn: int) -> bool | None:
        """True/False, or None when peerASN is 0 (learned from OPEN)."""
        return None if self.peer_asn == 0 else self.peer_asn == local_asn

    def neighbor_config(self) -> NeighborConfig:
        """The speaker's neighbor settings. Contains nothing about advertisements, so a change
        that only touches advertisements never changes this value (and never resets a session)."""
        return NeighborConfig(
            address=self.address, peer_asn=self.peer_asn, port=self.port,
            local_address=self.local_address, password=self.password or None,
            ebgp_multihop_ttl=self.ebgp_multihop if self.ebgp_multihop > 1 else None,
            hold_time=self.hold_time, keepalive=self.keepalive,
            connect_retry=self.connect_retry, passive=False,
            families=self.speaker_families, graceful_restart=self.graceful_restart,
            restart_time=self.restart_time, name=self.name, bfd=self.bfd,
        )


@dataclass(frozen=True)
class LegacyPathAttributes:
    """CiliumBGPPeeringPolicy virtualRouters[].neighbors[].advertisedPathAttributes[] entry."""

    selector_type: str                 # PodCIDR | CiliumLoadBalancerIPPool | CiliumPodIPPool
    selector: LabelSelector | None     # nil = all objects of that type (unlike v2)
    communities: tuple[int, ...] = ()
    large_communities: tuple[tuple[int, int, int], ...] = ()
    local_preference: int | None = None


@dataclass(frozen=True)
class LegacyAdvertisements:
    """What a legacy virtualRouter advertises (applies to all of its neighbors)."""

    export_pod_cidr: bool = False
    service_selector: LabelSelector | None = None      # nil = no services
    service_addresses: tuple[str, ...] = ("LoadBalancerIP",)


@dataclass(frozen=True)
class BgpInstance:
    name: str
    local_asn: int
    router_id: str
    local_port: int | None = None      # None: no listener (Cilium's default)
    peers: tuple[PeerSpec, ...] = ()
    # Set only when the instance comes from a legacy CiliumBGPPeeringPolicy.
    legacy: LegacyAdvertisements | None = None
    source: str = ""                   # "CiliumBGPClusterConfig/x" | "CiliumBGPPeeringPolicy/y"

    def peer(self, name_or_address: str) -> PeerSpec | None:
        return next((p for p in self.peers
                     if p.name == name_or_address or p.address == name_or_address), None)


@dataclass(frozen=True)
class NodeConfigResult:
    node_name: str
    instances: tuple[BgpInstance, ...] = ()
    source: str | None = None          # the object that won this node, or None
    issues: tuple[ConfigIssue, ...] = ()

    @property
    def errors(self) -> tuple[ConfigIssue, ...]:
        return tuple(i for i in self.issues if i.severity == "error")


# Desired Adj-RIB-Out of one peer: family -> prefix -> attributes.
DesiredPaths = dict[Family, dict[Prefix, PathAttributes]]


@dataclass(frozen=True)
class PolicyPrefix:
    cidr: str
    min_len: int
    max_len: int

    def __str__(self) -> str:
        return f"{self.cidr} ({self.min_len}..{self.max_len})"


@dataclass(frozen=True)
class PolicyStatement:
    match_peers: tuple[str, ...] = ()          # "10.0.0.1/32"
    match_families: tuple[str, ...] = ()       # "ipv4-unicast"
    match_prefixes: tuple[PolicyPrefix, ...] = ()
    rib_action: str = "accept"                 # accept | reject | none
    local_preference: int | None = None
    communities: tuple[str, ...] = ()          # rendered "65000:99"
    large_communities: tuple[str, ...] = ()

    @property
    def path_actions(self) -> tuple[str, ...]:
        out = []
        if self.local_preference is not None:
            out.append(f"SetLocalPreference: {self.local_preference}")
        if self.communities:
            out.append(f"AddCommunities: [{' '.join(self.communities)}]")
        if self.large_communities:
            out.append(f"AddLargeCommunities: [{' '.join(self.large_communities)}]")
        return tuple(out)


@dataclass(frozen=True)
class RoutePolicy:
    vrouter: int                       # local ASN (Cilium's "VRouter" column)
    instance: str
    name: str
    type: str                          # export | import
    statements: tuple[PolicyStatement, ...] = ()


@dataclass(frozen=True)
class LbIpamResult:
    # "namespace/name" -> allocated ingress IPs (sorted); persisted by the daemon and fed back as
    # ``previous_allocations`` so allocations are stable across restarts.
    allocations: dict[str, tuple[str, ...]] = field(default_factory=dict)
    # "namespace/name" -> cilium.io/IPAMRequestSatisfied condition
    service_conditions: dict[str, Condition] = field(default_factory=dict)
    # pool name -> conditions (IPsTotal, IPsAvailable, IPsUsed, PoolConflict)
    pool_conditions: dict[str, tuple[Condition, ...]] = field(default_factory=dict)
    # (pool, range) -> lowest address that may be free: below it every address is taken
    # (lets the next allocation of one Service skip the 20,000 taken ones)
    free_from: dict[tuple[str, str], int] = field(default_factory=dict, compare=False)


def to_data(value: Any) -> Any:
    """Plain data (dicts/lists/str/int) for golden files, YAML status and JSON APIs."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        # secrets never leave as data (API, status files, golden files)
        return {f.name: ("<redacted>" if f.name == "password" and getattr(value, f.name)
                         else to_data(getattr(value, f.name)))
                for f in dataclasses.fields(value)
                if not (f.metadata.get("omit_if_none") and getattr(value, f.name) is None)}
    if isinstance(value, LabelSelector):
        return value.to_dict()
    if isinstance(value, enum.Enum):
        return value.name
    if isinstance(value, dict):
        return {str(to_data(k)) if not isinstance(k, str) else k: to_data(v)
                for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_data(v) for v in value]
    if isinstance(value, (IPv4Network, IPv6Network)):
        return str(value)
    return value
