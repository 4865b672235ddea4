"""vipd, the node agent: ``vipd run --config DIR --node-name NAME`` (or ``--kubernetes``);
``vipd prepare`` compiles the BPF programs into the program cache at install time.

Wiring only (the logic lives in the pure control plane and the reconcilers):

    FileSource(DIR) | KubernetesSource --snapshots--> Store --> Controller (LB-IPAM, node config, [services],
    HostSource (netlink) --facts---------->   neighbors, advertisements, [routes], status)
                                               --> BGP speakers, [eBPF datapath: --lb-interface],
                                                   [kernel routes: --auto-direct-node-routes,
                                                    --bgp-import-table]
    ApiServer(unix socket) <-- ControllerProvider (read-only views for vipctl)

Signals:
  SIGTERM / SIGINT  graceful-restart stop: every speaker closes its TCP sessions *without* a
                    NOTIFICATION (``stop(notify=False)``), so peers that negotiated graceful
                    restart keep our routes for restartTime; the datapath (BPF programs and
                    pinned maps) is left attached and keeps forwarding. A new vipd adopts it.
  SIGHUP            re-read the config directory now (it is also watched continuously).
  ``vipd run --shutdown-mode=notify`` makes SIGTERM send Cease instead (peers withdraw at
  once), for decommissioning a node.
"""

from __future__ import annotations

import argparse
import asyncio
import fcntl
import gc
import os
import signal
import socket
import sys
from pathlib import Path
from typing import Sequence

from agent.log import configure, get_logger
from agent.version import version

DEFAULT_STATE_DIR = "/var/lib/vipd"
DEFAULT_SOCKET = "/run/vipd/vipd.sock"
SHUTDOWN_TIMEOUT = 10.0  # seconds for the speakers to close their sessions on SIGTERM


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vipd", description="vipd node agent")
    parser.add_argument("--version", action="version", version=f"vipd {version()}")
    sub = parser.add_subparsers(dest="cmd", required=True, metavar="COMMAND")
    run = sub.add_parser("run", help="run the agent: manifests from a directory (--config) or "
                                     "from the Kubernetes API (--kubernetes)")
    source = run.add_mutually_exclusive_group(required=True)
    source.add_argument("--config", metavar="DIR",
                        help="directory of *.yaml/*.yml manifests (watched; changes apply without restart)")
    source.add_argument("--kubernetes", action="store_true",
                        help="list and watch the Kubernetes API instead (in-cluster service account, "
                             "or --kubeconfig); docs/kubernetes.md")
    run.add_argument("--kubeconfig", default=None, metavar="PATH",
                     help="with --kubernetes: the kubeconfig to use (default: in-cluster config)")
    run.add_argument("--kubernetes-lease-namespace", default="kube-system", metavar="NS",
                     help="with --kubernetes: namespace of the vipd-lbipam Lease that elects the "
                          "one node writing Service status (default kube-system)")
    run.add_argument("--kubernetes-secrets-namespace", default="kube-system", metavar="NS",
                     help="with --kubernetes: the namespace of the BGP auth Secrets (default kube-system)")
    run.add_argument("--node-name", required=True, metavar="NAME",
                     help="this node's Node object name (default: none; required)")
    run.add_argument("--api-socket", default=DEFAULT_SOCKET, metavar="PATH",
                     help=f"gRPC API unix socket (default {DEFAULT_SOCKET})")
    run.add_argument("--state-dir", default=DEFAULT_STATE_DIR, metavar="DIR",
                     help=f"LB-IPAM allocations and status.yaml (default {DEFAULT_STATE_DIR})")
    run.add_argument("--metrics-addr", default=None, metavar="HOST:PORT",
                     help="serve Prometheus metrics on this address (default: off)")
    run.add_argument("--metrics-per-service", default=True, action=argparse.BooleanOptionalAction,
                     help="export vipd_service_packets_total / _bytes_total per frontend (default on; "
                          "two series per VIP:port, turn off on nodes with tens of thousands of Services)")
    run.add_argument("--lb-interface", action="append", default=[], metavar="IFACE",
                     help="program Services into the eBPF datapath and attach it (XDP + tc) to this "
                          "uplink; repeatable (default: off, BGP only)")
    run.add_argument("--lb-mode", choices=("snat", "dsr"), default="snat",
                     help="forwarding to remote backends: snat (default) or dsr (Cilium's loadBalancer.mode)")
    run.add_argument("--bpf-pin-root", default="/sys/fs/bpf/vipd", metavar="DIR",
                     help="bpffs directory of the pinned maps (default /sys/fs/bpf/vipd)")
    run.add_argument("--bpf-cache-dir", default=None, metavar="DIR",
                     help="compiled BPF programs are kept here and loaded without bcc/clang when the "
                          "sources, flags, bcc and kernel are unchanged (default $VIPD_BPF_CACHE_DIR, "
                          "else <state-dir>/bpf-cache; '' turns the cache off)")
    run.add_argument("--maglev-table-size", default="auto", type=_maglev_size, metavar="auto|auto:M|M",
                     help="Maglev table size M per service: 'auto' (default: the smallest of "
                          "Cilium's primes >= 100 x the service's backends, at least 251), "
                          "'auto:<M>' (auto, at most M) or one of 251, 509, 1021, 2039, 4093, "
                          "8191, 16381, 32749, 65521, 131071 for every service (Cilium's "
                          "bpf-lb-maglev-table-size)")
    run.add_argument("--bpf-lb-map-max", default=None, type=_positive_int, metavar="N",
                     help="at most N service frontends and N backends in the datapath maps "
                          "(default: no limit; the maps grow with the configuration). Frontends "
                          "beyond it are not programmed and not announced")
    run.add_argument("--auto-direct-node-routes", action="store_true",
                     help="install a route to every other Node's spec.podCIDRs via its InternalIP when "
                          "that address is on a network this host is attached to (Cilium's "
                          "auto-direct-node-routes; default off)")
    run.add_argument("--bgp-import-table", default=None, type=_route_table, metavar="TABLE",
                     help="install the prefixes BGP peers announce into this kernel routing table "
                          "(1..4294967295, e.g. 254 for main), ECMP across peers; removed on withdraw "
                          "or session down (default: off, nothing is imported, as in Cilium)")
    run.add_argument("--shutdown-mode", choices=("graceful", "notify"), default="graceful",
                     help="SIGTERM behaviour: graceful (no NOTIFICATION, peers keep routes under "
                          "graceful restart) or notify (Cease, peers withdraw now)")
    run.add_argument("--config-limit", action="append", default=[], type=_config_limit,
                     metavar="NAME=VALUE",
                     help="raise or lower a config input limit (repeatable): file-bytes, "
                          "dir-bytes, files, documents, document-bytes, document-values, depth, "
                          "parser-memory-bytes, parser-timeout-seconds (docs/configuration.md)")
    run.add_argument("--log-level", default=os.environ.get("VIPD_LOG_LEVEL", "info"))
    run.add_argument("--log-format", choices=("auto", "json", "console"), default="auto")
    prep = sub.add_parser("prepare", help="compile the BPF programs into the program cache and exit "
                                          "(at install time: the first `vipd run --lb-interface` "
                                          "then loads them instead of compiling)")
    prep.add_argument("--state-dir", default=DEFAULT_STATE_DIR, metavar="DIR",
                      help=f"as for `vipd run` (default {DEFAULT_STATE_DIR}): the cache is "
                           "<state-dir>/bpf-cache unless --bpf-cache-dir says otherwise")
    prep.add_argument("--bpf-cache-dir", default=None, metavar="DIR",
                      help="as for `vipd run` (default $VIPD_BPF_CACHE_DIR, else <state-dir>/bpf-cache)")
    prep.add_argument("--bpf-pin-root", default="/sys/fs/bpf/vipd", metavar="DIR",
                      help="bpffs directory for the compile's scratch pins, removed afterwards "
                           "(default /sys/fs/bpf/vipd)")
    prep.add_argument("--log-level", default=os.environ.get("VIPD_LOG_LEVEL", "warning"))
    prep.add_argument("--log-format", choices=("auto", "json", "console"), default="auto")
    return parser


def cmd_prepare(args) -> int:
    """``vipd prepare``: the program cache holds this kernel's compiled datapath afterwards.
    Prints what it did; exit 0 (compiled or cached), 1 with a message on stderr otherwise."""
    from agent.datapath.prepare import PrepareError, prepare_programs

    cache = _bpf_cache(args, Path(args.state_dir))
    if cache is None:
        print("vipd prepare: the program cache is turned off (--bpf-cache-dir '' or "
              "VIPD_BPF_CACHE_DIR=''): nothing to prepare", file=sys.stderr)
        return 1
    try:
        done = prepare_programs(cache, pin_root=args.bpf_pin_root)
    except PrepareError as exc:
        print(f"vipd prepare: {exc}", file=sys.stderr)
        return 1
    if done.cached:
        print(f"vipd prepare: cached: {done.path} ({done.seconds:.2f} s)")
    else:
        print(f"vipd prepare: compiled in {done.compile_s:.1f} s, stored {done.path}")
    return 0


def _maglev_size(text: str):
    from agent.datapath.capacity import parse_maglev_table_size

    try:
        return parse_maglev_table_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _route_table(text: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= 0xFFFFFFFF or int(text) in (253, 255):
        raise argparse.ArgumentTypeError(f"{text!r} is not a routing table id (1..4294967295, "
                                         "not 253 'default' or 255 'local')")
    return int(text)


def _config_limit(text: str) -> str:
    from agent.config.safeyaml import parse_limits

    try:
        parse_limits([text])
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def _positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive integer")
    return int(text)


def _bpf_cache(args, state_dir: Path):
    """The compiled-program cache: --bpf-cache-dir, else $VIPD_BPF_CACHE_DIR, else
    <state-dir>/bpf-cache; an empty value turns it off (every start compiles)."""
    from agent.datapath.objcache import ENV_VAR, ProgramCache
    d = args.bpf_cache_dir if args.bpf_cache_dir is not None else os.environ.get(ENV_VAR)
    if d is None:
        d = str(state_dir / "bpf-cache")
    return ProgramCache(d) if d else None


def _pinned_capacity(args, log):
    """The capacity of the datapath maps a previous agent left pinned (None: none, a first start)."""
    from agent.datapath.api import Datapath

    try:
        return Datapath(instance=args.node_name, pin_root=args.bpf_pin_root, bpf_cache=None).pinned_capacity()
    except Exception as exc:  # noqa: BLE001 - the load itself reports a broken pin; plan as on a first start
        log.warning("could not read the pinned datapath maps' sizes", error=str(exc), pin_root=args.bpf_pin_root)
        return None


def _trim_heap(log, after: str) -> None:
    """Free heap pages back to the kernel after a start-up pass (agent/memory.py): the
    start-up's peak RSS is what an operator sizes the node's memory for."""
    from agent.memory import rss_mb, trim_heap

    before = rss_mb()
    if trim_heap():
        log.info("heap trimmed", after=after, rss_before_mb=round(before, 1), rss_after_mb=round(rss_mb(), 1))


def _initial_capacity(plan, args):
    """Map sizes for a first start: what the start-up plan's frontends need (so the first pass
    needs no growth); None when the plan could not compute them (the pass grows the maps)."""
    from agent.reconcilers.services import capacity_for

    if plan.frontends is None:
        return None
    return capacity_for(plan.frontends, map_max=args.bpf_lb_map_max)


def speaker_factory(instance):
    """One BGP speaker per instance (Cilium runs one GoBGP server per instance)."""
    from agent.bgp.api import BgpSpeaker, SpeakerConfig

    config = SpeakerConfig(asn=instance.local_asn, router_id=instance.router_id,
                           listen_port=instance.local_port)
    return BgpSpeaker(config, logger=get_logger("bgp-control-plane", instance=instance.name))


def _sd_notify(message: str) -> None:
    """systemd Type=notify readiness (a datagram to $NOTIFY_SOCKET); no-op elsewhere."""
    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr:
        return
    if addr.startswith("@"):
        addr = "\0" + addr[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        try:
            s.sendto(message.encode(), addr)
        except OSError:
            pass


class StateDirLock:
    """An exclusive flock on <state-dir>/vipd.lock: two agents must never share allocations."""

    def __init__(self, state_dir: Path):
        self.path = state_dir / "vipd.lock"
        self.fd: int | None = None

    def __enter__(self):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            try:
                pid = os.read(self.fd, 32).decode().strip() or "?"
            finally:
                os.close(self.fd)
            raise SystemExit(f"vipd: another vipd (pid {pid}) is running with state dir "
                             f"{self.path.parent}; stop it first, or give this one its own "
                             "--state-dir and --api-socket")
        os.ftruncate(self.fd, 0)
        os.write(self.fd, f"{os.getpid()}\n".encode())
        return self

    def __exit__(self, *exc):
        if self.fd is not None:
            os.close(self.fd)


async def run_agent(args, *, speaker_factory=speaker_factory) -> int:
    from agent.profiling import StartupProfile

    profile = StartupProfile.from_env()   # VIPD_PROFILE=FILE: where start-up spends its CPU
    if profile is not None:
        profile.start()
    parser = None
    if not args.kubernetes:
        # first: the configuration parser process imports its models while this one imports
        from agent.config.worker import ParserProcess

        parser = ParserProcess()
        await parser.spawn()
    state_dir = Path(args.state_dir)
    loader = bpf_cache = maps = None
    dp_log = get_logger("lb", node=args.node_name)
    if args.lb_interface:   # the BPF compile (seconds) overlaps the parsing; map sizes come later
        from agent.reconcilers.services import load_datapath, start_datapath_loader
        bpf_cache = _bpf_cache(args, state_dir)
        loader = start_datapath_loader(args.node_name, pin_root=args.bpf_pin_root, bpf_cache=bpf_cache)
        if parser is not None and not loader.from_cache:
            # the compile (seconds of clang in the loader child) is the first start's critical
            # path: the configuration's parse does not take a second CPU from it
            parser.parallel_first_load = False

        def load(capacity):
            return asyncio.create_task(asyncio.to_thread(
                load_datapath, args.node_name, pin_root=args.bpf_pin_root, capacity=capacity, loader=loader,
                bpf_cache=bpf_cache))

        # A restart adopts the pinned maps at their size while the configuration is read (the
        # first pass grows them if the configuration outgrew them); a first start sizes new
        # maps from the start-up plan (below). Before the API's imports (grpc: ~0.3 s): the
        # kernel verifies the programs meanwhile.
        if await asyncio.to_thread(_pinned_capacity, args, dp_log) is not None:
            maps = load(None)
    from agent.api.provider import ControllerProvider
    from agent.api.server import ApiServer
    from agent.reconcilers.controller import Controller
    from agent.sources.files import FileSource
    from agent.sources.host import HostSource
    from agent.store import Store

    log = get_logger("daemon", node=args.node_name)
    # A pass at 20,000 Services allocates ~10^5 short-lived containers; at Python's default
    # thresholds (700, 10, 10) the cyclic GC then costs ~30 % of the pass. Refcounting frees
    # them anyway (the agent's data has no reference cycles to speak of).
    gc.set_threshold(100_000, 20, 20)
    # Start-up (parsing, the first plan, the first passes: millions of objects) runs with the
    # cyclic GC off: its collections would only rescan what start-up keeps (~10 % of the
    # CPU to "all prefixes announced"). It is back on, with that data frozen, below.
    gc.disable()
    store = Store()
    from agent.config.safeyaml import parse_limits

    if args.kubernetes:
        from agent.sources.kubernetes import KubernetesSource

        source = KubernetesSource(args.cluster_access, store,
                                  secrets_namespace=args.kubernetes_secrets_namespace)
        log.info("waiting for the first list from the Kubernetes API", source=source.origin)
    else:
        source = FileSource(args.config, store, limits=parse_limits(args.config_limit),
                            cache_dir=state_dir / "config-cache", parser=parser)
    await source.reload()   # parsed in the worker process, like every later reload
    services = None
    from agent.controlplane.memo import Memo

    memo, services_memo = Memo(), Memo()   # per-Service results kept from pass to pass
    if args.lb_interface:
        from agent.reconcilers.services import ServiceReconciler, attach_datapath

        # attached once loaded (below): until then no VIP is programmed and none is announced
        services = ServiceReconciler(None, args.node_name, mode=args.lb_mode, log=dp_log,
                                     maglev_size=args.maglev_table_size, map_max=args.bpf_lb_map_max,
                                     memo=services_memo)
    host = HostSource()
    try:
        await host.load()
    except Exception as exc:  # noqa: BLE001 - the watch retries; host-dependent fields wait for it
        log.error("could not read the host's links and routes", error=repr(exc))
    routes = None
    if args.auto_direct_node_routes or args.bgp_import_table is not None:
        from agent.reconcilers.routes import RouteReconciler
        from agent.routing.manager import RouteManager

        routes = RouteReconciler(RouteManager(), args.node_name,
                                 auto_direct_node_routes=args.auto_direct_node_routes,
                                 import_table=args.bgp_import_table, log=get_logger("routes", node=args.node_name))
    controller = Controller(args.node_name, store, state_dir=state_dir, speaker_factory=speaker_factory,
                            log=get_logger("bgp-control-plane", node=args.node_name), services=services,
                            host=host, routes=routes, memo=memo)
    api = ApiServer(ControllerProvider(controller, version=version()), args.api_socket)
    from agent.looplag import LoopLagMonitor

    loop_lag = controller.loop_lag = LoopLagMonitor(log=log)

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    received: list[str] = []

    def on_stop(signame: str) -> None:
        received.append(signame)
        log.info("signal received; stopping", signal=signame)
        stop.set()

    def on_hup() -> None:
        log.info("SIGHUP: reloading configuration")
        source.request_reload()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_stop, sig.name)
    loop.add_signal_handler(signal.SIGHUP, on_hup)

    metrics_server = None
    if args.metrics_addr:
        from agent.api.metrics import serve_metrics

        metrics_server = serve_metrics(args.metrics_addr, controller, loop,
                                       per_service=args.metrics_per_service)

    # The first pass runs before the API opens: neighbors and their full tables are in place.
    # With a datapath, it runs while the datapath loads (in a thread): the BGP sessions come up
    # and Pod CIDRs are announced at once; VIPs follow in the pass after the datapath
    # programmed them (never announce what is not).
    loading = planned = None
    if services is not None:
        # graceful restart: End-of-RIB (peers drop what is still stale) waits for the VIPs
        controller.neighbors.hold_end_of_rib = True

        # The BGP sessions first: their configuration needs no Services, and their TCP/OPEN
        # exchange then overlaps the start-up plan (the first pass announces; End-of-RIB waits).
        try:
            await controller.start_sessions(await asyncio.to_thread(controller.sessions_config))
        except Exception as exc:  # noqa: BLE001 - the first pass starts them and records the failure
            log.info("sessions start with the first pass instead", reason=str(exc))

        # The start-up plan (LB-IPAM, frontends, the VIPs' paths: seconds at 20,000 Services)
        # is made once, in a thread, and is the first pass's plan; a first start sizes the
        # datapath maps from it.
        # A first start loads the datapath (BPF_PROG_LOAD: the kernel's verifier, ~1 s of
        # CPU outside the GIL) as soon as the plan's frontends size its maps, while the peers'
        # paths are still being computed.
        try:
            planned = await asyncio.to_thread(controller.make_plan)
            dp_log.info("start-up plan", seconds=round(controller.last_plan_seconds, 3),
                        frontends=len(planned.frontends or ()))
        except Exception as exc:  # noqa: BLE001 - the pass below plans again and records the failure
            log.warning("start-up plan failed", error=str(exc))
        if maps is None:
            maps = load(_initial_capacity(planned, args) if planned is not None else None)
        if planned is not None:
            try:
                await asyncio.to_thread(planned.anticipate_paths)
            except Exception as exc:  # noqa: BLE001 - the pass computes them instead
                log.warning("start-up paths failed", error=str(exc))

        async def attached():
            dp = await maps
            await asyncio.to_thread(attach_datapath, dp, store.objects().node(args.node_name), args.lb_interface,
                                    log=dp_log)
            return dp
        loading = asyncio.create_task(attached())
    try:
        await (controller.reconcile_once(planned) if planned is not None else controller.reconcile_once())
    except Exception as exc:  # noqa: BLE001 - the controller loop retries; the agent stays up
        controller.record_failed_pass(exc)  # logged there; vipctl status shows it until a pass succeeds
    _trim_heap(log, "first pass")
    datapath = None
    if loading is not None:
        try:
            datapath = await loading
        except Exception as exc:  # noqa: BLE001 - asked for a datapath that cannot load: say why, stop
            log.error("datapath failed to load", error=str(exc), interfaces=args.lb_interface)
            await controller.shutdown(graceful=False)   # the sessions started: close them (Cease)
            if metrics_server is not None:
                metrics_server.shutdown()
            return 1
        services.attach(datapath)
        try:
            await controller.reconcile_once()
        except Exception as exc:  # noqa: BLE001 - as above
            controller.record_failed_pass(exc)
        controller.neighbors.release_end_of_rib()
        _trim_heap(log, "services pass")
    # The configuration and what the first pass derived from it live as long as the agent:
    # keep them out of the cyclic GC's scans (at 20,000 Services a full collection cost
    # ~0.5 s, paid at random points of later passes). Freed objects are still freed.
    gc.freeze()
    gc.enable()
    if profile is not None:
        log.info("start-up profile written", path=profile.write())
    await api.start()
    _sd_notify("READY=1")
    log.info("vipd running", config=store.current.source, state_dir=str(state_dir),
             socket=str(args.api_socket), generation=store.current.generation)
    tasks = [asyncio.create_task(controller.run(stop), name="controller"),
             asyncio.create_task(source.run(stop), name="config-source"),
             asyncio.create_task(host.run(stop), name="host-source"),
             asyncio.create_task(loop_lag.run(stop), name="loop-lag")]
    if args.kubernetes:
        from agent.sources.kubernetes_status import LeaseElector, ServiceStatusWriter

        # LB-IPAM allocations -> Service status (where they survive a lost state directory)
        elector = LeaseElector(source.client, args.node_name, args.kubernetes_lease_namespace)
        writer = ServiceStatusWriter(source.client, store, controller, elector=elector)
        tasks.append(asyncio.create_task(elector.run(stop), name="lease-election"))
        tasks.append(asyncio.create_task(writer.run(stop), name="service-status"))
        from agent.sources.kubernetes_bgp_status import BgpStatusWriter

        # this node's CiliumBGPNodeConfig; the Lease holder: BGP and pool conditions
        bgp_status = BgpStatusWriter(source.client, source, controller, elector=elector)
        tasks.append(asyncio.create_task(bgp_status.run(stop), name="bgp-status"))
    stopper = asyncio.create_task(stop.wait())
    done, _ = await asyncio.wait([*tasks, stopper], return_when=asyncio.FIRST_COMPLETED)
    exit_code = 0
    for task in done:
        if task is not stopper and task.exception() is not None:
            log.error("task failed; stopping", task=task.get_name(), error=repr(task.exception()))
            exit_code = 1
    stop.set()
    _sd_notify("STOPPING=1")
    graceful = args.shutdown_mode == "graceful"
    # No reconcile pass may start a speaker after this point.
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    # Then the speakers: with graceful restart the peers must see a plain TCP close.
    try:
        await asyncio.wait_for(controller.shutdown(graceful=graceful), SHUTDOWN_TIMEOUT)
    except TimeoutError:
        log.warning("speakers did not stop in time; exiting anyway", timeout=SHUTDOWN_TIMEOUT)
    await api.stop()
    try:   # the next start's first plan (agent/controlplane/startmemo.py)
        await asyncio.to_thread(controller.save_start_memo)
    except Exception as exc:  # noqa: BLE001 - the next start computes the plan instead
        log.warning("could not write the start-up plan memo", error=str(exc), state_dir=str(state_dir))
    if datapath is not None:
        datapath.close()   # drop our handles only: programs stay attached, maps stay pinned
    if metrics_server is not None:
        metrics_server.shutdown()
    log.info("vipd stopped", graceful=graceful, signal=received[0] if received else None)
    return exit_code


def main(argv: Sequence[str] | None = None, *, speaker_factory=speaker_factory) -> int:
    args = build_parser().parse_args(argv)
    configure(args.log_level, json=None if args.log_format == "auto" else args.log_format == "json")
    if args.cmd == "prepare":
        return cmd_prepare(args)
    if args.cmd == "run":
        if args.kubeconfig and not args.kubernetes:
            print("vipd: --kubeconfig is used with --kubernetes only", file=sys.stderr)
            return 2
        if args.kubernetes:
            from agent.sources.kubernetes import ClusterAccess

            try:
                args.cluster_access = (ClusterAccess.from_kubeconfig(args.kubeconfig) if args.kubeconfig
                                       else ClusterAccess.in_cluster())
            except (ValueError, OSError) as exc:
                print(f"vipd: {exc}", file=sys.stderr)
                return 2
        elif not Path(args.config).is_dir():
            print(f"vipd: --config {args.config}: not a directory (it holds the *.yaml manifests)",
                  file=sys.stderr)
            return 2
        with StateDirLock(Path(args.state_dir)):
            # Before any session starts: two agents on one socket would both peer with the
            # routers and fight over the same sessions.
            from agent.api.server import socket_owner

            owner = socket_owner(Path(args.api_socket))
            if owner is not None:
                print(f"vipd: another vipd (pid {owner}) serves {args.api_socket}; stop it first, "
                      "or give this one its own --api-socket and --state-dir", file=sys.stderr)
                return 1
            return asyncio.run(run_agent(args, speaker_factory=speaker_factory))
    return 2


if __name__ == "__main__":
    sys.exit(main())
