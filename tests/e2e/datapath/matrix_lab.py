"""The traffic-matrix lab (test_traffic_matrix.py, benchmarks/datapath_throughput.py): the
datapath lab of dp_topology.py with pods a1 (node-a) and b1 (node-b), one VIP per mode and
family, and in both pods: ``python3 -m http.server`` with files of exact sizes, a UDP echo and
"N bytes" server (matrix_server.py), and one iperf3 server per (mode, family).

    local  10.96.0.10 / fd96::10  -> a1 (DNAT on node-a, tc egress reverses the reply)
    snat   10.96.0.11 / fd96::11  -> b1 (DNAT + SNAT on node-a)
    dsr    10.96.0.12 / fd96::12  -> b1 (DSR option; node-b's tc records it and reverses the reply)
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from agent.lab import Lab, wait_until

import dp_topology as topology
from dp_topology import NODE_ADDR, NODE_ADDR6, PODS, pod_address

HERE = Path(__file__).resolve().parent
MODES = {"local": "a1", "snat": "b1", "dsr": "b1"}
VIPS = {("local", 4): "10.96.0.10", ("snat", 4): "10.96.0.11", ("dsr", 4): "10.96.0.12",
        ("local", 6): "fd96::10", ("snat", 6): "fd96::11", ("dsr", 6): "fd96::12"}
HTTP, UDP, SIZED = (80, 8000), (7, 7007), (81, 8081)            # (VIP port, pod port)
STREAM_PORT = {(m, f): 5201 + i for i, (m, f) in enumerate(VIPS)}  # VIP port = pod port
HTTP_SIZES = {"0B": 0, "1KiB": 1024, "100KiB": 100 * 1024, "10MiB": 10 * 1024 * 1024}
STREAM_SECONDS, STREAM_RATE = 60, 4_000_000   # per direction; 24 streams share 2 CPUs
UDP_COUNT, UDP_SIZE = 2000, 1400


def services(node: str) -> list[dict]:
    out = []
    for (mode, fam), vip in VIPS.items():
        pod = MODES[mode]
        ports = [(HTTP, "tcp"), (UDP, "udp"), (SIZED, "tcp"), ((STREAM_PORT[mode, fam],) * 2, "tcp")]
        for (vport, pport), proto in ports:
            out.append({"vip": vip, "port": vport, "proto": proto, "mode": "dsr" if mode == "dsr" else "snat",
                        "backends": [{"addr": pod_address(pod, fam), "port": pport,
                                      "local": PODS[pod][0] == node}]})
    return out


class MatrixLab:
    """One link configuration: the lab, its agents' pin roots, the HTTP files."""

    def __init__(self, lab: Lab, offloads: str, mtu: int):
        self.lab, self.offloads, self.mtu = lab, offloads, mtu
        self.pin_roots: list[str] = []
        self.streams: dict[tuple[str, int], subprocess.Popen] = {}

    def build(self) -> "MatrixLab":
        """Namespaces, links, servers (then start_agents: they compile for seconds, so the
        caller starts every lab's agents before waiting for any)."""
        self.env = topology.build(self.lab, mtu=self.mtu, offloads=self.offloads, pods_wanted=("a1", "b1"),
                                  pod_servers=False)
        www = self.lab.workdir / "www"
        www.mkdir()
        self.sha = {}
        for name, size in HTTP_SIZES.items():
            data = os.urandom(size)
            (www / name).write_bytes(data)
            self.sha[name] = hashlib.sha256(data).hexdigest()
        for pod in self.env.pods.values():
            pod.spawn([sys.executable, "-m", "http.server", "--bind", "::", "--directory", str(www), str(HTTP[1])])
            pod.spawn([sys.executable, str(HERE / "matrix_server.py"), str(UDP[1]), str(SIZED[1])])
            for port in STREAM_PORT.values():
                pod.spawn(["iperf3", "-s", "-p", str(port)])
        return self

    def start_agents(self) -> None:
        self.agents = [(name, self._start_agent(name)) for name in NODE_ADDR]

    def ready(self) -> None:
        for name, proc in self.agents:
            out, err = proc.communicate(timeout=300)
            if proc.returncode != 0:
                raise RuntimeError(f"agent on {name} ({self.offloads}, MTU {self.mtu}) failed:\n{err[-3000:]}")
        for name, pod in self.env.pods.items():
            wanted = [f":{p}" for p in (HTTP[1], SIZED[1], *STREAM_PORT.values())]
            wait_until(lambda: all(w in pod.run("ss", "-ltn") for w in wanted), timeout=30, what=f"{name} servers")

    def _start_agent(self, name: str) -> subprocess.Popen:
        host = self.env.nodes[name]
        pin_root = f"/sys/fs/bpf/vipd-mx-{host.ns}"
        self.pin_roots.append(pin_root)
        cfg = {"instance": f"mx-{name}", "pin_root": pin_root, "netns": host.ns,
               "node_v4": NODE_ADDR[name], "node_v6": NODE_ADDR6[name], "xdp": ["eth-lan"],
               "tc_ingress": ["eth-lan"], "tc_egress": ["eth-lan"], "services": services(name)}
        path = self.lab.workdir / f"{name}.json"
        path.write_text(json.dumps(cfg))
        return subprocess.Popen([sys.executable, str(HERE / "lbagent.py"), str(path)],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def client(self, *argv: str, timeout: float = 120, check: bool = True) -> str:
        return self.env.client.run(*argv, timeout=timeout, check=check)

    def start_streams(self) -> None:
        for (mode, fam), vip in VIPS.items():
            out = self.lab.workdir / f"stream-{mode}-{fam}.json"
            argv = self.env.client.exec_argv(
                ["iperf3", "-c", vip, "-p", str(STREAM_PORT[mode, fam]), "--bidir", "-t", str(STREAM_SECONDS),
                 "-b", str(STREAM_RATE), "-J", "--connect-timeout", "5000"])
            self.streams[mode, fam] = subprocess.Popen(argv, stdout=open(out, "w"), stderr=subprocess.STDOUT)
            self.streams[mode, fam].out_path = out  # type: ignore[attr-defined]

    def close(self) -> None:
        for p in self.streams.values():
            if p.poll() is None:
                p.kill()
                p.wait()
        for root in self.pin_roots:
            shutil.rmtree(root, ignore_errors=True)
