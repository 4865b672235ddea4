"""Helpers for the speaker interop tests: the speaker process, the shared topology, peers,
packet captures. Fixtures are in conftest.py (one topology per module, fresh daemons per test).

Topology (built once per test module; daemons are per test)::

       spk 10.0.0.1 fd00::1 (vipd speaker, AS 65001)
        |
   [lan bridge] ---- frr 10.0.0.2 fd00::2 (FRR, AS 65002)
        |  \\------- gobgp 10.0.0.3 fd00::3 (GoBGP, AS 65003)
        |
       mid 10.0.0.4 ==== 10.1.0.1 | 10.1.0.2 far (FRR or GoBGP, multihop: two IP hops from spk)

The speaker runs as its own process (``speaker_driver.py``) inside ``spk`` and is driven over a
unix socket, so tests can ``kill -9`` it, restart it, read its log and its peak RSS.
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
from agent.lab.peers import Announce, FrrPeer, GobgpPeer, Neighbor

REPO = Path(__file__).resolve().parents[3]
DRIVER = Path(__file__).with_name("speaker_driver.py")

SPEAKER_ASN = 65001
SPEAKER_V4, SPEAKER_V6 = "10.0.0.1", "fd00::1"
PEER_ADDRS = {"frr": ("10.0.0.2", "fd00::2"), "gobgp": ("10.0.0.3", "fd00::3")}
PEER_ASNS = {"frr": 65002, "gobgp": 65003}
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

    def vm_hwm_kib(self) -> int:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
        raise AssertionError("no VmHWM in /proc status")


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
    speakers: list[SpeakerProcess] = field(default_factory=list)

    def peer(self, kind: str, neighbors: list[Neighbor], *, host: Host | None = None,
             asn: int | None = None, router_id: str | None = None, announce=(), **peer_kw):
        """Start FRR or GoBGP (``kind``) with the given neighbors; returns the daemon."""
        host = host or self.topo.hosts[kind]
        asn = asn or PEER_ASNS[kind]
        router_id = router_id or {"frr": "10.0.0.2", "gobgp": "10.0.0.3"}[kind]
        if kind == "frr":
            # FrrDaemon reuses host.workdir/frr-ASN: sockets left by a previous daemon there would
            # make the harness (and bgpd, for zserv.api) believe the new one is already up.
            for stale in ("zserv.api", "bgpd.vty", "zebra.vty"):
                (host.workdir / f"frr-{asn}" / stale).unlink(missing_ok=True)
            daemon = self.topo.lab.frr(host, FrrPeer(asn=asn, router_id=router_id, neighbors=neighbors,
                                                     announce=list(announce), **peer_kw))
        elif kind == "gobgp":
            daemon = self.topo.lab.gobgp(host, GobgpPeer(asn=asn, router_id=router_id, neighbors=neighbors,
                                                         announce=list(announce), **peer_kw))
        else:
            raise ValueError(kind)
        self.daemons.append(daemon)
        # A restarted FRR finds its old vty socket file: wait until the new daemon answers.
        wait_until(lambda: daemon.sessions() is not None, timeout=15, what=f"{daemon!r} answers queries")
        return daemon

    def speaker(self, neighbors: list[dict], paths: list[dict] = (), *, asn: int = SPEAKER_ASN,
                router_id: str = SPEAKER_V4, listen_port: int | None = None, start: bool = True,
                host: Host | None = None) -> SpeakerProcess:
        config = {"speaker": {"asn": asn, "router_id": router_id, "listen_port": listen_port},
                  "neighbors": neighbors, "paths": list(paths)}
        spk = SpeakerProcess(host or self.topo.spk, config)
        self.speakers.append(spk)
        return spk.start() if start else spk

    def close(self) -> None:
        for spk in self.speakers:
            spk.stop()
        for d in self.daemons:
            d.stop()


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

    @classmethod
    def start(cls, host: Host, name: str = "bgp") -> "Capture":
        path = host.workdir / f"{name}-{time.monotonic_ns()}.pcap"
        log = host.workdir / f"{name}-tcpdump.log"
        proc = host.spawn(["tcpdump", "-i", "any", "--immediate-mode", "-U", "-n", "-w", str(path), "tcp"],
                          log_path=log)
        wait_until(lambda: "listening on" in log.read_text(errors="replace") or proc.poll() is not None,
                   timeout=10, interval=0.05, what="tcpdump ready")
        if proc.poll() is not None:
            raise AssertionError(f"tcpdump failed: {log.read_text()}")
        return cls(host, path, proc)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            self.proc.wait(timeout=5)

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
            while len(data) >= 19:
                length = int.from_bytes(data[16:18], "big")
                messages.append(data[:length])
                data = data[length:]
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


def updates(messages: list[bytes]) -> list[bytes]:
    return [m for m in messages if len(m) >= 19 and m[18] == BGP_UPDATE]
