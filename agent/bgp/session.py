"""One BGP session, sans-IO: bytes and time in; bytes, events and deadlines out.

A :class:`Session` is one peering attempt chain with one neighbor: it runs the RFC 4271 FSM
(:mod:`agent.bgp.fsm`) over whatever TCP connection the adapter hands it. It never touches a
socket or a clock (h2 push API + aioquic timers)::

    events = s.start(now)                      # -> [StateChanged, ConnectRequested]
    events = s.connection_made(now, local, remote, outgoing=True)
    events = s.receive_data(data, now)         # may raise BgpProtocolError (NOTIFICATION queued)
    wire   = s.data_to_send()                  # bytes for the transport
    when   = s.next_deadline()                 # call handle_timer(now) at that time
    events = s.handle_timer(now)

Errors: every public method either returns events or raises :class:`BgpProtocolError` after
having queued the NOTIFICATION (if a connection exists), moved to IDLE and scheduled the
automatic restart; ``err.events`` holds the events produced on the way. The adapter flushes
``data_to_send()`` and then closes the TCP connection when it sees :class:`CloseConnection`.

The Adj-RIB-Out (``rib_out``: one :class:`AdjRibOut` per family) belongs to the neighbor and is
shared with any other Session of the same neighbor (collision); the Adj-RIB-In is per Session.
"""

from __future__ import annotations

import random
from collections import deque
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv6Address, ip_address
from typing import Iterator

from agent.bgp.codec import (
    KEEPALIVE_BYTES, MAX_EXTENDED_MESSAGE_SIZE, MAX_MESSAGE_SIZE, MessageReader, encode,
)
from agent.bgp.errors import BgpProtocolError, ErrorCode as E, describe_notification
from agent.bgp.fsm import TRANSITIONS, Event as Ev, State, transition
from agent.bgp.messages import (
    AS_TRANS, As4Path, AsPath, ClusterList, EnhancedRouteRefreshCap, ExtendedMessage,
    ExtendedNextHop, Family, FourOctetAs, GracefulRestart, Keepalive, LocalPref, MpReach, MpUnreach,
    MultiProtocol, NextHop, Notification, Open, OriginAttr, OriginatorId, RouteRefresh,
    RouteRefreshCap, UnknownCapability, Update,
)
from agent.bgp.rib import AdjRibIn, AdjRibOut, UpdateEncoder, end_of_rib

__all__ = [
    "Session", "SessionConfig", "SessionEvent", "StateChanged", "ConnectRequested", "CloseConnection",
    "ConnectFailed", "OpenReceived", "SessionEstablished", "SessionDown", "UpdateReceived",
    "UpdateErrorHandled", "EndOfRibReceived", "RouteRefreshReceived", "RoutesNotSent", "capability_name",
    "OPEN_SENT_HOLD_TIME", "IDLE_HOLD_TIME",
]

OPEN_SENT_HOLD_TIME = 240  # RFC 4271 §8.2.2: "large value" while waiting for the peer's OPEN
IDLE_HOLD_TIME = 5.0  # first retry after a connection failed before Established (RFC 4271 §8.1.1)
_CONNECTED = (State.OPEN_SENT, State.OPEN_CONFIRM, State.ESTABLISHED)
_FAMILIES = {f.value: f for f in Family}


@dataclass(frozen=True)
class SessionConfig:
    local_asn: int
    router_id: str
    peer_asn: int = 0  # 0: accept any ASN and learn it from the OPEN
    hold_time: int = 90
    keepalive: int = 30
    connect_retry: float = 120.0
    passive: bool = False
    families: tuple[Family, ...] = (Family.IPV4_UNICAST, Family.IPV6_UNICAST)
    graceful_restart: bool = False
    restart_time: int = 120
    extended_messages: bool = True  # RFC 8654 offered; used only when both sides offer it
    connect_timeout: float | None = None  # None: min(connect_retry, 30)

    def __post_init__(self):
        if not (1 <= self.local_asn <= 0xFFFFFFFF) or not (0 <= self.peer_asn <= 0xFFFFFFFF):
            raise ValueError("ASNs must be in 1..4294967295 (peer 0 = any)")
        if self.hold_time in (1, 2) or not (0 <= self.hold_time <= 65535):
            raise ValueError(f"hold_time must be 0 or 3..65535, got {self.hold_time}")
        if self.keepalive < 0 or self.connect_retry <= 0:
            raise ValueError("keepalive must be >= 0 and connect_retry > 0")
        if not (0 <= self.restart_time <= 4095):
            raise ValueError("restart_time must be 0..4095")
        if IPv4Address(self.router_id) == IPv4Address(0):
            raise ValueError("router_id must not be 0.0.0.0")


# --------------------------------------------------------------------------- events

class SessionEvent:
    __slots__ = ()


@dataclass(frozen=True, slots=True)
class StateChanged(SessionEvent):
    old: State
    new: State


@dataclass(frozen=True, slots=True)
class ConnectRequested(SessionEvent):
    """Open a TCP connection to the peer; report with connection_made / connection_failed."""

    attempt: int
    timeout: float


@dataclass(frozen=True, slots=True)
class CloseConnection(SessionEvent):
    """Flush data_to_send() and close the TCP connection (or abandon the connect attempt).
    ``until_peer_closes``: send FIN and keep reading until the peer closes its side (graceful
    restart): a peer that answered our FIN has seen the close, so it is in graceful-restart
    helper mode before anything we signal next (BFD AdminDown) can reach it."""

    reason: str
    until_peer_closes: bool = False


@dataclass(frozen=True, slots=True)
class ConnectFailed(SessionEvent):
    reason: str
    timed_out: bool
    retry_in: float


@dataclass(frozen=True, slots=True)
class OpenReceived(SessionEvent):
    open: Open
    peer_asn: int
    router_id: IPv4Address


@dataclass(frozen=True, slots=True)
class SessionEstablished(SessionEvent):
    hold_time: int
    keepalive: int
    families: tuple[Family, ...]


@dataclass(frozen=True, slots=True)
class SessionDown(SessionEvent):
    reason: str
    sent: Notification | None = None
    received: Notification | None = None
    was_established: bool = False
    retry_in: float | None = None


@dataclass(frozen=True, slots=True)
class UpdateReceived(SessionEvent):
    family: Family
    announced: int
    withdrawn: int
    rejected: int = 0


@dataclass(frozen=True, slots=True)
class UpdateErrorHandled(SessionEvent):
    """RFC 7606 handling that kept the session up: action is treat-as-withdraw or attribute-discard."""

    action: str
    reason: str


@dataclass(frozen=True, slots=True)
class EndOfRibReceived(SessionEvent):
    family: Family


@dataclass(frozen=True, slots=True)
class RoutesNotSent(SessionEvent):
    """Prefixes of ``family`` in the Adj-RIB-Out cannot be sent on this session (e.g. IPv4
    over an IPv6 session whose peer did not offer extended next hop, RFC 8950): why, for people."""

    family: Family
    reason: str


@dataclass(frozen=True, slots=True)
class RouteRefreshReceived(SessionEvent):
    family: Family
    subtype: int


def capability_name(c) -> str:
    if isinstance(c, MultiProtocol):
        f = _FAMILIES.get((c.afi, c.safi))
        return f"multiprotocol({f.short if f else f'{c.afi}/{c.safi}'})"
    if isinstance(c, RouteRefreshCap):
        return "route-refresh"
    if isinstance(c, EnhancedRouteRefreshCap):
        return "enhanced-route-refresh"
    if isinstance(c, FourOctetAs):
        return f"4-octet-as({c.asn})"
    if isinstance(c, ExtendedMessage):
        return "extended-message"
    if isinstance(c, ExtendedNextHop):
        return "extended-nexthop(" + ",".join(f"{a}/{s}/{n}" for a, s, n in c.entries) + ")"
    if isinstance(c, GracefulRestart):
        bits = ("R," if c.restart_state else "") + ("N," if c.notification else "")
        fams = ",".join(f"{a}/{s}" + (":F" if fw else "") for a, s, fw in c.families)
        return f"graceful-restart({bits}time={c.restart_time}" + (f",{fams}" if fams else "") + ")"
    if isinstance(c, UnknownCapability):
        return f"unknown({c.code})"
    return type(c).__name__  # pragma: no cover


# --------------------------------------------------------------------------- session

class Session:
    """See the module docstring. Not thread-safe; one owner (the adapter) calls it."""

    def __init__(self, config: SessionConfig, rib_out: dict[Family, AdjRibOut] | None = None, *,
                 rng: random.Random | None = None, restarting: bool = True) -> None:
        self.config = config
        self.rib_out = rib_out if rib_out is not None else {f: AdjRibOut() for f in Family}
        for f in Family:
            self.rib_out.setdefault(f, AdjRibOut())
        self.rib_in: dict[Family, AdjRibIn] = {f: AdjRibIn() for f in Family}
        self._rng = rng or random.Random()
        self.state = State.IDLE
        self.admin_down = True
        # R bit (RFC 4724): set in OPENs until the first session reaches Established.
        self._restarting = restarting
        self._reader = MessageReader(nlri_keys=True)
        self._out: list[bytes] = []
        self._bulk: deque[Iterator[bytes]] = deque()
        self._events: list[SessionEvent] = []
        self._t_idle_hold: float | None = None
        self._t_connect: float | None = None
        self._t_hold: float | None = None
        self._t_keepalive: float | None = None
        self.failures = 0
        self.connect_attempt = 0
        self._stop_notification: Notification | None = None
        self._error: BgpProtocolError | None = None
        self._fail_reason = ""
        self._received_notification: Notification | None = None
        self._message = None
        self._now = 0.0
        self._reset_connection_state()
        self.last_error: str | None = None
        self.established_at: float | None = None
        # RFC 4724 §2: End-of-RIB follows the *initial* table. While the owner's table is not
        # complete yet (vipd starts its sessions while the datapath loads; VIPs follow), the
        # marker waits for release_end_of_rib(): a graceful-restart peer keeps its stale routes.
        self.hold_end_of_rib = False
        self._eor_held = False

    def _reset_connection_state(self) -> None:
        self.local_address: str | None = None
        self.remote_address: str | None = None
        self.link_local: str | None = None
        self.outgoing: bool | None = None
        self.sent_open: Open | None = None
        self.remote_open: Open | None = None
        self.peer_asn: int | None = None
        self.remote_router_id: IPv4Address | None = None
        self.ibgp: bool | None = None
        self.hold_time: int | None = None
        self.keepalive_time: int | None = None
        self.families: tuple[Family, ...] = ()
        self.four_octet_as = True
        self.extended_messages = False
        self.enhanced_refresh = False
        self.extended_next_hop = False
        self.peer_graceful_restart: GracefulRestart | None = None
        self.encoder: UpdateEncoder | None = None
        self._unsent_reported: set[Family] = set()

    # ------------------------------------------------------------------ public API

    def start(self, now: float, *, passive: bool | None = None) -> list[SessionEvent]:
        """ManualStart (active) or ManualStart_with_PassiveTcpEstablishment (passive peers, or
        ``passive=True``: a session created only to take an incoming connection)."""
        self.admin_down = False
        self._stop_notification = None
        passive = self.config.passive if passive is None else passive
        ev = Ev.MANUAL_START_PASSIVE if passive else Ev.MANUAL_START
        return self._run(lambda: self._fire(ev, now), now)

    def stop(self, now: float, *, notify: bool = True, subcode: int = E.ADMINISTRATIVE_SHUTDOWN,
             data: bytes = b"") -> list[SessionEvent]:
        """ManualStop. ``notify=False``: close without NOTIFICATION (graceful restart)."""
        self.admin_down = True
        self._t_idle_hold = None
        self._stop_notification = self._cease(subcode, data)
        return self._run(lambda: self._fire(Ev.MANUAL_STOP if notify else Ev.GRACEFUL_STOP, now), now)

    def connection_made(self, now: float, local_address: str, remote_address: str, *, outgoing: bool,
                        link_local: str | None = None) -> list[SessionEvent]:
        """TCP is up (Tcp_CR_Acked if we connected, TcpConnectionConfirmed if we accepted).
        ``link_local``: our IPv6 link-local address on the interface towards a directly
        connected peer (added to IPv6 next hops), else None."""

        def go():
            if self.state is State.IDLE and not self.admin_down:
                self._fire(Ev.AUTOMATIC_START_PASSIVE, now)  # accept while waiting to restart
            self.local_address, self.remote_address = str(ip_address(local_address)), str(ip_address(remote_address))
            self.link_local, self.outgoing = link_local, outgoing
            self._fire(Ev.TCP_CR_ACKED if outgoing else Ev.TCP_CONNECTION_CONFIRMED, now)
        return self._run(go, now)

    def connection_failed(self, now: float, reason: str = "connection closed") -> list[SessionEvent]:
        """TcpConnectionFails: the connect attempt failed, or the connection was lost."""
        self._fail_reason = reason
        return self._run(lambda: self._fire(Ev.TCP_CONNECTION_FAILS, now), now)

    def bfd_down(self, now: float, diagnostic: str) -> list[SessionEvent]:
        """The BFD session protecting this peer went from Up to Down (RFC 5882 §4.3): close at
        once with Cease/BFD Down (RFC 9384) instead of waiting for the hold timer; the normal
        automatic restart follows. A session that is not connected is left alone."""

        def go():
            if self.state in _CONNECTED:
                old = self.state
                self._close(f"BFD down ({diagnostic})", sent=Notification(E.CEASE, E.BFD_DOWN))
                self.state = State.IDLE
                self._events.append(StateChanged(old, State.IDLE))
        return self._run(go, now)

    def collision_dump(self, now: float) -> list[SessionEvent]:
        """OpenCollisionDump (RFC 4271 §6.8): this connection lost the collision; Cease 6/7."""
        self.admin_down = True
        return self._run(lambda: self._fire(Ev.OPEN_COLLISION_DUMP, now), now)

    def soft_reset(self, now: float) -> list[SessionEvent]:
        """Operator soft reset (``vipctl bgp reset --soft``), the session stays up: re-send the
        whole Adj-RIB-Out (outbound, as if the peer had sent ROUTE-REFRESH; wrapped in BoRR /
        EoRR with enhanced route refresh, RFC 7313) and ask the peer for its routes again
        (inbound, RFC 2918) when it offered route refresh. Returns [] unless Established."""
        if self.state is not State.ESTABLISHED:
            return []
        self._now = now
        refresh_in = self.remote_open is not None and self.remote_open.capability(RouteRefreshCap) is not None
        for family in self.families:
            if refresh_in:
                self._out.append(encode(RouteRefresh(family.afi, family.safi, 0)))
            table = self.rib_out[family].snapshot(clear_pending=False)
            self._bulk.append(self._table_stream([(family, table)], refresh=True))
        return []

    def receive_data(self, data: bytes, now: float) -> list[SessionEvent]:
        if self.state not in _CONNECTED:
            return []
        self._reader.feed(data)

        def go():
            while self.state in _CONNECTED:
                msg = self._reader.next_message()
                if msg is None:
                    break
                self._on_message(msg, now)
        return self._run(go, now)

    def handle_timer(self, now: float) -> list[SessionEvent]:
        def go():
            if self._t_idle_hold is not None and now >= self._t_idle_hold:
                self._t_idle_hold = None
                self._fire(Ev.AUTOMATIC_START_PASSIVE if self.config.passive else Ev.AUTOMATIC_START, now)
            if self._t_connect is not None and now >= self._t_connect:
                self._t_connect = None
                self._fail_reason = "timed out"
                self._fire(Ev.CONNECT_RETRY_TIMER_EXPIRES, now)
            if self._t_hold is not None and now >= self._t_hold:
                self._t_hold = None
                self._fire(Ev.HOLD_TIMER_EXPIRES, now)
            if self._t_keepalive is not None and now >= self._t_keepalive:
                self._t_keepalive = None
                self._fire(Ev.KEEPALIVE_TIMER_EXPIRES, now)
        return self._run(go, now)

    def next_deadline(self) -> float | None:
        ts = [t for t in (self._t_idle_hold, self._t_connect, self._t_hold, self._t_keepalive) if t is not None]
        return min(ts) if ts else None

    def take_routes_not_sent(self) -> list[RoutesNotSent]:
        """Families whose prefixes the encoder refused since the last call (once per session
        and family; the writer calls this after data_to_send)."""
        enc = self.encoder
        if enc is None or len(enc.unsendable) == len(self._unsent_reported):
            return []
        new = [RoutesNotSent(f, why) for f, why in enc.unsendable.items() if f not in self._unsent_reported]
        self._unsent_reported.update(e.family for e in new)
        return new

    def data_to_send(self, limit: int | None = None) -> bytes:
        """Bytes to write. Control messages are always returned; bulk UPDATEs (table, refresh,
        pending changes) only up to about ``limit`` bytes (None: everything), so a writer that
        is applying back-pressure can pass 0."""
        out, self._out = self._out, []
        if self.state is State.ESTABLISHED:
            size = 0
            while limit is None or size < limit:
                if self._bulk:
                    msg = next(self._bulk[0], None)
                    if msg is None:
                        self._bulk.popleft()
                        continue
                    out.append(msg)
                    size += len(msg)
                    continue
                pending = self._pending_updates()
                if not pending:
                    break
                self._bulk.append(iter(pending))
        return b"".join(out)

    @property
    def wants_to_send(self) -> bool:
        """True if data_to_send() would return something (for writers waiting on back-pressure)."""
        return bool(self._out) or (self.state is State.ESTABLISHED and (
            bool(self._bulk) or any(r.pending for r in self.rib_out.values())))

    def advertised_count(self, family: Family) -> int:
        if self.state is not State.ESTABLISHED or family not in self.families or self.encoder is None:
            return 0
        enc = self.encoder
        return sum(len(g) for a, g in self.rib_out[family].groups.items() if enc.sendable(family, a))

    def local_capabilities(self) -> tuple[str, ...]:
        return tuple(capability_name(c) for c in self.sent_open.capabilities) if self.sent_open else ()

    def remote_capabilities(self) -> tuple[str, ...]:
        return tuple(capability_name(c) for c in self.remote_open.capabilities) if self.remote_open else ()

    # ------------------------------------------------------------------ machinery

    def _run(self, fn, now: float) -> list[SessionEvent]:
        self._now = now
        self._events = []
        try:
            fn()
        except BgpProtocolError as err:
            self._protocol_error(err)
            err.events = self._take_events()
            raise
        return self._take_events()

    def _take_events(self) -> list[SessionEvent]:
        ev, self._events = self._events, []
        return ev

    def _fire(self, event: Ev, now: float) -> None:
        self._now = now
        action, nxt = transition(self.state, event)
        old = self.state
        getattr(self, "_act_" + action.value)()
        if self.state is old and nxt is not old:
            self.state = nxt
            self._events.append(StateChanged(old, nxt))

    def _protocol_error(self, err: BgpProtocolError) -> None:
        """Any protocol error: NOTIFICATION if connected, close, IDLE, automatic restart."""
        ev = {1: Ev.BGP_HEADER_ERR, 2: Ev.BGP_OPEN_MSG_ERR, 3: Ev.UPDATE_MSG_ERR}.get(err.code)
        self._error = err
        if ev is not None and (self.state, ev) in TRANSITIONS and self.state in _CONNECTED:
            self._fire(ev, self._now)
        else:
            self._act_send_error()
            if self.state is not State.IDLE:
                old, self.state = self.state, State.IDLE
                self._events.append(StateChanged(old, State.IDLE))

    def _cease(self, subcode: int, data: bytes = b"") -> Notification:
        """A Cease; as RFC 8538 Hard Reset when the N bit was negotiated, so the peer really
        drops our routes instead of keeping them as stale."""
        gr = self.peer_graceful_restart
        if gr is not None and gr.notification and self.config.graceful_restart and subcode in (
                E.ADMINISTRATIVE_SHUTDOWN, E.PEER_DECONFIGURED, E.ADMINISTRATIVE_RESET):
            return Notification(E.CEASE, E.HARD_RESET, bytes((E.CEASE, subcode)) + data)
        return Notification(E.CEASE, subcode, data)

    def _backoff(self, base: float) -> float:
        """Delay before the next connection attempt; never more than ConnectRetry (FRR and
        GoBGP semantics: a router that comes back is reconnected within connectRetryTime).

        ``base`` is the ConnectRetry time T after a failed TCP connection attempt, and
        IDLE_HOLD_TIME (at most T) after a connection that failed before Established: a peer that
        is up but still clearing our previous session is retried soon (GoBGP's
        IdleHoldTimeAfterReset is 5 s); it doubles on further failures in a row but stops at T.
        Jitter: the RFC 4271 §10 factor 0.75..1.0, so agents that lost the same router do not
        reconnect in lockstep."""
        t = self.config.connect_retry
        if self.failures <= 0:
            return min(t, self._rng.uniform(0.5, 1.0))  # first retry after a long-lived session ended
        delay = min(base * 2 ** min(self.failures - 1, 16), t)
        return delay * self._rng.uniform(0.75, 1.0)

    def _clear_timers(self) -> None:
        self._t_idle_hold = self._t_connect = self._t_hold = self._t_keepalive = None

    def _close(self, reason: str, *, sent: Notification | None = None, received: Notification | None = None,
               restart: bool = True, failed: bool = True, until_peer_closes: bool = False) -> None:
        was_connected = self.state in _CONNECTED
        was_established = self.state is State.ESTABLISHED
        if sent is not None:
            self._out.append(encode(sent))
            self.last_error = f"sent NOTIFICATION {describe_notification(sent.code, sent.subcode, sent.data)}"
        elif received is not None:
            self.last_error = f"peer sent NOTIFICATION {describe_notification(received.code, received.subcode, received.data)}"
        elif failed:
            self.last_error = reason
        self._clear_timers()
        self._bulk.clear()
        for rib in self.rib_in.values():
            rib.clear()
        if was_established:
            for rib in self.rib_out.values():
                rib.live -= 1
        if was_established and self.established_at is not None and self._now - self.established_at >= 10:
            self.failures = 0  # a session that held a while: reconnect quickly
        elif failed:
            self.failures += 1
        retry = None
        if restart and not self.admin_down:
            retry = self._backoff(min(IDLE_HOLD_TIME, self.config.connect_retry))
            self._t_idle_hold = self._now + retry
        self.established_at = None
        self._events.append(CloseConnection(reason, until_peer_closes and was_connected))
        if was_connected:
            self._events.append(SessionDown(reason, sent, received, was_established, retry))
        self._reset_connection_state()
        self._reader = MessageReader(nlri_keys=True)

    # ------------------------------------------------------------------ actions (fsm.Action)

    def _act_ignore(self) -> None:
        pass

    def _act_connect(self) -> None:
        self._clear_timers()
        self.connect_attempt += 1
        timeout = self.config.connect_timeout or min(self.config.connect_retry, 30.0)
        self._t_connect = self._now + timeout
        self._events.append(ConnectRequested(self.connect_attempt, timeout))

    def _act_listen(self) -> None:
        self._clear_timers()

    def _act_connect_failed(self) -> None:
        timed_out = self._fail_reason == "timed out"
        self._clear_timers()
        self.failures += 1
        retry = None
        if not self.admin_down:
            retry = self._backoff(self.config.connect_retry)
            self._t_idle_hold = self._now + retry
        self.last_error = f"connect failed: {self._fail_reason}"
        self._events.append(CloseConnection(f"connect failed: {self._fail_reason}"))
        self._events.append(ConnectFailed(self._fail_reason, timed_out, retry or 0.0))

    def _act_send_open(self) -> None:
        self._clear_timers()
        cfg = self.config
        caps: list = [MultiProtocol(f.afi, f.safi) for f in cfg.families]
        caps += [RouteRefreshCap(), EnhancedRouteRefreshCap()]
        local_v6 = self.local_address is not None and isinstance(ip_address(self.local_address), IPv6Address)
        if local_v6 and Family.IPV4_UNICAST in cfg.families:
            caps.append(ExtendedNextHop(((1, 1, 2),)))  # RFC 8950: IPv4 NLRI, IPv6 next hop
        if cfg.extended_messages:
            caps.append(ExtendedMessage())
        if cfg.graceful_restart:
            caps.append(GracefulRestart(cfg.restart_time, self._restarting, True,
                                        tuple((f.afi, f.safi, True) for f in cfg.families)))
        caps.append(FourOctetAs(cfg.local_asn))
        self.sent_open = Open(cfg.local_asn if cfg.local_asn <= 0xFFFF else AS_TRANS, cfg.hold_time,
                              IPv4Address(cfg.router_id), tuple(caps))
        self._out.append(encode(self.sent_open))
        self._t_hold = self._now + OPEN_SENT_HOLD_TIME

    def _validate_open(self, o: Open) -> None:
        cfg = self.config
        if o.router_id == IPv4Address(0):
            raise BgpProtocolError(E.OPEN_MESSAGE, E.BAD_BGP_IDENTIFIER, reason="BGP identifier 0.0.0.0")
        asn = o.asn
        if cfg.peer_asn and asn != cfg.peer_asn:
            raise BgpProtocolError(E.OPEN_MESSAGE, E.BAD_PEER_AS,
                                   reason=f"peer's OPEN says AS {asn}, configured peer AS is {cfg.peer_asn}")
        if asn == 0:
            raise BgpProtocolError(E.OPEN_MESSAGE, E.BAD_PEER_AS, reason="peer AS 0")
        if asn == cfg.local_asn and o.router_id == IPv4Address(cfg.router_id):
            # RFC 6286 §2.1: identical identifiers are only allowed between different ASes.
            raise BgpProtocolError(E.OPEN_MESSAGE, E.BAD_BGP_IDENTIFIER,
                                   reason=f"iBGP peer uses our router ID {cfg.router_id}")
        if o.hold_time in (1, 2):
            raise BgpProtocolError(E.OPEN_MESSAGE, E.UNACCEPTABLE_HOLD_TIME,
                                   reason=f"hold time {o.hold_time} (must be 0 or >= 3)")

    def _act_process_open(self) -> None:
        o: Open = self._message
        cfg = self.config
        self.remote_open = o
        self.peer_asn = o.asn
        self.remote_router_id = o.router_id
        self.ibgp = o.asn == cfg.local_asn
        self.hold_time = min(cfg.hold_time, o.hold_time)
        if self.hold_time == 0:
            self.keepalive_time = 0
        else:
            ka = cfg.keepalive if cfg.keepalive > 0 else self.hold_time // 3
            self.keepalive_time = max(1, min(ka, self.hold_time // 3))
        theirs = {(c.afi, c.safi) for c in o.capabilities if isinstance(c, MultiProtocol)}
        if not any(isinstance(c, MultiProtocol) for c in o.capabilities):
            theirs = {(1, 1)}  # RFC 4760 §8: no MP capability = IPv4 unicast only
        self.families = tuple(f for f in cfg.families if f.value in theirs)
        self.four_octet_as = o.capability(FourOctetAs) is not None
        self.extended_messages = cfg.extended_messages and o.capability(ExtendedMessage) is not None
        self.enhanced_refresh = o.capability(EnhancedRouteRefreshCap) is not None
        enh = o.capability(ExtendedNextHop)
        self.extended_next_hop = (enh is not None and (1, 1, 2) in enh.entries and
                                  any(isinstance(c, ExtendedNextHop) for c in self.sent_open.capabilities))
        self.peer_graceful_restart = o.capability(GracefulRestart)
        self._reader.four_octet_as = self.four_octet_as
        self._reader.max_size = MAX_EXTENDED_MESSAGE_SIZE if self.extended_messages else MAX_MESSAGE_SIZE
        self._out.append(KEEPALIVE_BYTES)
        self._t_hold = self._now + self.hold_time if self.hold_time else None
        self._t_keepalive = self._now + self.keepalive_time if self.keepalive_time else None
        self._events.append(OpenReceived(o, o.asn, o.router_id))

    def _act_establish(self) -> None:
        self.established_at = self._now
        self._restarting = False
        self._restart_hold()
        self.encoder = UpdateEncoder(
            local_asn=self.config.local_asn, ibgp=bool(self.ibgp), four_octet_as=self.four_octet_as,
            max_size=MAX_EXTENDED_MESSAGE_SIZE if self.extended_messages else MAX_MESSAGE_SIZE,
            local_address=self.local_address, link_local=self.link_local,
            extended_next_hop_ipv4=self.extended_next_hop)
        # The whole table, then End-of-RIB per family (RFC 4724 §2), as one lazy stream.
        tables = [(f, self.rib_out[f].snapshot(clear_pending=True)) for f in self.families]
        for rib in self.rib_out.values():
            rib.pending = {}
            rib.previous = {}
            rib.live += 1  # from now on changes are recorded as pending (see AdjRibOut)
        self._eor_held = self.hold_end_of_rib
        self._bulk.append(self._table_stream(tables, eor=not self._eor_held))
        self._events.append(SessionEstablished(self.hold_time or 0, self.keepalive_time or 0, self.families))

    def release_end_of_rib(self) -> list[SessionEvent]:
        """The owner's table is complete: a held End-of-RIB goes out after the changes still
        pending (sessions established from now on send it right after their table)."""
        self.hold_end_of_rib = False
        if self._eor_held and self.state is State.ESTABLISHED:
            self._eor_held = False
            self._bulk.append(self._end_of_rib_after_pending())
        return []

    def _end_of_rib_after_pending(self) -> Iterator[bytes]:
        yield from self._pending_updates()
        for family in self.families:
            yield end_of_rib(family)

    def _table_stream(self, tables, *, eor: bool = False, refresh: bool = False) -> Iterator[bytes]:
        enc = self.encoder
        for family, groups in tables:
            if refresh and self.enhanced_refresh:
                yield encode(RouteRefresh(family.afi, family.safi, 1))  # BoRR (RFC 7313)
            for attrs, keys in groups:
                yield from enc.announce(family, attrs, keys)
            if refresh and self.enhanced_refresh:
                yield encode(RouteRefresh(family.afi, family.safi, 2))  # EoRR
        if eor:
            for family, _ in tables:
                yield end_of_rib(family)

    def _pending_updates(self) -> list[bytes]:
        out: list[bytes] = []
        enc = self.encoder
        for family, rib in self.rib_out.items():
            if not rib.pending:
                continue
            withdrawn, groups, previous = rib.take_pending()
            if family not in self.families:
                continue

            # Withdraw only what the peer may hold (a prefix added and removed between two
            # flushes costs nothing); that includes prefixes whose new attributes cannot be sent.
            held = {a: enc.sendable(family, a) for a in set(previous.values()) if a is not None}
            get_prev, get_held = previous.get, held.get
            withdrawn = [k for k in withdrawn if get_held(get_prev(k), False)]
            sendable = []
            for attrs, keys in groups:
                if enc.sendable(family, attrs):
                    sendable.append((attrs, keys))
                else:
                    withdrawn.extend(k for k in keys if get_held(get_prev(k), False))
            if withdrawn:
                out.extend(enc.withdraw(family, withdrawn))
            for attrs, keys in sendable:
                out.extend(enc.announce(family, attrs, keys))
        return out

    def _restart_hold(self) -> None:
        if self.hold_time:
            self._t_hold = self._now + self.hold_time

    def _act_send_keepalive(self) -> None:
        self._out.append(KEEPALIVE_BYTES)
        self._t_keepalive = self._now + self.keepalive_time if self.keepalive_time else None

    def _act_restart_hold(self) -> None:
        self._restart_hold()

    def _act_hold_expired(self) -> None:
        self._close(f"hold timer expired: nothing received from the peer for {self.hold_time or OPEN_SENT_HOLD_TIME}s",
                    sent=Notification(E.HOLD_TIMER_EXPIRED, 0))

    def _act_send_error(self) -> None:
        err = self._error
        if self.state in _CONNECTED:
            self._close(f"protocol error: {err}", sent=Notification(err.code, err.subcode, err.data))
        elif self.state is not State.IDLE:
            self._close(f"protocol error: {err}")

    def _act_collision_dump(self) -> None:
        self._close("connection collision resolution (RFC 4271 §6.8): the other connection wins",
                    sent=Notification(E.CEASE, E.CONNECTION_COLLISION_RESOLUTION), restart=False, failed=False)

    def _act_stop(self) -> None:
        n = self._stop_notification or self._cease(E.ADMINISTRATIVE_SHUTDOWN)
        if self.state in _CONNECTED:
            # Re-evaluate: the Hard Reset wrapping depends on the negotiated N bit.
            if n.code == E.CEASE and n.subcode != E.HARD_RESET:
                n = self._cease(n.subcode, n.data)
            self._close("stopped by configuration", sent=n, restart=False, failed=False)
        else:
            self._close("stopped by configuration", restart=False, failed=False)

    def _act_stop_silent(self) -> None:
        self._close("stopped for graceful restart (no NOTIFICATION)", restart=False, failed=False,
                    until_peer_closes=True)

    def _act_peer_closed(self) -> None:
        n = self._received_notification
        self._received_notification = None
        if n is not None:
            self._close(f"peer sent NOTIFICATION {describe_notification(n.code, n.subcode, n.data)}", received=n)
        else:
            self._close(f"connection lost: {self._fail_reason}")

    # ------------------------------------------------------------------ messages

    def _on_message(self, msg, now: float) -> None:
        self._message = msg
        if isinstance(msg, Open):
            if self.state is State.OPEN_SENT:
                self._validate_open(msg)
            self._fire(Ev.BGP_OPEN, now)
        elif isinstance(msg, Keepalive):
            self._fire(Ev.KEEPALIVE_MSG, now)
        elif isinstance(msg, Update):
            self._fire(Ev.UPDATE_MSG, now)
        elif isinstance(msg, Notification):
            self._received_notification = msg
            ver = msg.code == E.OPEN_MESSAGE and msg.subcode == E.UNSUPPORTED_VERSION
            self._fire(Ev.NOTIF_MSG_VER_ERR if ver else Ev.NOTIF_MSG, now)
        elif isinstance(msg, RouteRefresh):
            self._fire(Ev.ROUTE_REFRESH_MSG, now)

    def _act_process_refresh(self) -> None:
        self._restart_hold()
        m: RouteRefresh = self._message
        family = _FAMILIES.get((m.afi, m.safi))
        if family is None or family not in self.families:
            return  # RFC 2918 §4: ignore a refresh for a family that was not negotiated
        self._events.append(RouteRefreshReceived(family, m.subtype))
        if m.subtype == 0:
            # Pending changes stay pending: they are sent after the refreshed table.
            table = self.rib_out[family].snapshot(clear_pending=False)
            self._bulk.append(self._table_stream([(family, table)], refresh=True))
        elif m.subtype == 1:
            self.rib_in[family].begin_refresh()
        elif m.subtype == 2:
            self.rib_in[family].end_refresh()
        # other subtypes: ignored (RFC 7313 §5)

    def _act_process_update(self) -> None:
        self._restart_hold()
        u: Update = self._message
        reach = u.attribute(MpReach)
        unreach = u.attribute(MpUnreach)
        # End-of-RIB markers (RFC 4724 §2)
        if not u.withdrawn and not u.nlri and u.treat_as_withdraw is None:
            if not u.attributes:
                self._events.append(EndOfRibReceived(Family.IPV4_UNICAST))
                return
            if (len(u.attributes) == 1 and unreach is not None and not unreach.withdrawn
                    and not unreach.unparsed and (unreach.afi, unreach.safi) in _FAMILIES):
                self._events.append(EndOfRibReceived(_FAMILIES[(unreach.afi, unreach.safi)]))
                return
        withdraw_reasons = [u.treat_as_withdraw] if u.treat_as_withdraw else []
        for d in u.discarded:
            self._events.append(UpdateErrorHandled("attribute-discard", d))
        attrs = [a for a in u.attributes if not isinstance(a, (MpReach, MpUnreach))]

        def discard(cls, why):
            nonlocal attrs
            if any(isinstance(a, cls) for a in attrs):
                attrs = [a for a in attrs if not isinstance(a, cls)]
                self._events.append(UpdateErrorHandled("attribute-discard", why))

        if not self.ibgp:  # RFC 7606 §7.5, §7.9, §7.10
            discard(LocalPref, "LOCAL_PREF from an external peer")
            discard(OriginatorId, "ORIGINATOR_ID from an external peer")
            discard(ClusterList, "CLUSTER_LIST from an external peer")
        if self.four_octet_as:
            discard(As4Path, "AS4_PATH from a 4-octet-AS speaker")  # RFC 6793 §4.1
        has_reach = bool(u.nlri) or reach is not None
        kinds = {type(a) for a in attrs}
        if has_reach:
            missing = [n for cls, n in ((OriginAttr, "ORIGIN"), (AsPath, "AS_PATH")) if cls not in kinds]
            if u.nlri and NextHop not in kinds:
                missing.append("NEXT_HOP")
            if missing:
                withdraw_reasons.append("missing well-known attribute " + ", ".join(missing))  # RFC 7606 §3(d)
        as_path = next((a for a in attrs if isinstance(a, AsPath)), None)
        if as_path is not None and not self.ibgp and not as_path.segments and has_reach:
            withdraw_reasons.append("empty AS_PATH from an external peer")
        path_asns = self._effective_as_path(as_path, next((a for a in attrs if isinstance(a, As4Path)), None))
        loop = None
        if self.config.local_asn in path_asns:
            loop = f"AS_PATH contains our AS {self.config.local_asn}"
        oid = next((a for a in attrs if isinstance(a, OriginatorId)), None)
        rid = IPv4Address(self.config.router_id)
        if oid is not None and oid.address == rid:
            loop = "ORIGINATOR_ID is our router ID"
        cl = next((a for a in attrs if isinstance(a, ClusterList)), None)
        if cl is not None and rid in cl.ids:
            loop = "CLUSTER_LIST contains our router ID"
        if withdraw_reasons:
            self._events.append(UpdateErrorHandled("treat-as-withdraw", "; ".join(withdraw_reasons)))
        stored = tuple(attrs)
        per_family: dict[Family, list] = {}

        def note(fam, ann=0, wd=0, rej=0):
            c = per_family.setdefault(fam, [0, 0, 0])
            c[0] += ann
            c[1] += wd
            c[2] += rej

        v4 = Family.IPV4_UNICAST
        if u.withdrawn and v4 in self.families:
            keys = u.withdrawn  # compact NLRI keys (MessageReader(nlri_keys=True))
            self.rib_in[v4].withdraw(keys)
            note(v4, wd=len(keys))
        if u.nlri and v4 in self.families:
            keys = u.nlri
            nh = next((a for a in attrs if isinstance(a, NextHop)), None)
            bad_nh = nh is not None and (nh.address.is_unspecified or nh.address.is_multicast or
                                         nh.address.is_reserved or str(nh.address) == self.local_address)
            if withdraw_reasons or bad_nh:
                if bad_nh and not withdraw_reasons:
                    self._events.append(UpdateErrorHandled("treat-as-withdraw", f"NEXT_HOP {nh.address} is not usable"))
                self.rib_in[v4].withdraw(keys)
                note(v4, wd=len(keys))
            else:
                self.rib_in[v4].announce(keys, stored, loop is None)
                note(v4, ann=len(keys), rej=len(keys) if loop else 0)
        if unreach is not None:
            fam = _FAMILIES.get((unreach.afi, unreach.safi))
            if fam in self.families and unreach.withdrawn:
                keys = unreach.withdrawn
                self.rib_in[fam].withdraw(keys)
                note(fam, wd=len(keys))
        if reach is not None:
            fam = _FAMILIES.get((reach.afi, reach.safi))
            if fam in self.families and reach.nlri:
                keys = reach.nlri
                nhs = reach.next_hops()
                bad_nh = not nhs or nhs[0].is_unspecified or nhs[0].is_multicast
                if withdraw_reasons or bad_nh:
                    if bad_nh and not withdraw_reasons:
                        self._events.append(UpdateErrorHandled("treat-as-withdraw", "MP_REACH next hop is not usable"))
                    self.rib_in[fam].withdraw(keys)
                    note(fam, wd=len(keys))
                else:
                    mp_attrs = tuple(a for a in stored if not isinstance(a, NextHop)) + (NextHop(nhs[0]),)
                    self.rib_in[fam].announce(keys, mp_attrs, loop is None)
                    note(fam, ann=len(keys), rej=len(keys) if loop else 0)
        for fam, (ann, wd, rej) in per_family.items():
            self._events.append(UpdateReceived(fam, ann, wd, rej))

    def _effective_as_path(self, as_path: AsPath | None, as4: As4Path | None) -> list[int]:
        """The AS numbers of the path; towards a 2-octet peer, AS4_PATH is merged in (RFC 6793 §4.2.3)."""
        asns = as_path.asns() if as_path else []
        if as4 is None or self.four_octet_as or as_path is None:
            return asns

        def count(segs):
            return sum(len(s.asns) if s.type == 2 else 1 if s.type == 1 else 0 for s in segs)

        n, n4 = count(as_path.segments), count(as4.segments)
        if n < n4:
            return asns  # RFC 6793: ignore AS4_PATH
        keep, merged = n - n4, []
        for s in as_path.segments:
            if keep <= 0:
                break
            if s.type == 2:
                merged.extend(s.asns[:keep])
                keep -= min(keep, len(s.asns))
            else:
                merged.extend(s.asns)
                keep -= 1 if s.type == 1 else 0
        return merged + [a for s in as4.segments for a in s.asns]
