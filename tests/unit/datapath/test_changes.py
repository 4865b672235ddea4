"""The datapath's map changes as data (agent/datapath/changes.py) and the loader child's map
fd relocation (agent/datapath/child.py): pure, no kernel."""

import struct

from agent.datapath.changes import MapChanges, Phase
from agent.datapath.child import map_references, patch_map_fds


def runs(changes):
    return [(b.map, b.op, list(b.keys), None if b.values is None else list(b.values)) for b in changes.batches()]


def test_writes_of_many_services_come_out_grouped_by_phase_in_a_safe_order():
    c = MapChanges()
    # recorded service by service, as Datapath programs them
    for i in (1, 2):
        c.put(Phase.BACKENDS, "backends_v2", bytes([i]), b"be%d" % i)
        c.put(Phase.MEMBERS, "svc_backends_v1", bytes([i, i]), b"\1")
        c.slots("maglev_v1", 10 * i, [i] * 3)
        c.put(Phase.FRONTENDS, "services_v2", bytes([i]), b"svc%d" % i)
    c.delete(Phase.CLEANUP, "services_v2", b"\\9")
    assert runs(c) == [
        ("backends_v2", "update", [b"\1", b"\2"], [b"be1", b"be2"]),        # backends before slots name them
        ("svc_backends_v1", "update", [b"\1\1", b"\2\2"], [b"\1", b"\1"]),
        ("maglev_v1", "update", [10, 11, 12, 20, 21, 22], [1, 1, 1, 2, 2, 2]),  # tables before frontends
        ("services_v2", "update", [b"\1", b"\2"], [b"svc1", b"svc2"]),
        ("services_v2", "delete", [b"\\9"], None),                             # clean-ups last
    ]
    assert len(c) == 2 + 2 + 6 + 2 + 1


def test_a_key_written_twice_keeps_only_its_last_write_in_that_writes_phase():
    c = MapChanges()
    c.put(Phase.FRONTENDS, "services_v2", b"k", b"v1")
    c.delete(Phase.CLEANUP, "services_v2", b"k")          # deleted later in the batch ...
    c.put(Phase.BACKENDS, "backends_v2", b"\5", b"\0")
    c.put(Phase.CLEANUP, "backends_v2", b"\5", b"dead")   # ... deactivated, then reused
    c.put(Phase.BACKENDS, "backends_v2", b"\5", b"live")
    assert runs(c) == [("backends_v2", "update", [b"\5"], [b"live"]), ("services_v2", "delete", [b"k"], None)]


def test_scattered_slot_writes_keep_their_order():
    c = MapChanges()
    c.slot_items("maglev_v1", [(7, 1), (3, 2)])
    c.slot_items("maglev_v1", [(7, 9)])                   # the later write of slot 7 is applied last
    assert runs(c) == [("maglev_v1", "update", [7, 3, 7], [1, 2, 9])]


INSN = struct.Struct("<BBhi")


def insn(op, regs=0, imm=0):
    return INSN.pack(op, regs, 0, imm)


def test_only_map_references_are_relocated_to_the_real_maps():
    code = b"".join([
        insn(0x18, regs=(1 << 4) | 1, imm=5), insn(0),      # r1 = map fd 5 (ld_imm64, pseudo map fd)
        insn(0x18, regs=(2 << 4) | 2, imm=6), insn(0),      # r2 = value of map fd 6 (pseudo map value)
        insn(0x18, regs=1, imm=5), insn(0),                 # r1 = the constant 5: not a map
        insn(0xB7, regs=1, imm=5),                          # mov r1, 5
        insn(0x95),                                         # exit
    ])
    refs = map_references(code)
    assert refs == [(0, 5), (2, 6)]
    out = patch_map_fds(code, {0: 50, 2: 60})
    imms = [INSN.unpack_from(out, i)[3] for i in range(0, len(out), 8)]
    assert imms == [50, 0, 60, 0, 5, 0, 5, 0]
    assert patch_map_fds(code, {}) == code


def test_a_long_batch_hands_over_its_early_phases_and_keeps_the_rest_in_order():
    c = MapChanges()
    c.put(Phase.BACKENDS, "backends_v2", b"\1", b"be1")
    c.slots("maglev_v1", 0, [1, 1])
    c.put(Phase.FRONTENDS, "services_v2", b"s1", b"svc1")
    c.put(Phase.CLEANUP, "backends_v2", b"\2", b"dead")
    early = c.take_through(Phase.SLOTS)
    assert runs(early) == [("backends_v2", "update", [b"\1"], [b"be1"]), ("maglev_v1", "update", [0, 1], [1, 1])]
    c.put(Phase.BACKENDS, "backends_v2", b"\1", b"be1'")   # written again after the hand-over: a later write
    assert runs(c) == [("backends_v2", "update", [b"\1"], [b"be1'"]),
                       ("services_v2", "update", [b"s1"], [b"svc1"]),
                       ("backends_v2", "update", [b"\2"], [b"dead"])]
    assert c.pending_slots == 0 and len(early) == 3
