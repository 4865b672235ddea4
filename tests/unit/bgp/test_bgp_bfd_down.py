"""RFC 5882 §4.3 / RFC 9384: BFD Down closes an Established session at once with Cease 6/10,
then the session restarts on its normal schedule; a session that is not connected ignores it."""

from __future__ import annotations

from agent.bgp.codec import encode
from agent.bgp.fsm import State
from agent.bgp.messages import Notification
from agent.bgp.session import CloseConnection, Session, SessionDown
from sansio_pair import ESTABLISHED, cfg, ebgp_pair


def test_bfd_down_sends_cease_bfd_down_and_goes_idle_at_once():
    p = ebgp_pair(a_hold_time=90).connect()
    assert p.a.state is ESTABLISHED
    p.a.data_to_send()
    evs = p.a.bfd_down(p.now + 0.01, "control detection time expired")
    assert p.a.data_to_send() == encode(Notification(6, 10))
    assert p.a.state is State.IDLE
    down = [e for e in evs if isinstance(e, SessionDown)]
    assert down and down[0].was_established and "BFD down" in down[0].reason
    assert any(isinstance(e, CloseConnection) for e in evs)
    # The automatic restart is scheduled (the BGP FSM, not BFD, brings the session back).
    assert down[0].retry_in is not None and p.a.next_deadline() == p.now + 0.01 + down[0].retry_in
    assert "6/10 BFD Down" in p.a.last_error


def test_bfd_down_is_ignored_when_not_connected():
    s = Session(cfg())
    s.start(0.0)
    before, deadline = s.state, s.next_deadline()
    assert s.bfd_down(1.0, "control detection time expired") == []
    assert s.state is before and s.next_deadline() == deadline and s.data_to_send() == b""
