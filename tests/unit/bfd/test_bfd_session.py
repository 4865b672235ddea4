"""RFC 5880 session rules at the sans-IO level: state machine, timers, jitter, poll sequence."""

from __future__ import annotations

import random

import pytest

from agent.bfd.codec import BfdPacketError, BfdState, ControlPacket, Diag, decode, encode
from agent.bfd.session import SLOW_TX_US, BfdSession, BfdTimers

FAST = BfdTimers(50_000, 50_000, 3)


class Pair:
    """Two sessions wired back to back through the codec; a clock we drive by hand."""

    def __init__(self, a=FAST, b=FAST, seed=1):
        self.now = 0.0
        self.a = BfdSession(a, 1, rng=random.Random(seed))
        self.b = BfdSession(b, 2, rng=random.Random(seed + 1))
        self.links = {"a": True, "b": True}   # a->b, b->a delivery
        self.changes = {"a": [], "b": []}
        self.sent = {"a": [], "b": []}

    def step(self, until: float) -> None:
        while True:
            dl = [d for d in (self.a.next_deadline(), self.b.next_deadline()) if d is not None]
            t = max(min(dl), self.now) if dl else until
            if t > until:
                self.now = until
                return
            self.now = t
            for name, s, other in (("a", self.a, self.b), ("b", self.b, self.a)):
                d = s.next_deadline()
                if d is not None and d <= self.now:
                    s.handle_timer(self.now)
                self._deliver(name, s, other)

    def _deliver(self, name, s, other):
        self.changes[name] += s.events()
        for p in s.packets_to_send():
            self.sent[name].append((self.now, p))
            if self.links[name]:
                other.receive(decode(encode(p)), self.now)
                other_name = "b" if name == "a" else "a"
                self.changes[other_name] += other.events()
                self._deliver(other_name, other, s)


def test_three_way_handshake_comes_up_and_switches_to_fast_timers():
    p = Pair()
    p.step(0.01)
    assert p.a.state is BfdState.UP and p.b.state is BfdState.UP
    assert [c.new for c in p.changes["a"]][:2] in ([BfdState.INIT, BfdState.UP], [BfdState.UP])
    p.step(3.0)
    assert not p.a.polling and not p.b.polling
    assert p.a.tx_interval == pytest.approx(0.05) and p.a.detection_time == pytest.approx(0.15)
    assert p.a.adv_tx == 50_000


def test_slow_rate_while_not_up():
    s = BfdSession(FAST, 9, rng=random.Random(0))
    s.handle_timer(0.0)
    pkts = s.packets_to_send()
    assert len(pkts) == 1 and pkts[0].desired_min_tx == SLOW_TX_US and pkts[0].state is BfdState.DOWN
    assert pkts[0].your_discriminator == 0 and pkts[0].required_min_rx == 50_000
    assert 0.75 <= s.next_deadline() <= 1.0


def test_detection_time_expiry_goes_down_with_diag_1():
    p = Pair()
    p.step(2.0)
    assert p.a.state is BfdState.UP
    p.links["b"] = False
    cut = p.now
    p.step(cut + 1.0)
    down = [c for c in p.changes["a"] if c.new is BfdState.DOWN]
    assert down and down[0].diag is Diag.CONTROL_DETECTION_TIME_EXPIRED and down[0].failed
    assert p.a.last_down is not None and p.a.last_down - cut <= 0.15 + 1e-9
    # §6.8.1: RemoteDiscr is forgotten; a keeps telling b it is Down, with diag 1, slowly.
    assert p.a.state is BfdState.DOWN and p.a.remote_discr == 0
    last = p.sent["a"][-1][1]
    assert last.state is BfdState.DOWN and last.diag == Diag.CONTROL_DETECTION_TIME_EXPIRED
    assert last.your_discriminator == 0 and last.desired_min_tx == SLOW_TX_US


def test_neighbor_signaled_down_and_admin_down_is_not_a_failure():
    p = Pair()
    p.step(2.0)
    p.b.admin_down(p.now)
    p._deliver("b", p.b, p.a)
    ch = [c for c in p.changes["a"] if c.new is BfdState.DOWN][-1]
    assert ch.diag is Diag.NEIGHBOR_SIGNALED_DOWN and ch.peer_admin_down and not ch.failed
    assert p.b.state is BfdState.ADMIN_DOWN and p.b.diag is Diag.ADMINISTRATIVELY_DOWN


def test_up_session_receiving_down_goes_down_diag_3():
    s = BfdSession(FAST, 5)
    s.receive(ControlPacket(BfdState.DOWN, 77), 0.0)
    assert s.state is BfdState.INIT
    s.receive(ControlPacket(BfdState.UP, 77, 5), 0.1)
    assert s.state is BfdState.UP
    s.receive(ControlPacket(BfdState.DOWN, 77, 5), 0.2)
    assert s.state is BfdState.DOWN and s.diag is Diag.NEIGHBOR_SIGNALED_DOWN
    assert [c.failed for c in s.events()] == [False, False, True]


def test_down_session_ignores_up_from_peer():
    s = BfdSession(FAST, 5)
    s.receive(ControlPacket(BfdState.UP, 77, 5), 0.0)
    assert s.state is BfdState.DOWN


def test_wrong_your_discriminator_is_dropped():
    s = BfdSession(FAST, 5)
    with pytest.raises(BfdPacketError):
        s.receive(ControlPacket(BfdState.UP, 77, 6), 0.0)
    assert s.dropped == {"unknown_discriminator": 1} and s.remote_discr == 0


def test_jitter_is_0_to_25_percent_below_interval():
    s = BfdSession(BfdTimers(100_000, 100_000, 3), 5, rng=random.Random(3))
    s.receive(ControlPacket(BfdState.INIT, 77, 5, 100_000, 100_000), 0.0)
    assert s.state is BfdState.UP
    gaps = []
    s.receive(ControlPacket(BfdState.UP, 77, 5, 100_000, 100_000, final=True), 0.0)
    for _ in range(500):
        t = s.next_deadline()
        s.handle_timer(t)
        gaps.append(t)
        s.packets_to_send()
        s.receive(ControlPacket(BfdState.UP, 77, 5, 100_000, 100_000), t)   # the peer stays up
    assert s.state is BfdState.UP
    deltas = [b - a for a, b in zip(gaps, gaps[1:])]
    assert min(deltas) >= 0.075 - 1e-9 and max(deltas) <= 0.1 + 1e-9
    assert max(deltas) - min(deltas) > 0.015   # really random


def test_transmit_interval_is_max_of_ours_and_peers_rx():
    s = BfdSession(FAST, 5)
    s.receive(ControlPacket(BfdState.INIT, 77, 5, 50_000, 300_000), 0.0)
    s.receive(ControlPacket(BfdState.UP, 77, 5, 50_000, 300_000, final=True), 0.0)
    assert s.tx_interval == pytest.approx(0.3)
    assert s.detection_time == pytest.approx(0.15)   # 3 x max(our 50 ms rx, peer's 50 ms tx)


def test_no_periodic_packets_when_peer_rx_is_zero():
    s = BfdSession(FAST, 5)
    s.receive(ControlPacket(BfdState.DOWN, 77, 0, 1_000_000, 0), 0.0)
    s.packets_to_send()
    for t in (1.0, 2.0, 3.0):
        s.handle_timer(t)
    assert s.packets_to_send() == []


def test_poll_is_answered_at_once_with_final():
    s = BfdSession(FAST, 5)
    s.handle_timer(0.0)
    s.packets_to_send()
    s.receive(ControlPacket(BfdState.DOWN, 77, 0, poll=True), 0.2)
    out = s.packets_to_send()   # queued by receive() itself, not by the TX timer
    assert [p.final for p in out] == [True] and not out[0].poll and out[0].your_discriminator == 77


def test_poll_sequence_on_timer_change_while_up():
    p = Pair()
    p.step(3.0)
    p.a.set_timers(BfdTimers(300_000, 300_000, 3), p.now)
    assert p.a.polling
    # Larger tx is not used until the Final arrives (§6.8.3).
    assert p.a.tx_interval == pytest.approx(0.05)
    p.step(p.now + 1.0)
    assert not p.a.polling and p.a.tx_interval == pytest.approx(0.3)
    assert any(pkt.poll for _, pkt in p.sent["a"]) and any(pkt.final for _, pkt in p.sent["b"])
    assert p.b.detection_time == pytest.approx(0.9)
    assert p.a.state is BfdState.UP and p.b.state is BfdState.UP
    assert all(c.new is not BfdState.DOWN for c in p.changes["a"] + p.changes["b"])


def test_reduced_rx_keeps_old_detection_time_until_final():
    s = BfdSession(BfdTimers(300_000, 300_000, 3), 5)
    s.receive(ControlPacket(BfdState.INIT, 77, 5, 50_000, 50_000), 0.0)
    s.receive(ControlPacket(BfdState.UP, 77, 5, 50_000, 50_000, final=True), 0.0)
    assert s.detection_time == pytest.approx(0.9)
    s.set_timers(BfdTimers(300_000, 50_000, 3), 1.0)
    assert s.polling and s.detection_time == pytest.approx(0.9)
    s.receive(ControlPacket(BfdState.UP, 77, 5, 50_000, 50_000, final=True), 1.01)
    assert not s.polling and s.detection_time == pytest.approx(0.15)


def test_change_during_poll_waits_for_the_next_poll():
    s = BfdSession(FAST, 5)
    s.receive(ControlPacket(BfdState.INIT, 77, 5, 50_000, 50_000), 0.0)
    assert s.polling   # going Up: the slow -> fast poll
    s.set_timers(BfdTimers(100_000, 100_000, 3), 0.01)
    assert s.adv_tx == 50_000
    s.receive(ControlPacket(BfdState.UP, 77, 5, 50_000, 50_000, final=True), 0.02)
    assert s.polling and s.adv_tx == 100_000


def test_passive_waits_for_the_peer():
    s = BfdSession(BfdTimers(50_000, 50_000, 3, passive=True), 5)
    assert s.next_deadline() is None
    s.receive(ControlPacket(BfdState.DOWN, 77), 0.0)
    s.handle_timer(0.0)
    assert s.packets_to_send()[0].state is BfdState.INIT


def test_admin_down_session_ignores_everything():
    s = BfdSession(FAST, 5)
    s.admin_down(0.0)
    s.receive(ControlPacket(BfdState.DOWN, 77), 0.1)
    assert s.state is BfdState.ADMIN_DOWN
    assert s.packets_to_send()[0].diag == Diag.ADMINISTRATIVELY_DOWN


@pytest.mark.parametrize("kw", [dict(desired_min_tx=1000), dict(required_min_rx=61_000_000),
                                dict(detect_mult=1), dict(detect_mult=256)])
def test_timer_limits(kw):
    with pytest.raises(ValueError):
        BfdTimers(**({"desired_min_tx": 50_000, "required_min_rx": 50_000, "detect_mult": 3} | kw))


def test_no_false_down_over_a_long_run_with_jitter():
    p = Pair(seed=11)
    p.step(120.0)
    assert all(c.new is not BfdState.DOWN for c in p.changes["a"] + p.changes["b"])
    assert p.a.up_transitions == 1 and p.b.up_transitions == 1


def _session_in(state: BfdState) -> BfdSession:
    s = BfdSession(FAST, 5)
    if state in (BfdState.INIT, BfdState.UP):
        s.receive(ControlPacket(BfdState.DOWN, 77), 0.0)
    if state is BfdState.UP:
        s.receive(ControlPacket(BfdState.UP, 77, 5), 0.0)
    assert s.state is state
    s.events()
    return s


D, A, I, U = BfdState.DOWN, BfdState.ADMIN_DOWN, BfdState.INIT, BfdState.UP


@pytest.mark.parametrize("local,remote,expected,diag", [
    # RFC 5880 §6.2 diagram / §6.8.6, every (local, received) pair
    (D, A, D, Diag.NONE), (D, D, I, Diag.NONE), (D, I, U, Diag.NONE), (D, U, D, Diag.NONE),
    (I, A, D, Diag.NEIGHBOR_SIGNALED_DOWN), (I, D, I, Diag.NONE), (I, I, U, Diag.NONE), (I, U, U, Diag.NONE),
    (U, A, D, Diag.NEIGHBOR_SIGNALED_DOWN), (U, D, D, Diag.NEIGHBOR_SIGNALED_DOWN), (U, I, U, Diag.NONE),
    (U, U, U, Diag.NONE),
])
def test_state_table(local, remote, expected, diag):
    s = _session_in(local)
    s.receive(ControlPacket(remote, 77, 5 if remote in (I, U) else 0), 1.0)
    assert s.state is expected and s.diag is diag
    changes = s.events()
    assert (changes[-1].new if changes else local) is expected
    if local is U and expected is D:
        assert changes[-1].failed is (remote is D)   # AdminDown from the peer is not a failure
