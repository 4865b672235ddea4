"""deploy/kubernetes/vipd.yaml's DaemonSet runs commands that exist: its args parse with
`vipd run`'s own parser (so a renamed flag breaks this test, not a cluster rollout), its
readiness probe is a vipctl command, its liveness probe scrapes the metrics address it
configures, and the image it names provides both programs (deploy/Dockerfile)."""

from pathlib import Path

import yaml

from agent.api.cli import build_parser as vipctl_parser
from agent.daemon import build_parser as vipd_parser

ROOT = Path(__file__).resolve().parents[3]


def _daemonset() -> dict:
    docs = list(yaml.safe_load_all((ROOT / "deploy" / "kubernetes" / "vipd.yaml").read_text()))
    [ds] = [d for d in docs if d and d["kind"] == "DaemonSet"]
    return ds


def test_daemonset_args_and_probes_are_real_commands():
    [c] = _daemonset()["spec"]["template"]["spec"]["containers"]
    args = vipd_parser().parse_args([a.replace("$(NODE_NAME)", "node1") for a in c["args"]])
    assert args.kubernetes and args.node_name == "node1" and args.api_socket == "/run/vipd/vipd.sock"
    port = int(args.metrics_addr.rpartition(":")[2])
    assert {p["name"]: p["containerPort"] for p in c["ports"]} == {"metrics": port}
    assert c["livenessProbe"]["httpGet"] == {"path": "/metrics", "port": "metrics"}
    probe = c["readinessProbe"]["exec"]["command"]
    assert probe[0] == "/usr/local/bin/vipctl"
    parsed = vipctl_parser().parse_args(probe[1:])
    assert parsed.socket == [args.api_socket] and parsed.func.__name__ == "cmd_status"
    assert {"name": "NODE_NAME", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}} in c["env"]
    mounts = {m["mountPath"] for m in c["volumeMounts"]}
    assert {"/sys/fs/bpf", "/run/vipd", "/var/lib/vipd", "/lib/modules", "/usr/src"} <= mounts
    dockerfile = (ROOT / "deploy" / "Dockerfile").read_text()
    assert "/opt/vipd/venv/bin/vipctl /usr/local/bin/" in dockerfile
