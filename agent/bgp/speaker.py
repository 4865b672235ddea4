"""BgpSpeaker: neighbors, sockets, listeners, collisions; the protocol is in the sans-IO core.

One :class:`_Peer` per configured neighbor holds the Adj-RIB-Out (kept across sessions) and
the :class:`SessionDriver` of its current session, plus, during a connection collision
(RFC 4271 §6.8), the drivers of the competing incoming connections.
"""

from __future__ import annotations

import asyncio
import errno
import random
import socket
import time
from dataclasses import dataclass, field
from ipaddress import ip_address

from agent.bgp.aio import BgpProtocol, SessionDriver, set_md5, set_min_ttl, set_ttl, set_user_timeout
from agent.bgp.codec import encode, encode_prefix, prefix_from_key
from agent.bgp.errors import ErrorCode as E
from agent.bgp.fsm import State
from agent.bgp.messages import (
    Communities, Family, LargeCommunities, LocalPref, Med, NextHop, Notification, OriginAttr,
    PathAttributes,
)
from agent.bgp.rib import AdjRibOut
from agent.bgp.session import (
    ConnectFailed, ConnectRequested, EndOfRibReceived, OpenReceived, RouteRefreshReceived, RoutesNotSent,
    Session, SessionConfig, SessionDown, SessionEstablished, StateChanged, UpdateErrorHandled, UpdateReceived,
)
from agent.bgp.unnumbered import RouterAdvertiser, sockaddr, with_zone, zone_of

__all__ = ["BgpSpeaker"]


class _NullLogger:
    def __getattr__(self, name):
        return lambda *a, **k: None

    def bind(self, **kw):
        return self


def shutdown_message(message: str) -> bytes:
    """RFC 8203 / RFC 9003 shutdown communication: length octet + UTF-8 (cut at 128 bytes)."""
    raw = message.encode("utf-8")[:128]
    while raw:
        try:
            raw.decode("utf-8")
            break
        except UnicodeDecodeError:
            raw = raw[:-1]
    return bytes((len(raw),)) + raw if raw else b""


# Pending route changes at which advertise()/withdraw() stop waiting for the next loop iteration
# and send (about three full 4096-byte UPDATEs of IPv4 prefixes).
FLUSH_EVERY = 2048

# NeighborConfig fields whose change needs a new session (they live in the OPEN or in the TCP
# connection); everything else is applied in place.
_RESET_FIELDS = ("peer_asn", "port", "local_address", "password", "hold_time", "keepalive", "families",
                 "graceful_restart", "restart_time", "passive", "link_local_next_hop", "ttl_security_hops")


@dataclass
class _Peer:
    cfg: object
    rib_out: dict[Family, AdjRibOut]
    driver: SessionDriver | None = None
    candidates: list[SessionDriver] = field(default_factory=list)
    rib_out_views: dict = field(default_factory=dict)  # family -> (rib version, {network: attrs})
    ever_established: bool = False
    established_wall: float | None = None
    last_error: str | None = None
    removed: bool = False


class BgpSpeaker:
    """See docs/internal/speaker-api.md for the contract and docs/bgp-speaker.md for the RFCs."""

    def __init__(self, config, *, logger=None):
        self.config = config
        self.log = logger if logger is not None else _NullLogger()
        self._peers: dict[str, _Peer] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._servers: list[asyncio.AbstractServer] = []
        self._listen_socks: list[socket.socket] = []
        self._rng = random.Random()
        self._started = False
        self._hint_tasks: set[asyncio.Task] = set()  # route lookups for connect-failure hints
        self._bfd_manager = None   # agent.bfd.transport.BfdManager, once a neighbor uses BFD
        # Router Advertisements on the interfaces of link-local (unnumbered) neighbors, so the
        # router learns our address (agent.bgp.unnumbered)
        self._advertiser = RouterAdvertiser(logger=self.log)
        # Called (no arguments) whenever a peer's Adj-RIB-In may have changed: an UPDATE came
        # in, a session went down (its routes were dropped), a neighbor was removed. The
        # daemon's route reconciler uses it to import received routes into the kernel.
        self.on_rib_in_change = None
        # True: sessions hold End-of-RIB until release_end_of_rib() (Session.hold_end_of_rib)
        self.hold_end_of_rib = False

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._started = True
        if self.config.listen_port is not None:
            for addr in self.config.listen_addresses:
                await self._listen(addr, self.config.listen_port)
            if not self._servers:
                raise OSError(f"could not listen on port {self.config.listen_port} on any of "
                              f"{self.config.listen_addresses}")
        self._sync_advertiser()
        for peer in self._peers.values():  # neighbors added before start()
            self._start_peer(peer)

    async def stop(self, *, notify: bool = True, message: str = "") -> None:
        """Stop every session. ``notify=False``: close TCP without NOTIFICATION (graceful
        restart: peers keep our routes as stale while we restart). Otherwise Cease 6/2
        Administrative Shutdown carrying ``message`` (RFC 8203)."""
        for server in self._servers:
            server.close()
        self._servers.clear()
        self._listen_socks.clear()
        data = shutdown_message(message) if notify else b""
        drivers = []
        for peer in self._peers.values():
            peer.removed = True
            for d in self._drivers(peer):
                d.call(d.session.stop, self._now(), notify=notify, subcode=E.ADMINISTRATIVE_SHUTDOWN, data=data)
                drivers.append(d)
        await asyncio.gather(*(d.wait_closed() for d in drivers))
        for d in drivers:
            d.shutdown()
        for peer in self._peers.values():
            # BFD last: the peer sees the Cease (or, graceful, the TCP close) before BFD AdminDown.
            self._bfd_sync(peer.cfg, None)
        for task in list(self._hint_tasks):
            task.cancel()
        self._advertiser.close()
        self.log.info("speaker stopped", notify=notify, message=message or None)
        self._started = False

    # ------------------------------------------------------------------ neighbors

    async def add_neighbor(self, cfg) -> None:
        key = cfg.address
        if key in self._peers:
            raise ValueError(f"neighbor {key} already exists; use update_neighbor")
        self._bfd_sync(None, cfg)   # first: a BFD socket error fails the add as a whole (retried)
        peer = _Peer(cfg, {f: AdjRibOut() for f in Family})
        self._peers[key] = peer
        self._set_listener_key(cfg.address, cfg.password)
        self._update_listener_ttl()
        if self._started:
            self._sync_advertiser()
            self._start_peer(peer)
        self.log.info("neighbor added", peer=key, peer_asn=cfg.peer_asn, port=cfg.port,
                      passive=cfg.passive, families=[f.short for f in cfg.families])
        if cfg.passive and self.config.listen_port is None:
            self.log.warning("passive neighbor but the speaker has no listener (listen_port is None): "
                             "this session can never come up", peer=key)

    async def update_neighbor(self, cfg) -> None:
        peer = self._peer(cfg.address)
        old = peer.cfg
        changed = [f for f in _RESET_FIELDS if getattr(old, f) != getattr(cfg, f)]
        self._bfd_sync(old, cfg)
        peer.cfg = cfg
        if old.password != cfg.password:
            self._set_listener_key(cfg.address, cfg.password)
        self._update_listener_ttl()
        if not changed:
            d = peer.driver
            if d is not None and d.transport is not None and old.ebgp_multihop_ttl != cfg.ebgp_multihop_ttl:
                sock = d.transport.get_extra_info("socket")
                if sock is not None:
                    set_ttl(sock, self._ttl(cfg))
            if d is not None:
                d.session.config = self._session_config(cfg)  # connect_retry etc. for later use
            self.log.info("neighbor updated in place", peer=cfg.address)
            return
        self.log.info("neighbor changed; resetting the session", peer=cfg.address, fields=changed)
        await self._stop_peer(peer, subcode=E.OTHER_CONFIGURATION_CHANGE)
        peer.removed = False
        if self._started:
            self._start_peer(peer)

    async def remove_neighbor(self, address: str, message: str = "") -> None:
        """Cease 6/3 Peer De-configured (RFC 8538 Hard Reset when N was negotiated)."""
        peer = self._peer(address)
        await self._stop_peer(peer, subcode=E.PEER_DECONFIGURED)
        self._bfd_sync(peer.cfg, None)   # after the Cease, so the peer logs why
        self._set_listener_key(peer.cfg.address, None)
        del self._peers[peer.cfg.address]
        self._update_listener_ttl()
        if self._started:
            self._sync_advertiser()
        self._rib_in_changed()
        self.log.info("neighbor removed", peer=peer.cfg.address, message=message or None)

    async def reset_neighbor(self, address: str, *, soft: bool = False) -> str:
        """Operator reset (``vipctl bgp reset``); returns what was done, for people.

        Hard: Cease 6/4 Administrative Reset (RFC 4486; RFC 8538 Hard Reset when N was
        negotiated, so the peer really drops our routes) and an immediate new connection.
        Soft: the session stays up; the whole table is sent again and the peer is asked for
        its routes (route refresh)."""
        peer = self._peer(address)
        d = peer.driver
        if soft:
            if d is None or d.session.state is not State.ESTABLISHED:
                raise ValueError(f"neighbor {peer.cfg.address} is not established "
                                 f"({d.session.state.value if d else 'idle'}): nothing to refresh; "
                                 "use a hard reset to reconnect now")
            d.call(d.session.soft_reset, self._now())
            self.log.info("neighbor soft reset: table re-sent, route refresh requested", peer=peer.cfg.address)
            return "soft reset: Adj-RIB-Out re-sent, route refresh requested"
        await self._stop_peer(peer, subcode=E.ADMINISTRATIVE_RESET)
        if self._started:
            self._start_peer(peer)  # connects right away, not after connectRetryTime
        self.log.info("neighbor reset by the operator (Cease/Administrative Reset); reconnecting",
                      peer=peer.cfg.address)
        return "hard reset: Cease/Administrative Reset sent, reconnecting"

    # ------------------------------------------------------------------ paths

    def advertise(self, address: str, family: Family, prefix, attrs: PathAttributes) -> None:
        peer = self._peer(address)
        rib = peer.rib_out[family]
        if rib.advertise(_prefix_key(family, prefix), attrs):
            self._changed(peer, rib)

    def withdraw(self, address: str, family: Family, prefix) -> None:
        peer = self._peer(address)
        rib = peer.rib_out[family]
        if rib.withdraw(_prefix_key(family, prefix)):
            self._changed(peer, rib)

    def advertise_many(self, address: str, family: Family, prefixes, attrs: PathAttributes) -> int:
        """advertise() for many prefixes with the same attributes; returns how many changed.
        A prefix of the wrong family raises ValueError (the ones before it are applied)."""
        return self._apply_many(address, family, prefixes, lambda rib, key: rib.advertise(key, attrs))

    def withdraw_many(self, address: str, family: Family, prefixes) -> int:
        """withdraw() for many prefixes; returns how many were advertised (and are now withdrawn)."""
        return self._apply_many(address, family, prefixes, lambda rib, key: rib.withdraw(key))

    def _apply_many(self, address: str, family: Family, prefixes, change) -> int:
        peer = self._peer(address)
        rib = peer.rib_out[family]
        changed = 0
        for prefix in prefixes:
            if change(rib, _prefix_key(family, prefix)):
                changed += 1
                # hand full batches to TCP while the caller's loop still runs
                if len(rib.pending) >= FLUSH_EVERY:
                    self._changed(peer, rib)
        if changed:
            self._changed(peer, rib)
        return changed

    def adj_rib_out(self, address: str, family: Family) -> dict:
        peer = self._peer(address)
        rib = peer.rib_out[family]
        cached = peer.rib_out_views.get(family)
        if cached is None or cached[0] != rib.version:
            # Building 100k network objects costs ~0.2 s: do it only when the RIB changed.
            cached = (rib.version, {prefix_from_key(k, family.afi): a for k, a in rib.routes.items()})
            peer.rib_out_views[family] = cached
        return dict(cached[1])

    def adj_rib_out_sent(self, address: str, family: Family) -> dict:
        """What the Established session sent in ``family``: {network: SentPath}, the
        attributes decoded from the UPDATE bytes (AS_PATH, NEXT_HOP, LOCAL_PREF as on the
        wire). A prefix changed since the session's last flush shows what the peer holds, its
        previous attributes. Empty while no session is Established (nothing was sent)."""
        peer = self._peer(address)
        d = peer.driver
        s = d.session if d is not None else None
        if s is None or s.state is not State.ESTABLISHED or s.encoder is None or family not in s.families:
            return {}
        rib, enc = peer.rib_out[family], s.encoder
        pending = rib.pending
        out = {}
        for attrs, keys in rib.groups.items():
            sent = enc.sent_path(family, attrs)
            if sent is None:
                continue
            for k in keys:
                if k not in pending:
                    out[prefix_from_key(k, family.afi)] = sent
        for k in pending:   # not flushed yet: the peer holds the previous attributes (or nothing)
            prev = rib.previous.get(k)
            sent = enc.sent_path(family, prev) if prev is not None else None
            if sent is not None:
                out[prefix_from_key(k, family.afi)] = sent
        return out

    def adj_rib_in(self, address: str, family: Family) -> dict:
        peer = self._peer(address)
        d = peer.driver
        if d is None:
            return {}
        out = {}
        for k, attrs in d.session.rib_in[family].routes.items():
            out[prefix_from_key(k, family.afi)] = _path_attributes(attrs)
        return out

    def peers(self) -> list:
        from agent.bgp.api import FamilyCounts, PeerState

        now = self._now()
        result = []
        for peer in self._peers.values():
            cfg = peer.cfg
            d = peer.driver
            s = d.session if d is not None else None
            est = s is not None and s.state is State.ESTABLISHED
            fams = {}
            for f in cfg.families:
                rin = s.rib_in[f] if s is not None else None
                fams[f] = FamilyCounts(
                    received=(len(rin.routes) + len(rin.rejected)) if rin else 0,
                    accepted=len(rin.routes) if rin else 0,
                    advertised=s.advertised_count(f) if s is not None else 0)
            uptime = (now - s.established_at) if est and s.established_at is not None else None
            result.append(PeerState(
                address=cfg.address, port=cfg.port,
                local_address=(s.local_address if s is not None and s.local_address else cfg.local_address),
                local_asn=self.config.asn,
                peer_asn=(s.peer_asn if s is not None and s.peer_asn else cfg.peer_asn),
                state=s.state.value if s is not None else "idle",
                uptime_seconds=uptime,
                established_at=peer.established_wall if uptime is not None else None,
                hold_time=s.hold_time if est else None,
                keepalive=s.keepalive_time if est else None,
                local_capabilities=s.local_capabilities() if s is not None else (),
                remote_capabilities=s.remote_capabilities() if s is not None else (),
                families=fams,
                last_error=((_not_sent(s) if est else None)
                            or (s.last_error if s is not None and s.last_error else peer.last_error))))
        return result

    # ------------------------------------------------------------------ BFD (RFC 5882)

    def _bfd_sync(self, old, new) -> None:
        """Start, retime or stop the BFD session of a neighbor whose ``bfd`` setting changed."""
        before = old.bfd if old is not None else None
        after = new.bfd if new is not None else None
        if before == after:
            return
        from agent.bfd.transport import shared_manager

        manager = self._bfd_manager or shared_manager(self.log)
        self._bfd_manager = manager
        cfg = new or old
        if after is None:
            manager.remove(cfg.address, self._on_bfd)
        elif before is None:
            manager.add(cfg.address, after, self._on_bfd, local=cfg.local_address)
        else:
            manager.update(cfg.address, after)

    def _on_bfd(self, address: str, change) -> None:
        """BFD Up -> Down: take the BGP session down now (Cease/BFD Down); it reconnects on its
        usual schedule. BFD never brings BGP up: that stays with the BGP FSM."""
        peer = self._peers.get(address)
        if peer is None or not change.failed:
            return
        for d in self._drivers(peer):
            d.call(d.session.bfd_down, self._now(), change.diag.text)
        self.log.warning("bfd down: BGP session closed", peer=address, diagnostic=change.diag.text)

    # ------------------------------------------------------------------ internals

    def _now(self) -> float:
        return self._loop.time() if self._loop is not None else time.monotonic()

    def _peer(self, address: str) -> _Peer:
        peer = self._peers.get(address)  # the common case: the same normalised string
        if peer is not None:
            return peer
        try:
            return self._peers[str(ip_address(address))]
        except (KeyError, ValueError):
            raise KeyError(f"no neighbor {address}") from None

    def release_end_of_rib(self) -> None:
        """Every path is in the Adj-RIB-Outs: End-of-RIB to every peer that is waiting for it."""
        self.hold_end_of_rib = False
        for peer in self._peers.values():
            for d in self._drivers(peer):
                d.call(d.session.release_end_of_rib)

    def _sync_advertiser(self) -> None:
        self._advertiser.set_interfaces({z for z in (zone_of(p.cfg.address) for p in self._peers.values()) if z})

    def _drivers(self, peer: _Peer) -> list[SessionDriver]:
        return [d for d in (peer.driver, *peer.candidates) if d is not None]

    def _changed(self, peer: _Peer, rib: AdjRibOut) -> None:
        """A route of ``peer`` changed. The UPDATEs normally go out on the next loop iteration
        (all changes of one pass together); once FLUSH_EVERY changes are pending they are sent
        right away, so a 100k-prefix withdraw loop is on the wire while it still runs (and the
        pending dicts stay small). ``rib.pending`` is only filled while a session is up."""
        if not rib.pending:
            return  # no Established session: the next one sends the whole table
        d = peer.driver
        if d is None or d.session.state is not State.ESTABLISHED:
            return
        if len(rib.pending) >= FLUSH_EVERY and not d.paused:
            d.transmit()
        elif not d.flush_scheduled:
            d.request_flush()

    def _session_config(self, cfg) -> SessionConfig:
        return SessionConfig(
            local_asn=self.config.asn, router_id=self.config.router_id, peer_asn=cfg.peer_asn,
            hold_time=cfg.hold_time, keepalive=cfg.keepalive, connect_retry=float(cfg.connect_retry),
            passive=cfg.passive, families=tuple(cfg.families), graceful_restart=cfg.graceful_restart,
            restart_time=cfg.restart_time)

    def _new_driver(self, peer: _Peer) -> SessionDriver:
        session = Session(self._session_config(peer.cfg), peer.rib_out, rng=self._rng,
                          restarting=not peer.ever_established)
        session.hold_end_of_rib = self.hold_end_of_rib
        return SessionDriver(session, self._loop, lambda d, evs, p=peer: self._on_events(p, d, evs),
                             link_local_next_hop=peer.cfg.link_local_next_hop)

    def _start_peer(self, peer: _Peer) -> None:
        peer.removed = False
        peer.driver = self._new_driver(peer)
        peer.driver.call(peer.driver.session.start, self._now())

    async def _stop_peer(self, peer: _Peer, *, subcode: int) -> None:
        peer.removed = True
        drivers = self._drivers(peer)
        for d in drivers:
            d.call(d.session.stop, self._now(), notify=True, subcode=subcode)
        await asyncio.gather(*(d.wait_closed() for d in drivers))
        for d in drivers:
            d.shutdown()
        peer.driver = None
        peer.candidates.clear()

    def _ttl(self, cfg) -> int:
        if cfg.ttl_security_hops is not None:
            return 255  # RFC 5082: always send 255, check on receipt
        if cfg.ebgp_multihop_ttl is not None:
            return cfg.ebgp_multihop_ttl
        ebgp = cfg.peer_asn != 0 and cfg.peer_asn != self.config.asn
        return 1 if ebgp else 255

    def _prepare_socket(self, sock: socket.socket, cfg) -> None:
        set_ttl(sock, self._ttl(cfg))
        if cfg.ttl_security_hops is not None:
            set_min_ttl(sock, 256 - cfg.ttl_security_hops)
        if cfg.hold_time:
            set_user_timeout(sock, cfg.hold_time)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    # -- active side

    def _start_connect(self, peer: _Peer, driver: SessionDriver, ev: ConnectRequested) -> None:
        if driver.connect_task is not None:
            driver.connect_task.cancel()
        driver.connect_task = self._loop.create_task(self._connect(peer, driver, ev.attempt))

    async def _connect(self, peer: _Peer, driver: SessionDriver, attempt: int) -> None:
        cfg = peer.cfg
        fam = socket.AF_INET6 if ip_address(cfg.address).version == 6 else socket.AF_INET
        sock = socket.socket(fam, socket.SOCK_STREAM)
        sock.setblocking(False)
        try:
            if cfg.password:
                set_md5(sock, cfg.address, cfg.password)  # before connect(): the SYN is signed
            self._prepare_socket(sock, cfg)
            if cfg.local_address:
                sock.bind((cfg.local_address, 0))
            driver.connect_sock = sock
            await self._loop.sock_connect(sock, sockaddr(cfg.address, cfg.port))
        except asyncio.CancelledError:
            sock.close()
            raise
        except OSError as exc:
            sock.close()
            if driver.connect_task is asyncio.current_task() and driver.session.connect_attempt == attempt:
                driver.connect_task = None
                driver.call(driver.session.connection_failed, self._now(), _connect_error(exc, cfg))
            return
        if driver.connect_task is not asyncio.current_task() or driver.session.state is not State.CONNECT:
            sock.close()
            return
        driver.connect_task = None

        def made(p: BgpProtocol, t: asyncio.Transport) -> SessionDriver | None:
            if driver.session.state is not State.CONNECT or driver.transport is not None:
                t.close()  # the session moved on (stopped, or took another connection) meanwhile
                return None
            driver.attach(p, t, outgoing=True)
            return driver

        try:
            await self._loop.create_connection(lambda: BgpProtocol(made), sock=sock)
        except OSError as exc:  # pragma: no cover - the socket is connected already
            sock.close()
            driver.call(driver.session.connection_failed, self._now(), str(exc))

    # -- passive side

    async def _listen(self, addr: str, port: int) -> None:
        fam = socket.AF_INET6 if ip_address(addr).version == 6 else socket.AF_INET
        sock = socket.socket(fam, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if fam == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind((addr, port))
            sock.listen(128)
            sock.setblocking(False)
        except OSError as exc:
            sock.close()
            if exc.errno in (errno.EADDRNOTAVAIL, errno.EAFNOSUPPORT):
                self.log.warning("listen address not available, skipped", address=addr, port=port,
                                 error=exc.strerror)
                return
            raise OSError(exc.errno, f"cannot listen on [{addr}]:{port}: {exc.strerror}") from exc
        for peer in self._peers.values():
            if peer.cfg.password and ip_address(peer.cfg.address).version == ip_address(addr).version:
                set_md5(sock, peer.cfg.address, peer.cfg.password)
        server = await self._loop.create_server(lambda: BgpProtocol(self._accepted), sock=sock)
        self._servers.append(server)
        self._listen_socks.append(sock)
        self._update_listener_ttl()
        self.log.info("listening", address=addr, port=sock.getsockname()[1])

    def listening_port(self) -> int | None:
        """The bound listen port (useful with listen_port=0)."""
        return self._listen_socks[0].getsockname()[1] if self._listen_socks else None

    def _update_listener_ttl(self) -> None:
        """GTSM peers need our SYN-ACKs (sent by the listener) at TTL 255 too; the listeners are
        shared, so they use 255 while any such peer of their family exists (-1: kernel default)."""
        for sock in self._listen_socks:
            v6 = sock.family == socket.AF_INET6
            gtsm = any(p.cfg.ttl_security_hops is not None and (ip_address(p.cfg.address).version == 6) == v6
                       for p in self._peers.values())
            set_ttl(sock, 255 if gtsm else -1)

    def _set_listener_key(self, address: str, password: str | None) -> None:
        for sock in self._listen_socks:
            if sock.family == (socket.AF_INET6 if ip_address(address).version == 6 else socket.AF_INET):
                set_md5(sock, address, password)

    def _accepted(self, protocol: BgpProtocol, transport: asyncio.Transport) -> SessionDriver | None:
        peername = transport.get_extra_info("peername")
        if not peername:  # reset before we got to it
            transport.close()
            return None
        remote = peername[0]
        try:
            key = str(ip_address(remote.split("%")[0]))
        except ValueError:
            key = remote
        zoned = with_zone(key, peername)
        if zoned in self._peers:   # a link-local peer is known with its zone ("fe80::1%eth0")
            key = zoned
        peer = self._peers.get(key)
        if peer is None or peer.removed:
            # RFC 4271 §8.2.1.1: refuse connections from unconfigured peers.
            self.log.warning("refused BGP connection from an unconfigured peer", remote=remote)
            transport.write(encode(Notification(E.CEASE, E.CONNECTION_REJECTED)))
            transport.close()
            return None
        sock = transport.get_extra_info("socket")
        if sock is not None:
            try:
                self._prepare_socket(sock, peer.cfg)
            except OSError:
                pass
        primary = peer.driver
        if primary is None or primary.session.admin_down:
            transport.close()
            return None
        state = primary.session.state
        if state in (State.IDLE, State.ACTIVE):
            primary.attach(protocol, transport, outgoing=False)
            return primary
        if state is State.ESTABLISHED:
            if primary.session.peer_graceful_restart is not None:
                # RFC 4724 §4.2: a new connection from a GR peer means it restarted: drop the old one.
                self.log.info("peer reconnected while established (graceful restart); replacing session",
                              peer=key)
                primary.call(primary.session.connection_failed, self._now(), "peer restarted (new connection)")
                primary.attach(protocol, transport, outgoing=False)
                return primary
            self.log.info("collision with an established session: refusing the new connection", peer=key)
            transport.write(encode(Notification(E.CEASE, E.CONNECTION_COLLISION_RESOLUTION)))
            transport.close()
            return None
        # Connect / OpenSent / OpenConfirm: our own connection is under way. The incoming one
        # gets its own session; the OPENs decide which survives (RFC 4271 §6.8).
        cand = self._new_driver(peer)
        peer.candidates.append(cand)
        cand.session.start(self._now(), passive=True)
        cand.attach(protocol, transport, outgoing=False)
        return cand

    # -- events

    def _on_events(self, peer: _Peer, driver: SessionDriver, events: list) -> None:
        log = self.log
        addr = peer.cfg.address
        for ev in events:
            if isinstance(ev, ConnectRequested):
                self._start_connect(peer, driver, ev)
            elif isinstance(ev, StateChanged):
                log.debug("bgp state", peer=addr, old=ev.old.value, new=ev.new.value)
            elif isinstance(ev, OpenReceived):
                self._resolve_collision(peer, driver, ev)
            elif isinstance(ev, SessionEstablished):
                peer.ever_established = True
                peer.last_error = None
                peer.established_wall = time.time()
                s = driver.session
                log.info("session established", peer=addr, peer_asn=s.peer_asn, hold_time=ev.hold_time,
                         keepalive=ev.keepalive, families=[f.short for f in ev.families],
                         local_address=s.local_address, remote_router_id=str(s.remote_router_id))
            elif isinstance(ev, ConnectFailed):
                peer.last_error = ev.reason
                self._log_connect_failed(peer, ev)
            elif isinstance(ev, SessionDown):
                if driver is not peer.driver:  # a connection that lost a collision: not news
                    log.info("extra connection closed", peer=addr, reason=ev.reason)
                    continue
                peer.last_error = driver.session.last_error or ev.reason
                log.warning("session down", peer=addr, reason=ev.reason, was_established=ev.was_established,
                            hint=_down_hint(ev, peer.cfg, self.config.asn),
                            retry_in=round(ev.retry_in, 1) if ev.retry_in is not None else None)
            elif isinstance(ev, UpdateErrorHandled):
                log.warning("malformed UPDATE handled (RFC 7606)", peer=addr, action=ev.action, reason=ev.reason)
            elif isinstance(ev, EndOfRibReceived):
                log.info("End-of-RIB received", peer=addr, family=ev.family.short)
            elif isinstance(ev, RoutesNotSent):
                log.warning("prefixes not sent to this peer", peer=addr, family=ev.family.short, reason=ev.reason)
            elif isinstance(ev, RouteRefreshReceived):
                log.info("route refresh received", peer=addr, family=ev.family.short, subtype=ev.subtype)
        if self.on_rib_in_change is not None and any(isinstance(ev, (UpdateReceived, SessionDown))
                                                     for ev in events):
            self._rib_in_changed()
        if driver in peer.candidates:
            if driver.session.state is State.IDLE:  # a losing or failed extra connection
                peer.candidates.remove(driver)
                self._loop.call_soon(driver.shutdown)
            elif driver.session.state is State.ESTABLISHED:
                self._promote(peer, driver)

    def _rib_in_changed(self) -> None:
        if self.on_rib_in_change is not None:
            self.on_rib_in_change()

    def _log_connect_failed(self, peer: _Peer, ev: ConnectFailed) -> None:
        cfg = peer.cfg
        ttl = self._ttl(cfg)

        def log(gateway: str | None = None) -> None:
            self.log.warning("connect failed", peer=cfg.address, port=cfg.port, reason=ev.reason,
                             hint=_connect_hint(ev, cfg, ttl=ttl, gateway=gateway),
                             retry_in=round(ev.retry_in, 1))

        if ttl != 1 or self._loop is None:
            log()
            return

        # eBGP's default TTL 1 dies at the first router: ask the kernel whether there is one.
        # pyroute2's blocking API runs its own event loop, hence the thread.
        async def lookup_then_log() -> None:
            try:
                gateway = await asyncio.wait_for(self._loop.run_in_executor(None, gateway_to, cfg.address), 2.0)
            except Exception:  # noqa: BLE001 - only a hint: log without it
                gateway = None
            log(gateway)

        task = self._loop.create_task(lookup_then_log())
        self._hint_tasks.add(task)
        task.add_done_callback(self._hint_tasks.discard)

    def _promote(self, peer: _Peer, winner: SessionDriver) -> None:
        """A candidate connection reached Established: it becomes the peer's session; every other
        connection attempt of this peer is closed."""
        old = peer.driver
        peer.candidates.remove(winner)
        peer.driver = winner
        others, peer.candidates = [old, *peer.candidates], []
        for d in others:
            if d is None:
                continue
            if d.session.state in (State.OPEN_SENT, State.OPEN_CONFIRM):
                d.call(d.session.collision_dump, self._now())
            elif d.session.state is not State.IDLE or not d.session.admin_down:
                d.call(d.session.stop, self._now(), notify=False)
            self._loop.call_soon(d.shutdown)

    def _resolve_collision(self, peer: _Peer, driver: SessionDriver, ev: OpenReceived) -> None:
        """RFC 4271 §6.8 (+ RFC 6286 §2.3 for equal identifiers): when a connection has both
        OPENs exchanged and another one has too, keep the one initiated by the speaker with the
        higher BGP identifier; an Established session wins over one that is not."""
        mine = driver.session.state
        if mine not in (State.OPEN_CONFIRM, State.ESTABLISHED):
            return  # this connection is already gone
        for other in [d for d in self._drivers(peer) if d is not driver]:
            st = other.session.state
            if st is State.ESTABLISHED and mine is not State.ESTABLISHED:
                winner, loser = other, driver
            elif st in (State.OPEN_CONFIRM, State.ESTABLISHED):
                keep_outgoing = collision_keeps_outgoing(self.config.router_id, str(ev.router_id),
                                                         self.config.asn, ev.peer_asn)
                winner, loser = (driver, other) if driver.session.outgoing == keep_outgoing else (other, driver)
            else:
                continue  # no OPEN there yet: decided when it arrives
            self.log.info("connection collision resolved", peer=peer.cfg.address,
                          kept="outgoing" if winner.session.outgoing else "incoming")
            if loser is peer.driver:
                peer.candidates.remove(winner)
                peer.driver = winner
            elif loser in peer.candidates:
                peer.candidates.remove(loser)
            if loser.session.state is State.ESTABLISHED:
                loser.call(loser.session.stop, self._now(), notify=True, subcode=E.CONNECTION_COLLISION_RESOLUTION)
            else:
                loser.call(loser.session.collision_dump, self._now())
            self._loop.call_soon(loser.shutdown)
            if loser is driver:
                return


def _prefix_key(family: Family, prefix) -> bytes:
    """The RIB key of ``prefix`` (its NLRI encoding), checking that it belongs to ``family``."""
    if (prefix.version == 4) is not (family is Family.IPV4_UNICAST):
        raise ValueError(f"prefix {prefix} does not belong to family {family.name}")
    return encode_prefix(prefix)


def collision_keeps_outgoing(local_id: str, remote_id: str, local_asn: int, remote_asn: int) -> bool:
    """RFC 4271 §6.8: keep the connection initiated by the speaker with the higher BGP
    identifier, i.e. our outgoing one iff our identifier is higher. RFC 6286 §2.3: with equal
    identifiers (possible on eBGP), the speaker with the larger AS number wins."""
    lid, rid = int(ip_address(local_id)), int(ip_address(remote_id))
    if lid != rid:
        return lid > rid
    return local_asn > remote_asn


def _not_sent(session) -> str | None:
    """What an Established session cannot carry (the encoder's reasons), else None."""
    enc = session.encoder
    if enc is None or not enc.unsendable:
        return None
    return "; ".join(f"{f.short} prefixes not sent: {why}" for f, why in enc.unsendable.items())


def _path_attributes(attrs: tuple) -> PathAttributes:
    kw = {}
    for a in attrs:
        if isinstance(a, OriginAttr):
            kw["origin"] = a.value
        elif isinstance(a, Med):
            kw["med"] = a.value
        elif isinstance(a, LocalPref):
            kw["local_pref"] = a.value
        elif isinstance(a, Communities):
            kw["communities"] = a.values
        elif isinstance(a, LargeCommunities):
            kw["large_communities"] = a.values
        elif isinstance(a, NextHop):
            kw["next_hop"] = str(a.address)
    try:
        return PathAttributes(**kw)
    except ValueError:
        kw.pop("next_hop", None)
        return PathAttributes(**kw)


def _connect_error(exc: OSError, cfg) -> str:
    names = {errno.ECONNREFUSED: "connection refused", errno.EHOSTUNREACH: "no route to host",
             errno.ENETUNREACH: "network unreachable", errno.ETIMEDOUT: "timed out",
             errno.EADDRNOTAVAIL: f"local address {cfg.local_address} is not configured on this host",
             errno.ECONNRESET: "connection reset"}
    return names.get(exc.errno, exc.strerror or str(exc))


def gateway_to(address: str) -> str | None:
    """The router through which the kernel reaches ``address``: its address, "" if the peer is
    on a directly connected subnet, None if unknown (no route, or the lookup failed)."""
    try:
        from pyroute2 import IPRoute

        with IPRoute() as ipr:
            routes = ipr.route("get", dst=address)
    except Exception:  # noqa: BLE001 - only a hint: any failure means "unknown"
        return None
    if not routes:
        return None
    return routes[0].get("RTA_GATEWAY") or ""


def _ttl_hint(cfg, ttl: int, gateway: str | None) -> str:
    """When our SYN leaves with TTL 1 (eBGP without ebgp_multihop_ttl) and the peer is behind a
    router, that router drops it (ICMP time exceeded, which Linux reports as "no route to host")."""
    if ttl != 1 or cfg.ttl_security_hops is not None:
        return ""
    if gateway:
        return (f"the peer is not directly connected (reached via {gateway}) but eBGP packets leave "
                "with TTL 1, so the first router drops them: set ebgp_multihop_ttl to the number of "
                "hops (Cilium: CiliumBGPPeerConfig spec.ebgpMultihop)")
    if gateway is None:
        return "if the peer is not directly connected, set ebgp_multihop_ttl (eBGP uses TTL 1 by default)"
    return ""


def _connect_hint(ev: ConnectFailed, cfg, *, ttl: int = 255, gateway: str | None = None) -> str:
    """A hint for people about why the connection failed. ``ttl``: the TTL our SYN used;
    ``gateway``: see gateway_to() (looked up only when ttl is 1)."""
    ttl_hint = _ttl_hint(cfg, ttl, gateway)
    if ttl_hint and gateway:  # a router two hops away: the TTL is the cause, whatever the errno
        return ttl_hint
    if ev.timed_out:
        if cfg.password:
            return ("no answer to our SYN: TCP MD5 key mismatch is a likely cause (the kernel silently "
                    "drops segments with a wrong or missing signature); also check reachability")
        if cfg.ttl_security_hops is not None:
            return (f"no answer to our SYN: with ttl_security_hops={cfg.ttl_security_hops} (GTSM) answers "
                    "from a peer that does not send TTL 255, or is further away, are dropped; also check "
                    "reachability")
        return ("no answer to our SYN: the peer is unreachable or filtered, or it requires a TCP MD5 "
                "password; for multihop eBGP check ebgp_multihop_ttl")
    if ev.reason == "connection refused":
        return (f"nothing accepts connections on port {cfg.port} at {cfg.address}: wrong port, BGP not "
                "running there, or the peer does not accept connections from us")
    if "unreachable" in ev.reason or "no route" in ev.reason:
        hint = "no route to the peer: check addresses and routes"
        return f"{hint}; {ttl_hint}" if ttl_hint else hint
    return ""


def _down_hint(ev: SessionDown, cfg, local_asn: int) -> str:
    n = ev.received or ev.sent
    if n is None:
        if not ev.was_established and "connection lost" in ev.reason:
            return ("the peer closed the connection before the session came up: it may have no neighbor "
                    "configured for our address (check local_address), or it expects a TCP MD5 password")
        return ""
    if ev.received is not None:
        if (n.code, n.subcode) == (2, 2):
            return f"the peer rejects our AS {local_asn}: check its remote-as for us"
        if (n.code, n.subcode) == (2, 3):
            return "the peer rejects our router ID (on iBGP it must differ from the peer's)"
        if (n.code, n.subcode) == (2, 6):
            return "the peer rejects our hold time: check hold_time against its minimum"
        if (n.code, n.subcode) == (6, 5):
            return "the peer rejected the connection: is a neighbor configured there for our address?"
    elif ev.sent is not None:
        if (n.code, n.subcode) == (2, 2):
            return "the peer's OPEN carries a different AS than configured peer_asn (or use peer_asn 0)"
        if (n.code, n.subcode) == (4, 0):
            return "no KEEPALIVE/UPDATE within the hold time: peer dead, link down, or traffic filtered"
    return ""
