"""The datapath's public API: compile and load the BPF programs, attach them, program services.

One :class:`Datapath` per node (``instance`` names its pin directory). It owns the BPF maps
under ``<pin_root>/<instance>`` and is the only writer of them.

Life cycle::

    dp = Datapath("node-a")            # nothing touches the kernel yet
    dp.load()                          # compile (bcc), create or ADOPT the pinned maps
    dp.set_node_addresses(v4="10.0.0.1")
    dp.attach_xdp("eth0"); dp.attach_tc("eth0", "egress"); dp.attach_tc("eth0", "ingress")
    dp.upsert_service(Service(...))    # writes only what changed
    dp.close()                         # programs stay attached, maps stay pinned

A new process doing the same ``load()`` finds the pinned maps, reads back what they program
(services, backends, Maglev slots, source ranges) and from then on writes only differences,
so an agent restart neither loses conntrack nor rewrites unchanged tables. Re-attaching
replaces the programs atomically (same maps, new program).

See docs/datapath.md for the maps, flags, drop reasons and policies.
"""

from __future__ import annotations

import ctypes
import errno
from array import array
import ipaddress
import os
import shutil
import struct as _struct
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

from agent.datapath import abi, bpfsys
from agent.datapath.abi import BackendFlag, CtDir, CtFlag, DropReason, Hook, MapName, Stat, SvcFlag
from agent.datapath.changes import MapChanges, Phase
from agent.datapath.child import SIZE_DEFINES, Loaded, PendingLoad, start_loading
from agent.datapath.loader import ensure_bpffs
from agent.datapath.model import (
    Backend, IPAddress, Mode, Proto, Service, ServiceKey, trusted,
)
from agent.datapath.netns import in_netns
from agent.datapath.objcache import FROM_ENV, ProgramCache
from agent.datapath.planner import (
    CapacityError, DatapathError, Layouts, Limits, Planner, Programmed, ServiceChange, TableBuilder,
    htons as _htons, words as _words,
)
from agent.log import get_logger

__all__ = ["Datapath", "Features", "Counters", "CtEntry", "NeighEntry", "ServiceChange", "DatapathError",
           "CapacityError", "SIZED_MAPS"]

log = get_logger("datapath")

EARLY_SLOTS = 1 << 20   # Maglev slots a batch holds before writing them (4 MiB each of keys, values)


# Maps whose size comes from the configuration (Capacity); pinned under SIZED_PIN_DIR and
# replaced by bigger copies on growth. Conntrack, affinity, source ranges and counters keep
# their pins across a growth.
SIZED_MAPS = (MapName.SERVICES, MapName.BACKENDS, MapName.SVC_BACKENDS, MapName.REVNAT,
              MapName.MAGLEV, MapName.SVC_STATS)
GROW_DIR = "grow-staging"   # bpffs reserves names with a dot


@dataclass(frozen=True)
class Features:
    """Compile-time settings (become -D flags). The four capacity fields (max_services,
    max_backends, max_memberships, maglev_slots) are only the initial sizes: ``load`` adopts
    the sizes of existing pins and ``grow`` enlarges them; changing any other field needs a
    fresh pin directory."""

    max_services: int = 65536
    max_backends: int = 65536
    max_memberships: int = 262144     # {service, backend} pairs (sum of backends over services)
    maglev_slots: int = 1 << 22       # u32 slots shared by all services' Maglev tables (16 MiB)
    ct_size: int = 1 << 18
    snat_slots: int = 1 << 18         # SNAT node-port slots (power of 2): live SNAT flows well below this
    dsr_flow_slots: int = 0           # DSR flow table slots (power of 2); 0: from ct_size (dsr_slots)
    affinity_size: int = 65536
    src_range_size: int = 16384
    hash_seed: int = 0x4A4C6676       # flow hash seed: equal on every node
    snat_port_min: int = 61000
    snat_port_max: int = 65535
    ct_close_timeout: int = 10        # s: a SNAT port whose TCP flow saw FIN/RST is reusable after this
    ct_tcp_idle_timeout: int = 21600  # s: ... or after this long without a reply
    ct_udp_idle_timeout: int = 60
    ct_syn_timeout: int = 60          # s: a SNAT port that never saw a reply is reusable after this
    # Flows of a local backend's designated service get no REPLY conntrack entry; tc derives
    # their reply rewrite instead (one LRU insert less per new flow, ~60 ns of XDP time here;
    # costs tc egress ~+70 ns per such reply and ~+20 ns per egress packet without a REPLY
    # entry). False: a REPLY entry for every local flow, as before (docs/datapath.md).
    derive_local_replies: bool = True

    def defines(self, pin_dir: Path, sized_pin_dir: Path | None = None) -> dict[str, object]:
        return {
            "PIN_DIR": str(pin_dir), "SIZED_PIN_DIR": str(sized_pin_dir or pin_dir),
            "MAX_SERVICES": self.max_services,
            "MAX_BACKENDS": self.max_backends, "MAX_MEMBERS": self.max_memberships,
            "MAGLEV_SLOTS": self.maglev_slots,
            "CT_SIZE": self.ct_size, "DSR_FLOW_SLOTS": self.dsr_slots, "SNAT_SLOTS": self.snat_slots, "AFFINITY_SIZE": self.affinity_size,
            "SRC_RANGE_SIZE": self.src_range_size, "HASH_SEED": self.hash_seed,
            "SNAT_PORT_MIN": self.snat_port_min, "SNAT_PORT_MAX": self.snat_port_max,
            "CT_CLOSE_TIMEOUT_S": self.ct_close_timeout, "CT_TCP_IDLE_TIMEOUT_S": self.ct_tcp_idle_timeout,
            "CT_UDP_IDLE_TIMEOUT_S": self.ct_udp_idle_timeout, "CT_SYN_TIMEOUT_S": self.ct_syn_timeout,
            "DERIVE_LOCAL_REPLIES": int(self.derive_local_replies),
        }

    @property
    def dsr_slots(self) -> int:
        """Slots of the DSR flow table (dsr_flows_v1): ``dsr_flow_slots``, by default ct_size
        rounded up to a power of 2, so every DSR flow conntrack could hold has a slot (64 B
        each: 16 MiB at 256 Ki)."""
        return self.dsr_flow_slots or 1 << max(self.ct_size - 1, 1).bit_length()

    @property
    def capacity(self):
        from agent.datapath.capacity import Capacity
        return Capacity(self.max_services, self.max_backends, self.max_memberships, self.maglev_slots)

    def with_capacity(self, cap) -> "Features":
        from dataclasses import replace
        return replace(self, max_services=cap.max_services, max_backends=cap.max_backends,
                       max_memberships=cap.max_memberships, maglev_slots=cap.maglev_slots)


@dataclass(frozen=True)
class Counters:
    stats: dict[str, int] = field(default_factory=dict)        # "xdp.pass", "tc_egress.revnat", ...
    drops: dict[str, int] = field(default_factory=dict)        # DropReason name -> packets
    services: dict[ServiceKey, tuple[int, int]] = field(default_factory=dict)  # (packets, bytes)

    def stat(self, hook: str, name: str) -> int:
        return self.stats.get(f"{hook}.{name}", 0)


@dataclass(frozen=True)
class CtEntry:
    direction: str         # "service" | "reply"
    proto: Proto
    saddr: IPAddress
    sport: int
    daddr: IPAddress
    dport: int
    backend_id: int
    service_id: int
    flags: CtFlag
    rewrite_saddr: IPAddress | None = None   # reply: new source (VIP)
    rewrite_sport: int | None = None
    nat_port: int = 0


@dataclass(frozen=True)
class NeighEntry:
    """One cached next hop (per CPU): the FIB lookup result towards ``addr``."""
    cpu: int
    slot: int
    addr: IPAddress
    ingress_ifindex: int
    ifindex: int
    smac: str
    dmac: str
    age_s: float
    len_ok: int


def _mac(b) -> str:
    return ":".join(f"{x:02x}" for x in bytes(b))


NEIGH_TTL_S = 1.0     # a cached next hop is looked up again after this (lb.h nh_resolve)
_HZ_CHOICES = (100, 250, 300, 1000)


def _jiffies32(probe_fd: int) -> int:
    """The kernel's jiffies (low 32 bits): xdp_lb.c's clock_probe returns them."""
    from agent.datapath.testrun import test_run
    return test_run(probe_fd, bytes(64)).retval


def _kernel_hz(probe_fd: int, meanwhile=None, start: tuple[int, float] | None = None) -> int:
    """CONFIG_HZ of the running kernel, measured (jiffies over >= 120 ms of CLOCK_MONOTONIC),
    rounded to the nearest of Linux's choices. An overestimate would make cached next hops
    live longer than NEIGH_TTL_S, so a measurement that fits no choice is used as measured.
    ``meanwhile()``, if given, runs inside the interval (it only has to wait out the rest);
    ``start``: (jiffies, monotonic seconds) read earlier through the same probe."""
    j0, t0 = start if start is not None else (_jiffies32(probe_fd), time.monotonic())
    if meanwhile is not None:
        meanwhile()
    time.sleep(max(0.0, 0.12 - (time.monotonic() - t0)))
    j1, t1 = _jiffies32(probe_fd), time.monotonic()
    hz = ((j1 - j0) & 0xFFFFFFFF) / (t1 - t0)
    best = min(_HZ_CHOICES, key=lambda c: abs(c - hz))
    return best if abs(best - hz) <= 0.15 * best else max(1, int(hz))


# ---------------------------------------------------------------------------- byte helpers

def _addr_from_words(words, family: int) -> IPAddress:
    if family == 4:
        return ipaddress.IPv4Address(_struct.pack("<I", words[0]))
    return ipaddress.IPv6Address(_struct.pack("<4I", *words))


def _ntohs(v: int) -> int:
    return _htons(v)

_WILDCARD, _LOCAL_ONLY, _DSR = int(SvcFlag.WILDCARD), int(SvcFlag.LOCAL_ONLY), int(SvcFlag.DSR)
_AFFINITY, _STATELESS = int(SvcFlag.AFFINITY), int(SvcFlag.STATELESS)
_BE_LOCAL, _BE_TERMINATING = int(BackendFlag.LOCAL), int(BackendFlag.TERMINATING)

_HOOK_NAMES = {Hook.XDP: "xdp", Hook.TC_INGRESS: "tc_ingress", Hook.TC_EGRESS: "tc_egress"}
XDP_FLAGS_SKB_MODE = 1 << 1
XDP_FLAGS_DRV_MODE = 1 << 2


# ---------------------------------------------------------------------------- the datapath

class Datapath:
    """Load, attach and program vipd's BPF datapath (see module docstring)."""

    def __init__(self, instance: str, *, pin_root: str | os.PathLike = "/sys/fs/bpf/vipd",
                 features: Features = Features(), table_builder: TableBuilder | None = None,
                 bpf_cache: ProgramCache | None | str = FROM_ENV, bpf_dir: Path | None = None):
        if not instance or "/" in instance or instance.startswith("."):
            raise ValueError(f"instance must be a plain name, got {instance!r}")
        self.instance = instance
        self.pin_dir = Path(pin_root) / instance
        self.features = features
        # compiled programs by content (objcache.py); None: always compile
        self.bpf_cache = ProgramCache.from_env() if bpf_cache == FROM_ENV else bpf_cache
        self.bpf_dir = bpf_dir   # the C sources (None: the installed bpf/)
        # what the maps program and the rules that turn service changes into writes (pure);
        # its map layouts arrive with the loaded maps
        self._plan = Planner(None, Limits.of(features), table_builder=table_builder)
        self._loaded: Loaded | None = None   # programs and maps handed over by the loader child
        self._fns: dict[str, object] = {}
        self._batching = False   # inside _writes: the planner's changes are applied at its end
        self._defer_sweep = False
        self._attached: list[tuple[str, str, str | None]] = []   # (ifname, hook, netns)
        self._xdp_modes: dict[tuple[str, str | None], str] = {}   # (ifname, netns) -> mode
        self.reloads = 0                                           # growths done by this process
        self.entries_written = 0   # map entries and Maglev slots written or deleted by this process
        self._fresh_snat_slots = False   # load() created the SNAT slot map (nothing to sweep in it)

    @property
    def maglev_builds(self) -> int:
        """Maglev tables computed (vipd_maglev_builds_total)."""
        return self._plan.maglev_builds

    def _reset_state(self) -> None:
        """Forget what the maps program (ids, tables, ranges); ``_adopt`` reads it back."""
        self._plan.reset()

    # ------------------------------------------------------------------ load / adopt

    def loader_defines(self) -> dict[str, object]:
        """The compile-time defines a loader child needs before the sizes are known
        (:meth:`start_loading` does that as early as possible, then ``load(child=)``)."""
        return self.features.defines(self.pin_dir)

    def start_loading(self) -> PendingLoad:
        """Start getting the programs now: from the program cache, or a child compiling them
        while the caller does other work; pass the result to ``load(child=)``."""
        return start_loading(self.loader_defines(), cache=self.bpf_cache, bpf_dir=self.bpf_dir)

    def load(self, capacity=None, *, child: PendingLoad | None = None) -> None:
        """Compile both programs and open (or create) the pinned maps, then adopt their state.

        The programs come from the program cache or are compiled in a child process
        (agent/datapath/child.py): ``child`` is a load begun earlier with :meth:`start_loading`,
        so a compile overlapped other work.
        Sized maps that are already pinned are adopted at their pinned size (never shrunk);
        without pins they are created at ``Features``' capacity. With ``capacity`` (a
        :class:`~agent.datapath.capacity.Capacity`, e.g. from ``plan_capacity``) maps that are
        smaller are grown right after adoption (:meth:`grow`)."""
        ensure_bpffs(self.pin_dir)
        self.pin_dir.mkdir(parents=True, exist_ok=True)
        pinned = self.pinned_capacity()
        # created by this load: all free, no slot to sweep (the scan reads 256 Ki slots)
        self._fresh_snat_slots = not (self.pin_dir / MapName.SNAT_PORTS.value).exists()
        if pinned is not None:
            self.features = self.features.with_capacity(pinned)
        elif capacity is not None:
            self.features = self.features.with_capacity(capacity)
        t0 = time.monotonic()
        self._loaded = self._compile(self.features, self.pin_dir, child=child)
        self._fns = self._loaded.programs
        self._plan.layouts = Layouts.from_tables(self._loaded.tables)
        self._plan.set_limits(Limits.of(self.features))
        log.info("datapath loaded", instance=self.instance, pin_dir=str(self.pin_dir),
                 programs_from="cache" if self._loaded.from_cache else "compile",
                 compile_s=round(self._loaded.compile_s, 2), waited_s=round(time.monotonic() - t0, 2),
                 loader_child_peak_rss_mb=round(self._loaded.child_peak_rss_mb),
                 capacity=str(self.features.capacity),
                 verified_insns={k: f.verified_insns for k, f in self._fns.items()})
        steps = {}

        def read_state():
            for step in (self._check_pins, self._migrate_ct_v1, self._migrate_snat_replies, self._adopt):
                t_step = time.monotonic()
                step()
                steps[step.__name__.lstrip("_")] = round(time.monotonic() - t_step, 3)
        # the clock measurement's 120 ms pass while the pinned state is read back
        # (from when the probe loaded, while the other programs were still being verified)
        self._hz = _kernel_hz(self._fns["clock-probe"].fd, meanwhile=read_state, start=self._loaded.clock_start)
        self._write_neigh_cfg(gen=0)
        log.info("datapath state read", instance=self.instance, seconds=steps)
        if capacity is not None and not self.features.capacity.covers(capacity):
            self.grow(capacity)

    def _compile(self, features: Features, sized_pin_dir: Path, child: PendingLoad | None = None) -> Loaded:
        """Programs and maps from the program cache or a loader child; the sized maps are created at ``features``'
        capacity under ``sized_pin_dir`` unless pinned there already."""
        defines = features.defines(self.pin_dir)
        if child is not None and _without_sizes(child.defines) != _without_sizes(defines):
            log.warning("the early loader child was started with other settings; compiling again",
                        instance=self.instance)
            child.kill()
            child = None
        if child is None:
            child = start_loading(defines, cache=self.bpf_cache, bpf_dir=self.bpf_dir)
        sizes = {d: int(defines[d]) for d in SIZE_DEFINES}
        try:
            return child.finish(sized_pin_dir, sizes)
        except Exception as exc:
            raise DatapathError(f"datapath {self.instance}: {exc}") from exc

    def pinned_capacity(self):
        """The capacity of the sized maps pinned now (None when they are not all pinned): a
        restarting agent plans against it, so it grows the maps only when they cannot hold
        the configuration, not because a fresh plan's headroom differs."""
        from agent.datapath.capacity import Capacity
        sizes = {}
        for name in SIZED_MAPS:
            path = self.pin_dir / name.value
            if not path.exists():
                return None
            sizes[name] = _pinned_map_info(path).max_entries
        return Capacity(max_services=sizes[MapName.SVC_STATS], max_backends=sizes[MapName.BACKENDS],
                        max_memberships=sizes[MapName.SVC_BACKENDS], maglev_slots=sizes[MapName.MAGLEV])

    @property
    def capacity(self):
        """The sizes the sized maps have now (:class:`~agent.datapath.capacity.Capacity`)."""
        return self.features.capacity

    def grow(self, capacity) -> None:
        """Enlarge the sized maps to at least ``capacity`` by a reload that keeps every flow.

        1. compile both programs against an empty staging directory for the sized maps: bcc
           creates them there at the new sizes, and opens conntrack, affinity and the other
           maps from their usual pins (the same kernel maps the running programs use);
        2. copy services, backends, memberships, revnat entries, the used Maglev slots and the
           per-service counters into the new maps (ids and slot offsets are unchanged, so
           conntrack and affinity entries stay valid);
        3. rename the new pins over the old ones (an agent that crashes from here on adopts
           the new maps);
        4. replace the programs on every attached hook (XDP and tc replace are atomic: each
           packet sees either the old programs with the old maps or the new ones with the new).
        Only this process writes the sized maps, and it writes nothing meanwhile, so the copy
        is exact (except per-service counters of packets in the copy's few milliseconds).
        """
        self._require_loaded()
        new = self.features.with_capacity(self.features.capacity.union(capacity))
        if new == self.features:
            return
        t0 = time.monotonic()
        stage = self.pin_dir / GROW_DIR
        shutil.rmtree(stage, ignore_errors=True)   # a growth interrupted before its renames
        stage.mkdir()
        try:
            loaded = self._compile(new, stage)
            t_compile = time.monotonic() - t0
            for name in SIZED_MAPS:
                old_t, new_t = self.table(name), loaded.tables[name.value]
                limit = self._plan.alloc.top if name is MapName.MAGLEV else None
                _copy_map(old_t.map_fd, new_t.map_fd, limit=limit)
            for name in SIZED_MAPS:
                os.rename(stage / name.value, self.pin_dir / name.value)
        except BaseException:
            shutil.rmtree(stage, ignore_errors=True)
            raise
        os.rmdir(stage)
        old_loaded = self._loaded
        self._loaded, self._fns = loaded, loaded.programs
        self._write_neigh_cfg(gen=0)   # the next-hop cache is per program (not pinned): configure it
        old_features, self.features = self.features, new
        self._plan.layouts = Layouts.from_tables(loaded.tables)
        self._plan.set_limits(Limits.of(new))
        for ifname, hook, netns in list(self._attached):
            if hook == "xdp":
                self.attach_xdp(ifname, netns=netns, mode=self._xdp_modes.get((ifname, netns), "native"),
                                accept_local=False)
            else:
                self.attach_tc(ifname, hook.split("-", 1)[1], netns=netns)
        old_loaded.close()
        self.reloads += 1
        log.info("datapath grown", instance=self.instance, old=str(old_features.capacity),
                 new=str(new.capacity), compile_s=round(t_compile, 2),
                 total_s=round(time.monotonic() - t0, 2), hooks=len(self._attached))

    @property
    def loaded(self) -> bool:
        return self._loaded is not None

    def program_fd(self, name: str) -> int:
        """File descriptor of a loaded program: "xdp", "tc-egress" or "tc-ingress"."""
        self._require_loaded()
        return self._fns[name].fd

    def table(self, name: MapName | str):
        """A map (:class:`~agent.datapath.maptable.MapTable`: bcc-like Key/Leaf types, raw syscalls)."""
        if self._loaded is None:
            self._require_loaded()
        try:
            return self._loaded.tables[name]
        except KeyError:   # MapName members are str: equal names hash alike, so this is rare
            return self._loaded.tables[name.value if isinstance(name, MapName) else name]

    def _require_loaded(self):
        if self._loaded is None:
            raise DatapathError("datapath not loaded: call load() first")

    def _check_pins(self) -> None:
        """bcc reuses a pinned map without comparing it with the program's declaration; a pin
        left by a build with other Features (sizes) or another layout must not be used."""
        for name in MapName:
            tbl = self.table(name)
            info = _map_info(tbl.map_fd)
            leaf = getattr(tbl, "sLeaf", tbl.Leaf)   # per-CPU tables: Leaf is the per-CPU array
            declared = tbl.declared_entries if tbl.declared_entries is not None else info.max_entries
            want = (ctypes.sizeof(tbl.Key), ctypes.sizeof(leaf), declared)
            got = (info.key_size, info.value_size, info.max_entries)
            if got != want:
                raise DatapathError(
                    f"pinned map {self.pin_dir / name.value} has key/value/entries {got}, this build "
                    f"expects {want}: it was created with other Features or another layout. Use the "
                    f"same Features, or remove {self.pin_dir} (drops conntrack) to start afresh")

    def _migrate_ct_v1(self) -> None:
        """Conntrack of an older vipd (``ct_v1``: addresses first in the value) moves into
        ``ct_v2`` (the fields an established packet reads first), so flows survive the upgrade;
        then the old pin goes. Keys are the same; values are re-ordered field by field."""
        old = self.pin_dir / "ct_v1"
        if not old.exists():
            return
        try:
            fd = bpfsys.obj_get(old)
        except OSError as exc:
            raise DatapathError(f"cannot open the old conntrack map {old}: {exc.strerror}") from exc
        try:
            info = _map_info(fd)
            if (info.key_size, info.value_size) != (40, CT_V1_VALUE.size):
                raise DatapathError(f"{old} has key/value sizes {(info.key_size, info.value_size)}, not "
                                    f"ct_v1's (40, {CT_V1_VALUE.size}); remove it to start afresh")
            dst = self.table(MapName.CT)
            moved = 0
            for keys, vals, n in _raw_batches(fd, info.key_size, info.value_size):
                out = ctypes.create_string_buffer(CT_V2_VALUE.size * n)
                for i in range(n):
                    (a0, a1, a2, a3, d0, d1, d2, d3, rport, rdport, nat_port, flags, backend_id, svc_id,
                     last_seen, svc_gen) = CT_V1_VALUE.unpack_from(vals, i * CT_V1_VALUE.size)
                    CT_V2_VALUE.pack_into(out, i * CT_V2_VALUE.size, backend_id, svc_id, svc_gen, flags,
                                          nat_port, rport, rdport, last_seen, a0, a1, a2, a3, d0, d1, d2, d3)
                _, rc = bpfsys.update_batch(dst.map_fd, keys, out, n)
                if rc:
                    raise DatapathError(f"migrating conntrack: BPF_MAP_UPDATE_BATCH failed: {os.strerror(-rc)}")
                moved += n
        finally:
            os.close(fd)
        old.unlink()
        log.info("conntrack migrated from ct_v1 to ct_v2", entries=moved, pin_dir=str(self.pin_dir))

    def _migrate_snat_replies(self) -> None:
        """SNAT REPLY conntrack entries of a vipd from before port slots move into
        ``snat_ports_v2`` (agent/datapath/snatports.py), so its SNAT flows survive the upgrade;
        so do the slots of ``snat_ports_v1`` (vipd before the SNAT flow index)."""
        from agent.datapath.snatports import migrate_reply_entries, migrate_v1_slots
        slots_v1 = migrate_v1_slots(self)
        if slots_v1:
            log.info("SNAT node-port slots migrated from snat_ports_v1", slots=slots_v1, pin_dir=str(self.pin_dir))
        moved, lost = migrate_reply_entries(self)
        if moved or lost:
            log.info("SNAT REPLY conntrack entries moved into node-port slots", moved=moved,
                     lost_to_slot_collisions=lost, pin_dir=str(self.pin_dir))

    def _adopt(self) -> None:
        """Rebuild the planner's view (ids, tables, ranges) from the pinned maps."""
        plan = self._plan
        backends = self.table(MapName.BACKENDS)
        revnat_svc = {}
        for k, v in _array_items(backends):
            if v.flags & BackendFlag.ACTIVE:
                plan.adopt_backend(k, _addr_from_words(v.addr, v.family), _ntohs(v.port), v.flags)
            if v.revnat_svc:
                revnat_svc[k] = v.revnat_svc
        ranges: dict[int, set] = {}
        for k, _ in self.table(MapName.SRC_RANGES).items():
            ranges.setdefault(k.svc_id, set()).add((tuple(k.addr), k.prefixlen - 32))
        maglev = self.table(MapName.MAGLEV)
        members: dict[int, set[int]] = {}
        member_keys = []
        mtbl = self.table(MapName.SVC_BACKENDS)
        for k, _ in _hash_items(mtbl):
            members.setdefault(k.svc_id, set()).add(k.backend_id)
            member_keys.append(mtbl.Key.from_buffer_copy(k))
        wildcards = []
        svc_ids = set()
        stbl = self.table(MapName.SERVICES)
        fronts = []
        for k, v in _hash_items(stbl):   # batched reads: 20,000 in ~5 calls
            if v.flags & _WILDCARD:
                wildcards.append((k.family, _addr_from_words(k.addr, k.family)))
            else:
                fronts.append((stbl.Key.from_buffer_copy(k), stbl.Leaf.from_buffer_copy(v)))
        # the tables out of the mapping in slot order (a few MiB mapped at a time), one
        # array per distinct table (equal tables share it: 20,000 Services over a few pods
        # hold a few tables, not 20,000 copies)
        fronts.sort(key=lambda kv: kv[1].table_off)
        window = maglev.u32_window()
        protos = {int(p): p for p in Proto}
        no_ranges = plan.shared_set(frozenset())
        same: dict[bytes, array] = {}
        table_ids: dict[int, frozenset] = {}   # id(table) -> its backend ids (tables live in ``same``)
        for k, v in fronts:
            key = ServiceKey(_addr_from_words(k.addr, k.family), _ntohs(k.port), protos.get(k.proto, k.proto))
            if not v.table_size:
                table = array("I")
            else:
                raw = (window.read(v.table_off, v.table_size) if window is not None
                       else _array_read_range(maglev, v.table_off, v.table_size).tobytes())
                table = same.get(raw)
                if table is None:
                    table = same[raw] = array("I", raw)
            nets = plan.shared_set(frozenset(
                ipaddress.ip_network((_addr_from_words(a, k.family), plen))
                for a, plen in ranges[v.id])) if v.id in ranges else no_ranges
            mem = plan.shared_set(frozenset(members.get(v.id, ())))
            ids = table_ids.get(id(table))
            if ids is None:   # shared tables: their backend set once
                ids = table_ids[id(table)] = plan.shared_set(frozenset(table))
            plan.adopt_service(key, Programmed(
                svc_id=v.id, flags=v.flags, table_off=v.table_off, table_cap=v.table_cap,
                table=table, affinity_timeout=v.affinity_timeout, ranges=nets, service=None,
                refs=plan.shared_set(ids | mem) if mem - ids else ids, members=mem, backend_gen=v.backend_gen))
            svc_ids.add(v.id)
        if window is not None:
            window.close()
        del fronts, same, table_ids
        with self._writes():   # leftover wildcards without services are deleted
            plan.adopt_done(wildcards, revnat_svc)
        for k in member_keys:   # memberships of no frontend: left by a batch a full map cut short
            if k.svc_id not in svc_ids:
                bpfsys.delete(self.table(MapName.SVC_BACKENDS).map_fd, k)
        self._sweep_stale_replies()
        if plan.programmed or plan.backend_ids:
            log.info("adopted pinned datapath state", services=len(plan.programmed),
                     backends=len(plan.backend_ids))

    # ------------------------------------------------------------------ attach / detach

    def attach_xdp(self, ifname: str, *, netns: str | None = None, mode: str = "native",
                   accept_local: bool = True) -> None:
        """Attach (or atomically replace) the XDP program on ``ifname``.

        ``mode``: "native" (driver XDP; veth supports it) or "generic" (skb mode, any device).
        ``accept_local``: set net.ipv4.conf.<ifname>.accept_local=1, needed for SNAT flows whose
        first packets are handed to the stack while the next hop's neighbour is unresolved
        (their source is the node's own address). Pass False on nodes without SNAT services.
        """
        self._require_loaded()
        flags = {"native": XDP_FLAGS_DRV_MODE, "generic": XDP_FLAGS_SKB_MODE}[mode]
        fn = self._fns["xdp"]

        def work():
            # SNATed packets punted to the stack (neighbour not yet resolved) carry the node's
            # own address as source; without accept_local the stack drops them as martians.
            if accept_local:
                _sysctl(f"net/ipv4/conf/{ifname}/accept_local", "1")
            _set_xdp(ifname, netns, fn.fd, flags)

        in_netns(netns, work)
        self._remember(ifname, "xdp", netns)
        self._xdp_modes[(ifname, netns)] = mode
        log.info("xdp attached", ifname=ifname, netns=netns, mode=mode)

    def attach_tc(self, ifname: str, direction: str, *, netns: str | None = None) -> None:
        """Attach (or replace) the tc program for ``direction`` ("ingress" | "egress")."""
        self._require_loaded()
        if direction not in ("ingress", "egress"):
            raise ValueError("direction must be 'ingress' or 'egress'")
        fn = self._fns[f"tc-{direction}"]

        def work():
            from pyroute2 import IPRoute
            with IPRoute() as ipr:
                idx = _ifindex(ipr, ifname, netns)
                try:
                    ipr.tc("add", "clsact", idx)
                except Exception as exc:  # noqa: BLE001 - EEXIST: clsact already there
                    if "exists" not in str(exc).lower():
                        raise
                parent = "ffff:fff2" if direction == "ingress" else "ffff:fff3"
                ipr.tc("replace-filter", "bpf", idx, handle=1, prio=1, fd=fn.fd, name=fn.name,
                       parent=parent, classid=1, direct_action=True)

        in_netns(netns, work)
        self._remember(ifname, f"tc-{direction}", netns)
        log.info("tc attached", ifname=ifname, netns=netns, direction=direction)

    def detach(self, ifname: str, hook: str, *, netns: str | None = None) -> None:
        """Detach ``hook`` ("xdp" | "tc-ingress" | "tc-egress") from ``ifname``."""
        if hook == "xdp":
            in_netns(netns, lambda: _set_xdp(ifname, netns, -1, 0))
            try:
                in_netns(netns, lambda: _set_xdp(ifname, netns, -1, XDP_FLAGS_SKB_MODE))
            except Exception:  # noqa: BLE001 - nothing attached in generic mode
                pass
        elif hook in ("tc-ingress", "tc-egress"):
            def work():
                from pyroute2 import IPRoute
                with IPRoute() as ipr:
                    idx = _ifindex(ipr, ifname, netns)
                    parent = "ffff:fff2" if hook == "tc-ingress" else "ffff:fff3"
                    try:
                        ipr.tc("del-filter", "bpf", idx, handle=1, prio=1, parent=parent)
                    except Exception as exc:  # noqa: BLE001
                        if "no such" not in str(exc).lower() and "not found" not in str(exc).lower():
                            raise
            in_netns(netns, work)
        else:
            raise ValueError(f"unknown hook {hook!r}")
        self._attached = [a for a in self._attached if a != (ifname, hook, netns)]
        log.info("detached", ifname=ifname, hook=hook, netns=netns)

    def _remember(self, ifname, hook, netns):
        entry = (ifname, hook, netns)
        if entry not in self._attached:
            self._attached.append(entry)

    # ------------------------------------------------------------------ node config

    def set_node_addresses(self, v4: str | None = None, v6: str | None = None) -> None:
        """The node's own addresses: the source of SNAT-mode flows (None = not configured)."""
        tbl = self.table(MapName.NODE_CFG)
        for idx, value in ((0, v4), (1, v6)):
            leaf = tbl.Leaf()
            if value is not None:
                addr = ipaddress.ip_address(value)
                if addr.version != (4 if idx == 0 else 6):
                    raise ValueError(f"node address {value} is not IPv{4 if idx == 0 else 6}")
                for i, w in enumerate(_words(addr)):
                    leaf.addr[i] = w
                leaf.valid = 1
            tbl[tbl.Key(idx)] = leaf

    # ------------------------------------------------------------------ services

    def services(self) -> dict[ServiceKey, Service]:
        """The services the maps program now (reconstructed from maps after adoption)."""
        out = {}
        vals = self._plan.backend_vals
        made: dict[int, Backend] = {}   # one Backend per id (shared by the services listing it)

        def backend(i: int) -> Backend:
            b = made.get(i)
            if b is None:
                addr, port, flags = vals[i]
                b = made[i] = Backend(addr, port, local=bool(flags & _BE_LOCAL),
                                      terminating=bool(flags & _BE_TERMINATING), id=i)
            return b

        listed: dict[int, tuple] = {}   # id(table) -> its backends: equal tables are one array
        for key, p in self._plan.programmed.items():
            if p.service is not None:
                out[key] = p.service
                continue
            backends = listed.get(id(p.table))
            if backends is None:   # a table has M (>= 251) slots: read each distinct one once
                backends = listed[id(p.table)] = tuple(backend(i) for i in sorted(set(p.table)) if i in vals)
            f = p.flags   # plain int tests: IntFlag arithmetic costs ~2 us each
            # kept: the next call (each reconcile pass) hands back the same object
            # the values of the maps this agent (or the one before) wrote: no checks again
            out[key] = p.service = trusted(
                Service, key, backends, bool(f & _LOCAL_ONLY), Mode.DSR if f & _DSR else Mode.SNAT,
                p.affinity_timeout if f & _AFFINITY else 0, tuple(sorted(p.ranges, key=str)) if p.ranges else (),
                bool(f & _STATELESS), p.table_cap)
        return out

    def service_id(self, key: ServiceKey) -> int | None:
        p = self._plan.programmed.get(key)
        return p.svc_id if p else None

    def backend_id(self, addr, port: int) -> int | None:
        return self._plan.backend_ids.get((ipaddress.ip_address(addr), port))

    def maglev_table(self, key: ServiceKey) -> list[int]:
        """The backend ids of a service's Maglev slots as programmed ([] = none)."""
        return list(self._plan.programmed[key].table)

    def upsert_service(self, svc: Service, *, atomic: bool = False) -> ServiceChange:
        """Program ``svc``; writes only what differs from what the maps hold.

        The Maglev table is updated slot by slot (only changed slots, one batch), or with
        ``atomic=True`` (and whenever M changes) filled into a fresh range and swapped in by
        one update of the frontend entry, so no packet sees a half-written table.
        """
        self._require_loaded()
        with self._writes():
            change = self._upsert(svc, atomic)
        if not self._defer_sweep:
            self._sweep_dead_backends()
        return change

    def upsert_services(self, services: Iterable[Service]) -> dict[ServiceKey, Exception]:
        """Program many services with one batch of writes per map and phase (the first pass
        at 20,000 Services: a handful of syscalls instead of ~10^5). Returns the services that
        could not be programmed, with why. When a batch write fails (a map is full), the
        in-memory view is read back from the maps and the services are programmed one by one,
        so each failure (e.g. :class:`CapacityError`) names its own service."""
        self._require_loaded()
        services = list(services)
        errors: dict[ServiceKey, Exception] = {}
        self._defer_sweep = True
        try:
            try:
                with self._writes():
                    for svc in services:
                        try:
                            self._upsert(svc, False)
                        except Exception as exc:  # noqa: BLE001 - one service must not stop the others
                            errors[svc.key] = exc
                        self._write_early()
            except DatapathError as exc:
                log.info("batched service writes failed; programming one by one", error=str(exc))
                errors = {}
                for svc in services:
                    try:
                        self.upsert_service(svc)
                    except Exception as exc2:  # noqa: BLE001 - as above
                        errors[svc.key] = exc2
        finally:
            self._defer_sweep = False
            self._sweep_dead_backends()
        return errors

    @contextmanager
    def _writes(self):
        """Let the planner record the map writes of the block and apply them at its end in one
        batch per map and phase (agent/datapath/planner.py, changes.py, writer.py); nested
        blocks join the outer one. What was recorded before an exception is applied too (the
        planner's view already includes it). A refused write leaves the maps partly written:
        the view is then read back from them (adoption), so the next upsert writes what is
        missing."""
        if self._batching:
            yield
            return
        from agent.datapath.writer import WriteError, apply

        self._batching = True
        try:
            yield
        finally:
            self._batching = False
            try:
                for changes in self._plan.take_changes():
                    self.entries_written += apply(changes, self._loaded.tables)
            except WriteError as exc:
                raise self._recover(exc) from exc

    def _recover(self, exc) -> DatapathError:
        """After a refused write (the maps partly written): read the view back from the maps,
        as a restarted agent would; returns the error to raise."""
        self._reset_state()
        self._adopt()
        if exc.full and exc.map == MapName.SVC_BACKENDS.value:
            return CapacityError("memberships", f"service memberships map full "
                                 f"({self.features.max_memberships}): {exc}")
        return DatapathError(str(exc))

    def _write_early(self) -> None:
        """Inside a long batch: apply what comes up to the Maglev slots once ~1 Mi slots are
        pending (bounded memory; the frontends that point at them still come after)."""
        from agent.datapath.writer import WriteError, apply

        if not self._batching or self._plan.changes.pending_slots < EARLY_SLOTS:
            return
        try:
            if len(self._plan.first):   # what must land before any of the rest
                self.entries_written += apply(self._plan.first, self._loaded.tables)
                self._plan.first = MapChanges()
            self.entries_written += apply(self._plan.changes.take_through(Phase.SLOTS), self._loaded.tables)
        except WriteError as exc:
            self._plan.take_changes()   # the rest is not written: the maps are read back
            raise self._recover(exc) from exc

    def _svc_key(self, vip: IPAddress, port: int, proto: int):
        """The services map key of a frontend (tests read entries with it)."""
        return self.table(MapName.SERVICES).Key.from_buffer_copy(self._plan._svc_key(vip, port, proto))

    def _upsert(self, svc: Service, atomic: bool) -> ServiceChange:
        change = self._plan.upsert(svc, atomic)
        if not self._defer_sweep:   # one service at a time (a batch of 20,000 would log 20,000 lines)
            log.debug("service programmed", service=str(svc.key), slots=change.slots_written,
                      swapped=change.swapped, created=change.created)
        return change

    def delete_service(self, key: ServiceKey) -> bool:
        """Remove a frontend; returns False when it was not programmed."""
        self._require_loaded()
        with self._writes():
            deleted = self._delete(key)
        if deleted and not self._defer_sweep:
            self._sweep_dead_backends()
        return deleted

    def _delete(self, key: ServiceKey) -> bool:
        deleted = self._plan.delete(key)
        if deleted and not self._defer_sweep:
            log.debug("service deleted", service=str(key))
        return deleted

    def reconcile(self, services: Iterable[Service]) -> dict[str, int]:
        """Make the maps program exactly ``services``: upsert each, delete the rest."""
        want = {s.key: s for s in services}
        stats = {"upserted": 0, "deleted": 0, "slots_written": 0}
        self._defer_sweep = True   # one conntrack sweep for the whole batch
        try:
            with self._writes():   # one batch of writes per map and phase
                for key in [k for k in self._plan.programmed if k not in want]:
                    self._delete(key)
                    stats["deleted"] += 1
                for svc in want.values():
                    ch = self._upsert(svc, False)
                    stats["upserted"] += 1
                    stats["slots_written"] += ch.slots_written
        finally:
            self._defer_sweep = False
            self._sweep_dead_backends()
        return stats

    # ------------------------------------------------------------------ reading

    def counters(self) -> Counters:
        """Per-CPU counters summed over CPUs."""
        self._require_loaded()
        stats = {}
        tbl = self.table(MapName.STATS)
        for hook in Hook:
            for st in Stat:
                v = tbl[tbl.Key(hook * abi.NUM_STATS + st)]
                stats[f"{_HOOK_NAMES[hook]}.{st.name.lower()}"] = int(sum(v))
        drops = {}
        dt = self.table(MapName.DROPS)
        for r in DropReason:
            drops[r.name] = int(sum(dt[dt.Key(r)]))
        services = {}
        st = self.table(MapName.SVC_STATS)
        for key, p in self._plan.programmed.items():
            vals = st[st.Key(p.svc_id)]
            services[key] = (int(sum(c.packets for c in vals)), int(sum(c.bytes for c in vals)))
        return Counters(stats, drops, services)

    def conntrack(self) -> list[CtEntry]:
        from agent.datapath.inspect import read_conntrack

        self._require_loaded()
        return read_conntrack(self)[0]

    # ------------------------------------------------------------------ next-hop cache

    def _write_neigh_cfg(self, gen: int) -> None:
        tbl = self.table("neigh_cfg_v1")
        v = tbl.Leaf()
        v.gen = gen & 0xFFFFFFFF
        v.ttl = max(1, round(self._hz * NEIGH_TTL_S))
        v.hz = self._hz
        tbl[tbl.Key(0)] = v

    def flush_neighbours(self) -> None:
        """Invalidate every cached next hop at once (bumps the generation): the next packet to
        each remote backend does a FIB lookup. Without a flush a route or neighbour change is
        followed within NEIGH_TTL_S (1 s) of the change (docs/datapath.md, "Next-hop cache")."""
        self._require_loaded()
        self._write_neigh_cfg(self.table("neigh_cfg_v1")[0].gen + 1)

    def neighbours(self) -> list[NeighEntry]:
        """The next hops cached per CPU (entries of the current generation, any age)."""
        self._require_loaded()
        gen = self.table("neigh_cfg_v1")[0].gen
        now = _jiffies32(self._fns["clock-probe"].fd)
        out = []
        for slot, per_cpu in self.table("neigh_v1").items():
            for cpu, e in enumerate(per_cpu):
                if e.stamp and e.gen == gen:
                    out.append(NeighEntry(
                        cpu=cpu, slot=slot.value, addr=_addr_from_words(e.addr, e.family),
                        ingress_ifindex=e.ingress, ifindex=e.ifindex, smac=_mac(e.smac), dmac=_mac(e.dmac),
                        age_s=((now - e.stamp) & 0xFFFFFFFF) / self._hz, len_ok=e.len_ok))
        return out

    # ------------------------------------------------------------------ teardown

    def close(self) -> None:
        """Drop this process's handles. Attached programs keep running; maps stay pinned."""
        if self._loaded is not None:
            self._loaded.close()
        self._loaded = None
        self._fns = {}

    def destroy(self) -> None:
        """Detach what this instance attached, close, and remove the pin directory."""
        for ifname, hook, netns in list(self._attached):
            try:
                self.detach(ifname, hook, netns=netns)
            except Exception as exc:  # noqa: BLE001 - the link may be gone with its netns
                log.warning("detach failed", ifname=ifname, hook=hook, error=str(exc))
        self.close()
        if self.pin_dir.exists():
            shutil.rmtree(self.pin_dir)

    # ------------------------------------------------------------------ internals

    def _sweep_dead_backends(self) -> int:
        """Delete the REPLY conntrack entries of the backends deactivated since the last sweep.

        Their flows are over (a packet of one re-balances), but a REPLY entry's key has no
        client in it: left in place it would keep the old backend's late packets flowing to a
        client port that may carry a new flow by now, and keep a SNAT port of that backend
        address busy for the 6 h idle timeout (an address that comes back, as a restarted pod,
        would find its ports taken). One batched scan of conntrack per call (not per backend);
        ``reconcile`` sweeps once at its end. Returns the number of entries deleted."""
        dead, remote = self._plan.take_dead_backends()
        if not dead:
            return 0
        dead_keys = {bid: (tuple(_words(addr)), _htons(port)) for bid, (addr, port) in dead.items()}
        return self._sweep_replies(lambda bid, k: bid in dead_keys and dead_keys[bid] == (tuple(k.saddr), k.sport),
                                   "removed backends", slots=remote)

    def _sweep_stale_replies(self) -> int:
        """At load: delete REPLY entries naming a backend id that is not active with the
        entry's backend address (an agent that stopped between deactivating a backend and
        sweeping it, or one from before the sweep existed). Entries without a backend id
        (DSR replies recorded on a backend's node) are left alone."""
        live = {bid: (tuple(_words(addr)), _htons(port)) for bid, (addr, port, _) in self._plan.backend_vals.items()}
        return self._sweep_replies(lambda bid, k: bid != 0 and live.get(bid) != (tuple(k.saddr), k.sport),
                                   "stale at load", slots=not self._fresh_snat_slots)

    def _sweep_replies(self, doomed_if, why: str, slots: bool = True) -> int:
        """Delete the REPLY entries, and (``slots``) free the SNAT node-port slots, for which
        ``doomed_if(backend_id, key)``. The slot scan reads the whole array (~0.3 s per 256 Ki
        slots here), so it is skipped when only local backends left."""
        from agent.datapath.snatports import clear_slots
        freed = clear_slots(self, doomed_if) if slots else 0
        if freed:
            log.info("SNAT node ports of backends no longer active freed", why=why, slots=freed)
        tbl = self.table(MapName.CT)
        reply = int(CtDir.REPLY)
        doomed = [tbl.Key.from_buffer_copy(k) for k, v in _hash_items(tbl)
                  if k.dir == reply and doomed_if(v.backend_id, k)]
        done = 0
        if doomed:   # one BPF_MAP_DELETE_BATCH; it stops at a key gone meanwhile: the rest one by one
            keys = (tbl.Key * len(doomed))(*doomed)
            done, _ = bpfsys.delete_batch(tbl.map_fd, keys, len(doomed))
        for k in doomed[done:]:
            try:
                del tbl[k]
            except KeyError:
                pass   # gone meanwhile (LRU, or taken over by the datapath)
        if doomed:
            log.info("conntrack REPLY entries of backends no longer active deleted", why=why, entries=len(doomed))
        return len(doomed) + freed

# ---------------------------------------------------------------------------- map helpers

def _array_read_range(tbl, start: int, count: int) -> array:
    """Read ``count`` u32 slots of an array starting at ``start``: a copy out of the mapped
    array (BPF_F_MMAPABLE), else by batch lookup."""
    window = tbl.u32_window()
    if window is not None:
        with window:
            return array("I", window.read(start, count))
    keys = (ctypes.c_uint32 * count)()
    vals = (ctypes.c_uint32 * count)()
    out_batch = ctypes.c_uint32(0)
    # the batch cursor is the key *before* the first
    in_batch = None if start == 0 else ctypes.c_uint32(start - 1)
    n, rc = bpfsys.lookup_batch(tbl.map_fd, in_batch, out_batch, keys, vals, count)
    if rc == 0 or n:
        got = {keys[i]: vals[i] for i in range(n)}
        if all(start + i in got for i in range(count)):
            return array("I", [got[start + i] for i in range(count)])
    return array("I", [tbl[tbl.Key(start + i)].value for i in range(count)])


def _hash_items(tbl, chunk: int = 4096):
    """(key, value) of every element of a hash map, by BPF_MAP_LOOKUP_BATCH in chunks (the
    yielded ctypes objects are views of a reused buffer: copy what is kept)."""
    keys, vals = (tbl.Key * chunk)(), (tbl.Leaf * chunk)()
    token_in, token_out = ctypes.c_uint32(0), ctypes.c_uint32(0)
    first = True
    while True:
        n, rc = bpfsys.lookup_batch(tbl.map_fd, None if first else token_in, token_out, keys, vals, chunk)
        if rc and rc != -errno.ENOENT:   # ENOENT: the last batch
            if first and -rc in (22, 95, 524):   # no batch ops: one by one
                yield from tbl.items()
                return
            raise DatapathError(f"BPF_MAP_LOOKUP_BATCH on {tbl.name} failed: {os.strerror(-rc)}")
        for i in range(n):
            yield keys[i], vals[i]
        if rc:
            return
        token_in.value, first = token_out.value, False


def _array_items(tbl):
    """(index, value) of every array element whose value is not all-zero."""
    for k, v in tbl.items_lookup_batch():
        if any(bytes(v)):
            yield int(k.value) if hasattr(k, "value") else int(k), v


def _pinned_map_info(path: Path) -> bpfsys.MapInfo:
    """Map info of a pinned map (BPF_OBJ_GET, then BPF_OBJ_GET_INFO_BY_FD)."""
    try:
        fd = bpfsys.obj_get(path)
    except OSError as exc:
        raise DatapathError(f"cannot open pinned map {path}: {exc.strerror}") from exc
    try:
        return _map_info(fd)
    finally:
        os.close(fd)


# ct_v1's value (vipd before the ct_v2 re-order), declared here only, for _migrate_ct_v1:
# raddr[4], rdaddr[4], rport, rdport, nat_port, flags, backend_id, svc_id, last_seen, svc_gen.
# Ports stay in network order (raw 16-bit words in, the same words out).
CT_V1_VALUE = _struct.Struct("<4I4IHHHHIIII")
# ct_v2 (bpf/include/structs.h struct ct_val): backend_id, svc_id, svc_gen, flags, nat_port,
# rport, rdport, last_seen, raddr[4], rdaddr[4]; tests/bpf/test_abi.py checks the offsets.
CT_V2_VALUE = _struct.Struct("<IIIHHHHI4I4I")


def _raw_batches(fd: int, key_size: int, value_size: int, chunk: int = 1 << 14):
    """(keys buffer, values buffer, n) per BPF_MAP_LOOKUP_BATCH of any map (the buffers are
    reused: consume them before the next batch)."""
    keys = ctypes.create_string_buffer(key_size * chunk)
    vals = ctypes.create_string_buffer(value_size * chunk)
    in_batch, out_batch = ctypes.c_uint32(0), ctypes.c_uint32(0)
    first = True
    while True:
        n, rc = bpfsys.lookup_batch(fd, None if first else in_batch, out_batch, keys, vals, chunk)
        if rc and rc != -errno.ENOENT:
            raise DatapathError(f"reading map: BPF_MAP_LOOKUP_BATCH failed: {os.strerror(-rc)}")
        if n:
            yield keys, vals, n
        if rc:
            return
        in_batch.value = out_batch.value
        first = False


def _copy_map(src_fd: int, dst_fd: int, *, limit: int | None = None, chunk: int = 1 << 16) -> int:
    """Copy every entry of one map into another of the same type and layout (batch lookup +
    batch update, ``chunk`` entries per syscall pair). ``limit``: for arrays, copy only keys
    below it. Returns the number of entries copied."""
    info = _map_info(src_fd)
    ks, vs = info.key_size, info.value_size
    if info.type in bpfsys.PERCPU_TYPES:
        vs = ((vs + 7) // 8) * 8 * len(bpfsys.possible_cpus())
    is_array = info.type in bpfsys.ARRAY_TYPES
    if is_array and limit is not None:
        chunk = max(1, min(chunk, limit))
    copied = 0
    for keys, vals, n in _raw_batches(src_fd, ks, vs, chunk):
        if is_array and limit is not None:
            n = max(0, min(n, limit - copied))
        if n:
            _, rc = bpfsys.update_batch(dst_fd, keys, vals, n)
            if rc:
                raise DatapathError(f"copying map: BPF_MAP_UPDATE_BATCH failed: {os.strerror(-rc)}")
            copied += n
        if is_array and limit is not None and copied >= limit:
            break
    return copied


def _map_info(fd: int) -> bpfsys.MapInfo:
    try:
        return bpfsys.map_info(fd)
    except OSError as exc:
        raise DatapathError(f"BPF_OBJ_GET_INFO_BY_FD failed: {exc.strerror}") from exc


def _set_xdp(ifname: str, netns: str | None, fd: int, flags: int) -> None:
    """Attach (fd >= 0, replacing) or detach (fd -1) XDP on ``ifname`` by netlink (IFLA_XDP),
    in the calling thread's network namespace."""
    from pyroute2 import IPRoute
    with IPRoute() as ipr:
        idx = _ifindex(ipr, ifname, netns)
        attrs = [("IFLA_XDP_FD", fd)] + ([("IFLA_XDP_FLAGS", flags)] if flags else [])
        ipr.link("set", index=idx, xdp={"attrs": attrs})


def _without_sizes(defines: dict) -> dict:
    return {k: v for k, v in defines.items() if k not in SIZE_DEFINES and k != "SIZED_PIN_DIR"}


def _ifindex(ipr, ifname: str, netns: str | None) -> int:
    links = ipr.link_lookup(ifname=ifname)
    if not links:
        raise DatapathError(f"no interface {ifname!r} in netns {netns or '(root)'}")
    return links[0]


def _sysctl(key: str, value: str) -> None:
    """Write a sysctl of the calling thread's network namespace."""
    path = Path("/proc/sys") / key
    if path.exists() and path.read_text().strip() != value:
        path.write_text(value)
