"""The router-restart scenario runs in the background from the start of the session.

Most of it (330 s) is routers being down, which costs no CPU: started as a subprocess when the
session's collection includes test_router_restart.py, it overlaps the rest of the suite, and the
test only waits for it and checks its result. The subprocess is stopped (SIGTERM, by PID: it
unwinds its lab) if the session ends first.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[2]
_run: dict = {}


def _start() -> None:
    fd, name = tempfile.mkstemp(prefix="vipd-router-restart-", suffix=".log")
    out = Path(name)
    proc = subprocess.Popen([sys.executable, str(HERE / "router_restart_scenario.py")], stdout=fd,
                            stderr=subprocess.STDOUT, cwd=ROOT,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    os.close(fd)
    _run.update(proc=proc, output=out)


def pytest_collection_finish(session):
    if session.config.option.collectonly or _run:
        return
    if any(item.nodeid.endswith("test_router_restart.py::test_router_restarts_reconnect_within_connect_retry_"
                                "and_operator_resets") for item in session.items):
        if os.geteuid() == 0:   # without root the test's tier check reports why
            _start()


def pytest_sessionfinish(session, exitstatus):
    proc = _run.get("proc")
    if proc is not None and proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    out = _run.get("output")
    if out is not None:
        out.unlink(missing_ok=True)


@pytest.fixture
def router_restart_scenario():
    if not _run:
        _start()   # e.g. collected but not at session start (a rerun plugin): run it now
    return _run["proc"], _run["output"]
