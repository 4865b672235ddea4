"""Maglev consistent hashing: the lookup table that maps a flow-hash slot to a backend.

Implements table population from Eisenbud et al., "Maglev: A Fast and Reliable Software
Network Load Balancer", NSDI 2016, §3.4 (Pseudocode 1), with weights.

Theory of operation
-------------------
Every backend ``i`` has a *preference list* over the ``M`` table slots, the permutation
``perm_i[j] = (offset_i + j * skip_i) mod M``. ``offset`` and ``skip`` come from two
independent hashes of the backend's stable *name* (``10.1.0.5:8080``). ``M`` is prime, so
any skip in ``1..M-1`` is coprime with ``M`` and every permutation visits every slot.

Backends take turns in a fixed order; on its turn a backend claims the next slot of its
permutation that nobody owns yet. The table is full after exactly ``M`` claims. Unweighted,
each backend ends with ``floor(M/N)`` or ``ceil(M/N)`` slots.

Weights (the paper leaves them open; we use Envoy's rule, which Cilium also follows): with
``w_max`` the largest weight, backend ``i`` takes its turn in round ``r`` only when
``r * w_i >= target_i``, and every turn taken adds ``w_max`` to ``target_i``. A backend of
weight ``w_max`` therefore claims a slot every round, one of weight ``w_max / 3`` every third
round, so slot counts are proportional to weights.

Determinism across nodes: the result depends only on the *set* of (name, weight) pairs, the
table size and the seed. Backends are ordered by name before population (never by input
order, never by Python's randomised ``hash()``), and names are hashed with BLAKE2b, so every
node and every agent version builds the same table for the same input.

This module is pure: no kernel, no logging. The datapath writes ``diff(old, new)`` into the
BPF map (only the slots that changed).
"""

from __future__ import annotations

import hashlib
from typing import Sequence

__all__ = [
    "MAGLEV_PRIMES", "DEFAULT_M", "DEFAULT_SEED", "build_table", "populate", "permutation_params",
    "diff", "slot_counts", "is_prime",
]

# Cilium's allowed table sizes (pkg/maglev): primes, roughly doubling. M should exceed
# 100 x N for a <= 1 % imbalance between backends (paper §3.4), so 16381 suits <= ~160 backends.
MAGLEV_PRIMES: tuple[int, ...] = (251, 509, 1021, 2039, 4093, 8191, 16381, 32749, 65521, 131071)
DEFAULT_M = 16381

# Cluster-wide: every node must use the same seed or they build different tables.
DEFAULT_SEED = b"vipd-maglev-v1"


def is_prime(n: int) -> bool:
    if n < 2:
        return False
    if n % 2 == 0:
        return n == 2
    f = 3
    while f * f <= n:
        if n % f == 0:
            return False
        f += 2
    return True


def permutation_params(name: str, m: int, seed: bytes = DEFAULT_SEED) -> tuple[int, int]:
    """``(offset, skip)`` of one backend: two 64-bit halves of a keyed BLAKE2b of its name."""
    digest = hashlib.blake2b(name.encode(), digest_size=16, key=seed).digest()
    h1 = int.from_bytes(digest[:8], "little")
    h2 = int.from_bytes(digest[8:], "little")
    return h1 % m, h2 % (m - 1) + 1


def populate(offsets: Sequence[int], skips: Sequence[int], m: int,
             weights: Sequence[int] | None = None) -> list[int]:
    """Pseudocode 1 of the paper: fill ``m`` slots from explicit ``(offset, skip)`` pairs.

    Returns ``entry`` with ``entry[slot]`` = index into ``offsets`` (the turn order).
    Exposed separately from :func:`build_table` so the paper's worked example (whose offsets
    and skips are given, not hashed) can be checked directly.
    """
    n = len(offsets)
    if n != len(skips):
        raise ValueError("offsets and skips must have the same length")
    if n == 0:
        return []
    for o, s in zip(offsets, skips):
        if not (0 <= o < m and 1 <= s < m):
            raise ValueError(f"need 0 <= offset < M and 1 <= skip < M (M={m}), got ({o}, {s})")
    entry = [-1] * m
    # cursor[i] is perm_i[next_i], maintained incrementally: (c + skip) mod M without a division.
    cursor = list(offsets)
    filled = 0

    if weights is None:
        weights = [1] * n  # equal weights: every backend claims a slot every round
    if len(weights) != n:
        raise ValueError("weights must have one entry per backend")
    if any(w < 0 for w in weights):
        raise ValueError("weights must be >= 0")
    w_max = max(weights)
    if w_max == 0:
        return []
    active = [i for i in range(n) if weights[i] > 0]
    target = [0] * n
    rnd = 0
    while True:
        rnd += 1
        for i in active:
            w = weights[i]
            if rnd * w < target[i]:
                continue  # not this backend's turn yet (Envoy / Cilium weighted Maglev)
            target[i] += w_max
            c = cursor[i]
            s = skips[i]
            while entry[c] >= 0:
                c += s
                if c >= m:
                    c -= m
            entry[c] = i
            c += s
            if c >= m:
                c -= m
            cursor[i] = c
            filled += 1
            if filled == m:
                return entry


def build_table(backends: Sequence[tuple[str, int]], m: int = DEFAULT_M, *,
                seed: bytes = DEFAULT_SEED) -> list[int]:
    """The Maglev lookup table for ``backends`` = ``[(name, weight), ...]``.

    Returns a list of length ``m``; each entry is an index into ``backends`` *as passed*.
    Input order does not matter (population runs in name order), so two nodes given the same
    set in different orders build tables that name the same backend in every slot.
    Backends of weight 0 get no slot. No backends (or all weight 0) -> ``[]``.
    """
    if not is_prime(m):
        raise ValueError(f"Maglev table size must be prime (e.g. one of {MAGLEV_PRIMES}), got {m}")
    names = [name for name, _ in backends]
    if len(set(names)) != len(names):
        dup = sorted({n for n in names if names.count(n) > 1})
        raise ValueError(f"duplicate backend names: {dup}")
    for name, weight in backends:
        if not isinstance(weight, int) or weight < 0:
            raise ValueError(f"backend {name}: weight must be an integer >= 0, got {weight!r}")
    live = [i for i, (_, w) in enumerate(backends) if w > 0]
    if not live:
        return []
    if len(live) > m:
        raise ValueError(f"{len(live)} backends do not fit a Maglev table of {m} slots; "
                         f"choose a larger size from {MAGLEV_PRIMES}")
    order = sorted(live, key=lambda i: backends[i][0])
    params = [permutation_params(backends[i][0], m, seed) for i in order]
    entry = populate([p[0] for p in params], [p[1] for p in params], m,
                     [backends[i][1] for i in order])
    return [order[e] for e in entry]


def diff(old: Sequence[int], new: Sequence[int]) -> list[tuple[int, int]]:
    """Slots to write to turn table ``old`` into ``new``: ``[(slot, value), ...]``.

    A size change (or an empty old table) rewrites every slot of ``new``.
    """
    if len(old) != len(new):
        return list(enumerate(new))
    return [(slot, v) for slot, (u, v) in enumerate(zip(old, new)) if u != v]


def slot_counts(table: Sequence[int], n: int) -> list[int]:
    """How many slots each of ``n`` backend indexes owns."""
    counts = [0] * n
    for v in table:
        counts[v] += 1
    return counts
