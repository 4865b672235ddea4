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


def _container_state_dir(container: dict) -> str:
    parsed = vipd_parser().parse_args([a.replace("$(NODE_NAME)", "node1") for a in container["args"]])
    return parsed.state_dir


def test_daemonsets_prepare_the_program_cache_the_agent_reads_in_an_init_container():
    """Both DaemonSets run `vipd prepare` first, from the same image, with the state dir (hence
    <state-dir>/bpf-cache), bpffs and kernel headers the agent container has: the agent's first
    start loads the programs instead of compiling."""
    for path in (ROOT / "deploy" / "kubernetes" / "vipd.yaml", ROOT / "deploy" / "daemonset.yaml"):
        [ds] = [d for d in yaml.safe_load_all(path.read_text()) if d and d["kind"] == "DaemonSet"]
        spec = ds["spec"]["template"]["spec"]
        [init], [agent] = spec["initContainers"], spec["containers"]
        args = vipd_parser().parse_args(init["args"])
        assert args.cmd == "prepare" and args.bpf_cache_dir is None, path
        assert init["image"] == agent["image"], path
        assert args.state_dir == _container_state_dir(agent), path
        mounts = {m["mountPath"]: m["name"] for m in init["volumeMounts"]}
        agent_mounts = {m["mountPath"]: m["name"] for m in agent["volumeMounts"]}
        for mount in ("/sys/fs/bpf", args.state_dir, "/lib/modules", "/usr/src"):
            assert mount in mounts and mounts[mount] == agent_mounts[mount], (path, mount)
        assert init["securityContext"]["privileged"] is True


def _unit(name: str) -> dict[str, list[str]]:
    """[Section] key=value lines of a systemd unit (continuation lines joined)."""
    out: dict[str, list[str]] = {}
    text = (ROOT / "deploy" / name).read_text().replace("\\\n", " ")
    section = ""
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("["):
            section = line.strip("[]")
        elif "=" in line and not line.startswith("#"):
            k, v = line.split("=", 1)
            out.setdefault(f"{section}.{k}", []).append(v)
    return out


def test_systemd_prepare_unit_runs_once_before_vipd_and_fills_the_cache_vipd_reads():
    """vipd.service pulls vipd-prepare.service in (Wants: a failed prepare does not stop vipd)
    and starts after it; the oneshot stays 'active' (RemainAfterExit), so a restart of vipd does
    not run it again; both units read /etc/default/vipd (VIPD_BPF_CACHE_DIR) and name the same
    state dir."""
    vipd, prep = _unit("vipd.service"), _unit("vipd-prepare.service")
    assert "vipd-prepare.service" in " ".join(vipd["Unit.Wants"]).split()
    assert "vipd-prepare.service" in " ".join(vipd["Unit.After"]).split()
    assert "Unit.Requires" not in vipd
    assert prep["Service.Type"] == ["oneshot"] and prep["Service.RemainAfterExit"] == ["yes"]
    assert prep["Service.EnvironmentFile"] == vipd["Service.EnvironmentFile"]
    [run_cmd], [prep_cmd] = vipd["Service.ExecStart"], prep["Service.ExecStart"]
    run_argv, prep_argv = run_cmd.split(), prep_cmd.split()
    assert run_argv[0] == prep_argv[0] == "/opt/vipd/venv/bin/vipd"
    run_args = vipd_parser().parse_args([a.replace("${VIPD_NODE_NAME}", "n1") for a in run_argv[1:]
                                         if a != "$VIPD_ARGS"])
    prep_args = vipd_parser().parse_args(prep_argv[1:])
    assert prep_args.cmd == "prepare" and prep_args.state_dir == run_args.state_dir
    assert prep_args.bpf_cache_dir is None and run_args.bpf_cache_dir is None
    install = (ROOT / "deploy" / "install-node.sh").read_text()
    assert '"$HERE/vipd-prepare.service"' in install and '"$venv/bin/vipd" prepare' in install
