"""BFD over UDP for single-hop IPv4/IPv6 (RFC 5881): sockets, timers, demultiplexing.

One :class:`BfdManager` per process (see :func:`shared_manager`) owns the receive sockets on
UDP 3784 and one send socket per session (source port 49152–65535, TTL/hop limit 255). The
protocol is in :class:`agent.bfd.session.BfdSession`; this layer only moves bytes and time.
Received packets whose TTL/hop limit is not 255 are dropped (RFC 5881 §5, GTSM).
"""

from __future__ import annotations

import asyncio
import errno
import random
import socket
import struct
import time
from dataclasses import dataclass, field
from ipaddress import ip_address
from typing import Callable

from agent.bfd.codec import BfdPacketError, BfdState, decode, encode
from agent.bfd.session import BfdSession, BfdTimers, StateChange

__all__ = ["BfdManager", "BfdPeerView", "shared_manager", "existing_manager", "BFD_PORT"]

BFD_PORT = 3784
SOURCE_PORTS = (49152, 65535)
_IP_RECVTTL = getattr(socket, "IP_RECVTTL", 12)
_IP_TTL = getattr(socket, "IP_TTL", 2)
_IPV6_RECVHOPLIMIT = getattr(socket, "IPV6_RECVHOPLIMIT", 51)
_IPV6_HOPLIMIT = getattr(socket, "IPV6_HOPLIMIT", 52)

Listener = Callable[[str, StateChange], None]


@dataclass(frozen=True)
class BfdPeerView:
    """What ``vipctl bfd peers`` and the metrics show for one session."""
    peer: str
    local: str
    state: str
    remote_state: str
    local_discriminator: int
    remote_discriminator: int
    diagnostic: str
    remote_diagnostic: str
    tx_interval_ms: float
    rx_interval_ms: float
    detect_mult: int
    remote_detect_mult: int
    detection_time_ms: float
    configured_tx_ms: float
    configured_rx_ms: float
    passive: bool
    uptime_seconds: float | None
    up_transitions: int
    down_transitions: int
    last_down_diagnostic: str
    packets_in: int
    packets_out: int
    dropped: dict = field(default_factory=dict)


class _Entry:
    def __init__(self, peer: str, timers: BfdTimers, session: BfdSession, sock: socket.socket):
        self.peer = peer
        self.session = session
        self.sock = sock
        self.local = sock.getsockname()[0]
        self.listeners: list[Listener] = []
        self.timer: asyncio.TimerHandle | None = None
        self.up_wall: float | None = None


class BfdManager:
    """Owns every BFD socket and timer of the process; sessions are keyed by peer address."""

    def __init__(self, *, port: int = BFD_PORT, logger=None, rng: random.Random | None = None):
        self.port = port
        self.log = logger
        self._rng = rng or random.Random()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._rx: dict[int, socket.socket] = {}
        self._by_peer: dict[str, _Entry] = {}
        self._by_discr: dict[int, _Entry] = {}
        self.dropped: dict[str, int] = {}   # packets no session could be charged with

    # ------------------------------------------------------------------ sessions

    def add(self, peer: str, timers: BfdTimers, listener: Listener, *, local: str | None = None) -> None:
        """Start (or join) the session towards ``peer``; ``listener(peer, change)`` hears its
        state changes. A second listener shares the session and its timers."""
        peer = str(ip_address(peer))
        self._loop = asyncio.get_running_loop()
        e = self._by_peer.get(peer)
        if e is not None:
            e.listeners.append(listener)
            return
        family = socket.AF_INET6 if ip_address(peer).version == 6 else socket.AF_INET
        self._open_rx(family)
        discr = self._new_discriminator()
        sock = self._open_tx(family, peer, local)
        e = _Entry(peer, timers, BfdSession(timers, discr, rng=self._rng, now=self._loop.time()), sock)
        e.listeners.append(listener)
        self._by_peer[peer] = e
        self._by_discr[discr] = e
        self._info("bfd session added", peer=peer, local=e.local, discriminator=discr,
                   tx_ms=timers.desired_min_tx / 1000, rx_ms=timers.required_min_rx / 1000,
                   detect_mult=timers.detect_mult, passive=timers.passive)
        self._run(e)

    def update(self, peer: str, timers: BfdTimers) -> None:
        e = self._by_peer[str(ip_address(peer))]
        if e.session.timers != timers:
            e.session.set_timers(timers, self._loop.time())
            self._info("bfd timers changed", peer=e.peer, tx_ms=timers.desired_min_tx / 1000,
                       rx_ms=timers.required_min_rx / 1000, detect_mult=timers.detect_mult)
            self._run(e)

    def remove(self, peer: str, listener: Listener | None = None) -> None:
        """Drop ``listener``; the last one gone, send AdminDown (diag 7) and close the session."""
        e = self._by_peer.get(str(ip_address(peer)))
        if e is None:
            return
        if listener is not None and listener in e.listeners:
            e.listeners.remove(listener)
        if e.listeners and listener is not None:
            return
        e.session.admin_down(self._loop.time())
        self._send(e)
        self._close(e)
        self._info("bfd session removed", peer=e.peer)

    def close(self) -> None:
        for e in list(self._by_peer.values()):
            self.remove(e.peer)
        for s in self._rx.values():
            self._loop.remove_reader(s.fileno())
            s.close()
        self._rx.clear()

    def state(self, peer: str) -> BfdState | None:
        e = self._by_peer.get(str(ip_address(peer)))
        return e.session.state if e is not None else None

    def peers(self) -> list[BfdPeerView]:
        now = self._loop.time() if self._loop is not None else 0.0
        out = []
        for e in self._by_peer.values():
            s = e.session
            out.append(BfdPeerView(
                peer=e.peer, local=e.local, state=s.state.label, remote_state=s.remote_state.label,
                local_discriminator=s.local_discr, remote_discriminator=s.remote_discr,
                diagnostic=s.diag.text, remote_diagnostic=s.remote_diag.text,
                tx_interval_ms=s.tx_interval * 1000, rx_interval_ms=s.adv_rx / 1000,
                detect_mult=s.timers.detect_mult, remote_detect_mult=s.remote_detect_mult,
                detection_time_ms=s.detection_time * 1000,
                configured_tx_ms=s.timers.desired_min_tx / 1000,
                configured_rx_ms=s.timers.required_min_rx / 1000, passive=s.timers.passive,
                uptime_seconds=(now - s.last_up) if s.state is BfdState.UP and s.last_up is not None else None,
                up_transitions=s.up_transitions, down_transitions=s.down_transitions,
                last_down_diagnostic=s.last_down_diag.text, packets_in=s.rx_packets,
                packets_out=s.tx_packets, dropped=dict(s.dropped)))
        return out

    # ------------------------------------------------------------------ effects

    def _new_discriminator(self) -> int:
        while True:
            d = self._rng.randrange(1, 2 ** 32)
            if d not in self._by_discr:
                return d

    def _open_rx(self, family: int) -> None:
        if family in self._rx:
            return
        s = socket.socket(family, socket.SOCK_DGRAM)
        try:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                s.setsockopt(socket.IPPROTO_IPV6, _IPV6_RECVHOPLIMIT, 1)
                s.bind(("::", self.port))
            else:
                s.setsockopt(socket.IPPROTO_IP, _IP_RECVTTL, 1)
                s.bind(("0.0.0.0", self.port))
        except OSError as exc:
            s.close()
            raise OSError(exc.errno, f"BFD: cannot listen on UDP port {self.port} "
                          f"({'IPv6' if family == socket.AF_INET6 else 'IPv4'}): {exc.strerror}; "
                          "is another BFD daemon (e.g. FRR bfdd) running on this host?") from None
        s.setblocking(False)
        self._rx[family] = s
        self._loop.add_reader(s.fileno(), self._readable, s)

    def _open_tx(self, family: int, peer: str, local: str | None) -> socket.socket:
        s = socket.socket(family, socket.SOCK_DGRAM)
        if family == socket.AF_INET6:
            s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_UNICAST_HOPS, 255)
        else:
            s.setsockopt(socket.IPPROTO_IP, socket.IP_TTL, 255)
        for _ in range(64):   # RFC 5881 §4: a source port in 49152-65535, unique per session
            try:
                s.bind((local or ("::" if family == socket.AF_INET6 else "0.0.0.0"),
                        self._rng.randint(*SOURCE_PORTS)))
                break
            except OSError as exc:
                if exc.errno != errno.EADDRINUSE:
                    s.close()
                    raise
        else:
            s.close()
            raise OSError(errno.EADDRINUSE, "BFD: no free source port in 49152-65535")
        s.connect((peer, BFD_PORT))
        s.setblocking(False)
        return s

    def _readable(self, sock: socket.socket) -> None:
        for _ in range(64):   # drain, but let other work run under a flood
            try:
                data, anc, _flags, src = sock.recvmsg(512, socket.CMSG_SPACE(4))
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return
            self._datagram(data, anc, src[0])

    def _datagram(self, data: bytes, anc, src: str) -> None:
        ttl = None
        for level, kind, value in anc:
            if (level, kind) in ((socket.IPPROTO_IP, _IP_TTL), (socket.IPPROTO_IPV6, _IPV6_HOPLIMIT)):
                ttl = struct.unpack("i", value[:4])[0] if len(value) >= 4 else value[0]
        src = src.split("%", 1)[0]
        e = self._by_peer.get(src)
        if ttl != 255:
            self._drop(e, "ttl", f"TTL/hop limit {ttl} from {src} (single-hop BFD needs 255)")
            return
        try:
            p = decode(data)
        except BfdPacketError as err:
            self._drop(e, err.reason, f"from {src}: {err}")
            return
        if p.your_discriminator:
            e = self._by_discr.get(p.your_discriminator)
            if e is None or e.peer != src:
                self._drop(None, "unknown_discriminator", f"from {src}: Your Discriminator "
                           f"{p.your_discriminator} matches no session")
                return
        elif e is None:
            self._drop(None, "unknown_peer", f"from {src}: no BFD session with this address")
            return
        try:
            e.session.receive(p, self._loop.time())
        except BfdPacketError:
            return   # counted by the session
        self._run(e)

    def _drop(self, e: _Entry | None, reason: str, detail: str) -> None:
        if e is not None:
            e.session.drop(reason)
        else:
            self.dropped[reason] = self.dropped.get(reason, 0) + 1
        if self.log is not None:
            self.log.debug("bfd packet dropped", reason=reason, detail=detail)

    def _run(self, e: _Entry) -> None:
        """After any input: send what the session queued, report changes, re-arm its timer."""
        now = self._loop.time()
        s = e.session
        deadline = s.next_deadline()
        if deadline is not None and deadline <= now:
            s.handle_timer(now)
        self._send(e)
        for ch in s.events():
            if ch.new is BfdState.UP:
                e.up_wall = time.time()
            level = "warning" if ch.old is BfdState.UP else "info"
            if self.log is not None:
                getattr(self.log, level)("bfd state", peer=e.peer, old=ch.old.label, new=ch.new.label,
                                         diagnostic=ch.diag.text)
            for listener in list(e.listeners):
                listener(e.peer, ch)
        if e.peer not in self._by_peer:
            return
        if e.timer is not None:
            e.timer.cancel()
        deadline = s.next_deadline()
        e.timer = self._loop.call_at(deadline, self._on_timer, e) if deadline is not None else None

    def _on_timer(self, e: _Entry) -> None:
        e.timer = None
        e.session.handle_timer(self._loop.time())
        self._run(e)

    def _send(self, e: _Entry) -> None:
        for p in e.session.packets_to_send():
            try:
                e.sock.send(encode(p))
            except OSError:
                pass   # unreachable / no buffer: the peer's detection timer covers it

    def _close(self, e: _Entry) -> None:
        if e.timer is not None:
            e.timer.cancel()
        e.sock.close()
        self._by_peer.pop(e.peer, None)
        self._by_discr.pop(e.session.local_discr, None)

    def _info(self, event: str, **kw) -> None:
        if self.log is not None:
            self.log.info(event, **kw)


_SHARED: dict[int, BfdManager] = {}


def shared_manager(logger=None) -> BfdManager:
    """The process's manager for the running event loop (UDP 3784 can be bound only once)."""
    loop = asyncio.get_running_loop()
    m = _SHARED.get(id(loop))
    if m is None or m._loop not in (None, loop):
        m = _SHARED[id(loop)] = BfdManager(logger=logger)
    if m.log is None and logger is not None:
        m.log = logger
    m._loop = loop
    return m


def existing_manager() -> BfdManager | None:
    """The shared manager if BFD is in use in this process (for the API and metrics)."""
    for m in _SHARED.values():
        if m._loop is not None and not m._loop.is_closed():
            return m
    return None
