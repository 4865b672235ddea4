"""Maglev table population (agent.lb.maglev) against the paper and its stated properties."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hypothesis import given, settings, strategies as st

from agent.lb.maglev import (
    DEFAULT_M, MAGLEV_PRIMES, build_table, diff, is_prime, permutation_params, populate, slot_counts,
)

REPO = Path(__file__).resolve().parents[3]


def names(n: int, prefix: str = "10.1") -> list[str]:
    return [f"{prefix}.{i // 250}.{i % 250 + 1}:8080" for i in range(n)]


def by_name(table: list[int], backends: list[tuple[str, int]]) -> list[str]:
    return [backends[i][0] for i in table]


# -- the paper --------------------------------------------------------------------------------

def test_paper_table1_example():
    # Eisenbud et al. NSDI'16 Table 1: M=7, (offset, skip) B0=(3,4) B1=(0,2) B2=(3,1).
    assert populate([3, 0, 3], [4, 2, 1], 7) == [1, 0, 1, 0, 2, 2, 0]
    # B1 removed: only slot 6 changes among the slots B1 did not own.
    assert populate([3, 3], [4, 1], 7) == [0, 0, 0, 0, 1, 1, 1]


def test_primes_are_ciliums_list_and_prime():
    assert MAGLEV_PRIMES == (251, 509, 1021, 2039, 4093, 8191, 16381, 32749, 65521, 131071)
    assert all(is_prime(m) for m in MAGLEV_PRIMES)
    assert DEFAULT_M == 16381


def test_non_prime_size_is_rejected():
    with pytest.raises(ValueError, match="prime"):
        build_table([("a", 1)], 16384)


def test_duplicate_names_are_rejected():
    with pytest.raises(ValueError, match="duplicate"):
        build_table([("a:1", 1), ("a:1", 2)], 251)


def test_more_backends_than_slots_is_rejected():
    with pytest.raises(ValueError, match="do not fit"):
        build_table([(n, 1) for n in names(300)], 251)


def test_empty_and_zero_weight():
    assert build_table([], 251) == []
    assert build_table([("a:1", 0)], 251) == []
    table = build_table([("a:1", 0), ("b:1", 1)], 251)
    assert set(table) == {1}


def test_permutation_params_in_range():
    for m in MAGLEV_PRIMES:
        offset, skip = permutation_params("10.0.0.1:80", m)
        assert 0 <= offset < m and 1 <= skip < m


# -- balance ----------------------------------------------------------------------------------

@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 300), m=st.sampled_from([251, 1021, 16381]), prefix=st.sampled_from(["10.1", "192.168"]))
def test_unweighted_balance_floor_or_ceil(n, m, prefix):
    n = min(n, m)
    backends = [(x, 1) for x in names(n, prefix)]
    table = build_table(backends, m)
    assert len(table) == m
    counts = slot_counts(table, n)
    assert set(counts) <= {m // n, -(-m // n)}, counts
    assert sum(counts) == m


@settings(max_examples=40, deadline=None)
@given(weights=st.lists(st.integers(1, 10), min_size=2, max_size=60))
def test_weights_proportional(weights):
    m = 16381
    backends = [(f"10.2.0.{i + 1}:80", w) for i, w in enumerate(weights)]
    counts = slot_counts(build_table(backends, m), len(backends))
    total = sum(weights)
    for (name, w), c in zip(backends, counts):
        # Within 3 slots of the exact share: a partial last round is the only imprecision.
        assert abs(c - m * w / total) <= 3, (name, w, c, m * w / total)


def test_weight_three_gets_three_times():
    backends = [("10.0.0.1:80", 1), ("10.0.0.2:80", 3)]
    a, b = slot_counts(build_table(backends, 16381), 2)
    assert abs(b / a - 3) < 0.002


# -- stability --------------------------------------------------------------------------------

@settings(max_examples=20, deadline=None)
@given(st.data())
def test_input_order_does_not_matter(data):
    n = data.draw(st.integers(1, 40))
    backends = [(x, data.draw(st.integers(1, 4))) for x in names(n)]
    shuffled = data.draw(st.permutations(backends))
    assert by_name(build_table(backends, 1021), backends) == by_name(build_table(shuffled, 1021), shuffled)


def test_seed_changes_the_table():
    backends = [(x, 1) for x in names(10)]
    assert build_table(backends, 1021, seed=b"a") != build_table(backends, 1021, seed=b"b")


def test_identical_across_processes():
    """Another interpreter with a different hash randomisation builds the same table."""
    backends = [(x, 1 + i % 3) for i, x in enumerate(names(50))]
    here = build_table(list(reversed(backends)), DEFAULT_M)
    code = ("import json,sys; from agent.lb.maglev import build_table; "
            "b=[tuple(x) for x in json.load(sys.stdin)]; print(json.dumps(build_table(b)))")
    outs = []
    for hashseed in ("1", "4242"):
        proc = subprocess.run([sys.executable, "-c", code], input=json.dumps(backends), text=True,
                              capture_output=True, check=True, cwd=REPO,
                              env={**os.environ, "PYTHONHASHSEED": hashseed})
        outs.append(json.loads(proc.stdout))
    assert outs[0] == outs[1]
    # The other processes got the list in the opposite order: compare names, not indexes.
    assert by_name(outs[0], backends) == by_name(here, list(reversed(backends)))


# -- disruption -------------------------------------------------------------------------------

def _removal(n: int, removed: int, m: int = 16381, prefix: str = "10.1"):
    before = [(x, 1) for x in names(n, prefix)]
    after = before[:removed] + before[removed + 1:]
    old = by_name(build_table(before, m), before)
    new = by_name(build_table(after, m), after)
    gone = before[removed][0]
    changed = sum(a != b for a, b in zip(old, new)) / m
    survivors_moved = sum(a != b and a != gone for a, b in zip(old, new)) / m
    forced = old.count(gone) / m
    return changed, survivors_moved, forced, old, new, gone


@settings(max_examples=25, deadline=None)
@given(st.data())
def test_disruption_when_one_backend_leaves(data):
    n = data.draw(st.integers(2, 100), label="N")
    removed = data.draw(st.integers(0, n - 1), label="removed")
    prefix = data.draw(st.sampled_from(["10.1", "172.20"]), label="prefix")
    changed, survivors_moved, forced, old, new, gone = _removal(n, removed, prefix=prefix)
    # Every slot of the leaving backend moves, and nothing still points at it.
    assert gone not in new
    assert abs(forced - 1 / n) <= 1 / 16381 + 1e-12
    # Maglev is not minimal-disruption (paper §3.4): some slots move between survivors. With
    # M=16381 >= 160 N that churn stays under 2 % of the table (measured worst: 1.51 % at N=100).
    assert survivors_moved <= 0.02, survivors_moved
    # Total disruption close to 1/N: <= 1.5/N holds while the churn is small relative to 1/N
    # (N <= 32; measured 1.44/N at N=40, 2.5/N at N=100 — see docs/load-balancing.md).
    if n <= 32:
        assert changed <= 1.5 / n, (changed * n, "/N")
    else:
        assert changed <= 1 / n + 0.02


@pytest.mark.parametrize("n,removed", [(60, 7), (100, 0), (100, 55)])
def test_disruption_within_1_5_over_n_at_the_largest_table(n, removed):
    """The issue's bound, <= 1.5/N for N <= 100, needs the largest size (measured 1.42/N at
    N=100, M=131071); at the default 16381 it holds up to N ~ 40 (see docs/load-balancing.md)."""
    changed, survivors_moved, *_ = _removal(n, removed, m=131071)
    assert changed <= 1.5 / n, (changed * n, "/N")


def test_disruption_figures_n100():
    """The documented figure: one of 100 leaves -> ~2.3 % of slots change, ~1.3 % between survivors."""
    changed, survivors_moved, *_ = _removal(100, 37)
    assert 0.01 < changed < 0.03
    assert survivors_moved < 0.02


# -- diff -------------------------------------------------------------------------------------

def test_diff_writes_only_changed_slots():
    before = [(x, 1) for x in names(10)]
    old = build_table(before, 1021)
    new = build_table(before[:-1], 1021)
    changes = diff(old, new)
    assert changes
    patched = list(old)
    for slot, value in changes:
        patched[slot] = value
    assert patched == new
    assert all(old[s] != v for s, v in changes)
    assert diff(new, new) == []


def test_diff_size_change_rewrites_everything():
    assert diff([0, 1, 0], [1] * 7) == [(i, 1) for i in range(7)]
    assert diff([], [0, 0]) == [(0, 0), (1, 0)]


# -- speed ------------------------------------------------------------------------------------

def test_fast_enough_for_the_control_plane():
    backends = [(x, 1) for x in names(100)]
    build_table(backends, 16381)  # warm-up
    best = min(_timed(lambda: build_table(backends, 16381)) for _ in range(3))
    assert best < 0.1, f"M=16381, N=100 took {best * 1000:.1f} ms"


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t
