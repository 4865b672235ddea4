"""`vipctl config validate` against a generated corpus of bad input (tests/corpus.py): every case
is refused (exit 2) without a traceback, in under 2 s and 300 MB, with an error that names the
file and, for a document-level mistake, the object and the field path.

Every case runs in-process (validate_dir, what the command calls); the hostile cases and a
sample of the mutations also run through the real `vipctl` process, where time and peak memory
are measured per process (os.wait4).
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest

from agent.sources.files import validate_dir
from tests.corpus import all_cases, hostile

ROOT = Path(__file__).resolve().parents[3]
CASES = all_cases()


def _write(case, directory: Path) -> None:
    for name, data in case.files.items():
        (directory / name).write_bytes(data)
    if case.write is not None:
        case.write(directory)


def _check_answer(case, ok: bool, errors: list[str], text: str) -> None:
    assert "Traceback" not in text, text[:2000]
    if case.must_fail:
        assert not ok, f"{case.id}: accepted\n{text[:2000]}"
    if not ok:
        assert any(all(n in e for n in case.names) for e in errors), \
            f"{case.id}: no error names {case.names}:\n" + "\n".join(errors)[:3000]
    assert all(len(e) < 2000 for e in errors), f"{case.id}: an error line is {max(map(len, errors))} chars"


def test_the_corpus_is_large_and_covers_every_kind():
    from agent.config.loader import KINDS

    assert len(CASES) >= 1000, len(CASES)
    covered = {c.id.split(":", 1)[0] for c in CASES}
    assert set(KINDS) <= covered, set(KINDS) - covered


def test_every_case_in_process(tmp_path):
    slowest = (0.0, "")
    for i, case in enumerate(CASES):
        d = tmp_path / f"c{i}"
        d.mkdir()
        _write(case, d)
        t0 = time.monotonic()
        report = validate_dir(d)
        took = time.monotonic() - t0
        slowest = max(slowest, (took, case.id))
        _check_answer(case, report.ok, report.errors, report.text())
        assert took < 2.0, f"{case.id}: {took:.2f} s"
    print(f"{len(CASES)} cases; slowest {slowest[1]} {slowest[0]:.2f} s")


# Runs `vipctl` as its own child and reports that child's peak RSS and wall time. (Measured from
# the test process, the child's peak would include the pytest process copied by fork before exec.)
LAUNCHER = r"""
import os, sys, time
t0 = time.monotonic()
pid = os.fork()
if pid == 0:
    os.execv(sys.executable, [sys.executable, "-m", "agent.api.cli", *sys.argv[1:]])
_, status, usage = os.wait4(pid, 0)
sys.stderr.write(f"MEASURED {usage.ru_maxrss * 1024} {time.monotonic() - t0}\n")
sys.exit(os.waitstatus_to_exitcode(status))
"""


def _vipctl(directory: Path) -> tuple[int, str, float, int]:
    """-> (exit status, output, seconds, peak RSS bytes) of one `vipctl config validate`."""
    proc = subprocess.run([sys.executable, "-c", LAUNCHER, "config", "validate", str(directory)],
                          capture_output=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    measured = [line for line in proc.stderr.decode().splitlines() if line.startswith("MEASURED ")]
    assert measured, proc.stderr.decode()[-2000:]
    _, rss, took = measured[-1].split()
    out = proc.stdout.decode(errors="replace") + proc.stderr.decode(errors="replace")
    return proc.returncode, out, float(took), int(rss)


SAMPLE = [*hostile(), *random.Random(9).sample([c for c in CASES if c.write is None
                                                and c.must_fail], 15)]


@pytest.mark.parametrize("case", SAMPLE, ids=[c.id for c in SAMPLE])
def test_vipctl_process(case, tmp_path):
    _write(case, tmp_path)
    code, out, took, rss = _vipctl(tmp_path)
    errors = [line for line in out.splitlines() if line.startswith("  error: ")]
    _check_answer(case, code == 0, errors, out)
    assert code in (0, 2), out[:2000]
    assert took < 2.0, f"{took:.2f} s"
    print(f"{case.id}: {took:.2f} s, {rss / 2**20:.0f} MB")
    assert rss < 300 * 2**20, f"{rss / 2**20:.0f} MB"


def test_limits_can_be_changed_and_a_bad_setting_is_a_usage_error(tmp_path):
    for i in range(4):
        (tmp_path / f"n{i}.yaml").write_text(f"apiVersion: v1\nkind: Node\nmetadata: {{name: n{i}}}\n")
    from agent.api.cli import main

    assert main(["config", "validate", str(tmp_path)]) == 0
    assert main(["config", "validate", str(tmp_path), "--config-limit", "files=3"]) == 2
    assert main(["config", "validate", str(tmp_path), "--config-limit", "filez=3"]) == 2
