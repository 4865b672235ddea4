"""Test helpers: a connection pair of two sans-IO sessions wired back to back with a fake clock
(h11 ``ConnectionPair`` + aioquic ``roundtrip`` style), and a BGP message factory."""

from __future__ import annotations

import random
from ipaddress import IPv4Address, ip_network

from agent.bgp.codec import encode
from agent.bgp.errors import BgpProtocolError
from agent.bgp.fsm import State
from agent.bgp.messages import Family, FourOctetAs, MultiProtocol, Open, PathAttributes
from agent.bgp.session import CloseConnection, Session, SessionConfig


class Pair:
    """Sessions ``a`` (connects, 10.0.0.1) and ``b`` (accepts, 10.0.0.2) over a fake link."""

    def __init__(self, a_cfg: SessionConfig, b_cfg: SessionConfig, *, a_addr="10.0.0.1", b_addr="10.0.0.2",
                 now: float = 1000.0):
        self.now = now
        self.a = Session(a_cfg, rng=random.Random(1))
        self.b = Session(b_cfg, rng=random.Random(2))
        self.a_addr, self.b_addr = a_addr, b_addr
        self.events = {"a": [], "b": []}
        self.errors = {"a": [], "b": []}
        self.wire = {"a": [], "b": []}  # bytes each side wrote, per flush
        self.closed = {"a": False, "b": False}

    def side(self, name):
        return self.a if name == "a" else self.b

    def _record(self, name, evs):
        self.events[name].extend(evs)
        if any(isinstance(e, CloseConnection) for e in evs):
            self.closed[name] = True
        return evs

    def call(self, name, fn, *args, **kw):
        try:
            return self._record(name, fn(*args, **kw))
        except BgpProtocolError as err:
            self.errors[name].append(err)
            self._record(name, err.events)
            return err.events

    def connect(self):
        """Start both, connect a -> b, and run until quiet. Returns self."""
        self.call("a", self.a.start, self.now)
        self.call("b", self.b.start, self.now)
        self.call("a", self.a.connection_made, self.now, self.a_addr, self.b_addr, outgoing=True)
        self.call("b", self.b.connection_made, self.now, self.b_addr, self.a_addr, outgoing=False)
        self.closed = {"a": False, "b": False}
        self.run()
        return self

    def transfer(self, src):
        dst = "b" if src == "a" else "a"
        data = self.side(src).data_to_send()
        if data:
            self.wire[src].append(data)
            if not self.closed[dst]:
                self.call(dst, self.side(dst).receive_data, data, self.now)
        return data

    def run(self, rounds=20):
        for _ in range(rounds):
            moved = self.transfer("a")
            moved2 = self.transfer("b")
            if not moved and not moved2:
                return

    def advance(self, seconds):
        """Move the fake clock, firing every timer that comes due on the way, in order."""
        end = self.now + seconds
        while True:
            due = [d for d in (self.a.next_deadline(), self.b.next_deadline()) if d is not None and d <= end]
            if not due:
                break
            self.now = max(self.now, min(due))
            for name in ("a", "b"):
                d = self.side(name).next_deadline()
                if d is not None and d <= self.now:
                    self.call(name, self.side(name).handle_timer, self.now)
            self.run()
        self.now = end

    def of_type(self, name, cls):
        return [e for e in self.events[name] if isinstance(e, cls)]


def cfg(asn=65001, rid="1.1.1.1", peer=65002, **kw) -> SessionConfig:
    return SessionConfig(local_asn=asn, router_id=rid, peer_asn=peer, **kw)


def ebgp_pair(**kw) -> Pair:
    a_kw = {k[2:]: v for k, v in kw.items() if k.startswith("a_")}
    b_kw = {k[2:]: v for k, v in kw.items() if k.startswith("b_")}
    return Pair(cfg(65001, "1.1.1.1", 65002, **a_kw), cfg(65002, "2.2.2.2", 65001, **b_kw))


def open_bytes(asn=65002, hold=90, rid="2.2.2.2", caps=None) -> bytes:
    if caps is None:
        caps = (MultiProtocol(1, 1), FourOctetAs(asn))
    return encode(Open(asn if asn <= 0xFFFF else 23456, hold, IPv4Address(rid), tuple(caps)))


def net(s):
    return ip_network(s)


V4, V6 = Family.IPV4_UNICAST, Family.IPV6_UNICAST
ESTABLISHED = State.ESTABLISHED
PA = PathAttributes
