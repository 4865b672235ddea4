"""The gRPC server on a real unix socket and vipctl against it: socket permissions, health,
reflection, -o json field names, --socket / VIPD_SOCKET, errors people can act on."""

import asyncio
import json
import re
import os
import stat
import threading

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from agent.api import cli
from agent.api.model import vipd_pb2
from agent.api.server import ApiServer


class StaticProvider:
    """Fixed API answers (the daemon's provider is tested with the real lab in e2e)."""

    def __init__(self, node="worker"):
        self.node = node
        self.route_requests = []

    def list_peers(self):
        resp = vipd_pb2.ListPeersResponse(node=self.node)
        p = resp.peers.add(node=self.node, local_asn=65005, peer_asn=65005, peer_address="10.0.5.1",
                           peer_port=179, session_state="established", uptime_seconds=694,
                           timers=vipd_pb2.Timers(applied_hold_time_seconds=90, applied_keepalive_seconds=30))
        p.families.add(afi="ipv4", safi="unicast", received=6, advertised=1)
        p.families.add(afi="ipv6", safi="unicast")
        return resp

    def list_routes(self, request):
        self.route_requests.append(request)
        if request.peer == "10.9.9.9":
            raise LookupError("no peer 10.9.9.9 on this node")
        resp = vipd_pb2.ListRoutesResponse(node=self.node)
        resp.routes.add(node=self.node, vrouter=65005, peer=request.peer, prefix="10.1.0.0/24",
                        next_hop="10.0.5.11", age_seconds=61, attrs="[{Origin: i} {Nexthop: 10.0.5.11}]")
        return resp

    def list_route_policies(self, request):
        resp = vipd_pb2.ListRoutePoliciesResponse(node=self.node)
        resp.policies.add(vrouter=65005, name="allow-local", type="import",
                          statements=[vipd_pb2.RoutePolicyStatement(rib_action="accept")])
        return resp

    def get_status(self):
        return vipd_pb2.GetStatusResponse(node=self.node, config_dir="/etc/vipd", config_generation=2)


@pytest.fixture
def servers(tmp_path):
    """Two API servers (two "nodes") on an event loop in a background thread."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    made = []

    def start(name):
        provider = StaticProvider(name)
        server = ApiServer(provider, tmp_path / name / "run" / "vipd.sock")
        asyncio.run_coroutine_threadsafe(server.start(), loop).result(10)
        made.append(server)
        return server, provider

    yield start
    for s in made:
        asyncio.run_coroutine_threadsafe(s.stop(0), loop).result(10)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(5)


def run_cli(capsys, *argv, env=None):
    old = os.environ.copy()
    os.environ.pop("VIPD_SOCKET", None)
    os.environ.update(env or {})
    try:
        code = cli.main(list(argv))
    finally:
        os.environ.clear()
        os.environ.update(old)
    out, err = capsys.readouterr()
    return code, out, err


def test_socket_is_private_and_serves_health_and_reflection(servers):
    server, _ = servers("worker")
    st = os.stat(server.socket_path)
    assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600
    assert stat.S_IMODE(os.stat(server.socket_path.parent).st_mode) == 0o700
    with grpc.insecure_channel(f"unix://{server.socket_path}") as ch:
        health = health_pb2_grpc.HealthStub(ch)
        for service in ("", "vipd.v1.Vipd"):
            assert health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status == \
                health_pb2.HealthCheckResponse.SERVING
        refl = reflection_pb2_grpc.ServerReflectionStub(ch)
        answer = next(refl.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]),
                                                timeout=5))
        names = {s.name for s in answer.list_services_response.service}
        assert {"vipd.v1.Vipd", "grpc.health.v1.Health"} <= names


def test_peers_table_and_json_over_the_socket(servers, capsys):
    server, _ = servers("worker")
    code, out, _ = run_cli(capsys, "bgp", "peers", env={"VIPD_SOCKET": str(server.socket_path)})
    assert code == 0
    assert re.split(r"\s{2,}", out.splitlines()[0]) == ["Local AS", "Peer AS", "Peer Address", "Session", "Uptime",
                                               "Family", "Received", "Advertised"]
    assert out.splitlines()[1].split() == ["65005", "65005", "10.0.5.1:179", "established", "11m34s",
                                           "ipv4/unicast", "6", "1"]
    code, out, _ = run_cli(capsys, "--socket", str(server.socket_path), "bgp", "peers", "-o", "json")
    peer = json.loads(out)["peers"][0]
    assert peer["localASN"] == 65005 and peer["peerASN"] == 65005 and peer["peerAddress"] == "10.0.5.1"
    assert peer["peerPort"] == 179 and peer["sessionState"] == "established"
    assert peer["uptimeSeconds"] == 694
    assert peer["timers"] == {"appliedHoldTimeSeconds": 90, "appliedKeepaliveSeconds": 30}
    assert peer["families"][1] == {"afi": "ipv6", "safi": "unicast", "received": 0, "accepted": 0,
                                   "advertised": 0}


def test_several_sockets_print_the_cluster_layout(servers, capsys):
    a, _ = servers("node-a")
    b, _ = servers("node-b")
    code, out, _ = run_cli(capsys, "bgp", "peers", "--socket", str(b.socket_path), "--socket", str(a.socket_path))
    lines = out.splitlines()
    assert lines[0].startswith("Node     Local AS   Peer AS   Peer Address   Session State")
    assert [l.split()[0] for l in lines[1:] if not l.startswith(" ")] == ["node-a", "node-b"]


def test_routes_grammar_defaults_and_peer_filter(servers, capsys):
    server, provider = servers("worker")
    sock = str(server.socket_path)
    code, out, err = run_cli(capsys, "--socket", sock, "bgp", "routes")
    assert code == 0 and "(Defaulting to `available ipv4 unicast` routes" in err
    assert out.splitlines()[0].split() == ["VRouter", "Prefix", "NextHop", "Age", "Attrs"]
    code, out, _ = run_cli(capsys, "--socket", sock, "bgp", "routes", "advertised", "ipv4", "unicast",
                           "peer", "10.0.5.1")
    req = provider.route_requests[-1]
    assert req.table == vipd_pb2.ADVERTISED and req.afi == "ipv4" and req.peer == "10.0.5.1"
    assert out.splitlines()[1].split()[:5] == ["65005", "10.0.5.1", "10.1.0.0/24", "10.0.5.11", "1m1s"]
    code, _, err = run_cli(capsys, "--socket", sock, "bgp", "routes", "advertised", "ipv4", "unicast",
                           "neighbor", "10.9.9.9")
    assert code == 1 and "NOT_FOUND: no peer 10.9.9.9 on this node" in err
    code, _, err = run_cli(capsys, "--socket", sock, "bgp", "routes", "available", "ipv4", "unicast", "bogus", "1")
    assert code == 2 and "unexpected argument 'bogus'" in err


def test_route_policies_and_status(servers, capsys):
    server, _ = servers("worker")
    sock = str(server.socket_path)
    code, out, _ = run_cli(capsys, "--socket", sock, "bgp", "rps")
    assert re.split(r"\s{2,}", out.splitlines()[0]) == ["VRouter", "Policy Name", "Type", "Match Peers",
                                               "Match Prefixes (Min..Max Len)", "RIB Action", "Path Actions"]
    assert out.splitlines()[1].split() == ["65005", "allow-local", "import", "accept"]
    code, out, _ = run_cli(capsys, "--socket", sock, "status", "-o", "json")
    assert json.loads(out)["configGeneration"] == 2


def test_unreachable_daemon_is_explained(tmp_path, capsys):
    code, _, err = run_cli(capsys, "bgp", "peers", env={"VIPD_SOCKET": str(tmp_path / "nope.sock")})
    assert code == 1
    assert f"cannot reach vipd at {tmp_path / 'nope.sock'}" in err and "VIPD_SOCKET" in err


def test_migrate_prints_loadable_v2_resources(tmp_path, capsys):
    from agent import demo
    from agent.config import load_documents

    src = tmp_path / "policy.yaml"
    src.write_text(demo.LEGACY_POLICY_YAML)
    code, out, _ = run_cli(capsys, "migrate", str(src))
    assert code == 0
    result = load_documents(out, "migrated.yaml")
    assert result.errors == []
    assert sorted(o.kind for o in result.objects.all()) == sorted(
        ["CiliumBGPClusterConfig"] * 2 + ["CiliumBGPPeerConfig"] * 2 + ["CiliumBGPAdvertisement"] * 2)


def test_config_validate_exit_status_and_json(tmp_path, capsys):
    (tmp_path / "bad.yaml").write_text("apiVersion: cilium.io/v2\nkind: CiliumBGPPeerConfig\n"
                                       "metadata: {name: p}\nspec:\n  timers: {holdTimeSeconds: 1}\n")
    code, out, _ = run_cli(capsys, "config", "validate", str(tmp_path), "-o", "json")
    report = json.loads(out)
    assert code == 2 and not report["ok"] and "holdTimeSeconds" in report["errors"][0]
    (tmp_path / "bad.yaml").write_text("apiVersion: cilium.io/v2\nkind: CiliumBGPPeerConfig\n"
                                       "metadata: {name: p}\nspec:\n  timers: {holdTimeSeconds: 9, "
                                       "keepAliveTimeSeconds: 3}\n")
    code, out, _ = run_cli(capsys, "config", "validate", str(tmp_path))
    assert code == 0 and out.strip().endswith("OK")


def test_yaml_output_is_the_same_model(servers, capsys):
    import yaml

    server, _ = servers("worker")
    _, as_json, _ = run_cli(capsys, "--socket", str(server.socket_path), "bgp", "peers", "-o", "json")
    _, as_yaml, _ = run_cli(capsys, "--socket", str(server.socket_path), "bgp", "peers", "-o", "yaml")
    assert yaml.safe_load(as_yaml) == json.loads(as_json)
