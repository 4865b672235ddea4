"""Helpers for the speaker interop tests (fixtures and the topology are in conftest.py).

* :class:`SpeakerProcess` runs the vipd speaker as its own process (``speaker_driver.py``) inside
  a lab host, driven over a unix socket, so tests can ``kill -9`` it, restart it and read its log;
  :class:`RunnerProcess` runs the speaker's own runner, ``python -m agent.bgp CONFIG.json``.
* :class:`BgpCase` starts per-test peers: FRR and GoBGP through ``agent.lab``, BIRD 2 through
  :class:`BirdReceiver`; all answer ``sessions()`` / ``routes(afi)`` the same way.
* :class:`Capture` records a peer's TCP traffic so tests can check the bytes we sent.
"""

from __future__ import annotations

import ipaddress
import json
import os
import signal
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from agent.lab import Host, Lab, wait_until
from agent.lab.peers import FrrPeer, GobgpPeer, Neighbor, Route, Session

sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "benchmarks"))
from bird import BirdDaemon  # noqa: E402  (benchmarks/bird.py: BIRD is not in agent.lab)

REPO = Path(__file__).resolve().parents[3]
DRIVER = Path(__file__).with_name("speaker_driver.py")

SPEAKER_ASN = 65001
SPEAKER_V4, SPEAKER_V6 = "10.0.0.1", "fd00::1"
PEER_ADDRS = {"frr": ("10.0.0.2", "fd00::2"), "gobgp": ("10.0.0.3", "fd00::3"), "bird": ("10.0.0.5", "fd00::5")}
PEER_ASNS = {"frr": 65002, "gobgp": 65003, "bird": 65005}
FAR_ADDR = "10.1.0.2"

# RFC 1997 well-known communities and how FRR/GoBGP (via agent.lab) print them.
NO_EXPORT, NO_ADVERTISE, LOCAL_AS = 0xFFFFFF01, 0xFFFFFF02, 0xFFFFFF03
WELL_KNOWN_NAMES = {NO_EXPORT: "no-export", NO_ADVERTISE: "no-advertise", LOCAL_AS: "local-AS"}


def community(text: str) -> int:
    """'65000:100' -> the RFC 1997 32-bit value."""
    high, low = text.split(":")
    return (int(high) << 16) | int(low)


def community_text(value: int) -> str:
    return WELL_KNOWN_NAMES.get(value, f"{value >> 16}:{value & 0xFFFF}")


# ------------------------------------------------------------------------------------------
# the speaker process
# ------------------------------------------------------------------------------------------

def neighbor(address: str, peer_asn: int, **kw) -> dict:
    """A NeighborConfig as JSON for the driver, with test-friendly timers."""
    cfg = {"address": address, "peer_asn": peer_asn, "families": ["ipv4"], "connect_retry": 1}
    cfg.update(kw)
    return cfg


class SpeakerProcess:
    """One vipd speaker (``speaker_driver.py``) in a lab host, driven over its control socket."""

    _seq = 0

    def __init__(self, host: Host, config: dict):
        SpeakerProcess._seq += 1
        self.host = host
        self.name = f"speaker-{SpeakerProcess._seq}"
        self.control = host.workdir / f"{self.name}.sock"
        self.config = {**config, "control": str(self.control)}
        self.config_path = host.workdir / f"{self.name}.json"
        self.config_path.write_text(json.dumps(self.config, indent=1))
        self.log_path = host.workdir / f"{self.name}.log"
        self.proc = None

    def start(self) -> "SpeakerProcess":
        self.control.unlink(missing_ok=True)
        env = {"PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"}
        self.proc = self.host.spawn([sys.executable, str(DRIVER), str(self.config_path)],
                                    env=env, log_path=self.log_path, cwd=REPO)

        def ready():
            return self.proc.poll() is not None or (self.control.exists() and self.call("peers") is not None)

        try:
            wait_until(ready, timeout=20, interval=0.05, what=f"{self.name} control socket")
        except TimeoutError as exc:
            raise AssertionError(f"{exc}\n{self.log()[-3000:]}") from exc
        if self.proc.poll() is not None:
            raise AssertionError(f"speaker exited ({self.proc.returncode}):\n{self.log()[-3000:]}")
        return self

    @property
    def pid(self) -> int:
        return self.proc.pid

    def call(self, op: str, **kw):
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(10)
            s.connect(str(self.control))
            s.sendall(json.dumps({"op": op, **kw}).encode() + b"\n")
            buf = b""
            while not buf.endswith(b"\n"):
                chunk = s.recv(65536)
                if not chunk:
                    break
                buf += chunk
        reply = json.loads(buf)
        if not reply["ok"]:
            raise AssertionError(f"speaker {op} failed: {reply['error']}")
        return reply["result"]

    def peers(self) -> dict[str, dict]:
        return {p["address"]: p for p in self.call("peers")}

    def peer(self, address: str) -> dict:
        return self.peers()[address]

    def established(self, address: str) -> bool:
        return self.peer(address)["state"] == "established"

    def advertise(self, neighbor: str, prefix: str, **attrs) -> None:
        self.call("advertise", neighbor=neighbor, prefix=prefix, attrs=attrs)

    def withdraw(self, neighbor: str, prefix: str) -> None:
        self.call("withdraw", neighbor=neighbor, prefix=prefix)

    def kill9(self) -> None:
        """SIGKILL: the kernel closes the TCP sessions (FIN), no NOTIFICATION is ever sent."""
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=5)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except Exception:  # noqa: BLE001 - a wedged speaker must not wedge the suite
                self.proc.kill()
                self.proc.wait(timeout=5)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


class RunnerProcess:
    """The speaker's own runner, ``python -m agent.bgp CONFIG.json`` (signals, status file)."""

    def __init__(self, host: Host, config: dict, name: str = "runner"):
        self.host = host
        self.status_path = host.workdir / f"{name}-status.json"
        self.config_path = host.workdir / f"{name}.json"
        self.config_path.write_text(json.dumps({**config, "status_file": str(self.status_path)}, indent=1))
        self.log_path = host.workdir / f"{name}.log"
        self.proc = None

    def start(self) -> "RunnerProcess":
        self.status_path.unlink(missing_ok=True)
        self.proc = self.host.spawn([sys.executable, "-m", "agent.bgp", str(self.config_path)],
                                    env={"PYTHONPATH": str(REPO)}, log_path=self.log_path, cwd=REPO)
        wait_until(lambda: self.proc.poll() is not None or self.status_path.exists(), timeout=20,
                   interval=0.05, what="runner status file")
        if self.proc.poll() is not None:
            raise AssertionError(f"runner exited ({self.proc.returncode}):\n{self.log()[-3000:]}")
        return self

    def signal(self, sig: int, *, wait: bool = True) -> int | None:
        self.proc.send_signal(sig)
        return self.proc.wait(timeout=10) if wait else None

    def peers(self) -> dict[str, dict]:
        return {p["address"]: p for p in json.loads(self.status_path.read_text())["peers"]}

    def established(self, address: str) -> bool:
        return self.peers()[address]["state"] == "established"

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=5)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


# ------------------------------------------------------------------------------------------
# the shared topology and per-test daemons
# ------------------------------------------------------------------------------------------

@dataclass
class Topo:
    lab: Lab
    spk: Host
    hosts: dict[str, Host]        # "frr", "gobgp" on the LAN
    mid: Host
    far: Host


@dataclass
class BgpCase:
    """What one test starts; everything is stopped (by PID) when the test ends."""

    topo: Topo
    daemons: list = field(default_factory=list)
    speakers: list = field(default_factory=list)   # SpeakerProcess / RunnerProcess

    def peer(self, kind: str, neighbors: list[Neighbor], *, host: Host | None = None,
             asn: int | None = None, router_id: str | None = None, announce=(), **peer_kw):
        """Start FRR or GoBGP (``kind``) with the given neighbors; returns the daemon."""
        host = host or self.topo.hosts[kind]
        asn = asn or PEER_ASNS[kind]
        router_id = router_id or PEER_ADDRS[kind][0]
        if kind == "frr":
            daemon = self.topo.lab.frr(host, FrrPeer(asn=asn, router_id=router_id, neighbors=neighbors,
                                                     announce=list(announce), **peer_kw))
        elif kind == "gobgp":
            daemon = self.topo.lab.gobgp(host, GobgpPeer(asn=asn, router_id=router_id, neighbors=neighbors,
                                                         announce=list(announce), **peer_kw))
        elif kind == "bird":
            daemon = BirdReceiver(host, asn=asn, router_id=router_id, neighbors=neighbors).start()
        else:
            raise ValueError(kind)
        self.daemons.append(daemon)
        return daemon

    def speaker(self, neighbors: list[dict], paths: list[dict] = (), *, asn: int = SPEAKER_ASN,
                router_id: str = SPEAKER_V4, listen_port: int | None = None, start: bool = True,
                host: Host | None = None) -> SpeakerProcess:
        config = {"speaker": {"asn": asn, "router_id": router_id, "listen_port": listen_port},
                  "neighbors": neighbors, "paths": list(paths)}
        spk = SpeakerProcess(host or self.topo.spk, config)
        self.speakers.append(spk)
        return spk.start() if start else spk

    def runner(self, config: dict) -> RunnerProcess:
        r = RunnerProcess(self.topo.spk, config, name=f"runner-{time.monotonic_ns()}")
        self.speakers.append(r)
        return r.start()

    def close(self) -> None:
        for spk in self.speakers:
            spk.stop()
        for d in self.daemons:
            d.stop()


class BirdReceiver:
    """BIRD 2 as a router receiving our routes, answering like agent.lab's FRR/GoBGP daemons."""

    def __init__(self, host: Host, *, asn: int, router_id: str, neighbors: list[Neighbor]):
        self.host = host
        self.neighbors = {f"n{i}": n for i, n in enumerate(neighbors)}
        self.daemon = BirdDaemon(host, self.config_text(asn, router_id), name=f"bird-{time.monotonic_ns()}")

    def __repr__(self) -> str:
        return f"BirdReceiver({self.host.name})"

    def config_text(self, asn: int, router_id: str) -> str:
        lines = [f"router id {router_id};", "protocol device { scan time 1; }"]
        for name, n in self.neighbors.items():
            lines += [f"protocol bgp {name} {{", f"  local as {asn};", f"  neighbor {n.address} as {n.remote_asn};",
                      "  connect delay time 1; connect retry time 1; error wait time 1, 2;"]
            if n.passive:
                lines.append("  passive on;")
            if n.password:
                lines.append(f'  password "{n.password}";')
            if n.ebgp_multihop:
                lines.append(f"  multihop {n.ebgp_multihop};")
            if n.hold_time is not None:
                lines.append(f"  hold time {n.hold_time};")
            for fam in n.families:
                # RFC 8212: BIRD needs explicit filters on eBGP channels.
                ext = " extended next hop on;" if fam == "ipv4" and ":" in n.address else ""
                lines.append(f"  {fam} {{ import all; export none;{ext} }};")
            lines.append("}")
        return "\n".join(lines) + "\n"

    def start(self) -> "BirdReceiver":
        self.daemon.start()
        return self

    def stop(self) -> None:
        self.daemon.stop()

    def log(self) -> str:
        return self.daemon.log() + self.daemon.birdc("show", "protocols", "all", check=False)

    def sessions(self) -> dict[str, Session]:
        result = {}
        for name, n in self.neighbors.items():
            out = self.daemon.birdc("show", "protocols", "all", name)
            state = next((l.split(":", 1)[1].strip() for l in out.splitlines() if "BGP state:" in l), "down")
            hold = next((int(l.split("/")[-1]) for l in out.splitlines() if "Hold timer:" in l), None)
            result[n.address] = Session(state=state.lower(), hold_time=hold, keepalive=None, uptime=None,
                                        received=0, accepted=0, raw={"text": out})
        return result

    def routes(self, afi: str = "ipv4") -> list[Route]:
        """`show route all` parsed: one Route per BGP route (BIRD keeps one table per family)."""
        out = self.daemon.birdc("show", "route", "all", "table", "master4" if afi == "ipv4" else "master6")
        routes, cur = [], None
        for line in out.splitlines():
            head = line.split()
            if head and not line[0].isspace() and "/" in head[0]:
                cur = {"prefix": head[0], "attrs": {}}
                routes.append(cur)
            elif cur is not None and ":" in line and line.strip().startswith("BGP."):
                key, value = line.strip().split(":", 1)
                cur["attrs"][key] = value.strip()
        result = []
        for r in routes:
            a = r["attrs"]
            if "BGP.origin" not in a:
                continue
            comms = tuple(_bird_pair(c) for c in a.get("BGP.community", "").replace(") (", ")|(").split("|") if c)
            large = tuple(c.strip("() ").replace(", ", ":") for c in
                          a.get("BGP.large_community", "").replace(") (", ")|(").split("|") if c)
            result.append(Route(
                prefix=r["prefix"], next_hop=a.get("BGP.next_hop", "").split()[0] if a.get("BGP.next_hop") else "",
                next_hops=tuple(a.get("BGP.next_hop", "").split()),
                as_path=tuple(int(x) for x in a.get("BGP.as_path", "").split()),
                origin=a["BGP.origin"].lower(), med=int(a["BGP.med"]) if "BGP.med" in a else None,
                local_pref=int(a["BGP.local_pref"]) if "BGP.local_pref" in a else None,
                communities=comms, large_communities=large, source="bgp"))
        return result


def _bird_pair(text: str) -> str:
    high, low = (int(x) for x in text.strip("() ").split(","))
    return community_text((high << 16) | low)


# ------------------------------------------------------------------------------------------
# assertions shared by the tests
# ------------------------------------------------------------------------------------------

def peer_established(daemon, address: str) -> bool:
    s = daemon.sessions().get(address)
    return s is not None and s.state == "established"


def wait_established(speaker: SpeakerProcess, daemon, speaker_side: str, peer_side: str,
                     timeout: float = 30):
    """Both ends report Established: our speaker for ``peer_side``, the daemon for ``speaker_side``."""
    try:
        wait_until(lambda: speaker.established(peer_side) and peer_established(daemon, speaker_side),
                   timeout=timeout, what=f"session {speaker_side} <-> {peer_side} Established on both sides")
    except TimeoutError as exc:
        raise AssertionError(f"{exc}\nour peer state: {speaker.peers().get(peer_side)}\n"
                             f"speaker log tail:\n{speaker.log()[-2500:]}\n"
                             f"peer log tail:\n{daemon.log()[-2500:]}\n"
                             f"listening in the peer's namespace:\n{daemon.host.run('ss', '-tlnpH', check=False)}"
                             ) from exc


def learned(daemon, afi: str = "ipv4") -> dict[str, object]:
    """Routes the daemon learned from a neighbor (not its own), by prefix."""
    return {r.prefix: r for r in daemon.routes(afi) if r.source}


def wait_routes(daemon, prefixes, afi: str = "ipv4", timeout: float = 15) -> dict:
    want = {str(ipaddress.ip_network(p)) for p in prefixes}
    return wait_until(lambda: (lambda got: got if set(got) == want else None)(learned(daemon, afi)),
                      timeout=timeout, what=f"exactly {sorted(want)} at {daemon!r}")


@dataclass
class Capture:
    """tcpdump of BGP in one host; ``messages_from(addr)`` gives the BGP messages that address sent."""

    host: Host
    path: Path
    proc: object
    name: str

    @classmethod
    def start(cls, host: Host, name: str = "bgp", iface: str = "eth-lan") -> "Capture":
        path = host.workdir / f"{name}-{time.monotonic_ns()}.pcap"
        log = host.workdir / f"{name}-tcpdump.log"
        proc = host.spawn(["tcpdump", "-i", iface, "--immediate-mode", "-B", "16384", "-U", "-n", "-w", str(path), "tcp"],
                          log_path=log)
        wait_until(lambda: "listening on" in log.read_text(errors="replace") or proc.poll() is not None,
                   timeout=10, interval=0.05, what="tcpdump ready")
        if proc.poll() is not None:
            raise AssertionError(f"tcpdump failed: {log.read_text()}")
        return cls(host, path, proc, name)

    def stop(self) -> None:
        if self.proc.poll() is None:
            time.sleep(0.5)  # let tcpdump drain its ring buffer: SIGINT drops what is still queued
            self.proc.send_signal(signal.SIGINT)
            self.proc.wait(timeout=5)

    def text(self) -> str:
        """tcpdump's own reading of the capture, for assertion messages."""
        import subprocess
        out = subprocess.run(["tcpdump", "-nr", str(self.path), "port", "179"], capture_output=True, text=True)
        log = (self.host.workdir / f"{self.name}-tcpdump.log").read_text(errors="replace")
        return (out.stdout + out.stderr)[-4000:] + "\n" + log[-1000:]

    def messages_from(self, address: str) -> list[bytes]:
        """Reassemble each TCP stream sent by ``address`` and split it into BGP messages."""
        from scapy.all import IP, IPv6, TCP, rdpcap

        streams: dict[tuple, dict[int, bytes]] = {}
        for pkt in rdpcap(str(self.path)):
            ip = pkt.getlayer(IP) or pkt.getlayer(IPv6)
            if ip is None or TCP not in pkt or ip.src != address:
                continue
            payload = bytes(pkt[TCP].payload)
            if payload:
                key = (ip.src, pkt[TCP].sport, ip.dst, pkt[TCP].dport)
                streams.setdefault(key, {})[pkt[TCP].seq] = payload
        messages = []
        for segments in streams.values():
            data = b"".join(segments[s] for s in sorted(segments))
            i = data.find(MARKER)           # resynchronise on the marker if the capture began late
            while i >= 0 and i + 19 <= len(data):
                length = int.from_bytes(data[i + 16:i + 18], "big")
                if data[i:i + 16] != MARKER or not 19 <= length <= 65535:
                    i = data.find(MARKER, i + 1)
                    continue
                messages.append(data[i:i + length])
                i += length
        return messages


def update_attribute_types(message: bytes) -> list[int]:
    """Path attribute type codes of one UPDATE (RFC 4271 §4.3), decoded independently of vipd."""
    body = message[19:]
    wlen = int.from_bytes(body[0:2], "big")
    alen = int.from_bytes(body[2 + wlen:4 + wlen], "big")
    attrs = body[4 + wlen:4 + wlen + alen]
    types, i = [], 0
    while i < len(attrs):
        flags, code = attrs[i], attrs[i + 1]
        if flags & 0x10:
            length, hdr = int.from_bytes(attrs[i + 2:i + 4], "big"), 4
        else:
            length, hdr = attrs[i + 2], 3
        types.append(code)
        i += hdr + length
    return types


BGP_UPDATE = 2
MARKER = b"\xff" * 16


def updates(messages: list[bytes]) -> list[bytes]:
    return [m for m in messages if len(m) >= 19 and m[18] == BGP_UPDATE]
