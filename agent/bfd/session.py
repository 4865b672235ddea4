"""One BFD session (RFC 5880, asynchronous mode, single hop), sans-IO.

Time and received packets go in; packets to send, state changes and the next deadline come
out. No sockets, no asyncio: :mod:`agent.bfd.transport` owns those.

Theory of operation (section numbers are RFC 5880):

* State machine (§6.2, §6.8.6): Down -> Init on a Down packet, Down/Init -> Up on Init/Up,
  Up -> Down on a Down packet (diag 3 Neighbor Signaled Down), any -> Down when the peer says
  AdminDown (diag 3), Init/Up -> Down when the detection time passes (diag 1).
* Slow start (§6.8.3): while not Up we advertise DesiredMinTx = 1 s whatever is configured;
  on reaching Up the configured values take effect through a Poll sequence, as FRR bfdd does.
* Poll sequence (§6.5, §6.8.3): a timer change while Up sets P in every packet until the
  peer answers F. A larger DesiredMinTx is used for sending only after the F; a smaller
  RequiredMinRx shortens the detection time only after the F. A change during a running
  poll waits for the next one. A received P is answered at once with an F packet.
* Transmit interval (§6.8.2, §6.8.7): max(DesiredMinTx, peer's RequiredMinRx) minus 0–25 %
  jitter; nothing is sent while the peer's RequiredMinRx is 0,
  nor in passive mode before the peer has been heard (§6.1).
* Detection time (§6.8.4): peer's DetectMult × max(our RequiredMinRx, peer's DesiredMinTx).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from agent.bfd.codec import BfdPacketError, BfdState, ControlPacket, Diag

__all__ = ["BfdTimers", "BfdSession", "StateChange", "SLOW_TX_US"]

SLOW_TX_US = 1_000_000   # §6.8.3: at least one second while the session is not Up


@dataclass(frozen=True)
class BfdTimers:
    """Configured timers, in microseconds (MetalLB BFDProfile naming, in ms, maps onto this)."""
    desired_min_tx: int = 300_000
    required_min_rx: int = 300_000
    detect_mult: int = 3
    passive: bool = False

    def __post_init__(self):
        limits = (("transmitInterval", self.desired_min_tx // 1000, 10, 60_000, " ms"),
                  ("receiveInterval", self.required_min_rx // 1000, 10, 60_000, " ms"),
                  ("detectMultiplier", self.detect_mult, 2, 255, ""))
        for name, value, low, high, unit in limits:
            if not low <= value <= high:
                raise ValueError(f"{name} {value}{unit}: must be {low}..{high}{unit}")


@dataclass(frozen=True)
class StateChange:
    old: BfdState
    new: BfdState
    diag: Diag
    # RFC 5882 §3.2: the peer said AdminDown; not a path failure, so clients keep their sessions.
    peer_admin_down: bool = False

    @property
    def failed(self) -> bool:
        """Up -> Down that means the path (or the peer) failed: clients must react at once."""
        return self.old is BfdState.UP and self.new is BfdState.DOWN and not self.peer_admin_down


class BfdSession:
    """See the module docstring. One owner calls it; not thread-safe."""

    def __init__(self, timers: BfdTimers, local_discriminator: int, *, rng: random.Random | None = None,
                 now: float = 0.0) -> None:
        if not 0 < local_discriminator < 2 ** 32:
            raise ValueError("local discriminator must be 1..2^32-1")
        self.timers = timers
        self.local_discr = local_discriminator
        self._rng = rng or random.Random()
        self.state = BfdState.DOWN
        self.diag = Diag.NONE
        self.remote_discr = 0
        self.remote_state = BfdState.DOWN
        self.remote_min_rx = 1          # µs; §6.8.1 initial value 1
        self.remote_desired_tx = 0      # µs, last received DesiredMinTx
        self.remote_detect_mult = 0
        # What we advertise now, and what governs our sending / detection (may lag, §6.8.3).
        self.adv_tx = SLOW_TX_US
        self.adv_rx = timers.required_min_rx
        self._tx_in_effect = SLOW_TX_US
        self._rx_in_effect = timers.required_min_rx
        self.polling = False
        self._poll_pending = False
        self._answer_final = False
        self._next_tx: float | None = None if timers.passive else now
        self._detect_at: float | None = None
        self.rx_packets = 0
        self.tx_packets = 0
        self.dropped: dict[str, int] = {}
        self.up_transitions = 0
        self.down_transitions = 0
        self.last_up: float | None = None
        self.last_down: float | None = None
        self.last_down_diag = Diag.NONE
        self.remote_diag = Diag.NONE
        self._events: list[StateChange] = []
        self._out: list[ControlPacket] = []

    # ------------------------------------------------------------------ public API

    @property
    def detection_time(self) -> float:
        """Seconds (§6.8.4, asynchronous mode)."""
        return self.remote_detect_mult * max(self._rx_in_effect, self.remote_desired_tx) / 1e6

    @property
    def tx_interval(self) -> float:
        """Seconds, before jitter."""
        return max(self._tx_in_effect, self.remote_min_rx) / 1e6

    def next_deadline(self) -> float | None:
        ts = [t for t in (self._next_tx, self._detect_at) if t is not None]
        if self._answer_final:
            return 0.0
        return min(ts) if ts else None

    def packets_to_send(self) -> list[ControlPacket]:
        out, self._out = self._out, []
        self.tx_packets += len(out)
        return out

    def events(self) -> list[StateChange]:
        ev, self._events = self._events, []
        return ev

    def drop(self, reason: str) -> None:
        """Count a packet the transport or codec discarded for this session."""
        self.dropped[reason] = self.dropped.get(reason, 0) + 1

    def set_timers(self, timers: BfdTimers, now: float) -> None:
        """Change the configured timers; while Up through a Poll sequence (§6.8.3)."""
        self.timers = timers
        if timers.passive and self.remote_discr == 0:
            self._next_tx = None
        elif self._next_tx is None:
            self._next_tx = now
        if self.state is not BfdState.UP:
            self.adv_rx = self._rx_in_effect = timers.required_min_rx
            return
        self._start_poll(now)

    def admin_down(self, now: float) -> None:
        """Local AdminDown (§6.8.16): tell the peer with diag 7, stop detecting."""
        self._change(BfdState.ADMIN_DOWN, Diag.ADMINISTRATIVELY_DOWN, now)
        self._detect_at = None
        self._queue(now)

    def receive(self, p: ControlPacket, now: float) -> None:
        """A packet that passed :func:`agent.bfd.codec.decode` and was addressed to us."""
        if p.your_discriminator not in (0, self.local_discr):
            self.drop("unknown_discriminator")
            raise BfdPacketError("unknown_discriminator", f"Your Discriminator {p.your_discriminator} "
                                 f"is not this session's {self.local_discr}")
        self.rx_packets += 1
        self.remote_discr = p.my_discriminator
        self.remote_state = p.state
        self.remote_diag = Diag(p.diag) if p.diag in Diag._value2member_map_ else Diag.NONE
        self.remote_min_rx = p.required_min_rx
        self.remote_desired_tx = p.desired_min_tx
        self.remote_detect_mult = p.detect_mult
        if self.polling and p.final:
            self._finish_poll(now)
        if self.state is BfdState.ADMIN_DOWN:
            return
        if p.state is BfdState.ADMIN_DOWN:
            if self.state is not BfdState.DOWN:
                self._change(BfdState.DOWN, Diag.NEIGHBOR_SIGNALED_DOWN, now)
        elif self.state is BfdState.DOWN:
            if p.state is BfdState.DOWN:
                self._change(BfdState.INIT, Diag.NONE, now)
            elif p.state is BfdState.INIT:
                self._change(BfdState.UP, Diag.NONE, now)
        elif self.state is BfdState.INIT:
            if p.state in (BfdState.INIT, BfdState.UP):
                self._change(BfdState.UP, Diag.NONE, now)
        elif p.state is BfdState.DOWN:   # we are Up
            self._change(BfdState.DOWN, Diag.NEIGHBOR_SIGNALED_DOWN, now)
        self._detect_at = now + self.detection_time if self.detection_time > 0 else None
        if p.poll:
            self._answer_final = True    # §6.5: answer a Poll at once, not on the TX timer
        if self._next_tx is None and not (self.timers.passive and self.remote_discr == 0):
            self._next_tx = now          # passive role: start sending once the peer is heard
        elif self._next_tx is not None and self._next_tx > now + self._jittered():
            self._next_tx = now + self._jittered()   # the peer asked for a faster rate
        self._flush_final(now)

    def handle_timer(self, now: float) -> None:
        if self._detect_at is not None and now >= self._detect_at:
            self._detect_at = None
            if self.state in (BfdState.INIT, BfdState.UP):
                self._change(BfdState.DOWN, Diag.CONTROL_DETECTION_TIME_EXPIRED, now)
            self.remote_discr = 0   # §6.8.1
        self._flush_final(now)
        if self._next_tx is not None and now >= self._next_tx:
            self._queue(now)
            self._next_tx = now + self._jittered()

    # ------------------------------------------------------------------ internals

    def _flush_final(self, now: float) -> None:
        if self._answer_final:
            self._answer_final = False
            self._queue(now, final=True)

    def _jittered(self) -> float:
        """§6.8.7: 0–25 % less than the interval. (The 10–25 % rule for DetectMult 1 does not
        arise: BfdTimers requires at least 2, as MetalLB and FRR do.)"""
        return self.tx_interval * self._rng.uniform(0.75, 1.0)

    def _queue(self, now: float, *, final: bool = False) -> None:
        if self.remote_min_rx == 0 and not final:
            return   # §6.8.7: the peer asked us not to send periodic packets
        self._out.append(ControlPacket(
            state=self.state, my_discriminator=self.local_discr, your_discriminator=self.remote_discr,
            desired_min_tx=self.adv_tx, required_min_rx=self.adv_rx, required_min_echo_rx=0,
            detect_mult=self.timers.detect_mult, diag=self.diag, poll=self.polling and not final,
            final=final))

    def _start_poll(self, now: float) -> None:
        if self.polling:
            self._poll_pending = True
            return
        want_tx = self.timers.desired_min_tx if self.state is BfdState.UP else SLOW_TX_US
        want_rx = self.timers.required_min_rx
        if (want_tx, want_rx) == (self.adv_tx, self.adv_rx):
            return
        # Faster sending / slower detection may start now; the others wait for the F (§6.8.3).
        if want_tx < self._tx_in_effect:
            self._tx_in_effect = want_tx
        if want_rx > self._rx_in_effect:
            self._rx_in_effect = want_rx
            if self._detect_at is not None:
                self._detect_at = max(self._detect_at, now + self.detection_time)
        self.adv_tx, self.adv_rx = want_tx, want_rx
        self.polling = True
        self._next_tx = now   # the first P packet goes out at once

    def _finish_poll(self, now: float) -> None:
        self.polling = False
        self._tx_in_effect, self._rx_in_effect = self.adv_tx, self.adv_rx
        if self._poll_pending:
            self._poll_pending = False
            self._start_poll(now)

    def _change(self, new: BfdState, diag: Diag, now: float) -> None:
        old = self.state
        if new is old:
            return
        self.state = new
        self.diag = diag
        if new is BfdState.UP:
            self.up_transitions += 1
            self.last_up = now
            self.diag = Diag.NONE
            self._start_poll(now)     # leave the 1 s slow rate (§6.8.3)
        elif old is BfdState.UP or new in (BfdState.DOWN, BfdState.ADMIN_DOWN):
            if old is BfdState.UP:
                self.down_transitions += 1
                self.last_down = now
                self.last_down_diag = diag
            # Back to the slow rate at once; no poll needed while not Up.
            self.polling = self._poll_pending = False
            self.adv_tx = self._tx_in_effect = SLOW_TX_US
            self.adv_rx = self._rx_in_effect = self.timers.required_min_rx
        self._events.append(StateChange(old, new, diag, self.remote_state is BfdState.ADMIN_DOWN))
        self._next_tx = now if self._next_tx is not None else None   # tell the peer now
