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


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    if rep.when == "call":
        item.bfd_call_failed = rep.failed


@pytest.fixture
def bfd_lab_factory(request):
    _check_prereqs()
    labs, made = [], []

    def make(ms: int, mult: int = 3, **kw) -> BfdLab:
        lab = Lab("bfd")
        lab.__enter__()
        labs.append(lab)
        made.append(BfdLab(lab, ms, mult, **kw))
        return made[-1]
    yield make
    if getattr(request.node, "bfd_call_failed", False):
        for b in made:   # what vipd saw, for the failure report (the lab's files go with it)
            print(f"--- vipd log of {b.lab.prefix} (last 200 lines)\n" + "\n".join(b.log().splitlines()[-200:]))
    for lab in labs:
        lab.close()
