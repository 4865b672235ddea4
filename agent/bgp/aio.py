"""The asyncio adapter: one sans-IO :class:`Session` <-> one TCP transport + one loop timer.

aioquic style: after every interaction the driver writes ``data_to_send()`` and re-arms a single
``loop.call_at`` handle at ``next_deadline()``. Writes are batched (each ``data_to_send`` call
returns many UPDATEs joined) and respect back-pressure: when the transport's buffer passes the
high-water mark asyncio calls ``pause_writing`` and the driver stops pulling bulk UPDATEs until
``resume_writing`` (control messages such as KEEPALIVE/NOTIFICATION are always written).

Socket options (TCP MD5, TTL, user timeout) are small helpers here too.
"""

from __future__ import annotations

import asyncio
import socket
import struct
from ipaddress import ip_address, ip_network
from typing import Callable

from agent.bgp.errors import BgpProtocolError
from agent.bgp.session import CloseConnection, Session

__all__ = ["SessionDriver", "BgpProtocol", "set_md5", "set_ttl", "set_min_ttl", "set_user_timeout",
           "link_local_for"]

TCP_MD5SIG = 14  # linux/tcp.h
_MD5_KEY_MAX = 80
WRITE_HIGH_WATER = 1 << 20
BULK_CHUNK = 256 * 1024


def set_md5(sock: socket.socket, peer: str, key: str | None) -> None:
    """RFC 2385 TCP MD5 signature key for ``peer`` on ``sock`` (None/"" removes it).
    Must be set on a connecting socket before connect() and on a listener before the SYN."""
    ip = ip_address(peer)
    raw = (key or "").encode()
    if len(raw) > _MD5_KEY_MAX:
        raise ValueError(f"TCP MD5 password longer than {_MD5_KEY_MAX} bytes")
    if ip.version == 4:
        ss = struct.pack("=H", socket.AF_INET) + b"\x00\x00" + ip.packed
    else:
        ss = struct.pack("=H", socket.AF_INET6) + b"\x00\x00" + b"\x00" * 4 + ip.packed + b"\x00" * 4
    # struct tcp_md5sig: sockaddr_storage, u8 flags, u8 prefixlen, u16 keylen, u32 ifindex, u8 key[80]
    opt = ss.ljust(128, b"\x00") + struct.pack("=BBHI", 0, 0, len(raw), 0) + raw.ljust(_MD5_KEY_MAX, b"\x00")
    try:
        sock.setsockopt(socket.IPPROTO_TCP, TCP_MD5SIG, opt)
    except OSError as exc:
        if key or exc.errno not in (2,):  # deleting a key that is not there: ENOENT, fine
            raise OSError(exc.errno, f"cannot set TCP MD5 key for {peer}: {exc.strerror} "
                                     "(kernel without CONFIG_TCP_MD5SIG?)") from exc


def set_ttl(sock: socket.socket, ttl: int) -> None:
    if sock.family == socket.AF_INET6:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_UNICAST_HOPS, ttl)
    else:
        sock.setsockopt(socket.IPPROTO_IP, socket.IP_TTL, ttl)


IP_MINTTL = 21  # linux/in.h
IPV6_MINHOPCOUNT = 73  # linux/in6.h


def set_min_ttl(sock: socket.socket, ttl: int) -> None:
    """RFC 5082 (GTSM): drop segments that arrive with a TTL / hop limit below ``ttl``."""
    if sock.family == socket.AF_INET6:
        sock.setsockopt(socket.IPPROTO_IPV6, IPV6_MINHOPCOUNT, ttl)
    else:
        sock.setsockopt(socket.IPPROTO_IP, IP_MINTTL, ttl)


def set_user_timeout(sock: socket.socket, seconds: int) -> None:
    """TCP_USER_TIMEOUT: unacknowledged data older than this kills the connection, so a dead
    peer is noticed by TCP too, not only by the hold timer."""
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, max(0, seconds) * 1000)


def link_local_for(local: str, peer: str, proc: str = "/proc/net/if_inet6") -> str | None:
    """Our IPv6 link-local address on the interface that holds ``local``, if the peer is
    directly connected through it (same prefix, or a link-local peer); else None."""
    try:
        lip, pip = ip_address(local), ip_address(peer)
        if lip.version != 6 or lip.is_link_local:
            return None
        rows = [line.split() for line in open(proc)]
    except (OSError, ValueError):
        return None
    entries = []
    for r in rows:
        if len(r) >= 6:
            entries.append((ip_address(bytes.fromhex(r[0])), int(r[2], 16), r[5]))
    dev = next(((plen, name) for addr, plen, name in entries if addr == lip), None)
    if dev is None:
        return None
    plen, name = dev
    if not (pip.is_link_local or pip in ip_network(f"{lip}/{plen}", strict=False)):
        return None
    return next((str(a) for a, _, n in entries if n == name and a.is_link_local), None)


class BgpProtocol(asyncio.Protocol):
    """Forwards transport callbacks to a driver chosen when the connection is made."""

    def __init__(self, on_made: Callable[["BgpProtocol", asyncio.Transport], "SessionDriver | None"]):
        self._on_made = on_made
        self.driver: SessionDriver | None = None
        self.transport: asyncio.Transport | None = None
        self.lost = asyncio.Event()

    def connection_made(self, transport):
        self.transport = transport
        self.driver = self._on_made(self, transport)

    def data_received(self, data):
        if self.driver is not None:
            self.driver.data_received(self, data)

    def connection_lost(self, exc):
        self.lost.set()
        if self.driver is not None:
            self.driver.connection_lost(self, exc)

    def pause_writing(self):
        if self.driver is not None:
            self.driver.paused = True

    def resume_writing(self):
        if self.driver is not None:
            self.driver.paused = False
            self.driver.transmit()


class SessionDriver:
    """Owns the effects of one Session: its transport, its connect task, its timer."""

    def __init__(self, session: Session, loop: asyncio.AbstractEventLoop,
                 on_events: Callable[["SessionDriver", list], None], *, link_local_next_hop: bool = True):
        self.session = session
        self.link_local_next_hop = link_local_next_hop
        self.loop = loop
        self.on_events = on_events
        self.protocol: BgpProtocol | None = None
        self.transport: asyncio.Transport | None = None
        self.connect_task: asyncio.Task | None = None
        self.connect_sock: socket.socket | None = None  # the socket connect_task is connecting
        self.paused = False
        self._closing: list[BgpProtocol] = []
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at: float | None = None
        self.flush_scheduled = False
        self.bytes_out = 0

    # -- driving the session

    def call(self, method, *args, **kw) -> list:
        try:
            events = method(*args, **kw)
        except BgpProtocolError as err:
            events = err.events
        self._after(events)
        return events

    def _after(self, events: list) -> None:
        self.transmit()
        closes = [e for e in events if isinstance(e, CloseConnection)]
        if closes:
            self._drop_transport(half_close=any(e.until_peer_closes for e in closes))
        if events:
            self.on_events(self, events)
        self.arm_timer()

    def transmit(self) -> None:
        t = self.transport
        if t is None or t.is_closing():
            return
        s = self.session
        while True:
            data = s.data_to_send(0 if self.paused else BULK_CHUNK)
            if data:
                self.bytes_out += len(data)
                t.write(data)
            if self.paused or not data or not s.wants_to_send:
                break
        unsent = s.take_routes_not_sent()
        if unsent:
            self.on_events(self, unsent)

    def request_flush(self) -> None:
        """Coalesce many advertise()/withdraw() calls of one loop iteration into one flush."""
        if not self.flush_scheduled and self.transport is not None:
            self.flush_scheduled = True
            self.loop.call_soon(self._flush)

    def _flush(self) -> None:
        self.flush_scheduled = False
        self.transmit()

    def arm_timer(self) -> None:
        when = self.session.next_deadline()
        if when == self._timer_at:
            return
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._timer_at = when
        if when is not None:
            self._timer = self.loop.call_at(when, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self._timer_at = None
        if self._connected_but_not_attached():
            # The loop was busy (a large reconcile pass) past the connect deadline while TCP
            # came up: let the connect task attach it first instead of timing out a working
            # connection and waiting a whole ConnectRetry for the next one.
            self._timer = self.loop.call_later(0.01, self._on_timer)
            return
        self.call(self.session.handle_timer, self.loop.time())

    def _connected_but_not_attached(self) -> bool:
        sock, task = self.connect_sock, self.connect_task
        if sock is None or task is None or task.done() or self.transport is not None:
            return False
        try:
            sock.getpeername()  # succeeds only once the handshake completed (no side effects)
        except OSError:
            return False
        return True

    # -- transport side

    def attach(self, protocol: BgpProtocol, transport: asyncio.Transport, *, outgoing: bool) -> None:
        if self.connect_task is not None and not outgoing:
            self.connect_task.cancel()
        self.connect_task = None
        self.protocol, self.transport = protocol, transport
        self.paused = False
        protocol.driver = self
        try:
            transport.set_write_buffer_limits(high=WRITE_HIGH_WATER)
        except (AttributeError, NotImplementedError):  # pragma: no cover
            pass
        local = transport.get_extra_info("sockname")[0]
        remote = transport.get_extra_info("peername")[0]
        self.call(self.session.connection_made, self.loop.time(), local, remote, outgoing=outgoing,
                  link_local=link_local_for(local, remote) if self.link_local_next_hop else None)

    def data_received(self, protocol: BgpProtocol, data: bytes) -> None:
        if protocol is not self.protocol:
            return
        self.call(self.session.receive_data, data, self.loop.time())

    def connection_lost(self, protocol: BgpProtocol, exc: Exception | None) -> None:
        if protocol is not self.protocol:
            return
        self.protocol = self.transport = None
        reason = f"{exc}" if exc else "closed by the peer"
        self.call(self.session.connection_failed, self.loop.time(), reason)

    def _drop_transport(self, *, half_close: bool = False) -> None:
        if self.connect_task is not None:
            self.connect_task.cancel()
            self.connect_task = None
        t, p = self.transport, self.protocol
        self.transport = self.protocol = None
        if p is not None:
            p.driver = None  # no more callbacks into the session from this connection
            self._closing = [c for c in self._closing if not c.lost.is_set()] + [p]
        if t is not None and half_close and t.can_write_eof():
            # FIN after what is buffered; the transport closes when the peer's FIN arrives
            # (wait_closed() bounds the wait and aborts)
            t.write_eof()
        elif t is not None:
            t.close()  # flushes what is buffered (the NOTIFICATION), then FIN

    async def wait_closed(self, timeout: float = 2.0) -> None:
        """Wait until every connection this driver closed (or holds) is really gone."""
        waiting = [p for p in (*self._closing, self.protocol) if p is not None and not p.lost.is_set()]
        if waiting:
            try:
                await asyncio.wait_for(asyncio.gather(*(p.lost.wait() for p in waiting)), timeout)
            except asyncio.TimeoutError:
                for p in waiting:
                    if p.transport is not None:
                        p.transport.abort()

    def shutdown(self) -> None:
        """Forget everything: cancel the timer and any connect attempt, abort the transport."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
            self._timer_at = None
        if self.connect_task is not None:
            self.connect_task.cancel()
            self.connect_task = None
        if self.transport is not None:
            self.transport.abort()
            self.transport = self.protocol = None
