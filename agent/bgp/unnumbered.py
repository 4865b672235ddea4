"""Unnumbered (IPv6 link-local) peering: make the router learn our link-local address.

A router peering with ``neighbor IFACE interface`` (FRR) knows no address for us: it learns
the neighbour's link-local address from the Router Advertisements it receives on that
interface, and refuses connections from neighbours it has not learned. So, like FRR on both
ends of an unnumbered link, vipd sends Router Advertisements on every interface that has a
link-local BGP neighbour: router lifetime 0 (RFC 4861 §4.2: "not a default router", so no
host on the link routes through us), no prefixes, no flags, and no source link-layer address
option: without it Linux creates no neighbour entry from the RA (it only flags an entry that
already exists), so other vipd nodes on a shared link normally do not take this node for
their unnumbered peer.

:func:`router_advertisement` is the message (pure); :class:`RouterAdvertiser` owns one raw
ICMPv6 socket and sends it on each interface in use, at once and then every ``interval``.
"""

from __future__ import annotations

import asyncio
import socket
import struct

__all__ = ["router_advertisement", "RouterAdvertiser", "RA_INTERVAL", "zone_of", "sockaddr", "with_zone"]

ND_ROUTER_ADVERT = 134
ALL_NODES = "ff02::1"
RA_INTERVAL = 10.0   # FRR's interval on unnumbered interfaces


def router_advertisement(cur_hop_limit: int = 64) -> bytes:
    """ICMPv6 Router Advertisement (RFC 4861 §4.2) with router lifetime 0 and no options.
    The checksum field is 0: the kernel fills it in for ICMPv6 raw sockets (RFC 3542 §3.1)."""
    return struct.pack("!BBHBBHII", ND_ROUTER_ADVERT, 0, 0, cur_hop_limit, 0, 0, 0, 0)


def zone_of(address: str) -> str | None:
    """``fe80::1%eth0`` -> ``eth0``; None for an address without a zone."""
    return address.partition("%")[2] or None


def sockaddr(address: str, port: int) -> tuple:
    """The socket address for ``address`` (zone-scoped link-local: with the interface index,
    resolved now, so a missing interface fails the connect with a clear error)."""
    zone = zone_of(address)
    if zone is None:
        return (address, port)
    try:
        index = socket.if_nametoindex(zone)
    except OSError:
        raise OSError(f"interface {zone!r} of link-local peer {address} does not exist") from None
    return (address.partition("%")[0], port, 0, index)


def with_zone(address: str, sockname: tuple) -> str:
    """``address`` with the zone of an IPv6 socket address whose scope id is set (a link-local
    peer: the kernel gives the interface index, not its name), else ``address`` unchanged."""
    if len(sockname) < 4 or not sockname[3]:
        return address
    try:
        return f"{address}%{socket.if_indextoname(sockname[3])}"
    except OSError:
        return address


class RouterAdvertiser:
    """Sends :func:`router_advertisement` on the interfaces of the link-local neighbours
    (:meth:`set_interfaces`, called whenever the neighbours change)."""

    def __init__(self, *, interval: float = RA_INTERVAL, logger=None):
        self.interval = interval
        self.log = logger
        self.interfaces: frozenset[str] = frozenset()
        self._sock: socket.socket | None = None
        self._task: asyncio.Task | None = None
        self._failed: set[str] = set()   # interfaces whose last send failed (logged once)

    def set_interfaces(self, interfaces) -> None:
        new = frozenset(interfaces)
        added, self.interfaces = new - self.interfaces, new
        self._failed &= new
        if not new:
            self.close()
            return
        for ifname in sorted(added):
            self._send(ifname)   # now: the router must know us before our first SYN arrives
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run())

    def close(self) -> None:
        self.interfaces = frozenset()
        if self._task is not None:
            self._task.cancel()
            self._task = None
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            for ifname in sorted(self.interfaces):
                self._send(ifname)

    def _send(self, ifname: str) -> None:
        try:
            if self._sock is None:
                sock = socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_ICMPV6)
                sock.setblocking(False)
                # RFC 4861 §6.1.2: receivers drop RAs whose hop limit is not 255
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_HOPS, 255)
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_LOOP, 0)
                self._sock = sock
            index = socket.if_nametoindex(ifname)
            self._sock.sendto(router_advertisement(), (ALL_NODES, 0, 0, index))
        except OSError as exc:
            if ifname not in self._failed and self.log is not None:
                self.log.warning("cannot send IPv6 Router Advertisement: the unnumbered peer cannot "
                                 "learn our link-local address", interface=ifname, error=str(exc))
            self._failed.add(ifname)
            return
        if ifname in self._failed and self.log is not None:
            self.log.info("IPv6 Router Advertisements sent again", interface=ifname)
        self._failed.discard(ifname)
