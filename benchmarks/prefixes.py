"""The benchmark table: the same prefixes and attribute sets for every sender."""

from __future__ import annotations

import ipaddress

BASE = ipaddress.IPv4Network("10.128.0.0/9")   # room for 131072 /26s; the lab link is 10.0.0.0/24
PREFIX_LEN = 26


def bench_prefixes(count: int) -> list[ipaddress.IPv4Network]:
    step = 1 << (32 - PREFIX_LEN)
    if count * step > BASE.num_addresses:
        raise ValueError(f"{count} /{PREFIX_LEN} prefixes do not fit in {BASE}")
    base = int(BASE.network_address)
    return [ipaddress.IPv4Network((base + i * step, PREFIX_LEN)) for i in range(count)]


def bench_prefix_sets(count: int, sets: int) -> list[list[ipaddress.IPv4Network]]:
    """``count`` prefixes split into ``sets`` contiguous groups (one attribute set each)."""
    prefixes = bench_prefixes(count)
    per = -(-count // sets)
    return [prefixes[i:i + per] for i in range(0, count, per)]
