"""Cilium BGP Control Plane and LB-IPAM resources (cilium.io/v2 and v2alpha1).

Field names, defaults and bounds follow Cilium's Go types and generated CRDs (see
../shared/reference/cilium-bgp.md §1, §7). Both API versions of a kind load into one model; the
few version differences are checked in ``_check_version`` validators. Unknown fields are rejected
(the API server's strict field validation does the same), so a typo is reported, not ignored.
"""

from __future__ import annotations

import functools
import ipaddress
import re
from typing import Annotated, Any, ClassVar, Literal

from pydantic import Field, field_validator, model_validator

from agent.bgp.communities import WELL_KNOWN_COMMUNITIES
from agent.config.meta import Condition, LabelSelector, LooseModel, Model, ObjectMeta

U32 = Annotated[int, Field(ge=0, le=4294967295)]
ASN = Annotated[int, Field(ge=1, le=4294967295)]
Port = Annotated[int, Field(ge=1, le=65535)]
Name255 = Annotated[str, Field(min_length=1, max_length=255)]

BGP_LOAD_BALANCER_CLASS = "io.cilium/bgp-control-plane"
L2_LOAD_BALANCER_CLASS = "io.cilium/l2-announcer"

AFI = Literal["ipv4", "ipv6", "l2vpn", "ls", "opaque"]
SAFI = Literal["unicast", "multicast", "mpls_label", "encapsulation", "vpls", "evpn", "ls",
               "sr_policy", "mup", "mpls_vpn", "mpls_vpn_multicast", "route_target_constraints",
               "flowspec_unicast", "flowspec_vpn", "key_value"]

# Cilium validates wellKnown against GoBGP's names: the one table is agent/bgp/communities.py.
WellKnown = Literal[tuple(WELL_KNOWN_COMMUNITIES)]  # type: ignore[valid-type]


# Cached: endpoint, node and peer addresses repeat across thousands of objects (exceptions are
# not cached, so a bad address is reported every time).
@functools.lru_cache(maxsize=65536)
def check_ip(value: str, *, allow_zone: bool = False) -> str:
    addr = value
    if allow_zone and "%" in value:
        addr, _, zone = value.partition("%")
        if not zone:
            raise ValueError("empty zone after '%'")
    try:
        ipaddress.ip_address(addr)
    except ValueError:
        raise ValueError(f"{value!r} is not an IPv4 or IPv6 address") from None
    return value


def check_router_id(value: str | None) -> str | None:
    if value is not None:
        try:
            ipaddress.IPv4Address(value)
        except ValueError:
            raise ValueError(f"{value[:80]!r} is not an IPv4 address (routerID is a dotted "
                             "quad)") from None
    return value


def parse_standard_community(value: str) -> int:
    """'65000:99' or a decimal 0..4294967295 -> 32-bit value (Cilium's CRD regex)."""
    if re.fullmatch(r"\d+", value):
        n = int(value)
        if n > 4294967295:
            raise ValueError(f"{value!r}: decimal community must be 0..4294967295")
        return n
    m = re.fullmatch(r"(\d+):(\d+)", value)
    if not m or int(m[1]) > 65535 or int(m[2]) > 65535:
        raise ValueError(
            f"{value!r}: a standard community is a decimal 0..4294967295 or "
            "<0-65535>:<0-65535>")
    return int(m[1]) << 16 | int(m[2])


def parse_large_community(value: str) -> tuple[int, int, int]:
    m = re.fullmatch(r"(\d+):(\d+):(\d+)", value)
    if not m or any(int(x) > 4294967295 for x in m.groups()):
        raise ValueError(f"{value!r}: a large community is <0-4294967295>:<0-4294967295>:"
                         "<0-4294967295>")
    return int(m[1]), int(m[2]), int(m[3])


class Resource(Model):
    """A top-level object: apiVersion, kind, metadata, spec (+ status where Cilium has one)."""

    KIND: ClassVar[str] = ""
    API_VERSIONS: ClassVar[tuple[str, ...]] = ()
    NAMESPACED: ClassVar[bool] = False

    api_version: str
    kind: str
    metadata: ObjectMeta

    @property
    def name(self) -> str:
        return self.metadata.name

    @property
    def namespace(self) -> str | None:
        return self.metadata.namespace if self.NAMESPACED else None

    @property
    def labels(self) -> dict[str, str]:
        return self.metadata.labels

    @functools.cached_property
    def key(self) -> str:
        # cached: models are frozen and the only copies made (LB-IPAM's effective Services)
        # change status, never metadata; a reload of 40,000 objects asks for keys 160,000 times
        ns = self.namespace
        return f"{self.KIND}/{ns}/{self.name}" if ns else f"{self.KIND}/{self.name}"

    @property
    def is_v2alpha1(self) -> bool:
        return self.api_version.endswith("/v2alpha1")


# --------------------------------------------------------------------- CiliumBGPClusterConfig


class PeerConfigReference(Model):
    name: str = Field(min_length=1)
    # v2alpha1 only (defaulted there to cilium.io / CiliumBGPPeerConfig)
    group: str | None = None
    kind: str | None = None


class DefaultGatewayDiscovery(Model):
    address_family: Literal["ipv4", "ipv6"]


class UnnumberedDiscovery(Model):
    interface: Name255


class AutoDiscovery(Model):
    mode: Literal["DefaultGateway", "Unnumbered"]
    default_gateway: DefaultGatewayDiscovery | None = None
    unnumbered: UnnumberedDiscovery | None = None

    @model_validator(mode="after")
    def _mode_block(self):
        if self.mode == "DefaultGateway" and self.default_gateway is None:
            raise ValueError("mode DefaultGateway requires the defaultGateway block")
        if self.mode == "Unnumbered" and self.unnumbered is None:
            raise ValueError("mode Unnumbered requires the unnumbered block")
        return self


class ClusterPeer(Model):
    name: Name255
    peer_address: str | None = None
    peer_asn: U32 = Field(0, alias="peerASN")
    auto_discovery: AutoDiscovery | None = None
    peer_config_ref: PeerConfigReference | None = None

    @field_validator("peer_address")
    @classmethod
    def _addr(cls, v):
        return None if v is None else check_ip(v, allow_zone=True)


def _unique_names(items, what: str):
    seen = set()
    for item in items or []:
        if item.name in seen:
            raise ValueError(f"duplicate {what} name {item.name!r}; names must be unique")
        seen.add(item.name)
    return items


class ClusterInstance(Model):
    name: Name255
    local_asn: ASN | None = Field(None, alias="localASN")
    local_port: Port | None = None
    peers: list[ClusterPeer] = Field(default_factory=list)

    @field_validator("peers")
    @classmethod
    def _peers(cls, v):
        return _unique_names(v, "peer")


class ClusterConfigSpec(Model):
    node_selector: LabelSelector | None = None
    bgp_instances: list[ClusterInstance] = Field(min_length=1, max_length=16)

    @field_validator("bgp_instances")
    @classmethod
    def _instances(cls, v):
        return _unique_names(v, "bgpInstances")


class StatusWithConditions(LooseModel):
    conditions: list[Condition] | None = None


def _v2alpha1_peer_asn(peers, path: str):
    for i, p in enumerate(peers):
        if "peer_asn" in p.model_fields_set and p.peer_asn == 0:
            raise ValueError(f"{path}[{i}].peerASN: must be 1..4294967295 in cilium.io/v2alpha1 "
                             "(0 = learn from OPEN is a cilium.io/v2 feature)")


class CiliumBGPClusterConfig(Resource):
    KIND = "CiliumBGPClusterConfig"
    API_VERSIONS = ("cilium.io/v2", "cilium.io/v2alpha1")
    spec: ClusterConfigSpec
    status: StatusWithConditions | None = None

    @model_validator(mode="after")
    def _check_version(self):
        if self.is_v2alpha1:
            for i, inst in enumerate(self.spec.bgp_instances):
                if inst.local_port is not None:
                    raise ValueError(f"spec.bgpInstances[{i}].localPort: not in cilium.io/v2alpha1 "
                                     "(use cilium.io/v2)")
                _v2alpha1_peer_asn(inst.peers, f"spec.bgpInstances[{i}].peers")
        return self


# --------------------------------------------------------------------- CiliumBGPPeerConfig


class Transport(Model):
    peer_port: Port = 179
    local_port: Port | None = None        # v2alpha1 only, deprecated, no effect
    source_interface: str | None = None   # newest Cilium


class Timers(Model):
    connect_retry_time_seconds: Annotated[int, Field(ge=1, le=2147483647)] = 120
    hold_time_seconds: Annotated[int, Field(ge=3, le=65535)] = 90
    keep_alive_time_seconds: Annotated[int, Field(ge=1, le=65535)] = 30

    @model_validator(mode="after")
    def _keepalive(self):
        if self.keep_alive_time_seconds > self.hold_time_seconds:
            raise ValueError("keepAliveTimeSeconds can not be larger than holdTimeSeconds "
                             f"({self.keep_alive_time_seconds} > {self.hold_time_seconds})")
        return self


class GracefulRestart(Model):
    enabled: bool
    restart_time_seconds: Annotated[int, Field(ge=1, le=4095)] = 120


class PeerFamily(Model):
    afi: AFI
    safi: SAFI
    advertisements: LabelSelector | None = None


class PeerConfigSpec(Model):
    transport: Transport | None = None
    timers: Timers | None = None
    auth_secret_ref: str | None = None
    graceful_restart: GracefulRestart | None = None
    ebgp_multihop: Annotated[int, Field(ge=1, le=255)] = 1
    families: list[PeerFamily] | None = None


DEFAULT_V2_FAMILIES = (("ipv6", "unicast"), ("ipv4", "unicast"))


class CiliumBGPPeerConfig(Resource):
    KIND = "CiliumBGPPeerConfig"
    API_VERSIONS = ("cilium.io/v2", "cilium.io/v2alpha1")
    spec: PeerConfigSpec = Field(default_factory=PeerConfigSpec)
    status: StatusWithConditions | None = None

    @model_validator(mode="after")
    def _check_version(self):
        t = self.spec.transport
        if not self.is_v2alpha1 and t is not None and t.local_port is not None:
            raise ValueError("spec.transport.localPort: removed in cilium.io/v2 (it never had "
                             "an effect); delete it")
        return self


# --------------------------------------------------------------------- CiliumBGPAdvertisement


class Communities(Model):
    standard: list[str] | None = None
    well_known: list[WellKnown] | None = None
    large: list[str] | None = None

    @field_validator("standard")
    @classmethod
    def _standard(cls, v):
        for c in v or []:
            parse_standard_community(c)
        return v

    @field_validator("large")
    @classmethod
    def _large(cls, v):
        for c in v or []:
            parse_large_community(c)
        return v


class BGPAttributes(Model):
    communities: Communities | None = None
    # int64 without bounds in the CRD; LOCAL_PREF is 32 bits on the wire
    local_preference: U32 | None = None


ServiceAddressType = Literal["LoadBalancerIP", "ClusterIP", "ExternalIP"]


class ServiceAdvertisement(Model):
    addresses: list[ServiceAddressType] = Field(min_length=1)
    aggregation_length_ipv4: Annotated[int, Field(ge=0, le=31)] | None = Field(
        None, alias="aggregationLengthIPv4")
    aggregation_length_ipv6: Annotated[int, Field(ge=0, le=127)] | None = Field(
        None, alias="aggregationLengthIPv6")


class InterfaceAdvertisement(Model):
    name: str = Field(min_length=1)


class Advertisement(Model):
    advertisement_type: Literal["PodCIDR", "CiliumPodIPPool", "Service", "Interface"]
    selector: LabelSelector | None = None
    service: ServiceAdvertisement | None = None
    interface: InterfaceAdvertisement | None = None
    attributes: BGPAttributes | None = None

    @model_validator(mode="after")
    def _blocks(self):
        t = self.advertisement_type
        if (t == "Service") != (self.service is not None):
            raise ValueError('service: required with advertisementType "Service" and '
                             "not allowed with any other type")
        if (t == "Interface") != (self.interface is not None):
            raise ValueError('interface: required with advertisementType "Interface" and '
                             "not allowed with any other type")
        return self


class AdvertisementSpec(Model):
    advertisements: list[Advertisement]


class CiliumBGPAdvertisement(Resource):
    KIND = "CiliumBGPAdvertisement"
    API_VERSIONS = ("cilium.io/v2", "cilium.io/v2alpha1")
    spec: AdvertisementSpec


# --------------------------------------------------------------------- CiliumBGPNodeConfigOverride


class OverridePeer(Model):
    name: Name255
    local_address: str | None = None
    local_port: Port | None = None   # deprecated; no effect (as in Cilium)

    @field_validator("local_address")
    @classmethod
    def _addr(cls, v):
        return None if v is None else check_ip(v)


class OverrideInstance(Model):
    name: Name255
    router_id: str | None = Field(None, alias="routerID")
    # int32 without bounds in the CRD; it becomes the listen port, so only a port is accepted
    local_port: Port | None = None
    local_asn: ASN | None = Field(None, alias="localASN")
    peers: list[OverridePeer] | None = None

    @field_validator("router_id")
    @classmethod
    def _rid(cls, v):
        return check_router_id(v)


class NodeConfigOverrideSpec(Model):
    bgp_instances: list[OverrideInstance] = Field(min_length=1)


class CiliumBGPNodeConfigOverride(Resource):
    KIND = "CiliumBGPNodeConfigOverride"
    API_VERSIONS = ("cilium.io/v2", "cilium.io/v2alpha1")
    spec: NodeConfigOverrideSpec


# --------------------------------------------------------------------- CiliumBGPNodeConfig


class NodePeer(Model):
    name: Name255
    peer_address: str | None = None
    peer_asn: U32 = Field(0, alias="peerASN")
    auto_discovery: AutoDiscovery | None = None
    local_address: str | None = None
    peer_interface: Name255 | None = None
    peer_config_ref: PeerConfigReference | None = None

    @field_validator("peer_address")
    @classmethod
    def _addr(cls, v):
        return None if v is None else check_ip(v, allow_zone=True)

    @field_validator("local_address")
    @classmethod
    def _laddr(cls, v):
        return None if v is None else check_ip(v)

    @model_validator(mode="after")
    def _rules(self):
        if self.peer_address is None and self.auto_discovery is None:
            raise ValueError("either peerAddress or autoDiscovery is required")
        if self.peer_interface is not None:
            if self.peer_address is not None and not self.peer_address.lower().startswith("fe80:"):
                raise ValueError("peerInterface requires peerAddress to be absent or fe80:…")
            if self.local_address is not None:
                raise ValueError("peerInterface and localAddress are mutually exclusive")
        return self


class NodeInstance(Model):
    name: Name255
    local_asn: ASN | None = Field(None, alias="localASN")
    router_id: str | None = Field(None, alias="routerID")
    local_port: Port | None = None
    peers: list[NodePeer] = Field(default_factory=list)

    @field_validator("router_id")
    @classmethod
    def _rid(cls, v):
        return check_router_id(v)


class NodeConfigSpec(Model):
    bgp_instances: list[NodeInstance] = Field(min_length=1, max_length=16)


class CiliumBGPNodeConfig(Resource):
    KIND = "CiliumBGPNodeConfig"
    API_VERSIONS = ("cilium.io/v2", "cilium.io/v2alpha1")
    spec: NodeConfigSpec
    status: dict[str, Any] | None = None   # agent-written; accepted as-is


# --------------------------------------------------------------------- CiliumBGPPeeringPolicy (v1)


class PolicyFamily(Model):
    afi: AFI
    safi: SAFI


class PolicyGracefulRestart(Model):
    enabled: bool
    restart_time_seconds: Annotated[int, Field(ge=1, le=4095)] | None = None


class PathAttributeSelector(Model):
    selector_type: Literal["PodCIDR", "CiliumLoadBalancerIPPool", "CiliumPodIPPool"]
    selector: LabelSelector | None = None
    communities: Communities | None = None
    local_preference: U32 | None = None


class PolicyNeighbor(Model):
    # CRD format is "cidr" (Cilium docs ask for /32 or /128); Cilium uses only the address part,
    # which is why seed 002's "10.0.5.1/24" works there. A bare address is accepted too.
    peer_address: str
    peer_port: Port = 179
    peer_asn: U32 = Field(alias="peerASN")
    auth_secret_ref: str | None = None
    e_bgp_multihop_ttl: Annotated[int, Field(ge=1, le=255)] = Field(1, alias="eBGPMultihopTTL")
    connect_retry_time_seconds: Annotated[int, Field(ge=1, le=2147483647)] = 120
    hold_time_seconds: Annotated[int, Field(ge=3, le=65535)] = 90
    keep_alive_time_seconds: Annotated[int, Field(ge=1, le=65535)] = 30
    graceful_restart: PolicyGracefulRestart | None = None
    families: list[PolicyFamily] | None = None
    advertised_path_attributes: list[PathAttributeSelector] | None = None

    @field_validator("peer_address")
    @classmethod
    def _addr(cls, v: str):
        try:
            ipaddress.ip_interface(v)
        except ValueError:
            raise ValueError(f"{v!r} is not an address in CIDR form (e.g. 10.0.0.1/32)") from None
        return v

    @property
    def address(self) -> str:
        return str(ipaddress.ip_interface(self.peer_address).ip)

    @model_validator(mode="after")
    def _keepalive(self):
        if self.keep_alive_time_seconds > self.hold_time_seconds:
            raise ValueError("keepAliveTimeSeconds can not be larger than holdTimeSeconds "
                             f"({self.keep_alive_time_seconds} > {self.hold_time_seconds})")
        return self


class VirtualRouter(Model):
    local_asn: U32 = Field(alias="localASN")
    export_pod_cidr: bool = Field(False, alias="exportPodCIDR")
    pod_ip_pool_selector: LabelSelector | None = Field(None, alias="podIPPoolSelector")
    service_selector: LabelSelector | None = None
    service_advertisements: list[ServiceAddressType] = Field(
        default_factory=lambda: ["LoadBalancerIP"])
    neighbors: list[PolicyNeighbor] = Field(min_length=1)


class PeeringPolicySpec(Model):
    node_selector: LabelSelector | None = None
    virtual_routers: list[VirtualRouter] = Field(min_length=1)

    @field_validator("virtual_routers")
    @classmethod
    def _unique_asn(cls, v):
        seen = set()
        for vr in v:
            if vr.local_asn in seen:
                raise ValueError(f"two virtualRouters with localASN {vr.local_asn}; the ASN "
                                 "identifies the router and must be unique")
            seen.add(vr.local_asn)
        return v


class CiliumBGPPeeringPolicy(Resource):
    KIND = "CiliumBGPPeeringPolicy"
    API_VERSIONS = ("cilium.io/v2alpha1",)
    spec: PeeringPolicySpec


# --------------------------------------------------------------------- CiliumLoadBalancerIPPool


class IPBlock(Model):
    cidr: str | None = None
    start: str | None = None
    stop: str | None = None

    @field_validator("cidr")
    @classmethod
    def _cidr(cls, v):
        if v is not None:
            try:
                ipaddress.ip_network(v, strict=False)
            except ValueError:
                raise ValueError(f"{v[:80]!r} is not in CIDR format") from None
        return v

    @field_validator("start", "stop")
    @classmethod
    def _addr(cls, v):
        return None if v is None else check_ip(v)

    @model_validator(mode="after")
    def _shape(self):
        if self.cidr is not None:
            if self.start is not None or self.stop is not None:
                raise ValueError("a block is either cidr or start/stop, not both")
        else:
            if self.start is None:
                raise ValueError("a block needs cidr or start (stop optional)")
            start = ipaddress.ip_address(self.start)
            if self.stop is not None:
                stop = ipaddress.ip_address(self.stop)
                if stop.version != start.version or stop < start:
                    raise ValueError(f"stop {self.stop} must be >= start {self.start} "
                                     "in the same family")
        return self


class LbPoolSpec(Model):
    blocks: list[IPBlock] | None = None
    cidrs: list[IPBlock] | None = None   # deprecated alias of blocks (v2alpha1)
    service_selector: LabelSelector | None = None
    allow_first_last_ips: Literal["Yes", "No"] | None = Field(None, alias="allowFirstLastIPs")
    disabled: bool = False

    @property
    def all_blocks(self) -> list[IPBlock]:
        return list(self.blocks or []) + list(self.cidrs or [])


class CiliumLoadBalancerIPPool(Resource):
    KIND = "CiliumLoadBalancerIPPool"
    API_VERSIONS = ("cilium.io/v2", "cilium.io/v2alpha1")
    spec: LbPoolSpec
    status: StatusWithConditions | None = None


CILIUM_KINDS = (
    CiliumBGPClusterConfig, CiliumBGPPeerConfig, CiliumBGPAdvertisement,
    CiliumBGPNodeConfigOverride, CiliumBGPNodeConfig, CiliumBGPPeeringPolicy,
    CiliumLoadBalancerIPPool,
)
