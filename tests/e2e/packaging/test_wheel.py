"""The wheel is what a node installs: build it as the image does, install it as the guide does, run it.

The wheel is built by `pip wheel` from only the files deploy/Dockerfile's builder stage copies
(hatch_build.py adds the gRPC stubs and bpf/), then deploy/install-node.sh (the install guide's
script) installs it below a scratch root: a venv on Debian's python with
--system-site-packages (python3-bpfcc's bcc, nothing from the checkout), /etc/vipd, the
systemd unit. From that venv, with no PYTHONPATH and outside the checkout:

* `vipd --version` / `vipctl --version` print the wheel's version ("dev" from a checkout);
  grpcio-tools is absent;
* `systemd-analyze verify` accepts the installed unit: every path it runs exists;
* `vipctl config validate` accepts the lab's example config (deploy/vagrant/vipd, the guide's
  example) and seed 002's manifests, and names a broken file;
* `vipd run --lb-interface` compiles the shipped BPF C sources, peers with FRR, announces a
  LoadBalancer VIP that a client reaches over TCP through the XDP datapath, and `vipctl status`
  answers over its socket.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import pytest

from agent.lab import Lab, wait_until
from agent.lab.scale import NODE_IP, NODE_NAME, ScaleLab, service_docs, vip_of

ROOT = Path(__file__).resolve().parents[3]
SEED = ROOT / "tests" / "golden" / "seeds" / "002"
EXAMPLE_CONFIG = ROOT / "deploy" / "vagrant" / "vipd"
# The installed commands must not see the checkout: no PYTHONPATH, cwd elsewhere; nor the
# session's program cache (the installed vipd must compile the shipped sources itself).
CLEAN_ENV = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIPD_BPF_CACHE_DIR")}


def run(argv, *, cwd, check=True, timeout=120) -> subprocess.CompletedProcess:
    proc = subprocess.run(argv, cwd=cwd, env=CLEAN_ENV, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, argv))} failed ({proc.returncode}):\n"
                             f"{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    return proc


def builder_stage_sources(dest: Path) -> Path:
    """Copy what deploy/Dockerfile's builder stage COPYs to /src into ``dest``; returns it."""
    lines = (ROOT / "deploy" / "Dockerfile").read_text().split("\nFROM ")[1].splitlines()
    copies = [line.split()[1:] for line in lines if line.startswith("COPY ")]
    assert copies, "deploy/Dockerfile: no COPY in the builder stage"
    for *sources, target in copies:
        assert target.startswith("/src"), f"deploy/Dockerfile: COPY to {target}, expected /src"
        for src in sources:
            to = dest / target.removeprefix("/src").strip("/")
            if (ROOT / src).is_dir():
                shutil.copytree(ROOT / src, to, ignore=shutil.ignore_patterns("__pycache__", "*_pb2*.py"))
            else:
                to.mkdir(parents=True, exist_ok=True)
                shutil.copy2(ROOT / src, to / Path(src).name)
    return dest


@pytest.fixture(scope="module")
def installed():
    """(wheel, venv, scratch dir, install root); everything is removed afterwards."""
    tmp = Path(tempfile.mkdtemp(prefix="e-wheel-"))
    try:
        src = builder_stage_sources(tmp / "src")
        run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp / "dist"), str(src)],
            cwd=tmp, timeout=300)
        wheel = next((tmp / "dist").glob("vipd-*.whl"))
        root = tmp / "root"
        out = run([ROOT / "deploy" / "install-node.sh", "--root", str(root), "--no-apt", str(wheel)],
                  cwd=tmp, timeout=300)
        assert "ok: vipd " in out.stdout, out.stdout
        yield wheel, root / "opt" / "vipd" / "venv", tmp, root
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def test_installed_commands_report_version_and_validate_config(installed):
    wheel, venv, cwd, _ = installed
    version = wheel.name.split("-")[1]
    assert run([venv / "bin" / "vipd", "--version"], cwd=cwd).stdout.strip() == f"vipd {version}"
    assert run([venv / "bin" / "vipctl", "--version"], cwd=cwd).stdout.strip() == f"vipctl {version}"
    # a checkout says so instead of claiming a release
    checkout = subprocess.run([sys.executable, "-m", "agent.daemon", "--version"], cwd=ROOT, capture_output=True,
                              text=True, env={**CLEAN_ENV, "PYTHONPATH": str(ROOT)}, timeout=60)
    assert checkout.stdout.strip() == "vipd dev", checkout
    where = run([venv / "bin" / "python", "-c", "import agent; print(agent.__file__)"], cwd=cwd).stdout
    assert where.startswith(str(venv)), where
    # build-time only: the stubs are in the wheel, protoc is not needed on a node
    probe = run([venv / "bin" / "python", "-c", "import grpc_tools"], cwd=cwd, check=False)
    assert probe.returncode != 0 and "grpc_tools" in probe.stderr
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        requires = zf.read(f"vipd-{version}.dist-info/METADATA").decode()
    assert {"agent/api/vipd_pb2.py", "agent/api/vipd_pb2_grpc.py", "agent/bpf/xdp_lb.c",
            "agent/bpf/tc_lb.c", "agent/bpf/include/lb.h"} <= names
    assert "grpcio-tools" not in requires.split("Provides-Extra: test")[0]

    for config in (EXAMPLE_CONFIG, SEED):
        ok = run([venv / "bin" / "vipctl", "config", "validate", config], cwd=cwd)
        assert "0 error(s)" in ok.stdout and "OK" in ok.stdout, ok.stdout
    bad = cwd / "bad"
    bad.mkdir()
    (bad / "peering-policies.yaml").write_text(
        (SEED / "peering-policies.yaml").read_text().replace("peerASN: 65005", "peerASN: seventy", 1))
    failed = run([venv / "bin" / "vipctl", "config", "validate", bad], cwd=cwd, check=False)
    assert failed.returncode != 0 and "peering-policies.yaml" in failed.stdout + failed.stderr, failed


def test_installed_vipd_serves_a_vip_through_the_shipped_datapath(installed):
    _, venv, cwd, _ = installed
    lab = Lab("epkg")
    env = None
    try:
        with lab:
            env = ScaleLab(lab, pods=2)
            env.write("services.yaml", service_docs(0, ports=1, pods=env.pod_ips, node_name=NODE_NAME))
            argv = [str(venv / "bin" / "vipd"), "run", "--config", str(env.config_dir), "--node-name", NODE_NAME,
                    "--api-socket", str(env.socket), "--state-dir", str(env.state_dir), "--log-format", "json",
                    "--lb-interface", "eth-router", "--bpf-pin-root", str(env.pin_root)]
            log = open(env.config_dir.parent / "vipd.log", "ab")
            env.proc = subprocess.Popen(env.node.exec_argv(argv, share_mounts=True), stdout=log,
                                        stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=CLEAN_ENV,
                                        cwd=cwd, start_new_session=True)
            log.close()
            lab._procs.append(env.proc)
            wait_until(lambda: env.accepted() >= 1 or env.proc.poll() is not None, timeout=90, interval=0.5,
                       what=f"FRR accepts the VIP from the wheel's vipd at {NODE_IP}")
            assert env.proc.poll() is None, env.log()[-3000:]
            env.wait_routed(f"{vip_of(0)}/32")
            assert '"event": "bpf programs compiled"' in env.log(), env.log()[-3000:]
            answers = env.connect(vip_of(0), 80, n=3)
            assert all(a.startswith("p") for a in answers), (answers, env.log()[-3000:])
            status = run([venv / "bin" / "vipctl", "--socket", str(env.socket), "status"], cwd=cwd)
            assert f"Node:        {NODE_NAME}" in status.stdout, status.stdout
            assert "Reconcile errors: none" in status.stdout, status.stdout
            lb = run([venv / "bin" / "vipctl", "--socket", str(env.socket), "bpf", "lb", "list"], cwd=cwd)
            assert f"{vip_of(0)}:80" in lb.stdout, lb.stdout
    finally:
        if env is not None:
            env.cleanup_pins()


def test_installed_systemd_unit_verifies(installed):
    """The unit the guide installs names only paths the guide creates (systemd checks ExecStart)."""
    _, _, cwd, root = installed
    assert (root / "etc" / "vipd").is_dir() and (root / "etc" / "default" / "vipd").is_file()
    assert os.readlink(root / "usr" / "local" / "bin" / "vipctl") == "/opt/vipd/venv/bin/vipctl"
    # systemd resolves the unit's dependencies (sysinit.target, ...) inside --root too
    shutil.copytree("/lib/systemd/system", root / "usr" / "lib" / "systemd" / "system", symlinks=True)
    out = run(["systemd-analyze", "verify", f"--root={root}", "vipd.service"], cwd=cwd, check=False)
    assert out.returncode == 0 and "vipd.service" not in out.stderr, out.stderr
    # the oneshot that fills the program cache before it (pulled in by vipd.service)
    out = run(["systemd-analyze", "verify", f"--root={root}", "vipd-prepare.service"], cwd=cwd, check=False)
    assert out.returncode == 0 and "vipd-prepare.service" not in out.stderr, out.stderr
    # and a unit whose ExecStart does not exist fails (the check above can fail)
    unit = root / "etc" / "systemd" / "system" / "vipd.service"
    unit.write_text(unit.read_text().replace("/opt/vipd/venv/bin/vipd", "/opt/vipd/.venv/bin/vipd"))
    out = run(["systemd-analyze", "verify", f"--root={root}", "vipd.service"], cwd=cwd, check=False)
    assert out.returncode != 0 and "/opt/vipd/.venv/bin/vipd" in out.stderr, out.stderr
