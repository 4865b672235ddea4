"""The FSM over every state × event: the table itself, and a real Session fed every event in every
state (h2 tests/test_state_machines.py style): a pair either follows the table or is a protocol
error that leaves the session IDLE with the RFC 6608 NOTIFICATION queued."""

from __future__ import annotations

from ipaddress import IPv4Address, IPv4Network

import pytest
from hypothesis import given, settings, strategies as st

from agent.bgp.codec import KEEPALIVE_BYTES, decode, encode
from agent.bgp.errors import BgpProtocolError
from agent.bgp.fsm import TRANSITIONS, Action, Event, State, fsm_error_subcode, transition
from agent.bgp.messages import Keepalive, Notification, RouteRefresh, Update
from agent.bgp.session import Session, SessionConfig

from sansio_pair import open_bytes

NOW = 100.0


@given(st.sampled_from(State), st.sampled_from(Event))
def test_table_lookup_is_total(state, event):
    if (state, event) in TRANSITIONS:
        action, nxt = transition(state, event)
        assert isinstance(action, Action) and isinstance(nxt, State)
    else:
        with pytest.raises(BgpProtocolError) as ei:
            transition(state, event)
        assert (ei.value.code, ei.value.subcode) == (5, fsm_error_subcode(state))


def test_every_action_is_implemented():
    for action in Action:
        assert hasattr(Session, "_act_" + action.value), action


def test_idle_ignores_everything_but_start():
    for ev in Event:
        action, nxt = TRANSITIONS[(State.IDLE, ev)]
        if ev in (Event.MANUAL_START, Event.AUTOMATIC_START):
            assert nxt is State.CONNECT
        elif ev in (Event.MANUAL_START_PASSIVE, Event.AUTOMATIC_START_PASSIVE):
            assert nxt is State.ACTIVE
        else:
            assert (action, nxt) == (Action.IGNORE, State.IDLE)


def session_in(state: State) -> Session:
    s = Session(SessionConfig(local_asn=65001, router_id="1.1.1.1", peer_asn=65002,
                              passive=state is State.ACTIVE))
    if state is State.IDLE:
        return s
    s.start(NOW)
    if state in (State.CONNECT, State.ACTIVE):
        return s
    s.connection_made(NOW, "10.0.0.1", "10.0.0.2", outgoing=True)
    if state is not State.OPEN_SENT:
        s.receive_data(open_bytes(), NOW)
        if state is State.ESTABLISHED:
            s.receive_data(KEEPALIVE_BYTES, NOW)
    s.data_to_send()
    assert s.state is state
    return s


MESSAGE_FOR = {
    Event.BGP_OPEN: lambda: decode(open_bytes()),
    Event.KEEPALIVE_MSG: lambda: Keepalive(),
    Event.UPDATE_MSG: lambda: Update(nlri=(IPv4Network("10.9.0.0/24"),)),
    Event.ROUTE_REFRESH_MSG: lambda: RouteRefresh(1, 1),
    Event.NOTIF_MSG: lambda: Notification(6, 2),
    Event.NOTIF_MSG_VER_ERR: lambda: Notification(2, 1),
}


@settings(max_examples=400, deadline=None)
@given(st.sampled_from(State), st.sampled_from(Event))
def test_session_handles_every_state_event_pair(state, event):
    s = session_in(state)
    if event in MESSAGE_FOR:
        s._message = MESSAGE_FOR[event]()
    s._error = BgpProtocolError(3, 1)
    try:
        s._run(lambda: s._fire(event, NOW + 1), NOW + 1)
    except BgpProtocolError as err:
        assert (state, event) not in TRANSITIONS
        assert (err.code, err.subcode) == (5, fsm_error_subcode(state))
        assert s.state is State.IDLE
        wire = s.data_to_send()
        if state in (State.OPEN_SENT, State.OPEN_CONFIRM, State.ESTABLISHED):
            assert decode(wire) == Notification(5, fsm_error_subcode(state))
        else:
            assert wire == b""
        return
    expected = TRANSITIONS[(state, event)][1]
    assert s.state is expected


def test_update_in_open_sent_is_fsm_error_5_1():
    s = session_in(State.OPEN_SENT)
    with pytest.raises(BgpProtocolError) as ei:
        s.receive_data(encode(Update()), NOW)
    assert (ei.value.code, ei.value.subcode) == (5, 1)
    assert s.data_to_send() == encode(Notification(5, 1))
    assert s.state is State.IDLE


def test_second_open_in_open_confirm_is_fsm_error_5_2():
    s = session_in(State.OPEN_CONFIRM)
    with pytest.raises(BgpProtocolError):
        s.receive_data(open_bytes(), NOW)
    assert s.data_to_send() == encode(Notification(5, 2))


def test_open_in_established_is_fsm_error_5_3():
    s = session_in(State.ESTABLISHED)
    with pytest.raises(BgpProtocolError):
        s.receive_data(open_bytes(rid=str(IPv4Address("9.9.9.9"))), NOW)
    assert s.data_to_send().endswith(encode(Notification(5, 3)))


def test_the_documented_table_is_the_code_table():
    from pathlib import Path

    from agent.bgp.fsm import render_markdown

    doc = (Path(__file__).resolve().parents[3] / "docs" / "bgp-speaker.md").read_text()
    begin, end = "<!-- fsm-table:begin -->\n", "\n<!-- fsm-table:end -->"
    assert doc[doc.index(begin) + len(begin):doc.index(end)] == render_markdown()
