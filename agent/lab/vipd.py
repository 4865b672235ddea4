"""`vipd run` inside a lab host, as a user runs it: a config directory written atomically (the
file source sees whole files), the API socket, a JSON log, and `vipctl` against it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Sequence

from . import Host, Lab, wait_until

__all__ = ["VipdRun"]

REPO = Path(__file__).resolve().parents[2]


class VipdRun:
    def __init__(self, lab: Lab, node: Host | None = None, *, node_name: str = "node"):
        self.lab, self.node, self.node_name = lab, node, node_name
        base = lab.workdir / "vipd"
        self.config, self.state = base / "config", base / "state"
        self.config.mkdir(parents=True)
        self.socket, self.log = base / "vipd.sock", base / "vipd.log"
        self.proc: subprocess.Popen | None = None

    def write(self, filename: str, text: str) -> None:
        tmp = self.config / f".{filename}.tmp"
        tmp.write_text(text)
        tmp.rename(self.config / filename)

    def start_vipd(self, extra_args: Sequence[str] = ()) -> None:
        argv = [sys.executable, "-m", "agent.daemon", "run", "--config", str(self.config),
                "--node-name", self.node_name, "--api-socket", str(self.socket), "--state-dir", str(self.state),
                "--log-format", "json", *extra_args]
        self.proc = self.node.spawn(argv, log_path=self.log, env={"PYTHONPATH": str(REPO)})
        wait_until(lambda: self.socket.exists() or self.proc.poll() is not None, timeout=60, what="vipd API socket")
        if self.proc.poll() is not None:
            raise RuntimeError(f"vipd exited:\n{self.log.read_text()[-3000:]}")

    def vipctl(self, *args: str) -> str:
        proc = subprocess.run([sys.executable, "-m", "agent.api.cli", "--socket", str(self.socket), *args],
                              capture_output=True, text=True, timeout=30, env={**os.environ, "PYTHONPATH": str(REPO)})
        assert proc.returncode == 0, proc.stderr
        return proc.stdout

    def vipd_log(self) -> str:
        return self.log.read_text(errors="replace")
