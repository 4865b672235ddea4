"""The CI rule: a skip is a failure when CI is set, and "no tests ran" fails."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]


def _pytest(tmp_path, body, env_ci):
    tests = tmp_path / "tests" / "unit"
    tests.mkdir(parents=True)
    (tmp_path / "tests" / "conftest.py").write_text((ROOT / "tests" / "conftest.py").read_text())
    (tests / "test_x.py").write_text(textwrap.dedent(body))
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    if env_ci:
        env["CI"] = "true"
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tmp_path / "tests")],
                          capture_output=True, text=True, env=env, cwd=tmp_path)


SKIPPING = """
import pytest
def test_a():
    pytest.skip("no frr")
"""


def test_skip_fails_in_ci(tmp_path):
    r = _pytest(tmp_path, SKIPPING, env_ci=True)
    assert r.returncode == 1, r.stdout
    assert "skipped in CI" in r.stdout


def test_skip_is_a_skip_outside_ci(tmp_path):
    r = _pytest(tmp_path, SKIPPING, env_ci=False)
    assert r.returncode == 0, r.stdout
    assert "1 skipped" in r.stdout


def test_no_tests_is_failure(tmp_path):
    r = _pytest(tmp_path, "x = 1\n", env_ci=True)
    assert r.returncode == 1, r.stdout


def test_tier_summary_line(tmp_path):
    r = _pytest(tmp_path, "def test_a():\n    pass\n", env_ci=True)
    assert "tiers run: unit=1, bpf=0, e2e=0" in r.stdout
