"""Kubernetes core objects, modelled only as far as the control-plane rules read them.

Unknown fields are ignored (``kubectl get -o yaml`` output must load), but the fields we read are
validated: addresses must be addresses, policies must be one of Kubernetes' values.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
from typing import Annotated, Literal

from pydantic import AfterValidator, Field, field_validator, model_validator

from agent.config.cilium import Resource, check_ip
from agent.config.meta import LooseModel

SERVICE_NAME_LABEL = "io.kubernetes.service.name"
SERVICE_NAMESPACE_LABEL = "io.kubernetes.service.namespace"
ENDPOINTSLICE_SERVICE_LABEL = "kubernetes.io/service-name"

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


class CoreResource(Resource):
    model_config = {"extra": "ignore"}
    NAMESPACED = True

    @property
    def namespace(self) -> str:
        return self.metadata.namespace or "default"


# ----------------------------------------------------------------------------------------- Node


class NodeAddress(LooseModel):
    type: str
    address: str

    @field_validator("address")
    @classmethod
    def _ip(cls, v: str, info):
        # the addresses vipd peers and routes from must be addresses (Hostname/DNS types are names)
        if info.data.get("type") in ("InternalIP", "ExternalIP"):
            check_ip(v)
        return v


def _check_cidr(v: str) -> str:
    try:
        ipaddress.ip_network(v, strict=True)
    except ValueError:
        raise ValueError(f"{v[:80]!r} is not a network in CIDR form (host bits must be zero)") \
            from None
    return v


def _check_ip_or_none(v: str) -> str:
    return v if v in ("", "None") else check_ip(v)


# Validated per entry, so the index of a bad one is in the error's field path: podCIDRs[1].
CIDR = Annotated[str, AfterValidator(_check_cidr)]
IP = Annotated[str, AfterValidator(check_ip)]
ClusterIP = Annotated[str, AfterValidator(_check_ip_or_none)]


class NodeSpec(LooseModel):
    pod_cidr: CIDR | None = Field(None, alias="podCIDR")
    pod_cidrs: list[CIDR] | None = Field(None, alias="podCIDRs")


class NodeStatus(LooseModel):
    addresses: list[NodeAddress] = Field(default_factory=list)


class Node(CoreResource):
    KIND = "Node"
    API_VERSIONS = ("v1",)
    NAMESPACED = False
    spec: NodeSpec = Field(default_factory=NodeSpec)
    status: NodeStatus = Field(default_factory=NodeStatus)

    @property
    def namespace(self) -> None:
        return None

    @property
    def pod_cidrs(self) -> list[str]:
        """spec.podCIDRs, else spec.podCIDR (older objects), de-duplicated, in order."""
        out: list[str] = []
        for c in list(self.spec.pod_cidrs or []) + ([self.spec.pod_cidr] if self.spec.pod_cidr
                                                    else []):
            c = str(ipaddress.ip_network(c))
            if c not in out:
                out.append(c)
        return out

    def addresses(self, version: int) -> list[str]:
        """Node addresses of one IP version, InternalIP first (Cilium's node IP choice)."""
        order = {"InternalIP": 0, "ExternalIP": 1}
        found = []
        for a in self.status.addresses:
            try:
                ip = ipaddress.ip_address(a.address)
            except ValueError:
                continue
            if ip.version == version:
                found.append((order.get(a.type, 2), str(ip)))
        return [ip for _, ip in sorted(found, key=lambda t: t[0])]


# -------------------------------------------------------------------------------------- Service


class ServicePort(LooseModel):
    name: str | None = None
    port: int = Field(ge=1, le=65535)
    protocol: Literal["TCP", "UDP", "SCTP"] = "TCP"
    target_port: int | str | None = None
    node_port: Annotated[int, Field(ge=1, le=65535)] | None = None

    @field_validator("target_port")
    @classmethod
    def _target_port(cls, v):
        if isinstance(v, int) and not 1 <= v <= 65535:
            raise ValueError(f"{v} is not a port number (1..65535)")
        if isinstance(v, str) and not v:
            raise ValueError("a port name must not be empty")
        return v


SOURCE_RANGES_ANNOTATION = "service.beta.kubernetes.io/load-balancer-source-ranges"
DEFAULT_AFFINITY_TIMEOUT = 10800   # Kubernetes' default for sessionAffinity ClientIP (3 hours)
MAX_AFFINITY_TIMEOUT = 86400       # Kubernetes' upper bound (MaxClientIPServiceAffinitySeconds)


def parse_source_range(value: str) -> IPNetwork:
    """One loadBalancerSourceRanges entry -> network. Like Kubernetes: surrounding spaces are
    allowed (a leftover of the annotation era) and host bits are masked (``10.0.0.1/8`` ->
    ``10.0.0.0/8``); a plain address without a prefix length is not a range."""
    text = value.strip()
    if "/" not in text:
        try:
            host = ipaddress.ip_address(text)
        except ValueError:
            host = None
        if host is not None:
            raise ValueError(f"{value!r} is an address, not a range: write "
                             f"{host}/{host.max_prefixlen} for this one client")
    try:
        return ipaddress.ip_network(text, strict=False)
    except ValueError:
        raise ValueError(f"{value!r} is not a CIDR (e.g. 203.0.113.0/24 or 2001:db8::/48)") \
            from None


def _check_source_range(value: str) -> str:
    parse_source_range(value)
    return value


# The index of a bad entry ends up in the error's field path: spec.loadBalancerSourceRanges[2].
SourceRange = Annotated[str, AfterValidator(_check_source_range)]


class ClientIPConfig(LooseModel):
    timeout_seconds: int = Field(DEFAULT_AFFINITY_TIMEOUT, ge=1, le=MAX_AFFINITY_TIMEOUT)


class SessionAffinityConfig(LooseModel):
    client_ip: ClientIPConfig | None = Field(None, alias="clientIP")


class ServiceSpec(LooseModel):
    type: Literal["ClusterIP", "NodePort", "LoadBalancer", "ExternalName"] = "ClusterIP"
    cluster_ip: str | None = Field(None, alias="clusterIP")
    cluster_ips: list[ClusterIP] | None = Field(None, alias="clusterIPs")
    external_ips: list[IP] | None = Field(None, alias="externalIPs")
    load_balancer_ip: str | None = Field(None, alias="loadBalancerIP")
    load_balancer_class: str | None = None
    external_traffic_policy: Literal["Cluster", "Local"] = "Cluster"
    internal_traffic_policy: Literal["Cluster", "Local"] = "Cluster"
    ports: list[ServicePort] = Field(default_factory=list)
    selector: dict[str, str] | None = None
    ip_families: list[Literal["IPv4", "IPv6"]] | None = None
    ip_family_policy: Literal["SingleStack", "PreferDualStack", "RequireDualStack"] | None = None
    session_affinity: Literal["None", "ClientIP"] = "None"
    session_affinity_config: SessionAffinityConfig | None = None
    load_balancer_source_ranges: list[SourceRange] | None = None

    @field_validator("cluster_ip", "load_balancer_ip")
    @classmethod
    def _ip(cls, v):
        if v in (None, "", "None"):
            return v
        return check_ip(v)


class LoadBalancerIngress(LooseModel):
    ip: str | None = None
    hostname: str | None = None

    @field_validator("ip")
    @classmethod
    def _ip(cls, v):
        return None if v is None else check_ip(v)


class LoadBalancerStatus(LooseModel):
    ingress: list[LoadBalancerIngress] | None = None


class ServiceStatus(LooseModel):
    load_balancer: LoadBalancerStatus | None = None
    conditions: list[dict] | None = None


class Service(CoreResource):
    KIND = "Service"
    API_VERSIONS = ("v1",)
    spec: ServiceSpec = Field(default_factory=ServiceSpec)
    status: ServiceStatus = Field(default_factory=ServiceStatus)

    @property
    def selector_labels(self) -> dict[str, str]:
        """Labels plus the synthetic name/namespace labels Cilium's selectors can match."""
        return {**self.metadata.labels, SERVICE_NAME_LABEL: self.name,
                SERVICE_NAMESPACE_LABEL: self.namespace}

    @property
    def cluster_ips(self) -> list[str]:
        ips = list(self.spec.cluster_ips or [])
        if self.spec.cluster_ip and self.spec.cluster_ip not in ips:
            ips.insert(0, self.spec.cluster_ip)
        return [ip for ip in ips if ip not in ("", "None")]

    @property
    def ingress_ips(self) -> list[str]:
        lb = self.status.load_balancer
        return [i.ip for i in (lb.ingress or []) if i.ip] if lb else []

    @model_validator(mode="after")
    def _session_affinity_and_source_ranges(self):
        # The API server's rules (ValidateService), so a manifest it would refuse fails here too.
        spec = self.spec
        if spec.session_affinity == "None" and spec.session_affinity_config is not None:
            raise ValueError("spec.sessionAffinityConfig: must not be set when sessionAffinity "
                             "is None (set sessionAffinity: ClientIP to use it)")
        if spec.load_balancer_source_ranges:
            if spec.type != "LoadBalancer":
                raise ValueError("spec.loadBalancerSourceRanges: may only be used when type is "
                                 f"LoadBalancer (this Service is {spec.type})")
        elif SOURCE_RANGES_ANNOTATION in self.metadata.annotations:
            where = f"metadata.annotations[{SOURCE_RANGES_ANNOTATION}]"
            if spec.type != "LoadBalancer":
                raise ValueError(f"{where}: may only be used when type is LoadBalancer "
                                 f"(this Service is {spec.type})")
            for n, entry in enumerate(self._annotation_ranges(), 1):
                try:
                    parse_source_range(entry)
                except ValueError as exc:
                    raise ValueError(f"{where}: entry {n} of the comma-separated list: {exc}") \
                        from None
        return self

    def _annotation_ranges(self) -> list[str]:
        text = self.metadata.annotations.get(SOURCE_RANGES_ANNOTATION, "").strip()
        return [entry.strip() for entry in text.split(",")] if text else []

    @property
    def affinity_timeout(self) -> int:
        """ClientIP session affinity in seconds, 0 when sessionAffinity is None."""
        if self.spec.session_affinity != "ClientIP":
            return 0
        config = self.spec.session_affinity_config
        client_ip = config.client_ip if config is not None else None
        return client_ip.timeout_seconds if client_ip is not None else DEFAULT_AFFINITY_TIMEOUT

    @property
    def source_ranges(self) -> tuple[IPNetwork, ...]:
        """The clients allowed to reach the LoadBalancer frontends; empty = everyone.

        ``spec.loadBalancerSourceRanges`` wins; the legacy annotation is read only when the
        field is empty (Kubernetes' GetLoadBalancerSourceRanges). Only type LoadBalancer has
        them (validation refuses them elsewhere). Sorted, duplicates removed."""
        if self.spec.type != "LoadBalancer":
            return ()
        entries = self.spec.load_balancer_source_ranges or self._annotation_ranges()
        nets = {parse_source_range(e) for e in entries}
        return tuple(sorted(nets, key=lambda n: (n.version, n)))


# -------------------------------------------------------------------------------- EndpointSlice


class EndpointConditions(LooseModel):
    ready: bool | None = None
    serving: bool | None = None
    terminating: bool | None = None


class Endpoint(LooseModel):
    addresses: list[IP] = Field(min_length=1)
    conditions: EndpointConditions = Field(default_factory=EndpointConditions)
    node_name: str | None = None

    @property
    def is_active(self) -> bool:
        """Cilium counts only Active backends: ready (nil means ready, per the k8s API) and not
        terminating."""
        c = self.conditions
        return c.ready is not False and c.terminating is not True


class EndpointPort(LooseModel):
    name: str | None = None
    port: Annotated[int, Field(ge=1, le=65535)] | None = None
    protocol: Literal["TCP", "UDP", "SCTP"] | None = "TCP"


class EndpointSlice(CoreResource):
    KIND = "EndpointSlice"
    API_VERSIONS = ("discovery.k8s.io/v1",)
    address_type: Literal["IPv4", "IPv6", "FQDN"] = "IPv4"
    endpoints: list[Endpoint] | None = None
    ports: list[EndpointPort] | None = None

    @property
    def service_name(self) -> str | None:
        return self.metadata.labels.get(ENDPOINTSLICE_SERVICE_LABEL)


# --------------------------------------------------------------------------------------- Secret


class Secret(CoreResource):
    KIND = "Secret"
    API_VERSIONS = ("v1",)
    data: dict[str, str] | None = None
    string_data: dict[str, str] | None = None
    type: str | None = None

    @field_validator("data")
    @classmethod
    def _b64(cls, v):
        for k, val in (v or {}).items():
            try:
                base64.b64decode(val, validate=True)
            except (binascii.Error, ValueError):
                raise ValueError(f"data.{k} is not base64 (use stringData for plain text)") \
                    from None
        return v

    def value(self, key: str) -> str | None:
        if self.string_data and key in self.string_data:
            return self.string_data[key]
        if self.data and key in self.data:
            return base64.b64decode(self.data[key]).decode()
        return None


class ConfigMap(CoreResource):
    KIND = "ConfigMap"
    API_VERSIONS = ("v1",)
    data: dict[str, str] | None = None


CORE_KINDS = (Node, Service, EndpointSlice, Secret, ConfigMap)
