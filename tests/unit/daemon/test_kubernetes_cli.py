"""`vipd run --kubernetes` refuses what cannot work before it starts anything, and says why."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]


def vipd(*args: str, tmp_path: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("KUBERNETES_")}
    return subprocess.run([sys.executable, "-m", "agent.daemon", "run", "--node-name", "n1",
                           "--state-dir", str(tmp_path / "state"),
                           "--api-socket", str(tmp_path / "vipd.sock"), *args],
                          capture_output=True, text=True, timeout=30,
                          env={**env, "PYTHONPATH": str(ROOT)})


def test_config_and_kubernetes_are_mutually_exclusive(tmp_path):
    out = vipd("--config", str(tmp_path), "--kubernetes", tmp_path=tmp_path)
    assert out.returncode == 2
    assert "--kubernetes: not allowed with argument --config" in out.stderr


def test_kubeconfig_without_kubernetes_is_refused(tmp_path):
    out = vipd("--config", str(tmp_path), "--kubeconfig", str(tmp_path / "kc"), tmp_path=tmp_path)
    assert out.returncode == 2
    assert "--kubeconfig is used with --kubernetes only" in out.stderr


def test_outside_a_pod_without_kubeconfig_says_what_to_give(tmp_path):
    out = vipd("--kubernetes", tmp_path=tmp_path)
    assert out.returncode == 2
    assert "KUBERNETES_SERVICE_HOST/PORT are not set" in out.stderr
    assert "--kubeconfig PATH" in out.stderr


def test_a_bad_kubeconfig_is_named_with_the_problem(tmp_path):
    missing = tmp_path / "missing"
    out = vipd("--kubernetes", "--kubeconfig", str(missing), tmp_path=tmp_path)
    assert out.returncode == 2 and f"kubeconfig {missing}: cannot read" in out.stderr
    kc = tmp_path / "kc"
    kc.write_text("apiVersion: v1\nkind: Config\ncurrent-context: prod\ncontexts: []\n")
    out = vipd("--kubernetes", "--kubeconfig", str(kc), tmp_path=tmp_path)
    assert out.returncode == 2
    assert f"kubeconfig {kc}: contexts: no entry named 'prod'" in out.stderr
