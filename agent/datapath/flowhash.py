"""The datapath's flow hash in Python (mirror of bpf/include/jhash.h + lb.h flow_hash).

Used to predict which Maglev slot a flow lands on: ``slot = flow_hash(...) % M``.
The destination address is not an input, so every node and every VIP derive the same slot.
"""

from __future__ import annotations

import ipaddress

__all__ = ["jhash_3words", "jhash_2words", "flow_hash", "DEFAULT_SEED"]

DEFAULT_SEED = 0x4A4C6676   # bpf/include/consts.h HASH_SEED
_M32 = 0xFFFFFFFF
_INITVAL = 0xDEADBEEF


def _rol(w: int, s: int) -> int:
    return ((w << s) | (w >> (32 - s))) & _M32


def _nwords(a: int, b: int, c: int, initval: int) -> int:
    a = (a + initval) & _M32
    b = (b + initval) & _M32
    c = (c + initval) & _M32
    c ^= b; c = (c - _rol(b, 14)) & _M32
    a ^= c; a = (a - _rol(c, 11)) & _M32
    b ^= a; b = (b - _rol(a, 25)) & _M32
    c ^= b; c = (c - _rol(b, 16)) & _M32
    a ^= c; a = (a - _rol(c, 4)) & _M32
    b ^= a; b = (b - _rol(a, 14)) & _M32
    c ^= b; c = (c - _rol(b, 24)) & _M32
    return c


def jhash_3words(a: int, b: int, c: int, initval: int) -> int:
    return _nwords(a, b, c, (initval + _INITVAL + (3 << 2)) & _M32)


def jhash_2words(a: int, b: int, initval: int) -> int:
    return _nwords(a, b, 0, (initval + _INITVAL + (2 << 2)) & _M32)


def flow_hash(saddr, sport: int, dport: int, proto: int, seed: int = DEFAULT_SEED) -> int:
    """Hash of (source address, source port, destination port, protocol).

    With session affinity the datapath hashes ``sport=0``.
    """
    addr = ipaddress.ip_address(saddr)
    if addr.version == 4:
        a = int(addr)
    else:
        w = [int.from_bytes(addr.packed[i:i + 4], "big") for i in range(0, 16, 4)]
        a = jhash_2words(jhash_2words(w[0], w[1], seed), jhash_2words(w[2], w[3], seed), seed)
    return jhash_3words(a, ((dport & 0xFFFF) << 16) | (sport & 0xFFFF), proto, seed)
