"""Real traffic through every kind of VIP with unmodified standard tools, on every link setup.

Cells: {local backend, SNAT to a remote backend, DSR to a remote backend} × {IPv4, IPv6} ×
{curl GET of 0 B / 1 KiB / 100 KiB / 10 MiB from ``python3 -m http.server`` (sha256 checked),
1,400-byte UDP datagrams echoed (count and content checked), a 60 s iperf3 --bidir stream
(bytes both ways, no reset)} × {GRO/GSO/TSO on, off} × {MTU 1500, 9000}.

The four link configurations are four labs (dp_topology.py with pods a1 on node-a and b1 on
node-b) built concurrently; all 24 streams start when the labs are up and run while the HTTP
and UDP cells run, so the whole matrix takes a few minutes. Each cell is its own test (its id
names mode, family, size or kind, offloads and MTU).

Plus the reproduction of issue 8 as a regression: a local (or DSR) backend answering N bytes,
N = 62 and 63 (the reply frame crosses 128 bytes).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from agent.lab import Lab, wait_until

import dp_topology as topology
from dp_topology import NODE_ADDR, NODE_ADDR6, PODS, pod_address

HERE = Path(__file__).resolve().parent
CONFIGS = [("on", 1500), ("off", 1500), ("on", 9000), ("off", 9000)]
MODES = {"local": "a1", "snat": "b1", "dsr": "b1"}
VIPS = {("local", 4): "10.96.0.10", ("snat", 4): "10.96.0.11", ("dsr", 4): "10.96.0.12",
        ("local", 6): "fd96::10", ("snat", 6): "fd96::11", ("dsr", 6): "fd96::12"}
HTTP, UDP, SIZED = (80, 8000), (7, 7007), (81, 8081)            # (VIP port, pod port)
STREAM_PORT = {(m, f): 5201 + i for i, (m, f) in enumerate(VIPS)}  # VIP port = pod port
HTTP_SIZES = {"0B": 0, "1KiB": 1024, "100KiB": 100 * 1024, "10MiB": 10 * 1024 * 1024}
STREAM_SECONDS, STREAM_RATE = 60, 4_000_000   # per direction; 24 streams share 2 CPUs
UDP_COUNT, UDP_SIZE = 2000, 1400


def cfg_id(cfg) -> str:
    return f"offload-{cfg[0]}-mtu{cfg[1]}"


CELLS = [(cfg, mode, fam) for cfg in CONFIGS for mode in MODES for fam in (4, 6)]
CELL_IDS = [f"{mode}-v{fam}-{cfg_id(cfg)}" for cfg, mode, fam in CELLS]


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

    def client(self, *argv: str, timeout: float = 120) -> str:
        return self.env.client.run(*argv, timeout=timeout)

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


@pytest.fixture(scope="module")
def matrix():
    with contextlib.ExitStack() as stack:
        labs = {cfg: MatrixLab(stack.enter_context(Lab(f"mx{cfg[0]}{cfg[1]}")), *cfg) for cfg in CONFIGS}
        for m in labs.values():
            stack.callback(m.close)
        t0 = time.monotonic()
        # one lab after the other in this thread (pyroute2 forks: never from several threads),
        # then the agents of all four, compiling at once (an agent started while the next lab
        # was being built lost its pin directory: started after every build, none does)
        for m in labs.values():
            m.build()
        for m in labs.values():
            m.start_agents()
        for m in labs.values():
            m.ready()
        print(f"matrix: 4 labs built in {time.monotonic() - t0:.1f} s", file=sys.stderr)
        for m in labs.values():
            m.start_streams()
        yield labs


# -- HTTP ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("size", list(HTTP_SIZES))
@pytest.mark.parametrize("cfg,mode,fam", CELLS, ids=CELL_IDS)
def test_http_get(matrix, cfg, mode, fam, size):
    m = matrix[cfg]
    vip = VIPS[mode, fam]
    host = f"[{vip}]" if fam == 6 else vip
    out = m.lab.workdir / f"get-{mode}-{fam}-{size}"
    m.client("curl", "-sS", "-g", "--fail", "--max-time", "60", "-o", str(out), f"http://{host}:{HTTP[0]}/{size}")
    data = out.read_bytes()
    assert len(data) == HTTP_SIZES[size]
    assert hashlib.sha256(data).hexdigest() == m.sha[size]


# -- UDP -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("cfg,mode,fam", CELLS, ids=CELL_IDS)
def test_udp_1400_byte_datagrams(matrix, cfg, mode, fam):
    m = matrix[cfg]
    vip = VIPS[mode, fam]
    r = json.loads(m.client(sys.executable, str(HERE / "traffic.py"), "udp", vip, str(UDP[0]),
                            str(UDP_COUNT), str(UDP_SIZE)))
    assert r["bad"] == 0 and r["from"] == [vip], r
    # every one of them went out and came back through the datapath; allow a few datagrams
    # lost to socket buffers on a shared 2-CPU machine (a datapath fault loses all of them)
    assert r["ok"] >= UDP_COUNT * 0.995, r


# -- the reproduction of issue 8 ---------------------------------------------------------------------

@pytest.mark.parametrize("n", [62, 63])
@pytest.mark.parametrize("cfg,mode,fam", [c for c in CELLS if c[1] != "snat"],
                         ids=[i for c, i in zip(CELLS, CELL_IDS) if c[1] != "snat"])
def test_reply_of_n_bytes(matrix, cfg, mode, fam, n):
    """A local or DSR backend's reply of N bytes: 62 always worked, 63 was left untranslated."""
    m = matrix[cfg]
    vip = VIPS[mode, fam]
    r = json.loads(m.client(sys.executable, str(HERE / "traffic.py"), "sized", vip, str(SIZED[0]), str(n)))
    assert r == {"bytes": n, "intact": True, "from": vip}


# -- 60 s streams (started with the labs; here their results are collected) ----------------------

@pytest.mark.parametrize("cfg,mode,fam", CELLS, ids=CELL_IDS)
def test_stream_60s_both_ways(matrix, cfg, mode, fam):
    m = matrix[cfg]
    p = m.streams[mode, fam]
    p.wait(timeout=STREAM_SECONDS + 60)
    text = Path(p.out_path).read_text()
    r = json.loads(text)
    assert "error" not in r and p.returncode == 0, r.get("error", text[-2000:])
    end = r["end"]
    want = STREAM_SECONDS * STREAM_RATE / 8 * 0.9     # the paced bytes, less 10 %
    got = {"client->server": end["sum_received"]["bytes"], "server->client": end["sum_received_bidir_reverse"]["bytes"]}
    assert all(v >= want for v in got.values()), (got, want)
    assert end["sum_received"]["seconds"] >= STREAM_SECONDS - 1
