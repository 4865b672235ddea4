"""HTTP through a VIP served by the real daemon (`vipd run --lb-interface ...`), the way users
run it: the seed 002 lab, eTP=Local with the endpoint on cilium-bgp-worker, whose XDP DNATs
to the local pod and whose tc egress must turn the pod's replies (100 KiB: non-linear skbs,
many segments) back into VIP:80. Before issue 8's fix every reply frame above 128 bytes left
with the pod's address and curl failed."""

import hashlib
import os
import shutil
import sys
from pathlib import Path

import pytest

from agent import demo
from agent.demo import NODES, Seed002Lab
from agent.lab import Lab, wait_until

POD_PORT = 8080
SIZE = 100 * 1024


@pytest.fixture(scope="module")
def env():
    lab = Lab("dhttp")
    try:
        with lab:
            env = Seed002Lab(lab).build()
            env.prepare_datapath()
            node = next(n for n in NODES if n.name == "cilium-bgp-worker")
            www = lab.workdir / "www"
            www.mkdir()
            env.body = os.urandom(SIZE)
            (www / "100k").write_bytes(env.body)
            pod = lab.hosts[f"pod-{node.host}"]
            pod.spawn([sys.executable, "-m", "http.server", "--bind", "0.0.0.0", "--directory", str(www), str(POD_PORT)])
            wait_until(lambda: f":{POD_PORT}" in pod.run("ss", "-ltn"), what="http.server in the pod")
            svc = demo.service_yaml(traffic_policy="Local", endpoint_node=node.name)
            svc = svc.replace("targetPort: 80", f"targetPort: {POD_PORT}").replace(
                "ports:\n- port: 80\n  protocol: TCP\nendpoints", f"ports:\n- port: {POD_PORT}\n  protocol: TCP\nendpoints")
            assert f"targetPort: {POD_PORT}" in svc and f"- port: {POD_PORT}" in svc
            env.write_all("nodes.yaml", demo.nodes_yaml())
            env.write_all("bgp.yaml", demo.V2_BGP_YAML)
            env.write_all("svc.yaml", svc)
            env.start_nodes(lb=True)
            wait_until(env.sessions_established, timeout=120, what="sessions established")
            yield env
    finally:
        shutil.rmtree(Path("/sys/fs/bpf") / f"{lab.prefix}vipd", ignore_errors=True)


def test_http_get_of_100_kib_through_a_local_backend_vip(env):
    address = env.vip()
    wait_until(lambda: env.vip_announcers(f"{address}/32") == {"10.0.5.12"}, timeout=60,
               what="VIP announced by cilium-bgp-worker only")
    out = env.lab.workdir / "got"

    def get():
        out.unlink(missing_ok=True)
        env.client.run("curl", "-sS", "--fail", "--max-time", "10", "-o", str(out), f"http://{address}/100k",
                       check=False)
        return out.exists() and out.stat().st_size == SIZE
    wait_until(get, timeout=30, what="a 100 KiB GET through the VIP")
    for _ in range(5):
        env.client.run("curl", "-sS", "--fail", "--max-time", "10", "-o", str(out), f"http://{address}/100k")
        assert hashlib.sha256(out.read_bytes()).hexdigest() == hashlib.sha256(env.body).hexdigest()
