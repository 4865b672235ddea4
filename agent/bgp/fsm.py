"""The RFC 4271 §8 BGP finite state machine, as a table.

Rules (h11 ``_state.py`` style):

Rule 1: everything that decides *which state follows which* lives here, in ``TRANSITIONS``.
        The session (:mod:`agent.bgp.session`) only performs the named actions; it never
        changes state by itself.
Rule 2: this file knows nothing about bytes, sockets, time or configuration.
Rule 3: a (state, event) pair that is not in the table is a protocol error: :func:`transition`
        raises :class:`BgpProtocolError` with the RFC 6608 FSM-error subcode of the state
        (1 OpenSent, 2 OpenConfirm, 3 Established, 0 otherwise); the session then sends that
        NOTIFICATION if a connection exists and goes to IDLE.

Theory of operation. Events carry the RFC 4271 §8.1 numbers where one exists. Deviations, all
deliberate and documented in docs/bgp-speaker.md:

* No DelayOpen, no peer oscillation damping: events 6, 7, 12, 20 and 14/15 do not exist here.
  TCP connection success is event 16 (we connected) or 17 (we accepted).
* Idle ignores everything except the start events (RFC 4271 §8.2.2). After any failure the
  session goes to IDLE and the *session* (not this table) schedules an automatic start after a
  back-off delay (the IdleHoldTimer of §8.1.1), by feeding AUTOMATIC_START(_PASSIVE) later.
* CONNECT + TcpConnectionFails goes to IDLE (then automatic restart with back-off), as RFC
  4271 does without DelayOpen. In CONNECT the ConnectRetry timer bounds the TCP attempt; when
  it expires the attempt counts as failed and also goes to IDLE with back-off (RFC 4271 would
  retry at once; the back-off is what stops tight loops against a dead or misconfigured peer).
* An active peer waiting in IDLE for its automatic restart still accepts the peer's incoming
  connection: the session feeds AUTOMATIC_START_PASSIVE first (ACTIVE), then the TCP event.
* ROUTE_REFRESH_MSG (RFC 2918) is accepted in Established only.
* GRACEFUL_STOP (not in RFC 4271) is the restarting speaker's stop: close TCP without a
  NOTIFICATION so the peer keeps our routes (RFC 4724).
* NotifMsg (25) in OpenSent goes to IDLE without answering (sending a NOTIFICATION in reply
  to a NOTIFICATION helps nobody); RFC 4271 would send an FSM error.
"""

from __future__ import annotations

import enum

from agent.bgp.errors import BgpProtocolError, ErrorCode

__all__ = ["State", "Event", "Action", "TRANSITIONS", "transition", "fsm_error_subcode"]


class State(enum.Enum):
    IDLE = "idle"
    CONNECT = "connect"
    ACTIVE = "active"
    OPEN_SENT = "open_sent"
    OPEN_CONFIRM = "open_confirm"
    ESTABLISHED = "established"


class Event(enum.Enum):
    MANUAL_START = 1
    MANUAL_STOP = 2
    AUTOMATIC_START = 3
    MANUAL_START_PASSIVE = 4
    AUTOMATIC_START_PASSIVE = 5
    CONNECT_RETRY_TIMER_EXPIRES = 9
    HOLD_TIMER_EXPIRES = 10
    KEEPALIVE_TIMER_EXPIRES = 11
    TCP_CR_ACKED = 16
    TCP_CONNECTION_CONFIRMED = 17
    TCP_CONNECTION_FAILS = 18
    BGP_OPEN = 19
    BGP_HEADER_ERR = 21
    BGP_OPEN_MSG_ERR = 22
    OPEN_COLLISION_DUMP = 23
    NOTIF_MSG_VER_ERR = 24
    NOTIF_MSG = 25
    KEEPALIVE_MSG = 26
    UPDATE_MSG = 27
    UPDATE_MSG_ERR = 28
    ROUTE_REFRESH_MSG = 100  # RFC 2918
    GRACEFUL_STOP = 101  # RFC 4724 restarting speaker


class Action(enum.Enum):
    IGNORE = "ignore"
    CONNECT = "connect"  # initiate TCP, arm the ConnectRetry timer
    LISTEN = "listen"  # wait for the peer (passive); for active peers arm the retry timer
    CONNECT_FAILED = "connect_failed"  # TCP attempt failed: back off, then restart
    SEND_OPEN = "send_open"  # TCP is up: send OPEN, arm the large hold timer
    PROCESS_OPEN = "process_open"  # negotiated: send KEEPALIVE, arm hold/keepalive
    ESTABLISH = "establish"  # first KEEPALIVE: start sending the table
    SEND_KEEPALIVE = "send_keepalive"
    RESTART_HOLD = "restart_hold"
    PROCESS_UPDATE = "process_update"
    PROCESS_REFRESH = "process_refresh"
    HOLD_EXPIRED = "hold_expired"  # NOTIFICATION 4/0, close
    SEND_ERROR = "send_error"  # NOTIFICATION from the protocol error, close
    COLLISION_DUMP = "collision_dump"  # NOTIFICATION 6/7, close
    STOP = "stop"  # NOTIFICATION Cease (if connected), close, no restart
    STOP_SILENT = "stop_silent"  # close without NOTIFICATION, no restart
    PEER_CLOSED = "peer_closed"  # TCP lost or NOTIFICATION received: close, back off, restart


S, Ev, A = State, Event, Action
_STARTS = (Ev.MANUAL_START, Ev.AUTOMATIC_START, Ev.MANUAL_START_PASSIVE, Ev.AUTOMATIC_START_PASSIVE)
_CONNECTED = (S.OPEN_SENT, S.OPEN_CONFIRM, S.ESTABLISHED)

TRANSITIONS: dict[tuple[State, Event], tuple[Action, State]] = {}

# Idle: only the start events do something (RFC 4271 §8.2.2 "Idle state").
for _ev in Event:
    TRANSITIONS[(S.IDLE, _ev)] = (A.IGNORE, S.IDLE)
TRANSITIONS[(S.IDLE, Ev.MANUAL_START)] = (A.CONNECT, S.CONNECT)
TRANSITIONS[(S.IDLE, Ev.AUTOMATIC_START)] = (A.CONNECT, S.CONNECT)
TRANSITIONS[(S.IDLE, Ev.MANUAL_START_PASSIVE)] = (A.LISTEN, S.ACTIVE)
TRANSITIONS[(S.IDLE, Ev.AUTOMATIC_START_PASSIVE)] = (A.LISTEN, S.ACTIVE)

# Every non-Idle state ignores start events and stops on ManualStop / GracefulStop.
for _st in (S.CONNECT, S.ACTIVE, *_CONNECTED):
    for _ev in _STARTS:
        TRANSITIONS[(_st, _ev)] = (A.IGNORE, _st)
    TRANSITIONS[(_st, Ev.MANUAL_STOP)] = (A.STOP, S.IDLE)
    TRANSITIONS[(_st, Ev.GRACEFUL_STOP)] = (A.STOP_SILENT, S.IDLE)

TRANSITIONS.update({
    # Connect: waiting for our own TCP connection attempt.
    (S.CONNECT, Ev.CONNECT_RETRY_TIMER_EXPIRES): (A.CONNECT_FAILED, S.IDLE),
    (S.CONNECT, Ev.TCP_CR_ACKED): (A.SEND_OPEN, S.OPEN_SENT),
    (S.CONNECT, Ev.TCP_CONNECTION_CONFIRMED): (A.SEND_OPEN, S.OPEN_SENT),
    (S.CONNECT, Ev.TCP_CONNECTION_FAILS): (A.CONNECT_FAILED, S.IDLE),
    # Active: listening for the peer; for active peers the ConnectRetry timer is running.
    (S.ACTIVE, Ev.CONNECT_RETRY_TIMER_EXPIRES): (A.CONNECT, S.CONNECT),
    (S.ACTIVE, Ev.TCP_CR_ACKED): (A.SEND_OPEN, S.OPEN_SENT),
    (S.ACTIVE, Ev.TCP_CONNECTION_CONFIRMED): (A.SEND_OPEN, S.OPEN_SENT),
    (S.ACTIVE, Ev.TCP_CONNECTION_FAILS): (A.CONNECT_FAILED, S.IDLE),
    # OpenSent: our OPEN is out, waiting for the peer's.
    (S.OPEN_SENT, Ev.HOLD_TIMER_EXPIRES): (A.HOLD_EXPIRED, S.IDLE),
    (S.OPEN_SENT, Ev.TCP_CONNECTION_FAILS): (A.PEER_CLOSED, S.IDLE),
    (S.OPEN_SENT, Ev.BGP_OPEN): (A.PROCESS_OPEN, S.OPEN_CONFIRM),
    (S.OPEN_SENT, Ev.BGP_HEADER_ERR): (A.SEND_ERROR, S.IDLE),
    (S.OPEN_SENT, Ev.BGP_OPEN_MSG_ERR): (A.SEND_ERROR, S.IDLE),
    (S.OPEN_SENT, Ev.OPEN_COLLISION_DUMP): (A.COLLISION_DUMP, S.IDLE),
    (S.OPEN_SENT, Ev.NOTIF_MSG_VER_ERR): (A.PEER_CLOSED, S.IDLE),
    (S.OPEN_SENT, Ev.NOTIF_MSG): (A.PEER_CLOSED, S.IDLE),
    # OpenConfirm: OPENs exchanged, waiting for the first KEEPALIVE.
    (S.OPEN_CONFIRM, Ev.HOLD_TIMER_EXPIRES): (A.HOLD_EXPIRED, S.IDLE),
    (S.OPEN_CONFIRM, Ev.KEEPALIVE_TIMER_EXPIRES): (A.SEND_KEEPALIVE, S.OPEN_CONFIRM),
    (S.OPEN_CONFIRM, Ev.TCP_CONNECTION_FAILS): (A.PEER_CLOSED, S.IDLE),
    (S.OPEN_CONFIRM, Ev.KEEPALIVE_MSG): (A.ESTABLISH, S.ESTABLISHED),
    (S.OPEN_CONFIRM, Ev.BGP_HEADER_ERR): (A.SEND_ERROR, S.IDLE),
    (S.OPEN_CONFIRM, Ev.BGP_OPEN_MSG_ERR): (A.SEND_ERROR, S.IDLE),
    (S.OPEN_CONFIRM, Ev.UPDATE_MSG_ERR): (A.SEND_ERROR, S.IDLE),
    (S.OPEN_CONFIRM, Ev.OPEN_COLLISION_DUMP): (A.COLLISION_DUMP, S.IDLE),
    (S.OPEN_CONFIRM, Ev.NOTIF_MSG_VER_ERR): (A.PEER_CLOSED, S.IDLE),
    (S.OPEN_CONFIRM, Ev.NOTIF_MSG): (A.PEER_CLOSED, S.IDLE),
    # Established.
    (S.ESTABLISHED, Ev.HOLD_TIMER_EXPIRES): (A.HOLD_EXPIRED, S.IDLE),
    (S.ESTABLISHED, Ev.KEEPALIVE_TIMER_EXPIRES): (A.SEND_KEEPALIVE, S.ESTABLISHED),
    (S.ESTABLISHED, Ev.TCP_CONNECTION_FAILS): (A.PEER_CLOSED, S.IDLE),
    (S.ESTABLISHED, Ev.KEEPALIVE_MSG): (A.RESTART_HOLD, S.ESTABLISHED),
    (S.ESTABLISHED, Ev.UPDATE_MSG): (A.PROCESS_UPDATE, S.ESTABLISHED),
    (S.ESTABLISHED, Ev.ROUTE_REFRESH_MSG): (A.PROCESS_REFRESH, S.ESTABLISHED),
    (S.ESTABLISHED, Ev.BGP_HEADER_ERR): (A.SEND_ERROR, S.IDLE),
    (S.ESTABLISHED, Ev.UPDATE_MSG_ERR): (A.SEND_ERROR, S.IDLE),
    (S.ESTABLISHED, Ev.NOTIF_MSG_VER_ERR): (A.PEER_CLOSED, S.IDLE),
    (S.ESTABLISHED, Ev.NOTIF_MSG): (A.PEER_CLOSED, S.IDLE),
})


def fsm_error_subcode(state: State) -> int:
    """RFC 6608 subcode for an unexpected event in ``state``."""
    return {S.OPEN_SENT: 1, S.OPEN_CONFIRM: 2, S.ESTABLISHED: 3}.get(state, 0)


def transition(state: State, event: Event) -> tuple[Action, State]:
    """Look up (action, next state); an unlisted pair raises the FSM error (Rule 3)."""
    try:
        return TRANSITIONS[(state, event)]
    except KeyError:
        raise BgpProtocolError(ErrorCode.FSM, fsm_error_subcode(state),
                               reason=f"event {event.name} is not allowed in state {state.name}") from None


def render_markdown() -> str:
    """The transition table as Markdown (docs/bgp-speaker.md embeds it; a test keeps them equal).
    Pairs not listed are FSM errors; IDLE's ignored events and the start/stop rows shared by all
    states are summarised instead of repeated."""
    lines = ["| state | event | action | next state |", "|---|---|---|---|"]
    for (st, ev), (action, nxt) in TRANSITIONS.items():
        if st is S.IDLE and action is A.IGNORE:
            continue
        if st is not S.IDLE and (ev in _STARTS or ev in (Ev.MANUAL_STOP, Ev.GRACEFUL_STOP)):
            continue
        lines.append(f"| {st.name} | {ev.name} ({ev.value}) | {action.value} | {nxt.name} |")
    lines.append("| any but IDLE | start events | ignore | (same) |")
    lines.append("| any but IDLE | MANUAL_STOP (2) / GRACEFUL_STOP | stop / stop_silent | IDLE |")
    lines.append("| IDLE | anything else | ignore | IDLE |")
    return "\n".join(lines)


if __name__ == "__main__":  # python -m agent.bgp.fsm > table.md
    print(render_markdown())
