"""New TCP connections per second through a Service VIP: vipd's XDP datapath vs kube-proxy iptables.

Run as root:  .venv/bin/python benchmarks/datapath_conn.py [--services 1,1000,10000] [--seconds 3]

Topology (namespaces created and removed by agent.lab; no traffic leaves them), one
independent chain per setup::

    client 10.111.0.2 ── lb 10.111.0.1 | 10.111.1.1 ── srv 10.111.1.2, backends 10.111.1.10-19:8080

* ``client`` runs a closed-loop generator (C, epoll, 64 connections in flight): connect,
  wait for the handshake, reset (SO_LINGER 0, so no TIME_WAIT), reconnect.
* ``srv`` runs an accept-and-close server on :8080 for all ten backend addresses.
* ``lb`` is the node under test, with N services of 10 backends each; the measured service
  (10.96.0.10:80) is the *last* one, the worst case for a linear rule chain:
    - **direct**: no load balancer, the client connects to a backend address (routing only);
    - **iptables**: kube-proxy's iptables-mode rules (KUBE-SERVICES -> KUBE-SVC-* with one
      ``statistic --mode random`` rule per endpoint -> KUBE-SEP-* DNAT, KUBE-MARK-MASQ +
      KUBE-POSTROUTING masquerade for clients outside the cluster), loaded with iptables-restore;
    - **vipd**: the XDP datapath on lb's two interfaces (plus tc on srv for DSR), in SNAT
      mode (the same client-visible behaviour as the masquerading iptables rules: replies
      return through lb) and in DSR mode (replies skip lb's load balancer), Maglev M=16381
      for the measured service and M=251 for the others (the table size does not change the
      per-packet cost, only memory: 10,000 x 16381 slots would not fit the slot budget).
All chains are built and programmed first, then measured in turns (``--reps`` rounds of
``--seconds`` each), so the noise of a shared machine falls on every setup alike; each cell
is the median over the rounds. The last column is the cost of a connection relative to
"direct" (us per connection above the routing-only baseline).
"""

from __future__ import annotations

import argparse
import hashlib
import base64
import ipaddress
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from agent.lab import Lab, wait_until  # noqa: E402

VIP, VIP_PORT, BACKEND_PORT = "10.96.0.10", 80, 8080
BACKENDS = [f"10.111.1.{10 + i}" for i in range(10)]
CLUSTER_CIDR = "10.244.0.0/16"

CONNBENCH_C = r"""
/* Closed-loop TCP connection generator / accept-and-close server (see datapath_conn.py). */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

static double now(void) { struct timespec t; clock_gettime(CLOCK_MONOTONIC, &t); return t.tv_sec + t.tv_nsec / 1e9; }

static int open_one(int ep, struct sockaddr_in *dst) {
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);
    if (fd < 0) return -1;
    struct linger l = {1, 0};   /* close() sends RST: no TIME_WAIT, ports reusable at once */
    setsockopt(fd, SOL_SOCKET, SO_LINGER, &l, sizeof l);
    if (connect(fd, (struct sockaddr *)dst, sizeof *dst) < 0 && errno != EINPROGRESS) { close(fd); return -1; }
    struct epoll_event ev = {.events = EPOLLOUT, .data.fd = fd};
    epoll_ctl(ep, EPOLL_CTL_ADD, fd, &ev);
    return fd;
}

static int client(const char *ip, int port, double secs, int conc) {
    struct sockaddr_in dst = {.sin_family = AF_INET, .sin_port = htons(port)};
    inet_pton(AF_INET, ip, &dst.sin_addr);
    int ep = epoll_create1(0);
    long ok = 0, fail = 0;
    for (int i = 0; i < conc; i++) if (open_one(ep, &dst) < 0) fail++;
    double t0 = now(), end = t0 + secs;
    struct epoll_event evs[256];
    while (now() < end) {
        int n = epoll_wait(ep, evs, 256, 100);
        for (int i = 0; i < n; i++) {
            int fd = evs[i].data.fd, err = 0; socklen_t len = sizeof err;
            getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &len);
            if (err == 0 && !(evs[i].events & (EPOLLERR | EPOLLHUP))) ok++; else fail++;
            close(fd);
            if (open_one(ep, &dst) < 0) fail++;
        }
    }
    printf("%ld %ld %.6f\n", ok, fail, now() - t0);
    return 0;
}

static int server(int port) {
    int s = socket(AF_INET, SOCK_STREAM, 0), one = 1;
    setsockopt(s, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(port)};
    if (bind(s, (struct sockaddr *)&a, sizeof a) < 0 || listen(s, 65535) < 0) { perror("listen"); return 1; }
    for (;;) { int c = accept(s, NULL, NULL); if (c >= 0) close(c); }
}

int main(int argc, char **argv) {
    if (argc == 6 && !strcmp(argv[1], "client")) return client(argv[2], atoi(argv[3]), atof(argv[4]), atoi(argv[5]));
    if (argc == 3 && !strcmp(argv[1], "server")) return server(atoi(argv[2]));
    fprintf(stderr, "usage: connbench client IP PORT SECONDS CONCURRENCY | server PORT\n");
    return 2;
}
"""


XDP_PASS_LOADER = """
import sys
sys.path.append("/usr/lib/python3/dist-packages")
from bcc import BPF
b = BPF(text="int xdp_pass(struct xdp_md *ctx) { return XDP_PASS; }")
fn = b.load_func("xdp_pass", BPF.XDP)
for ifname in sys.argv[1:]:
    b.attach_xdp(ifname, fn, 0)
"""


def build_connbench(workdir: Path) -> Path:
    if shutil.which("gcc") is None:
        raise SystemExit("gcc is needed to build the connection generator")
    src, exe = workdir / "connbench.c", workdir / "connbench"
    src.write_text(CONNBENCH_C)
    subprocess.run(["gcc", "-O2", "-o", str(exe), str(src)], check=True)
    return exe


# -- topology ------------------------------------------------------------------------------------

class Chain:
    """One independent client -> lb -> srv path (three namespaces) for one datapath setup.

    Every setup gets its own chain so all of them exist at once and are measured in turns
    (round robin), which spreads the noise of a shared machine over all of them alike.
    """

    def __init__(self, lab: Lab, tag: str, connbench: Path):
        self.tag = tag
        self.client = lab.host(f"c-{tag}")
        self.lb = lab.host(f"lb-{tag}", forwarding=True)
        self.srv = lab.host(f"s-{tag}")
        client, lb, srv = self.client, self.lb, self.srv
        lab.link(client, lb, ["10.111.0.2/24"], ["10.111.0.1/24"], a_if="eth-lb", b_if="eth-client")
        lab.link(lb, srv, ["10.111.1.1/24"], ["10.111.1.2/24"], a_if="eth-srv", b_if="eth-lb")
        client.route("0.0.0.0/0", via="10.111.0.1")
        srv.route("0.0.0.0/0", via="10.111.1.1")
        for addr in BACKENDS:
            srv.add_address("eth-lb", f"{addr}/32")
        for host in (client, srv):
            host.sysctl("net.core.somaxconn", 65535)
            host.sysctl("net.ipv4.tcp_max_syn_backlog", 65535)
        client.sysctl("net.ipv4.ip_local_port_range", "1024 65535")
        # Lab-only needs of XDP on veth (see tests/e2e/datapath/dp_topology.py): the peers of
        # the interfaces lb's XDP transmits on run NAPI (an XDP_PASS program), senders compute
        # full checksums (no CHECKSUM_PARTIAL), lb's neighbours are resolved for bpf_fib_lookup.
        # Every chain gets the same treatment, whatever its datapath.
        client.run(sys.executable, "-c", XDP_PASS_LOADER, "eth-lb", timeout=60)
        srv.run(sys.executable, "-c", XDP_PASS_LOADER, "eth-lb", timeout=60)
        for host, ifnames in ((client, ["eth-lb"]), (lb, ["eth-client", "eth-srv"]), (srv, ["eth-lb"])):
            for ifname in ifnames:
                host.run("ethtool", "-K", ifname, "tx", "off")
        for neighbour in ["10.111.0.2", "10.111.1.2", *BACKENDS]:  # backends are on-link neighbours of lb
            lb.run("ping", "-c", "1", "-W", "1", neighbour)
        srv.spawn([str(connbench), "server", str(BACKEND_PORT)])
        wait_until(lambda: f":{BACKEND_PORT}" in srv.run("ss", "-ltn"), timeout=10, what="benchmark server")

    def run_once(self, connbench: Path, dst: str, port: int, seconds: float) -> tuple[float, int]:
        out = self.client.run(str(connbench), "client", dst, str(port), str(seconds), "64", timeout=seconds + 30)
        ok, fail, elapsed = out.split()
        return int(ok) / float(elapsed), int(fail)


# -- kube-proxy iptables mode -----------------------------------------------------------------------

def _chain(prefix: str, *parts: str) -> str:
    # kube-proxy names chains by a hash of the service/endpoint (KUBE-SVC-XXXXXXXXXXXXXXXX).
    digest = hashlib.sha256("/".join(parts).encode()).digest()
    return prefix + base64.b32encode(digest).decode()[:16]


def filler_vip(i: int) -> str:
    return str(ipaddress.ip_address("10.97.0.0") + i)


def kube_proxy_rules(n_services: int) -> str:
    """iptables-restore input for ``n_services`` services; the measured one last."""
    chains = [":KUBE-SERVICES - [0:0]", ":KUBE-POSTROUTING - [0:0]", ":KUBE-MARK-MASQ - [0:0]"]
    rules = [
        "-A PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES",
        "-A OUTPUT -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES",
        "-A POSTROUTING -m comment --comment \"kubernetes postrouting rules\" -j KUBE-POSTROUTING",
        "-A KUBE-MARK-MASQ -j MARK --set-xmark 0x4000/0x4000",
        "-A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN",
        "-A KUBE-POSTROUTING -j MARK --set-xmark 0x4000/0x0",
        "-A KUBE-POSTROUTING -m comment --comment \"kubernetes service traffic requiring SNAT\" "
        "-j MASQUERADE --random-fully",
    ]
    vips = [filler_vip(i) for i in range(n_services - 1)] + [VIP]
    for i, vip in enumerate(vips):
        name = f"default/svc-{i}:http"
        svc = _chain("KUBE-SVC-", name)
        chains.append(f":{svc} - [0:0]")
        rules.append(f"-A KUBE-SERVICES -d {vip}/32 -p tcp -m comment --comment \"{name} cluster IP\" "
                     f"-m tcp --dport {VIP_PORT} -j {svc}")
        rules.append(f"-A {svc} ! -s {CLUSTER_CIDR} -d {vip}/32 -p tcp -m comment --comment \"{name} cluster IP\" "
                     f"-m tcp --dport {VIP_PORT} -j KUBE-MARK-MASQ")
        n = len(BACKENDS)
        for j, backend in enumerate(BACKENDS):
            sep = _chain("KUBE-SEP-", name, backend)
            chains.append(f":{sep} - [0:0]")
            prob = "" if j == n - 1 else f" -m statistic --mode random --probability {1 / (n - j):.11f}"
            rules.append(f"-A {svc} -m comment --comment \"{name} -> {backend}:{BACKEND_PORT}\"{prob} -j {sep}")
            rules.append(f"-A {sep} -s {backend}/32 -m comment --comment \"{name}\" -j KUBE-MARK-MASQ")
            rules.append(f"-A {sep} -p tcp -m comment --comment \"{name}\" -m tcp "
                         f"-j DNAT --to-destination {backend}:{BACKEND_PORT}")
    return "\n".join(["*nat", *chains, *rules, "COMMIT", ""])


def load_iptables(lb, n_services: int, flavour: str) -> tuple[float, int]:
    text = kube_proxy_rules(n_services)
    t = time.monotonic()
    lb.run(f"iptables-{flavour}-restore", input=text, timeout=600)
    return time.monotonic() - t, text.count("\n-A ")


# -- vipd -----------------------------------------------------------------------------------------

class Vipd:
    """vipd's datapath: XDP on lb's two interfaces; for DSR also tc on srv (the backends' node)."""

    def __init__(self, lb, srv, mode: str, pin_root: str):
        from agent.datapath.api import Datapath
        from agent.datapath.model import Mode
        self.mode = Mode(mode)
        self.pin_root = pin_root
        self.dp = self.backend_dp = None
        self.count = 0
        try:
            self.dp = Datapath(instance="lb", pin_root=pin_root)
            self.dp.load()
            self.dp.set_node_addresses(v4="10.111.1.1")
            for ifname in ("eth-client", "eth-srv"):
                self.dp.attach_xdp(ifname, netns=lb.ns, mode="native")
            self.dp.attach_tc("eth-client", "egress", netns=lb.ns)
            if self.mode is Mode.DSR:
                self.backend_dp = Datapath(instance="srv", pin_root=pin_root)
                self.backend_dp.load()
                self.backend_dp.set_node_addresses(v4="10.111.1.2")
                self.backend_dp.attach_tc("eth-lb", "ingress", netns=srv.ns)
                self.backend_dp.attach_tc("eth-lb", "egress", netns=srv.ns)
        except BaseException:
            self.close()
            raise

    def services(self, n_services: int) -> float:
        from agent.datapath.model import Backend, Service, ServiceKey
        backends = tuple(Backend(b, BACKEND_PORT) for b in BACKENDS)
        t = time.monotonic()
        for i in range(self.count, n_services - 1):
            self.dp.upsert_service(Service(ServiceKey(filler_vip(i), VIP_PORT), backends, mode=self.mode,
                                           maglev_m=251))
        self.count = max(self.count, n_services - 1)
        self.dp.upsert_service(Service(ServiceKey(VIP, VIP_PORT), backends, mode=self.mode))
        return time.monotonic() - t

    def close(self):
        for dp in (self.dp, self.backend_dp):
            if dp is not None:
                try:
                    dp.destroy()
                except Exception as exc:  # noqa: BLE001 - keep cleaning up
                    print(f"vipd cleanup: {exc}", file=sys.stderr)
        shutil.rmtree(self.pin_root, ignore_errors=True)  # also what a failed load left behind


# -- main -----------------------------------------------------------------------------------------

def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--services", default="1,1000,10000", help="comma-separated service counts")
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--iptables", default="nft", help="nft, legacy or nft,legacy")
    ap.add_argument("--no-vipd", action="store_true", help="only the iptables rows")
    ap.add_argument("--vipd-mode", default="dsr,snat",
                    help="forwarding modes of the vipd services: dsr, snat or dsr,snat (the default)")
    args = ap.parse_args(argv)
    counts = [int(x) for x in args.services.split(",")]
    flavours = args.iptables.split(",")
    modes = args.vipd_mode.split(",")

    workdir = Path(tempfile.mkdtemp(prefix="vipd-connbench-"))
    setups: list[dict] = []   # name, services, program time, chain, destination
    vipds: list[Vipd] = []
    rates: dict[int, list[float]] = {}
    failed: dict[int, int] = {}
    try:
        connbench = build_connbench(workdir)
        with Lab("conn") as lab:
            print("building chains ...", flush=True)
            chain = Chain(lab, "direct", connbench)
            setups.append(dict(name="direct (no LB)", n=0, load="-", chain=chain, dst=(BACKENDS[0], BACKEND_PORT)))
            if not args.no_vipd:
                for mode in modes:
                    for n in counts:
                        chain = Chain(lab, f"v{mode[0]}{n}", connbench)
                        vipd = Vipd(chain.lb, chain.srv, mode, pin_root=f"/sys/fs/bpf/vipd-bench-{chain.lb.ns}")
                        vipds.append(vipd)
                        load_s = vipd.services(n)
                        setups.append(dict(name=f"vipd (XDP, {mode.upper()})", n=n, load=f"{load_s:.2f}s",
                                           chain=chain, dst=(VIP, VIP_PORT)))
                        print(f"  vipd {mode} with {n} services programmed in {load_s:.2f}s", flush=True)
            for flavour in flavours:
                for n in counts:
                    chain = Chain(lab, f"i{flavour[0]}{n}", connbench)
                    load_s, n_rules = load_iptables(chain.lb, n, flavour)
                    setups.append(dict(name=f"iptables-{flavour}", n=n, load=f"{load_s:.2f}s ({n_rules} rules)",
                                       chain=chain, dst=(VIP, VIP_PORT)))
                    print(f"  iptables-{flavour} with {n} services loaded in {load_s:.2f}s", flush=True)
            for rep in range(args.reps):
                print(f"round {rep + 1}/{args.reps} ...", flush=True)
                for i, setup in enumerate(setups):
                    rate, fail = setup["chain"].run_once(connbench, *setup["dst"], args.seconds)
                    print(f"  {setup['name']:<18} {setup['n']:>6} services: {rate:>9,.0f} conn/s"
                          f"{f'  ({fail} failed)' if fail else ''}", flush=True)
                    rates.setdefault(i, []).append(rate)
                    failed[i] = failed.get(i, 0) + fail
            while vipds:
                vipds.pop().close()
    finally:
        while vipds:
            vipds.pop().close()
        shutil.rmtree(workdir, ignore_errors=True)

    rows = [(x["name"], x["n"], x["load"], statistics.median(rates[i]), failed[i]) for i, x in enumerate(setups)]
    base = rows[0][3]
    print(f"\nNew TCP connections/s through {VIP}:{VIP_PORT} (10 backends, 64 in flight, "
          f"median of {args.reps} x {args.seconds:g}s)")
    header = ["datapath", "services", "program time", "conn/s", "failed", "us/conn over direct"]
    def over_direct(rate: float) -> str:
        return f"{1e6 / rate - 1e6 / base:+.1f}" if rate and base else "n/a"

    table = [[name, str(n), load, f"{rate:,.0f}", str(failed), over_direct(rate)]
             for name, n, load, rate, failed in rows]
    widths = [max(len(r[i]) for r in [header, *table]) for i in range(len(header))]
    for r in [header, *table]:
        print("  " + "  ".join(c.rjust(w) if i in (1, 3, 4, 5) else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))))
    by = {(name, n): rate for name, n, _, rate, _ in rows}
    vipd_rows = [r for r in rows if r[0].startswith("vipd")]
    if vipd_rows:
        print("\nvipd / iptables (connections per second ratio):")
        for mode in modes:
            for flavour in flavours:
                for n in counts:
                    ipt = by.get((f"iptables-{flavour}", n))
                    v = by.get((f"vipd (XDP, {mode.upper()})", n))
                    if ipt and v is not None:
                        print(f"  {n:>6} services: vipd {mode} {v:,.0f} / iptables-{flavour} {ipt:,.0f}"
                              f" = {v / ipt:.2f}x")


if __name__ == "__main__":
    main()
