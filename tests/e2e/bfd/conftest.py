"""Fixtures for the BFD e2e tests (the lab itself is in bfd_lab.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.lab import Lab
from bfd_lab import BfdLab


def _check_prereqs() -> None:
    for exe in ("/usr/lib/frr/bfdd", "/usr/lib/frr/zebra", "/usr/sbin/iptables"):
        if not Path(exe).exists():
            raise RuntimeError(f"{exe} missing: install frr and iptables (scripts/install-deps)")


@pytest.fixture
def bfd_lab_factory():
    _check_prereqs()
    labs = []

    def make(ms: int, mult: int = 3, **kw) -> BfdLab:
        lab = Lab("bfd")
        lab.__enter__()
        labs.append(lab)
        return BfdLab(lab, ms, mult, **kw)
    yield make
    for lab in labs:
        lab.close()
