"""The datapath's input model: services, their frontends and backends, as plain frozen dataclasses.

Pure data, no kernel: the daemon's LB reconciler builds these from Kubernetes Services and
EndpointSlices, and :class:`agent.datapath.api.Datapath` turns them into BPF map entries.
Validation happens here (ports, protocols, Maglev size, address families) so that a bad
object is rejected with a readable message before anything touches a map.
"""

from __future__ import annotations

import enum
import ipaddress
from dataclasses import dataclass, field

from agent.addresses import ip_address

__all__ = [
    "Proto", "Mode", "ServiceKey", "Backend", "Service", "MAGLEV_PRIMES", "DEFAULT_MAGLEV_M",
    "IPAddress", "IPNetwork", "backend_name", "trusted",
]

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

# Cilium's allowed Maglev table sizes (pkg/maglev): primes, so every skip is coprime with M.
MAGLEV_PRIMES = (251, 509, 1021, 2039, 4093, 8191, 16381, 32749, 65521, 131071)
DEFAULT_MAGLEV_M = 16381


class Proto(enum.IntEnum):
    """L4 protocol of a frontend (IANA protocol numbers, as in the IP header)."""

    TCP = 6
    UDP = 17


class Mode(enum.Enum):
    """How a flow reaches a backend on another node (local backends are always plain DNAT)."""

    SNAT = "snat"  # DNAT + SNAT to the node address; replies come back through this node
    DSR = "dsr"    # DNAT + VIP:port carried in an IP option; the backend replies directly


def _addr(value) -> IPAddress:
    return value if isinstance(value, (ipaddress.IPv4Address, ipaddress.IPv6Address)) \
        else ip_address(value)   # parsed once per process


def _check_port(port: int, what: str, *args) -> None:
    """``what.format(*args)`` names the port in the error (formatted only then: formatting an
    address costs more than the check, and 20,000 Services make 40,000+ of these)."""
    if not isinstance(port, int) or not 1 <= port <= 65535:
        raise ValueError(f"{what.format(*args)} must be an integer 1..65535, got {port!r}")


# slots: one ServiceKey, Service and Backend per frontend (20,000+ of each), no __dict__
@dataclass(frozen=True, order=True, slots=True)
class ServiceKey:
    """A frontend: the (VIP, port, protocol) the datapath matches on."""

    vip: IPAddress
    port: int
    proto: Proto = Proto.TCP
    _hash: int = field(default=0, init=False, repr=False, compare=False)

    def __post_init__(self):
        object.__setattr__(self, "vip", _addr(self.vip))
        object.__setattr__(self, "proto", Proto(self.proto))
        _check_port(self.port, "service {} port", self.vip)
        # keys of dicts with 20,000+ entries, hashed several times a pass: hash once
        object.__setattr__(self, "_hash", hash((self.vip, self.port, self.proto)))

    def __hash__(self) -> int:
        return self._hash

    @property
    def family(self) -> int:
        return self.vip.version

    def __str__(self) -> str:
        host = f"[{self.vip}]" if self.vip.version == 6 else str(self.vip)
        return f"{host}:{self.port}/{self.proto.name}"


@dataclass(frozen=True, order=True, slots=True)
class Backend:
    """One endpoint of a service.

    ``local``: the backend runs on this node (delivered through the local stack by DNAT).
    ``terminating``: keeps its established flows, gets no new ones (graceful termination).
    ``weight``: relative share of the Maglev table (0 = no new flows, like terminating).
    ``id``: optional explicit backend id (1..MAX_BACKENDS-1; 0 is reserved for "no backend").
    When None the datapath allocates a stable id per (addr, port).
    """

    addr: IPAddress
    port: int
    weight: int = 1
    local: bool = False
    terminating: bool = False
    id: int | None = field(default=None, compare=False)

    def __post_init__(self):
        object.__setattr__(self, "addr", _addr(self.addr))
        _check_port(self.port, "backend {} port", self.addr)
        if not isinstance(self.weight, int) or self.weight < 0:
            raise ValueError(f"backend {self.addr}:{self.port} weight must be >= 0, got {self.weight!r}")
        if self.id is not None and (not isinstance(self.id, int) or self.id <= 0):
            raise ValueError(f"backend id must be a positive integer (0 means 'no backend'), got {self.id!r}")

    @property
    def name(self) -> str:
        return backend_name(self.addr, self.port)


def backend_name(addr: IPAddress, port: int) -> str:
    """The stable Maglev name of a backend: ``10.0.0.1:80`` / ``[fd00::1]:80``.

    Every node must derive the same name for the same backend, so this never changes.
    """
    addr = _addr(addr)
    return f"[{addr}]:{port}" if addr.version == 6 else f"{addr}:{port}"


@dataclass(frozen=True, slots=True)
class Service:
    """A frontend with its backends and per-service datapath flags.

    ``traffic_policy_local``: externalTrafficPolicy=Local — only ``local`` backends get traffic;
    with none, packets are dropped with reason NO_LOCAL_BACKEND.
    ``mode``: forwarding mode for remote backends (SNAT or DSR).
    ``affinity_timeout``: ClientIP session affinity in seconds (0 = off).
    ``source_ranges``: loadBalancerSourceRanges allow list (empty = allow all).
    ``stateless``: no conntrack entry for new flows; every packet is placed by Maglev alone.
    ``maglev_m``: Maglev table size, one of :data:`MAGLEV_PRIMES`.
    """

    key: ServiceKey
    backends: tuple[Backend, ...] = ()
    traffic_policy_local: bool = False
    mode: Mode = Mode.SNAT
    affinity_timeout: int = 0
    source_ranges: tuple[IPNetwork, ...] = ()
    stateless: bool = False
    maglev_m: int = DEFAULT_MAGLEV_M

    def __post_init__(self):
        object.__setattr__(self, "backends", tuple(self.backends))
        object.__setattr__(self, "mode", Mode(self.mode))
        ranges = tuple(r if isinstance(r, (ipaddress.IPv4Network, ipaddress.IPv6Network))
                       else ipaddress.ip_network(r, strict=True) for r in self.source_ranges)
        object.__setattr__(self, "source_ranges", ranges)
        if self.maglev_m not in MAGLEV_PRIMES:
            raise ValueError(f"service {self.key}: maglev_m must be one of {MAGLEV_PRIMES}, got {self.maglev_m}")
        if not isinstance(self.affinity_timeout, int) or not 0 <= self.affinity_timeout < 2**32:
            raise ValueError(f"service {self.key}: affinity_timeout must be seconds >= 0")
        fam = self.key.family
        seen = set()
        for b in self.backends:
            if b.addr.version != fam:
                raise ValueError(f"service {self.key}: backend {b.name} is IPv{b.addr.version}, "
                                 f"the frontend is IPv{fam} (no NAT46/64)")
            if (b.addr, b.port) in seen:
                raise ValueError(f"service {self.key}: backend {b.name} listed twice")
            seen.add((b.addr, b.port))
        for r in ranges:
            if r.version != fam:
                raise ValueError(f"service {self.key}: source range {r} is not IPv{fam}")

    def selectable_backends(self) -> tuple[Backend, ...]:
        """Backends that may receive *new* flows (what the Maglev table is built from)."""
        return tuple(b for b in self.backends
                     if not b.terminating and b.weight > 0
                     and (b.local or not self.traffic_policy_local))


_new, _set = object.__new__, object.__setattr__


def trusted(cls, *values):
    """A ``Backend`` or ``Service`` from its field values in declaration order, without the
    checks and conversions of ``__post_init__``: for values this agent made and checked before
    (read back from its own maps, its own start-up memo), already in their final types. At
    20,000 frontends the checks cost ~0.1 s per rebuild."""
    obj = _new(cls)
    for name, value in zip(cls.__slots__, values):
        _set(obj, name, value)
    return obj
