"""The namespace lab: hosts are network namespaces, joined by veth links and bridged segments.

A lab is a context manager with guaranteed teardown (test failure, exception, Ctrl-C,
SIGTERM): every process it started is stopped by PID, then every namespace it created is
deleted (which deletes the links inside). Nothing is created in the root namespace: veth
pairs are created directly inside the host namespaces. Namespace names carry a prefix unique
to the lab (pid + counter), so concurrent runs never collide.

Manual::

    from agent.lab import Lab, wait_until
    from agent.lab.peers import FrrPeer, GobgpPeer, Neighbor, Announce

    with Lab("bgp") as lab:
        a = lab.host("a", forwarding=True)      # a.ns is the namespace name
        b = lab.host("b")
        lab.link(a, b, ["10.0.0.1/24", "fd00::1/64"], ["10.0.0.2/24", "fd00::2/64"])
        # interfaces: "eth-b" in a, "eth-a" in b (a_if= / b_if= override); returns the names
        lab.segment("lan", [(a, ["10.1.0.1/24"]), (b, ["10.1.0.2/24"])])
        # an L2 segment: a bridge inside its own namespace "lan", one veth per member
        a.route("10.9.0.0/24", via="10.0.0.2")
        a.run("ip", "-j", "route")              # stdout; raises LabError on failure
        p = a.spawn(["sleep", "100"])           # Popen in the namespace; stopped by PID at teardown
        v = a.spawn(["vipd", ...], share_mounts=True)  # sees the host's bpffs (pinned maps)
        frr = lab.frr(a, FrrPeer(asn=65001, router_id="1.1.1.1", neighbors=[...]))
        go = lab.gobgp(b, GobgpPeer(asn=65002, router_id="2.2.2.2", neighbors=[...]))
        wait_until(lambda: frr.sessions()["10.0.0.2"].state == "established", what="session")

Declarative form: ``Lab("x").build(Topology(...))`` (see :class:`Topology`).
"""

from __future__ import annotations

import atexit
import itertools
import os
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence

__all__ = ["Lab", "Host", "LabError", "Topology", "HostSpec", "LinkSpec", "SegmentSpec", "wait_until"]

_counter = itertools.count()
_live_labs: list["Lab"] = []


class LabError(RuntimeError):
    """A lab command failed; the message has the command and its stderr."""


def _run(argv: Sequence[str], *, check: bool = True, input: str | None = None, timeout: float = 30) -> str:
    proc = subprocess.run(list(argv), capture_output=True, text=True, input=input, timeout=timeout)
    if check and proc.returncode != 0:
        raise LabError(f"command failed ({proc.returncode}): {' '.join(argv)}\n{proc.stderr.strip()}")
    return proc.stdout


def wait_until(predicate: Callable[[], object], *, timeout: float = 30.0, interval: float = 0.2,
               what: str = "condition"):
    """Poll ``predicate`` until it returns a truthy value (returned); TimeoutError names ``what``.

    Exceptions from the predicate count as "not yet" (a daemon may not answer while it starts);
    the last one is chained to the TimeoutError.
    """
    deadline = time.monotonic() + timeout
    last_exc: BaseException | None = None
    while True:
        try:
            value = predicate()
            if value:
                return value
            last_exc = None
        except Exception as exc:  # noqa: BLE001 - see docstring
            last_exc = exc
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}") from last_exc
        time.sleep(interval)


@dataclass
class HostSpec:
    name: str
    forwarding: bool = False
    sysctls: dict[str, str] = field(default_factory=dict)


@dataclass
class LinkSpec:
    a: str
    b: str
    a_addrs: Sequence[str] = ()
    b_addrs: Sequence[str] = ()
    a_if: str | None = None
    b_if: str | None = None


@dataclass
class SegmentSpec:
    name: str
    members: Sequence[tuple[str, Sequence[str]]]  # (host name, addresses)


@dataclass
class Topology:
    hosts: Sequence[HostSpec]
    links: Sequence[LinkSpec] = ()
    segments: Sequence[SegmentSpec] = ()
    routes: dict[str, Sequence[tuple[str, str]]] = field(default_factory=dict)  # host -> (prefix, via)


class Host:
    """One network namespace of a lab."""

    def __init__(self, lab: "Lab", name: str, ns: str):
        self.lab, self.name, self.ns = lab, name, ns
        self.workdir = lab.workdir / name
        self.workdir.mkdir(parents=True, exist_ok=True)

    def __repr__(self) -> str:
        return f"Host({self.name!r}, ns={self.ns!r})"

    def exec_argv(self, argv: Sequence[str], *, share_mounts: bool = False) -> list[str]:
        """argv that runs inside this namespace.

        ``ip netns exec`` gives the process a private mount namespace with /sys remounted for
        the network namespace, which hides the host's bpffs. ``share_mounts=True`` enters only
        the network namespace (as a systemd service on a node would run), so pinned BPF maps
        in /sys/fs/bpf are shared with the test and with the agent's next incarnation.
        """
        if share_mounts:
            return ["nsenter", f"--net=/var/run/netns/{self.ns}", "--", *argv]
        return ["ip", "netns", "exec", self.ns, *argv]

    def run(self, *argv: str, check: bool = True, input: str | None = None, timeout: float = 30) -> str:
        return _run(self.exec_argv(argv), check=check, input=input, timeout=timeout)

    def sysctl(self, key: str, value: str | int) -> None:
        self.run("sysctl", "-qw", f"{key}={value}")

    def add_address(self, ifname: str, addr: str) -> None:
        # nodad: tests must not wait ~2 s for IPv6 duplicate address detection.
        extra = ["nodad"] if ":" in addr else []
        self.run("ip", "addr", "add", addr, "dev", ifname, *extra)

    def route(self, prefix: str, *, via: str | None = None, dev: str | None = None) -> None:
        argv = ["ip", "-6" if ":" in prefix else "-4", "route", "replace", prefix]
        if via:
            argv += ["via", via]
        if dev:
            argv += ["dev", dev]
        self.run(*argv)

    def spawn(self, argv: Sequence[str], *, env: dict[str, str] | None = None,
              log_path: str | Path | None = None, cwd: str | Path | None = None,
              share_mounts: bool = False) -> subprocess.Popen:
        """Start a process inside this namespace; the lab stops it by PID at teardown.
        ``share_mounts``: see :meth:`exec_argv` (needed for processes that pin BPF maps)."""
        log_path = Path(log_path) if log_path else self.workdir / f"{Path(argv[0]).name}-{next(_counter)}.log"
        out = open(log_path, "ab")
        full_env = {**os.environ, **(env or {})}
        # setns via `ip netns exec` then exec: the PID we get is the daemon's own PID.
        proc = subprocess.Popen(self.exec_argv(argv, share_mounts=share_mounts), stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, env=full_env, cwd=cwd,
                                start_new_session=True)
        out.close()
        proc.log_path = log_path  # type: ignore[attr-defined]
        self.lab._procs.append(proc)
        return proc

    def pids(self) -> list[int]:
        """PIDs of all processes whose network namespace is this host's."""
        return [int(p) for p in _run(["ip", "netns", "pids", self.ns], check=False).split()]


class Lab:
    """A set of namespaces and processes with guaranteed teardown. See the module docstring."""

    def __init__(self, name: str = "lab", *, keep_workdir: bool = False):
        self.prefix = f"v{name[:6]}{os.getpid() % 100000}x{next(_counter)}-"
        self.workdir = Path(tempfile.mkdtemp(prefix=f"vipd-lab-{name}-"))
        os.chmod(self.workdir, 0o755)  # zebra drops to user frr and must reach its files here
        self.keep_workdir = keep_workdir
        self.hosts: dict[str, Host] = {}
        self._procs: list[subprocess.Popen] = []
        self._daemons: list = []
        self._closed = False
        self._prev_sigterm = None

    # -- lifecycle ---------------------------------------------------------------------------
    def __enter__(self) -> "Lab":
        _live_labs.append(self)
        if _live_labs and len(_live_labs) == 1:
            atexit.register(_teardown_all)
        try:
            # SIGTERM (CI timeout, kill) must tear down like Ctrl-C does.
            self._prev_sigterm = signal.signal(signal.SIGTERM, _sigterm_to_keyboardinterrupt)
        except ValueError:  # not the main thread
            self._prev_sigterm = None
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        errors: list[str] = []
        for daemon in reversed(self._daemons):
            try:
                daemon.stop()
            except Exception as exc:  # noqa: BLE001 - keep tearing down
                errors.append(f"{daemon!r}: {exc}")
        for proc in reversed(self._procs):
            _stop_pid(proc)
        for host in self.hosts.values():
            # Anything still in the namespace was started by this lab's tests: stop it by PID.
            for pid in host.pids():
                _kill_pid(pid)
        for host in self.hosts.values():
            _run(["ip", "netns", "del", host.ns], check=False)
        if self in _live_labs:
            _live_labs.remove(self)
        if self._prev_sigterm is not None:
            try:
                signal.signal(signal.SIGTERM, self._prev_sigterm)
            except ValueError:
                pass
        if not self.keep_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)
        if errors:
            raise LabError("teardown problems: " + "; ".join(errors))

    # -- building ----------------------------------------------------------------------------
    def host(self, name: str, *, forwarding: bool = False, sysctls: dict[str, str] | None = None) -> Host:
        if name in self.hosts:
            raise LabError(f"host {name!r} already exists")
        ns = self.prefix + name
        if len(ns) > 60:
            raise LabError(f"namespace name too long: {ns}")
        _run(["ip", "netns", "add", ns])
        host = Host(self, name, ns)
        self.hosts[name] = host
        host.run("ip", "link", "set", "lo", "up")
        settings = {
            "net.ipv6.conf.all.accept_dad": "0",
            "net.ipv6.conf.default.accept_dad": "0",
            "net.ipv4.conf.all.rp_filter": "0",
            "net.ipv4.conf.default.rp_filter": "0",
        }
        if forwarding:
            settings |= {"net.ipv4.ip_forward": "1", "net.ipv6.conf.all.forwarding": "1"}
        settings |= sysctls or {}
        for key, value in settings.items():
            host.sysctl(key, value)
        return host

    def link(self, a: Host, b: Host, a_addrs: Iterable[str] = (), b_addrs: Iterable[str] = (), *,
             a_if: str | None = None, b_if: str | None = None, mtu: int | None = None) -> tuple[str, str]:
        """A veth pair between two hosts, created inside ``a`` with its peer moved into ``b``."""
        a_if = a_if or f"eth-{b.name}"[:15]
        b_if = b_if or f"eth-{a.name}"[:15]
        a.run("ip", "link", "add", a_if, "type", "veth", "peer", "name", b_if, "netns", b.ns)
        for host, ifname, addrs in ((a, a_if, a_addrs), (b, b_if, b_addrs)):
            if mtu:
                host.run("ip", "link", "set", ifname, "mtu", str(mtu))
            for addr in addrs:
                host.add_address(ifname, addr)
            host.run("ip", "link", "set", ifname, "up")
        return a_if, b_if

    def segment(self, name: str, members: Sequence[tuple[Host, Sequence[str]]]) -> Host:
        """An L2 segment: a bridge ``br0`` inside its own namespace, one veth per member host."""
        switch = self.host(name)
        switch.run("ip", "link", "add", "br0", "type", "bridge")
        switch.run("ip", "link", "set", "br0", "up")
        for host, addrs in members:
            port, _ = self.link(switch, host, (), addrs, a_if=f"p-{host.name}"[:15], b_if=f"eth-{name}"[:15])
            switch.run("ip", "link", "set", port, "master", "br0")
        return switch

    def build(self, topology: Topology) -> "Lab":
        for spec in topology.hosts:
            self.host(spec.name, forwarding=spec.forwarding, sysctls=spec.sysctls)
        for l in topology.links:
            self.link(self.hosts[l.a], self.hosts[l.b], l.a_addrs, l.b_addrs, a_if=l.a_if, b_if=l.b_if)
        for s in topology.segments:
            self.segment(s.name, [(self.hosts[h], addrs) for h, addrs in s.members])
        for hname, routes in topology.routes.items():
            for prefix, via in routes:
                self.hosts[hname].route(prefix, via=via)
        return self

    # -- daemons -----------------------------------------------------------------------------
    def frr(self, host: Host, peer) -> "FrrDaemon":
        from .peers import FrrDaemon
        daemon = FrrDaemon(host, peer)
        self._daemons.append(daemon)
        daemon.start()
        return daemon

    def gobgp(self, host: Host, peer) -> "GobgpDaemon":
        from .peers import GobgpDaemon
        daemon = GobgpDaemon(host, peer)
        self._daemons.append(daemon)
        daemon.start()
        return daemon

    def namespaces(self) -> list[str]:
        return [h.ns for h in self.hosts.values()]


def _stop_pid(proc: subprocess.Popen, timeout: float = 3.0) -> None:
    if proc.poll() is not None:
        return
    try:
        proc.terminate()
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=timeout)
    except ProcessLookupError:
        pass


def _kill_pid(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        return
    for _ in range(50):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        try:
            os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            pass
        time.sleep(0.02)


def _sigterm_to_keyboardinterrupt(signum, frame):
    raise KeyboardInterrupt("SIGTERM")


def _teardown_all() -> None:
    for lab in list(_live_labs):
        try:
            lab.close()
        except Exception:  # noqa: BLE001 - best effort at interpreter exit
            pass
