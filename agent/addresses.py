"""One parser for the IP address strings the control plane reads at every start.

At 20,000 Services each VIP string is turned into an address by LB-IPAM, the datapath's
frontend keys, the announce rule and the advertised prefixes: ~180,000 ``ipaddress`` parses,
a second of CPU on the start-up's critical path. :func:`ip_address` is
``ipaddress.ip_address`` (the same values, the same ``ValueError`` for bad input) that parses
dotted-quad IPv4 with the C library's ``inet_pton`` (a third of the cost) and remembers its
answers, so every VIP is parsed once per process.
"""

from __future__ import annotations

import functools
import ipaddress
import socket

__all__ = ["ip_address", "host_network"]

_IPv4Address, _IPv4Network, _IPv6Network = ipaddress.IPv4Address, ipaddress.IPv4Network, ipaddress.IPv6Network
_ADDRESS_TYPES = (ipaddress.IPv4Address, ipaddress.IPv6Address)


@functools.lru_cache(maxsize=1 << 17)
def ip_address(value) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """``ipaddress.ip_address(value)``, remembered. inet_pton accepts only the plain dotted
    quad that Python accepts too (no leading zeros, no shorthand); anything else (IPv6,
    integers, bad input) takes the ipaddress route and its error."""
    if type(value) is str and ":" not in value:
        try:
            return _IPv4Address(socket.inet_pton(socket.AF_INET, value))
        except (OSError, UnicodeError, ValueError):
            pass
    return ipaddress.ip_address(value)


def host_network(value, length: int | None = None) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    """``ipaddress.ip_network(f"{value}/{length}", strict=False)`` (length None: the host
    prefix, /32 or /128) without formatting and parsing the text again. ``value``: a string
    or an address."""
    addr = value if isinstance(value, _ADDRESS_TYPES) else ip_address(value)
    if length is None:
        length = addr.max_prefixlen
    cls = _IPv4Network if addr.version == 4 else _IPv6Network
    return cls((int(addr), length), strict=False)
