"""The datapath's pure planner (agent/datapath/planner.py): services in, map writes out as
bytes, applied here to dict-backed maps and read back field by field, as the BPF programs
read them. No root, no bcc: the map layouts come from a recorded fixture (layouts.json)."""

from __future__ import annotations

import ctypes
import ipaddress
import json
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from agent.datapath.abi import BackendFlag, MapName, SvcFlag
from agent.datapath.changes import MapChanges, Phase
from agent.datapath.model import Backend, Mode, Proto, Service, ServiceKey
from agent.datapath.planner import CapacityError, Layouts, Limits, Planner, RangeAllocator

DESCS = {k: v for k, v in json.loads((Path(__file__).parent / "layouts.json").read_text()).items()
         if not k.startswith("_")}
LAYOUTS = Layouts.from_descs(DESCS)
SVC, BE, MEM, REV, MAG, RNG = (m.value for m in (MapName.SERVICES, MapName.BACKENDS, MapName.SVC_BACKENDS,
                                                 MapName.REVNAT, MapName.MAGLEV, MapName.SRC_RANGES))
LIMITS = Limits(max_services=64, max_backends=64, max_memberships=256, maglev_slots=1 << 14)


class Clock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self):
        return self.t


def planner(limits=LIMITS, clock=None) -> Planner:
    return Planner(LAYOUTS, limits, clock=clock or Clock())


class FakeMaps:
    """The planned maps as dicts (array maps: absent = all-zero), written batch by batch."""

    def __init__(self):
        self.maps = {name: {} for name in (SVC, BE, MEM, REV, MAG, RNG)}

    def apply(self, changes: MapChanges, after_each=None) -> None:
        for b in changes.batches():
            m = self.maps[b.map]
            if b.op == "update":
                for k, v in zip(b.keys, b.values):
                    m[k] = v
            else:
                for k in b.keys:
                    m.pop(k, None)
            if after_each:
                after_each(self, b)

    # ---- reading, as the BPF programs do

    def _rows(self, name):
        K, V = LAYOUTS.key(name), LAYOUTS.leaf(name)
        for k, v in self.maps[name].items():
            yield (k if name == MAG else K.from_buffer_copy(k)), (v if name == MAG else V.from_buffer_copy(v))

    def backend(self, bid):
        raw = self.maps[BE].get(bytes(ctypes.c_uint32(bid)))
        return LAYOUTS.leaf(BE).from_buffer_copy(raw) if raw else None

    def active_backends(self):
        out = {}
        for k, v in self._rows(BE):
            if v.flags & BackendFlag.ACTIVE:
                out[k.value] = v
        return out

    def frontends(self):
        """ServiceKey -> svc_val of every non-wildcard entry; wildcard (family, vip) set."""
        fronts, wild = {}, set()
        for k, v in self._rows(SVC):
            vip = _addr(k.addr, k.family)
            if v.flags & SvcFlag.WILDCARD:
                wild.add((k.family, vip))
            else:
                fronts[ServiceKey(vip, _ntohs(k.port), Proto(k.proto))] = v
        return fronts, wild

    def table(self, v):
        return [self.maps[MAG].get(s, 0) for s in range(v.table_off, v.table_off + v.table_size)]

    def picture(self):
        """What the maps program, without ids or offsets (these depend on history)."""
        be = self.active_backends()
        name = {bid: (_addr(v.addr, v.family), _ntohs(v.port), v.flags) for bid, v in be.items()}
        fronts, wild = self.frontends()
        by_id = {v.id: key for key, v in fronts.items()}
        members, ranges = {}, {}
        for k, _ in self._rows(MEM):
            members.setdefault(by_id.get(k.svc_id, ("orphan", k.svc_id)), set()).add(name.get(k.backend_id, k.backend_id))
        for k, _ in self._rows(RNG):
            key = by_id.get(k.svc_id, ("orphan", k.svc_id))
            fam = key.family if isinstance(key, ServiceKey) else 4
            net = ipaddress.ip_network((_addr(k.addr, fam), k.prefixlen - 32))
            ranges.setdefault(key, set()).add(net)
        services = {key: (v.flags, v.affinity_timeout, v.table_cap, tuple(name.get(b, b) for b in self.table(v)))
                    for key, v in fronts.items()}
        return {"services": services, "wildcards": wild, "members": members, "ranges": ranges,
                "backends": set(name.values()), "revnat_keys": len(self.maps[REV])}


def diff(got: dict, expected: dict) -> dict:
    """Where two pictures differ, briefly (a Maglev table as its length and backend set)."""
    def brief(v):
        if isinstance(v, tuple) and v and isinstance(v[-1], tuple):
            return v[:-1] + (len(v[-1]), sorted(set(v[-1]), key=str))
        return v
    out = {}
    for section in expected:
        g, e = got[section], expected[section]
        if g == e:
            continue
        if isinstance(e, dict):
            out[section] = {k: (brief(g.get(k)), brief(e.get(k))) for k in set(g) | set(e) if g.get(k) != e.get(k)}
        else:
            out[section] = (g, e)
    return out


def _addr(words, family):
    raw = b"".join(int(w).to_bytes(4, "little") for w in words)
    return ipaddress.IPv4Address(raw[:4]) if family == 4 else ipaddress.IPv6Address(raw)


def _ntohs(v):
    return ((v & 0xFF) << 8) | (v >> 8)


def check_packet_view(fake: FakeMaps, _batch=None) -> None:
    """What a packet may rely on at any moment: a frontend's table names only active
    backends, its VIP has a wildcard entry, and a backend designated to a service (XDP then
    creates no REPLY entry) has the revnat entry tc derives the reply from. After a whole
    batch (``_batch`` None) also: every revnat entry names a frontend."""
    fronts, wild = fake.frontends()
    active = fake.active_backends()
    for key, v in fronts.items():
        assert (key.family, key.vip) in wild, f"{key}: no wildcard entry"
        assert v.table_size in (0, v.table_cap)
        for bid in fake.table(v):
            assert bid in active, f"{key}: a slot names backend {bid}, which is not active"
    revnat = {(v.backend_id, v.svc_id) for _, v in fake._rows(REV)}
    for bid, v in active.items():
        if v.revnat_svc:
            assert (bid, v.revnat_svc) in revnat, f"backend {bid} designated to {v.revnat_svc} without revnat entry"
    if _batch is None:
        ids = {v.id for v in fronts.values()}
        for bid, sid in revnat:
            assert sid in ids and bid in active, f"revnat entry ({bid}, {sid}) names no live frontend/backend"


def svc(vip="10.0.0.1", port=80, backends=(("10.1.0.1", 8080),), **kw) -> Service:
    bes = tuple(b if isinstance(b, Backend) else Backend(*b) for b in backends)
    kw.setdefault("maglev_m", 251)
    return Service(ServiceKey(vip, port), bes, **kw)


def apply_all(p: Planner, fake: FakeMaps, after_each=check_packet_view):
    for changes in p.take_changes():
        fake.apply(changes, after_each=after_each)


def run(p: Planner, fake: FakeMaps, *, upsert=(), delete=(), errors_ok=False):
    errors = p.plan(upsert, delete=delete)
    assert errors_ok or not errors
    apply_all(p, fake)
    check_packet_view(fake)
    return errors


# ---------------------------------------------------------------------------- ids and slots

def test_a_new_service_is_written_backends_first_frontend_last():
    p = planner()
    p.upsert(svc(backends=[("10.1.0.1", 8080), ("10.1.0.2", 8080)], maglev_m=251))
    (changes,) = p.take_changes()
    runs = [(b.map, b.op) for b in changes.batches()]
    assert runs == [(BE, "update"), (MEM, "update"), (MAG, "update"), (SVC, "update")]


def test_service_ids_are_reused_and_backend_ids_stay_stable():
    p, fake = planner(), FakeMaps()
    a, b = svc(port=80), svc(port=81, backends=[("10.1.0.2", 80)])
    run(p, fake, upsert=[a, b])
    ids = {k: p.programmed[k].svc_id for k in (a.key, b.key)}
    be1 = p.backend_ids[(ipaddress.ip_address("10.1.0.1"), 8080)]
    run(p, fake, delete=[a.key])
    c = svc(port=82)
    run(p, fake, upsert=[c])
    assert p.programmed[c.key].svc_id == ids[a.key]        # the freed id is taken again
    assert p.programmed[b.key].svc_id == ids[b.key]
    assert p.backend_ids[(ipaddress.ip_address("10.1.0.1"), 8080)] != 0
    fronts, _ = fake.frontends()
    assert set(fronts) == {b.key, c.key}
    assert be1 > 0


def test_freed_slot_ranges_rest_before_reuse():
    clock = Clock()
    p, fake = planner(clock=clock), FakeMaps()
    a = svc(maglev_m=251)
    run(p, fake, upsert=[a])
    off_a = p.programmed[a.key].table_off
    run(p, fake, delete=[a.key])
    b = svc(port=81, maglev_m=251)
    run(p, fake, upsert=[b])
    assert p.programmed[b.key].table_off != off_a           # still resting: a packet may read it
    clock.t += RangeAllocator.QUARANTINE_S + 0.1
    c = svc(port=82, maglev_m=251)
    run(p, fake, upsert=[c])
    assert p.programmed[c.key].table_off == off_a
    offs = sorted((p.programmed[k].table_off, p.programmed[k].table_cap) for k in (b.key, c.key))
    assert offs[0][0] + offs[0][1] <= offs[1][0]            # no overlap


def test_a_changed_table_size_fills_a_fresh_range_and_swaps():
    p, fake = planner(), FakeMaps()
    a = svc(backends=[("10.1.0.1", 80), ("10.1.0.2", 80)], maglev_m=251)
    run(p, fake, upsert=[a])
    old_off = p.programmed[a.key].table_off
    ch = p.upsert(svc(backends=[("10.1.0.1", 80), ("10.1.0.2", 80)], maglev_m=509))
    apply_all(p, fake)
    assert ch.swapped and ch.slots_written == 509
    v = fake.frontends()[0][a.key]
    assert (v.table_size, v.table_cap) == (509, 509) and v.table_off != old_off


def test_backend_refcounts_keep_a_shared_backend_until_its_last_service_goes():
    p, fake = planner(), FakeMaps()
    shared = ("10.1.0.9", 80)
    a, b = svc(port=80, backends=[shared]), svc(port=81, backends=[shared])
    run(p, fake, upsert=[a, b])
    bid = p.backend_ids[(ipaddress.ip_address("10.1.0.9"), 80)]
    run(p, fake, delete=[a.key])
    assert fake.backend(bid).flags & BackendFlag.ACTIVE
    assert p.take_dead_backends() == ({}, False)
    run(p, fake, delete=[b.key])
    assert fake.backend(bid).flags == 0                     # deactivated: its flows re-balance
    dead, remote = p.take_dead_backends()
    assert dead == {bid: (ipaddress.ip_address("10.1.0.9"), 80)} and remote


def test_a_backend_leaving_a_service_bumps_its_generation_and_drops_its_membership():
    p, fake = planner(), FakeMaps()
    run(p, fake, upsert=[svc(backends=[("10.1.0.1", 80), ("10.1.0.2", 80)], maglev_m=251)])
    key = ServiceKey("10.0.0.1", 80)
    gen0 = fake.frontends()[0][key].backend_gen
    changes_seen = []
    p.upsert(svc(backends=[("10.1.0.1", 80)], maglev_m=251))
    apply_all(p, fake, after_each=lambda f, b: changes_seen.append((b.map, b.op)))
    assert fake.frontends()[0][key].backend_gen == gen0 + 1
    # the membership goes before the frontend entry announces it; the backend is deactivated after
    assert changes_seen.index((MEM, "delete")) < changes_seen.index((SVC, "update")) \
        < changes_seen.index((BE, "update"))
    assert fake.picture()["members"] == {key: {(ipaddress.ip_address("10.1.0.1"), 80, int(BackendFlag.ACTIVE))}}


def test_wildcard_entries_follow_the_vip_not_each_port():
    p, fake = planner(), FakeMaps()
    a, b = svc(port=80), svc(port=443)
    run(p, fake, upsert=[a, b])
    assert fake.frontends()[1] == {(4, ipaddress.ip_address("10.0.0.1"))}
    run(p, fake, delete=[a.key])
    assert fake.frontends()[1] == {(4, ipaddress.ip_address("10.0.0.1"))}
    run(p, fake, delete=[b.key])
    assert fake.maps[SVC] == {}


def test_a_local_backend_gets_a_revnat_entry_for_one_designated_service():
    p, fake = planner(), FakeMaps()
    local = Backend("10.1.0.5", 80, local=True)
    a, b = svc(port=80, backends=[local]), svc(port=81, backends=[local])
    run(p, fake, upsert=[a, b])
    bid = p.backend_ids[(local.addr, 80)]
    assert len(fake.maps[REV]) == 1
    desig = fake.backend(bid).revnat_svc
    assert desig in (p.programmed[a.key].svc_id, p.programmed[b.key].svc_id)
    gone = a.key if desig == p.programmed[a.key].svc_id else b.key
    run(p, fake, delete=[gone])
    other = b.key if gone == a.key else a.key
    assert fake.backend(bid).revnat_svc == p.programmed[other].svc_id   # moved, not lost
    (_, v), = list(fake._rows(REV))
    assert v.svc_id == p.programmed[other].svc_id and v.backend_id == bid


# ---------------------------------------------------------------------------- capacity

def test_a_capacity_overflow_names_the_service_and_writes_nothing_of_it():
    p, fake = planner(Limits(max_services=64, max_backends=64, max_memberships=3, maglev_slots=1 << 14)), FakeMaps()
    ok = svc(port=80, backends=[("10.1.0.1", 80), ("10.1.0.2", 80)])
    big = svc(port=81, backends=[("10.1.0.3", 80), ("10.1.0.4", 80)])
    errors = run(p, fake, upsert=[ok, big], errors_ok=True)
    assert set(errors) == {big.key}
    assert isinstance(errors[big.key], CapacityError) and errors[big.key].what == "memberships"
    assert "10.0.0.1:81/TCP" in str(errors[big.key])
    assert set(fake.frontends()[0]) == {ok.key}
    assert len(fake.active_backends()) == 2                # big's backends were not left behind


def test_maglev_slot_space_exhausted_names_the_service_and_leaves_no_backend():
    p, fake = planner(Limits(max_services=64, max_backends=64, max_memberships=64, maglev_slots=600)), FakeMaps()
    a = svc(port=80, maglev_m=509)
    b = svc(port=81, backends=[("10.1.0.7", 80)], maglev_m=251)
    errors = run(p, fake, upsert=[a, b], errors_ok=True)
    assert set(errors) == {b.key} and errors[b.key].what == "maglev_slots"
    assert "10.0.0.1:81/TCP" in str(errors[b.key])
    assert {_ntohs(v.port) for v in fake.active_backends().values()} == {8080}   # only a's backend
    assert p.take_dead_backends() == ({}, False)            # never active: no conntrack sweep
    assert set(fake.frontends()[0]) == {a.key}


def test_too_many_services_names_the_service():
    p, fake = planner(Limits(max_services=3, max_backends=64, max_memberships=64, maglev_slots=1 << 14)), FakeMaps()
    errors = run(p, fake, upsert=[svc(port=80 + i) for i in range(3)], errors_ok=True)
    assert list(errors) == [ServiceKey("10.0.0.1", 82)] and errors[ServiceKey("10.0.0.1", 82)].what == "services"


# ---------------------------------------------------------------------------- property

VIPS = ("10.0.0.1", "10.0.0.2", "fd00::1")
BACKEND_ADDRS = {4: ("10.1.0.1", "10.1.0.2", "10.1.0.3", "10.1.0.4"), 6: ("fd01::1", "fd01::2", "fd01::3")}
TERMINATING = {("10.1.0.2", 9090), ("fd01::3", 8080)}
RANGES = {4: ("192.0.2.0/24", "198.51.100.0/24"), 6: ("2001:db8::/32",)}


@st.composite
def services(draw):
    vip = draw(st.sampled_from(VIPS))
    fam = ipaddress.ip_address(vip).version
    key = ServiceKey(vip, draw(st.sampled_from((80, 443))), draw(st.sampled_from((Proto.TCP, Proto.UDP))))
    addrs = draw(st.lists(st.sampled_from(BACKEND_ADDRS[fam]), unique=True, max_size=3))
    # local and terminating belong to the endpoint (every service listing it agrees); the
    # weight is per service
    bes = tuple(Backend(a, port, weight=draw(st.sampled_from((0, 1, 2))), local=a.endswith(("1", "3")),
                        terminating=(a, port) in TERMINATING)
                for a in addrs for port in [draw(st.sampled_from((8080, 9090)))])
    mode = draw(st.sampled_from((Mode.SNAT, Mode.DSR)))
    return Service(key, bes, traffic_policy_local=draw(st.booleans()), mode=mode,
                   affinity_timeout=draw(st.sampled_from((0, 30))),
                   source_ranges=tuple(draw(st.lists(st.sampled_from(RANGES[fam]), unique=True, max_size=2))),
                   stateless=mode is Mode.DSR and draw(st.booleans()), maglev_m=draw(st.sampled_from((251, 509))))


ops = st.lists(st.one_of(st.tuples(st.just("upsert"), st.lists(services(), max_size=4)),
                         st.tuples(st.just("delete"), st.integers(0, 11))), min_size=1, max_size=12)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops)
def test_any_sequence_of_changes_leaves_what_planning_from_scratch_writes(sequence):
    clock = Clock()
    p, fake = planner(clock=clock), FakeMaps()
    want: dict[ServiceKey, Service] = {}
    for op, arg in sequence:
        clock.t += 1.0
        if op == "upsert":
            run(p, fake, upsert=arg)
            want.update({s.key: s for s in arg})
        elif want:
            key = sorted(want, key=str)[arg % len(want)]
            run(p, fake, delete=[key])
            del want[key]
    scratch, fresh = planner(), FakeMaps()
    run(scratch, fresh, upsert=list(want.values()))
    got, expected = fake.picture(), fresh.picture()
    assert diff(got, expected) == {}
    assert set(got["services"]) == set(want)
    for key, s in want.items():   # memberships are exactly the listed backends
        assert {(b.addr, b.port) for b in s.backends} == {(a, port) for a, port, _ in got["members"].get(key, ())}
