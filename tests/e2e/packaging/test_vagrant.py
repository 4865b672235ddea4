"""The top-level Vagrantfile (the VM lab of docs/quickstart.md) loads, with the libvirt provider.

`vagrant validate` (Debian's vagrant + vagrant-libvirt) parses it and checks every VM's and the
provider's settings; its provisioning scripts exist and parse, and the nodes install vipd with
the install guide's script. Booting the VMs needs KVM and is not done here.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]


def vagrant(*args: str, home: Path) -> subprocess.CompletedProcess:
    if shutil.which("vagrant") is None:
        raise RuntimeError("vagrant not found: run scripts/install-deps (apt: vagrant vagrant-libvirt)")
    # A scratch VAGRANT_HOME and dotfile dir: nothing is written to ~ or the checkout.
    env = {**os.environ, "VAGRANT_HOME": str(home / "home"), "VAGRANT_DOTFILE_PATH": str(home / "dot"),
           "VAGRANT_DEFAULT_PROVIDER": "libvirt", "VAGRANT_CHECKPOINT_DISABLE": "1"}
    return subprocess.run(["vagrant", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)


def test_vagrantfile_validates_with_libvirt():
    home = Path(tempfile.mkdtemp(prefix="e-vagrant-"))
    try:
        plugins = vagrant("plugin", "list", home=home)
        assert "vagrant-libvirt" in plugins.stdout, plugins.stdout + plugins.stderr
        out = vagrant("validate", home=home)
        assert out.returncode == 0 and "validated successfully" in out.stdout, out.stdout + out.stderr
        # vagrant warns when a VM takes the .1 that libvirt gives the host's bridge
        assert "static IP ending in" not in out.stdout, out.stdout
        status = vagrant("status", "--machine-readable", home=home)
        machines = {line.split(",")[1] for line in status.stdout.splitlines() if ",state," in line}
        assert machines == {"router", "node1", "node2", "client"}, status.stdout + status.stderr
    finally:
        shutil.rmtree(home, ignore_errors=True)


def test_vagrant_provisioning_scripts_exist_parse_and_use_the_install_guide():
    text = (ROOT / "Vagrantfile").read_text()
    scripts = re.findall(r'path: "([^"]+)"', text)
    assert len(scripts) == 3, scripts
    for script in scripts:
        path = ROOT / script
        assert path.is_file() and os.access(path, os.X_OK), path
        check = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True)
        assert check.returncode == 0, f"{path}: {check.stderr}"
    node = (ROOT / "deploy" / "vagrant" / "node.sh").read_text()
    assert "/vagrant/deploy/install-node.sh /vagrant" in node
    assert "systemctl enable --now vipd" in node
