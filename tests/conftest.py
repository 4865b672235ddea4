"""Test tiers and the CI rule.

Tiers are assigned by directory: tests/unit -> ``unit`` (pure Python, no root),
tests/bpf -> ``bpf`` (bcc + BPF_PROG_TEST_RUN, root), tests/e2e -> ``e2e`` (network
namespaces + real daemons, root). Select one with ``-m unit`` etc.

When ``CI`` is set a missing prerequisite is an error, never a skip: a green run that skipped
the datapath proves nothing. Outside CI the same check still raises, with the reason, so a
developer sees exactly what to install (``make deps``). A run that collects no tests fails.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections import Counter
from pathlib import Path

import pytest

TIERS = ("unit", "bpf", "e2e")
_ran: Counter[str] = Counter()
_bpf_cache_dir: str | None = None


def pytest_configure(config):
    """One compiled-program cache per session (agent/datapath/objcache.py): every Datapath and
    every ``vipd run`` the tests start (they inherit the environment) compiles each distinct
    program set once. A cache directory given by the caller is used as it is and kept."""
    global _bpf_cache_dir
    from agent.datapath.objcache import ENV_VAR
    if not os.environ.get(ENV_VAR):
        _bpf_cache_dir = tempfile.mkdtemp(prefix="vipd-test-bpf-cache-")   # mode 0700
        os.environ[ENV_VAR] = _bpf_cache_dir


    _ipv6_frames_without_neighbour_solicitation()


def _ipv6_frames_without_neighbour_solicitation() -> None:
    """A scapy frame ``Ether() / IPv6(dst=...)`` built in this process gets its destination
    MAC from scapy's getmacbyip6, which sends a neighbour solicitation and waits 1 s for an
    answer that never comes for the test addresses, then uses broadcast. Resolve as scapy does
    for multicast and for its neighbour cache, and use broadcast at once otherwise: the same
    bytes, a second sooner per frame (~1 s per IPv6 packet test)."""
    import socket

    from scapy.config import conf
    from scapy.layers.inet6 import IPv6
    from scapy.layers.l2 import Ether
    from scapy.utils6 import in6_getnsmac, in6_ismaddr

    def resolve(l2, l3) -> str:
        dst = str(l3.dst)
        if in6_ismaddr(dst):
            return in6_getnsmac(socket.inet_pton(socket.AF_INET6, dst))
        return conf.netcache.in6_neighbor.get(dst) or "ff:ff:ff:ff:ff:ff"

    conf.neighbor.register_l3(Ether, IPv6, resolve)


def pytest_unconfigure(config):
    if _bpf_cache_dir is not None:
        shutil.rmtree(_bpf_cache_dir, ignore_errors=True)


def _tier_of(path: Path) -> str | None:
    parts = path.parts
    for tier in TIERS:
        if tier in parts:
            return tier
    return None


def pytest_collection_modifyitems(config, items):
    for item in items:
        tier = _tier_of(Path(str(item.fspath)).relative_to(Path(__file__).parent))
        if tier:
            item.add_marker(getattr(pytest.mark, tier))


def _prerequisite_problems(tier: str) -> list[str]:
    problems = []
    if tier in ("bpf", "e2e"):
        if os.geteuid() != 0:
            problems.append("must run as root")
    if tier == "bpf":
        try:
            import bcc  # noqa: F401  (Debian python3-bpfcc)
        except ImportError as exc:
            problems.append(f"bcc is not importable ({exc}); install python3-bpfcc")
        if not Path(f"/lib/modules/{os.uname().release}/build").exists() and not os.environ.get(
            "BCC_KERNEL_SOURCE"
        ):
            problems.append("no kernel headers for bcc (/lib/modules/$(uname -r)/build)")
    if tier == "e2e":
        for exe in ("ip", "/usr/lib/frr/bgpd", "gobgpd", "gobgp", "vtysh", "iperf3", "curl", "ethtool"):
            if shutil.which(exe) is None and not Path(exe).exists():
                problems.append(f"{exe} not found")
    return problems


_checked: dict[str, list[str]] = {}


def pytest_runtest_setup(item):
    for tier in TIERS:
        if item.get_closest_marker(tier) and tier != "unit":
            if tier not in _checked:
                _checked[tier] = _prerequisite_problems(tier)
            if _checked[tier]:
                ci = " (CI is set: a skipped test counts as failed)" if os.environ.get("CI") else ""
                raise RuntimeError(
                    f"tier {tier} prerequisites missing{ci}: " + "; ".join(_checked[tier])
                    + ". Run `make deps` as root."
                )


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.skipped and os.environ.get("CI"):
        # A skip in CI is a failure: rewrite the report before anyone counts it.
        report.outcome = "failed"
        report.longrepr = f"skipped in CI (not allowed): {report.longrepr}"


def pytest_runtest_logreport(report):
    if report.when == "call" or (report.when == "setup" and report.outcome != "passed"):
        tier = next((t for t in TIERS if t in report.keywords), "untiered")
        _ran[tier] += 1


def pytest_sessionfinish(session, exitstatus):
    if exitstatus == pytest.ExitCode.NO_TESTS_COLLECTED:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter):
    line = ", ".join(f"{t}={_ran.get(t, 0)}" for t in (*TIERS, "untiered") if t != "untiered" or _ran.get(t))
    terminalreporter.write_sep("=", f"tiers run: {line}")
