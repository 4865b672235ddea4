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


def test_cilium_crds_are_generated_and_cover_every_cilium_kind_vipd_uses():
    """deploy/kubernetes/cilium-crds.yaml is what scripts/gen-cilium-crds.py writes, and has one
    CRD per cilium.io kind vipd reads or writes, serving each version vipd asks for, with a
    status subresource where vipd writes status."""
    import subprocess
    import sys

    from agent.sources.kubernetes import watched_resources

    path = ROOT / "deploy" / "kubernetes" / "cilium-crds.yaml"
    generated = subprocess.run([sys.executable, str(ROOT / "scripts" / "gen-cilium-crds.py")],
                               capture_output=True, text=True, check=True, timeout=60).stdout
    assert generated == path.read_text(), \
        "stale: run python3 scripts/gen-cilium-crds.py > deploy/kubernetes/cilium-crds.yaml"
    crds = {d["spec"]["names"]["kind"]: d for d in yaml.safe_load_all(generated) if d}
    wanted: dict[str, set] = {}
    for w in watched_resources():
        if w.api_version.startswith("cilium.io/"):
            wanted.setdefault(w.kind, set()).add(w.api_version.split("/")[1])
    assert set(crds) == set(wanted)
    written = {"CiliumBGPNodeConfig", "CiliumBGPClusterConfig", "CiliumBGPPeerConfig",
               "CiliumLoadBalancerIPPool"}
    for kind, crd in crds.items():
        assert crd["spec"]["scope"] == "Cluster"
        versions = {v["name"]: v for v in crd["spec"]["versions"]}
        assert set(versions) == wanted[kind], kind
        storage = "v2" if "v2" in versions else "v2alpha1"    # as in Cilium 1.18
        assert [n for n, v in versions.items() if v["storage"]] == [storage], kind
        if kind in written:
            assert "status" in versions["v2"]["subresources"], kind
