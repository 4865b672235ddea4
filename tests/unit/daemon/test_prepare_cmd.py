"""`vipd prepare`'s checks that need no compile: a cache directory `vipd run` would not use is
refused with a message naming it and why (never a traceback), and a turned-off cache is an
error. The compile itself: tests/e2e/datapath/test_prepare_cli.py."""

from __future__ import annotations

import os

import pytest

from agent.daemon import main
from agent.datapath.objcache import ENV_VAR, ProgramCache
from agent.datapath.prepare import PrepareError, check_cache_dir


@pytest.fixture(autouse=True)
def _no_env_cache(monkeypatch):
    monkeypatch.delenv(ENV_VAR, raising=False)


def test_a_missing_cache_dir_is_created_private(tmp_path):
    d = tmp_path / "a" / "bpf-cache"
    check_cache_dir(ProgramCache(d))
    assert d.is_dir() and (d.stat().st_mode & 0o777) == 0o700


@pytest.mark.parametrize("make, says", [
    (lambda d: (d.mkdir(), d.chmod(0o770)), "writable by group or others (mode 770)"),
    (lambda d: (d.mkdir(), d.chmod(0o702)), "writable by group or others (mode 702)"),
    (lambda d: d.write_text("x"), "is not a directory (or is a symlink)"),
    (lambda d: ((d.parent / "real").mkdir(mode=0o700), d.symlink_to(d.parent / "real")),
     "is not a directory (or is a symlink)"),
])
def test_untrusted_or_odd_cache_dirs_are_refused(tmp_path, make, says):
    d = tmp_path / "bpf-cache"
    make(d)
    with pytest.raises(PrepareError, match="BPF program cache directory") as exc:
        check_cache_dir(ProgramCache(d))
    assert str(d) in str(exc.value) and says in str(exc.value)


def test_cache_dir_owned_by_another_user_is_refused(tmp_path):
    # the suite runs as root (CI does too); never a silent skip (tests/conftest.py)
    assert os.geteuid() == 0, "needs root to chown the cache dir: run the tests as root"
    d = tmp_path / "bpf-cache"
    d.mkdir(mode=0o700)
    os.chown(d, 4242, 4242)
    with pytest.raises(PrepareError, match="owned by uid 4242"):
        check_cache_dir(ProgramCache(d))


def test_cli_reports_refusals_on_stderr_with_exit_1(tmp_path, capsys):
    d = tmp_path / "bpf-cache"
    d.mkdir(mode=0o777)
    d.chmod(0o777)
    assert main(["prepare", "--bpf-cache-dir", str(d), "--bpf-pin-root", str(tmp_path / "pins")]) == 1
    out = capsys.readouterr()
    assert out.out == "" and out.err.startswith(f"vipd prepare: BPF program cache directory {d} is writable")
    assert "chmod 0700" in out.err and "Traceback" not in out.err
    assert not (tmp_path / "pins").exists()   # refused before any compile


def test_cli_with_the_cache_turned_off_is_an_error(tmp_path, capsys, monkeypatch):
    assert main(["prepare", "--bpf-cache-dir", "", "--state-dir", str(tmp_path)]) == 1
    assert "the program cache is turned off" in capsys.readouterr().err
    monkeypatch.setenv(ENV_VAR, "")
    assert main(["prepare", "--state-dir", str(tmp_path)]) == 1
    assert "the program cache is turned off" in capsys.readouterr().err
    assert not (tmp_path / "bpf-cache").exists()
