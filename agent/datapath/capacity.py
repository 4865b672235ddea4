"""Datapath capacity from configuration: the Maglev table size per service and the map sizes.

Pure (no kernel). Two decisions live here:

* :func:`choose_maglev_m` — ``M`` of one service. ``vipd run --maglev-table-size`` takes
  Cilium's ``bpf-lb-maglev-table-size`` choices (:data:`MAGLEV_PRIMES`) or ``auto`` (the
  default). An explicit prime fixes ``M`` for every service, as in Cilium. ``auto`` gives each
  service the smallest allowed prime ``>= 100 x`` its backend count (the Maglev paper's rule
  for <= 1 % imbalance, §3.4), at least 251, so 20,000 one-backend services take 20,000 x 251
  slots (20 MiB) instead of 20,000 x 16,381 (1.3 GiB). ``auto:<prime>`` caps the automatic
  choice at ``<prime>``.
* :func:`plan_capacity` — how many entries the sized maps (services, backends,
  memberships, Maglev slots) need for a set of services, with headroom, so that the maps are
  created big enough at load and grown (by a reload that keeps flows: ``Datapath.grow``)
  only rarely.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

from agent.datapath.model import MAGLEV_PRIMES

__all__ = ["MaglevSize", "parse_maglev_table_size", "choose_maglev_m", "Capacity", "plan_capacity",
           "AUTO_MIN_M", "BACKENDS_PER_SLOT_FACTOR", "HEADROOM", "MIN_CAPACITY"]

AUTO_MIN_M = MAGLEV_PRIMES[0]     # 251
BACKENDS_PER_SLOT_FACTOR = 100    # M >= 100 x N: <= 1 % imbalance (Maglev paper §3.4)
HEADROOM = 1.5                    # sizes are 1.5 x what the configuration needs ...
GRANULE = 1024                    # ... rounded up to a multiple of this


@dataclass(frozen=True)
class MaglevSize:
    """The parsed ``--maglev-table-size``: ``fixed`` (all services) or auto with a ``cap``."""

    fixed: int | None = None
    cap: int = MAGLEV_PRIMES[-1]

    def __str__(self) -> str:
        if self.fixed is not None:
            return str(self.fixed)
        return "auto" if self.cap == MAGLEV_PRIMES[-1] else f"auto:{self.cap}"


def parse_maglev_table_size(text: str | int) -> MaglevSize:
    """``"auto"``, ``"auto:<prime>"`` or one of :data:`MAGLEV_PRIMES` (ValueError otherwise)."""
    s = str(text).strip().lower()
    choices = ", ".join(str(p) for p in MAGLEV_PRIMES)
    if s == "auto":
        return MaglevSize()
    if s.startswith("auto:"):
        cap = s[5:]
        if not cap.isdigit() or int(cap) not in MAGLEV_PRIMES:
            raise ValueError(f"maglev table size cap {cap!r} must be one of {choices}")
        return MaglevSize(cap=int(cap))
    if not s.isdigit() or int(s) not in MAGLEV_PRIMES:
        raise ValueError(f"maglev table size {text!r} must be 'auto', 'auto:<M>' or one of {choices} "
                         "(Cilium's bpf-lb-maglev-table-size choices)")
    return MaglevSize(fixed=int(s))


def choose_maglev_m(n_backends: int, size: MaglevSize = MaglevSize()) -> int:
    """M for a service with ``n_backends`` backends (see module doc). Beyond the cap the
    service still gets the cap (the imbalance grows above 1 %, it is not refused)."""
    if size.fixed is not None:
        return size.fixed
    want = max(AUTO_MIN_M, BACKENDS_PER_SLOT_FACTOR * max(n_backends, 1))
    for m in MAGLEV_PRIMES:
        if m > size.cap:
            break
        if m >= want:
            return m
    return size.cap


@dataclass(frozen=True, order=True)
class Capacity:
    """Entries of the sized maps (``Features`` fields of the same names)."""

    max_services: int      # service ids (services map holds 2 x this: frontends + VIP wildcards)
    max_backends: int      # backend ids (backends, revnat)
    max_memberships: int   # {service, backend} pairs (svc_backends)
    maglev_slots: int      # u32 slots of all Maglev tables

    def covers(self, other: "Capacity") -> bool:
        return (self.max_services >= other.max_services and self.max_backends >= other.max_backends
                and self.max_memberships >= other.max_memberships and self.maglev_slots >= other.maglev_slots)

    def union(self, other: "Capacity") -> "Capacity":
        return Capacity(*(max(a, b) for a, b in zip(self.astuple(), other.astuple())))

    def astuple(self) -> tuple[int, int, int, int]:
        return (self.max_services, self.max_backends, self.max_memberships, self.maglev_slots)

    def map_bytes(self) -> int:
        """Approximate kernel memory of the sized maps (prealloc'd hash ~ 96 B per entry)."""
        return (self.max_services * 2 * 96            # services_v2 (hash, preallocated)
                + self.max_services * 16 * 2          # svc_stats_v1 (per-CPU, 2 CPUs typical)
                + self.max_backends * (24 + 80)       # backends_v2 array + revnat_v1 (no prealloc)
                + self.max_memberships * 72           # svc_backends_v1 (no prealloc, when full)
                + self.maglev_slots * 4)              # maglev_v1


# Floors: a small node still has room to add services without a reload.
MIN_CAPACITY = Capacity(max_services=1024, max_backends=1024, max_memberships=4096, maglev_slots=1 << 20)


def _size(need: int, floor: int) -> int:
    want = max(floor, int(need * HEADROOM) + 1)
    return -(-want // GRANULE) * GRANULE


def requirement(services: Iterable) -> Capacity:
    """The exact entries ``services`` (datapath ``Service`` models) occupy, without headroom.
    Ids start at 1, hence the +1; one extra table of the largest M is needed to swap a table
    whose M changes (the old range rests for a while before it is reused)."""
    n = members = slots = biggest = 0
    backends: set = set()
    for s in services:
        n += 1
        members += len(s.backends)
        slots += s.maglev_m
        biggest = max(biggest, s.maglev_m)
        backends.update((b.addr.version, int(b.addr), b.port) for b in s.backends)   # cheap to hash
    return Capacity(n + 1, len(backends) + 1, members, slots + biggest)


def plan_capacity(services: Iterable, current: Capacity | None = None) -> Capacity:
    """Map sizes for ``services``: the current sizes when they suffice (no reload), else
    every size that is too small becomes 1.5 x the need (never smaller than before)."""
    need = requirement(services)
    if current is not None and current.covers(need):
        return current
    base = current or MIN_CAPACITY
    return Capacity(*(cur if cur >= n else _size(n, floor)
                      for cur, n, floor in zip(base.astuple(), need.astuple(), MIN_CAPACITY.astuple())))
