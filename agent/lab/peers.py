"""Real BGP daemons inside lab hosts: FRR (bgpd, optionally zebra) and GoBGP (gobgpd).

A peer is described once (:class:`FrrPeer` / :class:`GobgpPeer`, same fields) and rendered
into the daemon's own configuration. Both daemons answer the same machine-readable queries:
``sessions()`` (per neighbor: state, negotiated hold/keepalive, uptime, prefixes
received/accepted) and ``routes(afi)`` (prefix, next hop, AS path, origin, MED, local-pref,
communities, large communities). Processes are started in the foreground and stopped by PID.

Pitfalls handled here (see shared/reference/bgp-interop.md §5): bgpd as root needs ``-S``;
without zebra (``-Z``) FRR cannot use IPv6 link-local next hops or install routes; FRR enforces
RFC 8212 on eBGP unless ``no bgp ebgp-requires-policy``; ``network`` statements need ``no bgp
network import-check`` without zebra; each FRR instance needs its own vty socket directory.
"""

from __future__ import annotations

import ipaddress
import json
import os
import subprocess
import time
from dataclasses import dataclass, field
from typing import Sequence

from . import Host, LabError, _stop_pid, wait_until

__all__ = ["Neighbor", "Announce", "FrrPeer", "GobgpPeer", "Session", "Route", "FrrDaemon", "GobgpDaemon"]


@dataclass(frozen=True)
class Neighbor:
    address: str
    remote_asn: int
    password: str | None = None
    ebgp_multihop: int | None = None
    passive: bool = False
    hold_time: int | None = None
    keepalive: int | None = None
    rr_client: bool = False
    families: tuple[str, ...] = ("ipv4",)      # "ipv4" / "ipv6" unicast
    port: int | None = None                    # the neighbor's port (we connect to it)
    update_source: str | None = None
    soft_reconfiguration: bool = False         # FRR: keep Adj-RIB-In for received-routes
    connect_retry: int = 1
    graceful_restart: bool = False
    extended_nexthop: bool = False
    bfd: str | None = None                     # "": `neighbor X bfd`; a name: `bfd profile NAME`
    interface: bool = False                    # FRR unnumbered: ``address`` is an interface name


@dataclass(frozen=True)
class Announce:
    prefix: str
    communities: tuple[str, ...] = ()
    large_communities: tuple[str, ...] = ()
    med: int | None = None
    local_pref: int | None = None


@dataclass
class FrrPeer:
    asn: int
    router_id: str
    neighbors: Sequence[Neighbor] = ()
    announce: Sequence[Announce] = ()
    zebra: bool = False            # needed for IPv6 link-local next hops and FIB installation
    listen_port: int = 179         # 0: do not listen
    graceful_restart: bool = False
    extra_config: str = ""         # appended inside `router bgp` (e.g. cluster-id)
    extra_global_config: str = ""  # appended at top level (route-maps, prefix-lists)
    bfdd_config: str | None = None  # bfdd.conf text (`bfd` / `profile` / `peer`); starts zebra + bfdd


GobgpPeer = FrrPeer  # the same description drives both daemons; GoBGP ignores zebra/extra_*


@dataclass(frozen=True)
class Session:
    state: str                     # lower-case RFC 4271 state: idle, connect, active, opensent, openconfirm, established
    hold_time: int | None          # negotiated, seconds
    keepalive: int | None
    uptime: float | None           # seconds since Established
    received: int
    accepted: int
    peer_asn: int | None = None
    raw: dict = field(default_factory=dict, repr=False, compare=False)


@dataclass(frozen=True)
class Route:
    prefix: str
    next_hop: str
    as_path: tuple[int, ...]
    origin: str                    # "igp" / "egp" / "incomplete"
    med: int | None
    local_pref: int | None
    communities: tuple[str, ...]
    large_communities: tuple[str, ...]
    stale: bool = False
    next_hops: tuple[str, ...] = ()
    source: str = ""               # the neighbor it came from ("" = originated locally)


def _norm_state(s: str) -> str:
    return s.lower().replace("_", "").replace(" ", "")


# ---------------------------------------------------------------------------------------------
# FRR
# ---------------------------------------------------------------------------------------------

class FrrDaemon:
    def __init__(self, host: Host, peer: FrrPeer):
        self.host, self.peer = host, peer
        self.dir = host.workdir / f"frr-{peer.asn}"
        self.dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.dir, 0o777)  # zebra drops to user frr and must create its vty socket here
        self.bgpd: subprocess.Popen | None = None
        self.zebra: subprocess.Popen | None = None
        self.bfdd: subprocess.Popen | None = None

    def __repr__(self) -> str:
        return f"FrrDaemon({self.host.name}, AS{self.peer.asn})"

    @property
    def pid(self) -> int | None:
        return self.bgpd.pid if self.bgpd else None

    def config_text(self) -> str:
        p = self.peer
        lines = ["frr defaults traditional", f"hostname {self.host.name}", "log stdout informational", "!"]
        for i, a in enumerate(p.announce):
            lines += [f"route-map ANNOUNCE-{i} permit 10"]
            if a.communities:
                lines.append(" set community " + " ".join(a.communities))
            if a.large_communities:
                lines.append(" set large-community " + " ".join(a.large_communities))
            if a.med is not None:
                lines.append(f" set metric {a.med}")
            if a.local_pref is not None:
                lines.append(f" set local-preference {a.local_pref}")
            lines.append("!")
        lines += [f"router bgp {p.asn}", f" bgp router-id {p.router_id}", " no bgp ebgp-requires-policy",
                  " no bgp default ipv4-unicast", " no bgp network import-check",
                  " bgp log-neighbor-changes"]
        if p.graceful_restart:
            lines += [" bgp graceful-restart", " bgp graceful-restart preserve-fw-state"]
        for n in p.neighbors:
            a = n.address
            lines.append(f" neighbor {a}{' interface' if n.interface else ''} remote-as {n.remote_asn}")
            if n.password:
                lines.append(f" neighbor {a} password {n.password}")
            if n.ebgp_multihop:
                lines.append(f" neighbor {a} ebgp-multihop {n.ebgp_multihop}")
            if n.passive:
                lines.append(f" neighbor {a} passive")
            if n.hold_time is not None:
                ka = n.keepalive if n.keepalive is not None else n.hold_time // 3
                lines.append(f" neighbor {a} timers {ka} {n.hold_time}")
            lines.append(f" neighbor {a} timers connect {n.connect_retry}")
            if n.port:
                lines.append(f" neighbor {a} port {n.port}")
            if n.update_source:
                lines.append(f" neighbor {a} update-source {n.update_source}")
            if n.extended_nexthop:
                lines.append(f" neighbor {a} capability extended-nexthop")
            if n.graceful_restart:
                lines.append(f" neighbor {a} graceful-restart")
            if n.bfd is not None:
                lines.append(f" neighbor {a} bfd" + (f" profile {n.bfd}" if n.bfd else ""))
        if p.extra_config:
            lines += [" " + l.strip() for l in p.extra_config.strip().splitlines()]
        for afi in ("ipv4", "ipv6"):
            members = [n for n in p.neighbors if afi in n.families]
            anns = [(i, a) for i, a in enumerate(p.announce)
                    if ipaddress.ip_network(a.prefix).version == (4 if afi == "ipv4" else 6)]
            if not members and not anns:
                continue
            lines.append(f" address-family {afi} unicast")
            for i, a in anns:
                lines.append(f"  network {a.prefix} route-map ANNOUNCE-{i}")
            for n in members:
                lines.append(f"  neighbor {n.address} activate")
                if n.rr_client:
                    lines.append(f"  neighbor {n.address} route-reflector-client")
                if n.soft_reconfiguration:
                    lines.append(f"  neighbor {n.address} soft-reconfiguration inbound")
            lines.append(" exit-address-family")
        lines.append("!")
        if p.extra_global_config:
            lines += [p.extra_global_config.strip(), "!"]
        return "\n".join(lines) + "\n"

    def start(self) -> None:
        conf = self.dir / "bgpd.conf"
        conf.write_text(self.config_text())
        zsock = self.dir / "zserv.api"
        # A restart in the same host reuses this directory: stale sockets would make us think
        # the new daemons answer before they do (and bgpd could dial a dead zebra).
        for stale in ("bgpd.vty", "zebra.vty", "zserv.api", "bfdd.vty", "bfdd.sock"):
            (self.dir / stale).unlink(missing_ok=True)
        if self.peer.zebra or self.peer.bfdd_config is not None:   # bgpd reaches bfdd through zebra
            zconf = self.dir / "zebra.conf"
            zconf.write_text(f"hostname {self.host.name}\n")
            self.zebra = self.host.spawn(
                ["/usr/lib/frr/zebra", "-f", str(zconf), "-i", str(self.dir / "zebra.pid"),
                 "--vty_socket", str(self.dir), "-z", str(zsock), "-u", "frr", "-g", "frr", "-P", "0"],
                log_path=self.dir / "zebra.log")
            wait_until(lambda: zsock.exists(), timeout=10, what=f"zebra socket in {self.host.name}")
        if self.peer.bfdd_config is not None:
            bconf = self.dir / "bfdd.conf"
            bconf.write_text(f"hostname {self.host.name}\n{self.peer.bfdd_config}\n")
            self.bfdd = self.host.spawn(
                ["/usr/lib/frr/bfdd", "-f", str(bconf), "-i", str(self.dir / "bfdd.pid"), "--vty_socket",
                 str(self.dir), "-z", str(zsock), "--bfdctl", str(self.dir / "bfdd.sock"),
                 "-u", "frr", "-g", "frr", "-P", "0"], log_path=self.dir / "bfdd.log")
            wait_until(lambda: (self.dir / "bfdd.vty").exists() or self.bfdd.poll() is not None,
                       timeout=10, what=f"bfdd vty in {self.host.name}")
            if self.bfdd.poll() is not None:
                raise LabError(f"bfdd exited in {self.host.name}: "
                               f"{(self.dir / 'bfdd.log').read_text(errors='replace')[-2000:]}")
        argv = ["/usr/lib/frr/bgpd", "-f", str(conf), "-i", str(self.dir / "bgpd.pid"),
                "--vty_socket", str(self.dir), "-S", "-P", "0", "-p", str(self.peer.listen_port)]
        argv += ["-z", str(zsock)] if self.zebra is not None else ["-Z"]
        self.bgpd = self.host.spawn(argv, log_path=self.dir / "bgpd.log")
        try:
            wait_until(lambda: (self.dir / "bgpd.vty").exists() or self.bgpd.poll() is not None,
                       timeout=10, what=f"bgpd vty in {self.host.name}")
        except TimeoutError:
            pass
        if self.bgpd.poll() is not None:
            raise LabError(f"bgpd exited in {self.host.name}: {self.log()[-2000:]}")

    def log(self) -> str:
        return (self.dir / "bgpd.log").read_text(errors="replace")

    def stop(self) -> None:
        for proc in (self.bgpd, self.bfdd, self.zebra):
            if proc is not None:
                _stop_pid(proc)

    def vtysh(self, *commands: str) -> str:
        argv = ["vtysh", "--vty_socket", str(self.dir)]
        for c in commands:
            argv += ["-c", c]
        return self.host.run(*argv)

    def _json(self, command: str):
        out = self.vtysh(command)
        return json.loads(out) if out.strip() else {}

    def sessions(self) -> dict[str, Session]:
        data = self._json("show bgp neighbors json")
        result = {}
        for addr, n in data.items():
            if not isinstance(n, dict) or "bgpState" not in n:
                continue
            received = accepted = 0
            for af in n.get("addressFamilyInfo", {}).values():
                accepted += int(af.get("acceptedPrefixCounter", 0))
                received += int(af.get("receivedPrefixCounter", af.get("acceptedPrefixCounter", 0)))
            est = n["bgpState"] == "Established"
            hold = n.get("bgpTimerHoldTimeMsecs")
            ka = n.get("bgpTimerKeepAliveIntervalMsecs")
            result[addr] = Session(
                state=_norm_state(n["bgpState"]),
                hold_time=hold // 1000 if est and hold is not None else None,
                keepalive=ka // 1000 if est and ka is not None else None,
                uptime=n.get("bgpTimerUpMsec", 0) / 1000 if est else None,
                received=received, accepted=accepted, peer_asn=n.get("remoteAs"), raw=n)
        return result

    def routes(self, afi: str = "ipv4") -> list[Route]:
        data = self._json(f"show bgp {afi} unicast json detail")
        routes = []
        for prefix, paths in data.get("routes", {}).items():
            for path in paths if isinstance(paths, list) else paths.get("paths", []):
                if "nexthops" not in path or not path.get("valid", True):
                    continue  # FRR's first element per prefix is a header, not a path
                nhs = tuple(nh.get("ip", "") for nh in path.get("nexthops", []))
                seg = path.get("aspath", {})
                as_str = seg.get("string", "") if isinstance(seg, dict) else str(seg)
                as_path = tuple(int(x) for x in as_str.replace("{", " ").replace("}", " ").split()
                                if x.isdigit())
                comms = path.get("community", {}).get("string", "")
                large = path.get("largeCommunity", {}).get("string", "")
                routes.append(Route(
                    prefix=prefix, next_hop=nhs[0] if nhs else "", next_hops=nhs,
                    as_path=as_path, origin=path.get("origin", "").lower(),
                    med=path.get("metric") if "metric" in path else path.get("med"),
                    local_pref=path.get("locPrf", path.get("localpref")),
                    communities=tuple(comms.split()) if comms else (),
                    large_communities=tuple(large.split()) if large else (),
                    stale=bool(path.get("stale", False)),
                    source="" if path.get("local") else path.get("peer", {}).get("peerId", "")))
        return routes


# ---------------------------------------------------------------------------------------------
# GoBGP
# ---------------------------------------------------------------------------------------------

_GOBGP_STATES = {0: "unknown", 1: "idle", 2: "connect", 3: "active", 4: "opensent",
                 5: "openconfirm", 6: "established"}
_ORIGINS = {0: "igp", 1: "egp", 2: "incomplete"}


def _toml_str(s: str) -> str:
    return json.dumps(s)


class GobgpDaemon:
    API_PORT = 50051  # inside the host's own namespace, so every host can use the default

    def __init__(self, host: Host, peer: FrrPeer):
        self.host, self.peer = host, peer
        self.dir = host.workdir / f"gobgp-{peer.asn}"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.proc: subprocess.Popen | None = None

    def __repr__(self) -> str:
        return f"GobgpDaemon({self.host.name}, AS{self.peer.asn})"

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def config_text(self) -> str:
        p = self.peer
        out = ["[global.config]", f"  as = {p.asn}", f"  router-id = {_toml_str(p.router_id)}",
               f"  port = {p.listen_port if p.listen_port else -1}", ""]
        if p.graceful_restart:
            out += ["[global.graceful-restart.config]", "  enabled = true", ""]
        for n in p.neighbors:
            out += ["[[neighbors]]", "  [neighbors.config]",
                    f"    neighbor-address = {_toml_str(n.address)}", f"    peer-as = {n.remote_asn}"]
            if n.password:
                out.append(f"    auth-password = {_toml_str(n.password)}")
            out += ["  [neighbors.transport.config]", f"    passive-mode = {str(n.passive).lower()}"]
            if n.port:
                out.append(f"    remote-port = {n.port}")
            if n.update_source:
                out.append(f"    local-address = {_toml_str(n.update_source)}")
            out += ["  [neighbors.timers.config]", f"    connect-retry = {max(n.connect_retry, 1)}"]
            if n.hold_time is not None:
                ka = n.keepalive if n.keepalive is not None else n.hold_time // 3
                out += [f"    hold-time = {n.hold_time}", f"    keepalive-interval = {ka}"]
            if n.ebgp_multihop:
                out += ["  [neighbors.ebgp-multihop.config]", "    enabled = true",
                        f"    multihop-ttl = {n.ebgp_multihop}"]
            if n.rr_client:
                out += ["  [neighbors.route-reflector.config]", "    route-reflector-client = true",
                        f"    route-reflector-cluster-id = {_toml_str(p.router_id)}"]
            if n.graceful_restart or p.graceful_restart:
                out += ["  [neighbors.graceful-restart.config]", "    enabled = true"]
            for fam in n.families:
                out += ["  [[neighbors.afi-safis]]", "    [neighbors.afi-safis.config]",
                        f"      afi-safi-name = \"{fam}-unicast\""]
                if n.graceful_restart or p.graceful_restart:
                    out += ["    [neighbors.afi-safis.mp-graceful-restart.config]", "      enabled = true"]
            out.append("")
        return "\n".join(out) + "\n"

    def start(self) -> None:
        conf = self.dir / "gobgpd.toml"
        conf.write_text(self.config_text())
        self.proc = self.host.spawn(
            ["gobgpd", "-f", str(conf), "-p", "--api-hosts", f"127.0.0.1:{self.API_PORT}",
             "--pprof-disable"], log_path=self.dir / "gobgpd.log")
        wait_until(lambda: self.proc.poll() is not None or self._cli_ok(), timeout=15,
                   what=f"gobgpd API in {self.host.name}")
        if self.proc.poll() is not None:
            raise LabError(f"gobgpd exited in {self.host.name}: {self.log()[-2000:]}")
        for a in self.peer.announce:
            self.announce(a)

    def _cli_ok(self) -> bool:
        try:
            self.gobgp("global")
            return True
        except LabError:
            return False

    def log(self) -> str:
        return (self.dir / "gobgpd.log").read_text(errors="replace")

    def stop(self) -> None:
        if self.proc is not None:
            _stop_pid(self.proc)

    def gobgp(self, *args: str) -> str:
        return self.host.run("gobgp", "-p", str(self.API_PORT), *args)

    def announce(self, a: Announce) -> None:
        v6 = ipaddress.ip_network(a.prefix).version == 6
        argv = ["global", "rib", "add", "-a", "ipv6" if v6 else "ipv4", a.prefix]
        if a.communities:
            argv += ["community", ",".join(a.communities)]
        if a.large_communities:
            argv += ["large-community", ",".join(a.large_communities)]
        if a.med is not None:
            argv += ["med", str(a.med)]
        if a.local_pref is not None:
            argv += ["local-pref", str(a.local_pref)]
        self.gobgp(*argv)

    def withdraw(self, prefix: str) -> None:
        v6 = ipaddress.ip_network(prefix).version == 6
        self.gobgp("global", "rib", "del", "-a", "ipv6" if v6 else "ipv4", prefix)

    def sessions(self) -> dict[str, Session]:
        result = {}
        for summary in json.loads(self.gobgp("-j", "neighbor") or "[]"):
            # Per-family counters are only in the per-neighbor view.
            n = json.loads(self.gobgp("-j", "neighbor", summary["conf"]["neighbor_address"]))
            st = n.get("state", {})
            timers = n.get("timers", {}).get("state", {})
            state = st.get("session_state", 0)
            state = _GOBGP_STATES.get(state, str(state)) if isinstance(state, int) else _norm_state(state)
            est = state == "established"
            received = accepted = 0
            for af in n.get("afi_safis", []):
                s = af.get("state", {})
                received += int(s.get("received", 0))
                accepted += int(s.get("accepted", 0))
            uptime = None
            if est and timers.get("uptime"):
                up = timers["uptime"]
                uptime = time.time() - (up.get("seconds", 0) if isinstance(up, dict) else up)
            result[n["conf"]["neighbor_address"]] = Session(
                state=state,
                # GoBGP's JSON omits zero values: an absent negotiated hold time is 0.
                hold_time=timers.get("negotiated_hold_time", 0) if est else None,
                keepalive=timers.get("keepalive_interval", 0) if est else None,
                uptime=uptime, received=received, accepted=accepted,
                peer_asn=n.get("conf", {}).get("peer_asn"), raw=n)
        return result

    def routes(self, afi: str = "ipv4") -> list[Route]:
        data = json.loads(self.gobgp("-j", "global", "rib", "-a", afi) or "{}")
        routes = []
        for prefix, paths in data.items():
            for path in paths:
                routes.append(_gobgp_route(prefix, path))
        return routes


def _gobgp_route(prefix: str, path: dict) -> Route:
    origin, as_path, nh, med, lp = "igp", (), "", None, None
    comms: tuple[str, ...] = ()
    large: tuple[str, ...] = ()
    for attr in path.get("attrs", []):
        t = attr.get("type")
        if t == 1:
            origin = _ORIGINS.get(attr.get("value"), str(attr.get("value")))
        elif t == 2:
            as_path = tuple(a for seg in attr.get("as_paths") or [] for a in seg.get("asns", []))
        elif t == 3:
            nh = attr.get("nexthop", "")
        elif t == 4:
            med = attr.get("metric")
        elif t == 5:
            lp = attr.get("value")
        elif t == 8:
            comms = tuple(_community_str(c) for c in attr.get("communities", []))
        elif t == 14:
            nh = attr.get("nexthop", nh)
        elif t == 32:
            large = tuple(f"{v['ASN']}:{v['LocalData1']}:{v['LocalData2']}" for v in attr.get("value", []))
    return Route(prefix=prefix, next_hop=nh, next_hops=(nh,), as_path=as_path, origin=origin, med=med,
                 local_pref=lp, communities=comms, large_communities=large,
                 stale=bool(path.get("stale", False)), source=path.get("neighbor-ip", ""))


# How FRR prints well-known communities (the lab compares routes of FRR, GoBGP and BIRD in
# FRR's words; vipd's own names are agent/bgp/communities.py, GoBGP's)
_WELL_KNOWN = {0xFFFFFF01: "no-export", 0xFFFFFF02: "no-advertise", 0xFFFFFF03: "local-AS",
               0xFFFF0000: "graceful-shutdown", 0xFFFFFF04: "no-peer", 0xFFFF029A: "blackhole"}


def _community_str(value: int) -> str:
    return _WELL_KNOWN.get(value, f"{value >> 16}:{value & 0xFFFF}")
