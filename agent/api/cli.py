"""``vipctl``: the command-line client of vipd's API (and two offline tools).

    vipctl bgp peers                                   (alias: neighbors)
    vipctl bgp routes [available|advertised] [ipv4|ipv6] [unicast] [vrouter ASN] [peer|neighbor ADDR]
    vipctl bgp route-policies [vrouter ASN]            (alias: rps)
    vipctl bgp reset [PEER] [--soft] [--vrouter ASN]   (hard: Cease 6/4 + reconnect; soft: route refresh)
    vipctl bfd peers                                   (BFD sessions protecting BGP peers)
    vipctl status
    vipctl service list                                (the load balancer: frontends and backends)
    vipctl bpf lb list [--frontends]                   (the services map, cilium-dbg bpf lb list)
    vipctl bpf lb maglev list | get ID|FRONTEND        (Maglev lookup tables)
    vipctl bpf ct list [--limit N]                     (conntrack entries)
    vipctl bpf drops [--all]                           (drops by reason; --all: every hook counter)
    vipctl config validate DIR                         (offline: no daemon needed)
    vipctl migrate FILE...                             (offline: legacy -> v2 resources as YAML)

Global options, accepted before or after the command: ``-o table|json``, ``--socket PATH``
(repeatable: several nodes print one cluster-wide table with a Node column, as
``cilium bgp peers`` does). ``VIPD_SOCKET`` (comma-separated) sets the default socket(s).
Exit status: 0 ok, 1 daemon unreachable or API error, 2 usage error or invalid configuration.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Callable, Sequence

from agent.api.gen import ensure_generated

ensure_generated()
import grpc  # noqa: E402
from google.protobuf.json_format import MessageToDict  # noqa: E402

from agent.api import printers, vipd_pb2, vipd_pb2_grpc  # noqa: E402
from agent.version import version  # noqa: E402

DEFAULT_SOCKET = "/run/vipd/vipd.sock"
TIMEOUT = 10.0


class CliError(Exception):
    def __init__(self, message: str, code: int = 1):
        super().__init__(message)
        self.code = code


# --------------------------------------------------------------------------------------------
# argument parsing
# --------------------------------------------------------------------------------------------

def _common() -> argparse.ArgumentParser:
    # SUPPRESS so an option given at the top level is not reset by a subcommand's default.
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("-o", "--output", choices=("table", "json", "yaml"), default=argparse.SUPPRESS,
                   help="table (default), json or yaml (the API model, verbatim)")
    p.add_argument("--socket", action="append", default=argparse.SUPPRESS, metavar="PATH",
                   help="vipd API socket (repeatable; default $VIPD_SOCKET or " + DEFAULT_SOCKET + ")")
    return p


def build_parser() -> argparse.ArgumentParser:
    common = _common()
    parser = argparse.ArgumentParser(prog="vipctl", parents=[common],
                                     description="Inspect and configure vipd.",
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n")[1])
    parser.add_argument("--version", action="version", version=f"vipctl {version()}")
    sub = parser.add_subparsers(dest="cmd", required=True, metavar="COMMAND")

    bgp = sub.add_parser("bgp", parents=[common], help="BGP control plane state")
    bsub = bgp.add_subparsers(dest="bgp_cmd", required=True, metavar="SUBCOMMAND")
    peers = bsub.add_parser("peers", aliases=["neighbors"], parents=[common],
                            help="BGP peering state (cilium-dbg bgp peers)")
    peers.add_argument("--cluster", action="store_true",
                       help="cluster layout with a Node column (implied by several --socket)")
    peers.add_argument("-c", "--caps", action="store_true",
                       help="print the capabilities advertised to / received from each peer")
    peers.set_defaults(func=cmd_peers)
    routes = bsub.add_parser(
        "routes", parents=[common], help="routes available (loc-rib) or advertised (per peer)",
        description="vipctl bgp routes <available|advertised> <afi> <safi> [vrouter <asn>] "
                    "[peer|neighbor <address>]\n\nExample:\n  vipctl bgp routes advertised ipv4 unicast peer 10.0.5.1",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    routes.add_argument("words", nargs="*", metavar="ARG")
    routes.add_argument("--cluster", action="store_true", help="cluster layout with a Node column")
    routes.set_defaults(func=cmd_routes)
    rps = bsub.add_parser("route-policies", aliases=["rps"], parents=[common],
                          help="route policies computed from the advertisements")
    rps.add_argument("words", nargs="*", metavar="vrouter ASN")
    rps.add_argument("--families", action="store_true", help="add the Match Families column")
    rps.set_defaults(func=cmd_route_policies)

    reset = bsub.add_parser("reset", parents=[common], help="reset BGP sessions (all, or one peer)",
                            description="Hard (default): Cease/Administrative Reset, then reconnect at "
                                        "once. --soft: the session stays up; vipd re-sends its table "
                                        "and asks the peer for its routes (route refresh).")
    reset.add_argument("peer", nargs="?", default="", help="peer address (default: every peer)")
    reset.add_argument("--soft", action="store_true", help="route refresh instead of dropping the session")
    reset.add_argument("--vrouter", type=int, default=0, metavar="ASN",
                       help="only the instance with this local ASN")
    reset.set_defaults(func=cmd_reset)

    bfd = sub.add_parser("bfd", parents=[common], help="BFD sessions (vipd.io/bfd annotation)")
    bfdsub = bfd.add_subparsers(dest="bfd_cmd", required=True, metavar="SUBCOMMAND")
    bfd_peers = bfdsub.add_parser("peers", parents=[common],
                                  help="BFD session state, timers in effect, counters")
    bfd_peers.add_argument("--cluster", action="store_true",
                           help="cluster layout with a Node column (implied by several --socket)")
    bfd_peers.set_defaults(func=cmd_bfd_peers)

    status = sub.add_parser("status", parents=[common], help="conditions, reconcile errors, config errors")
    status.set_defaults(func=cmd_status)

    service = sub.add_parser("service", parents=[common], help="the load balancer's services")
    ssub = service.add_subparsers(dest="service_cmd", required=True, metavar="SUBCOMMAND")
    slist = ssub.add_parser("list", aliases=["ls"], parents=[common],
                            help="frontends and their backends as the datapath holds them")
    slist.set_defaults(func=cmd_service_list)

    bpf = sub.add_parser("bpf", parents=[common], help="the BPF maps, decoded")
    bpsub = bpf.add_subparsers(dest="bpf_cmd", required=True, metavar="SUBCOMMAND")
    lb = bpsub.add_parser("lb", parents=[common], help="load-balancing maps")
    lbsub = lb.add_subparsers(dest="lb_cmd", required=True, metavar="SUBCOMMAND")
    lblist = lbsub.add_parser("list", parents=[common], help="services map: frontends with backends and slots")
    lblist.add_argument("--frontends", action="store_true", help="only the frontends (SERVICE ADDRESS | ID)")
    lblist.set_defaults(func=cmd_bpf_lb_list)
    maglev = lbsub.add_parser("maglev", parents=[common], help="Maglev lookup tables")
    msub = maglev.add_subparsers(dest="maglev_cmd", required=True, metavar="SUBCOMMAND")
    mlist = msub.add_parser("list", parents=[common], help="every service's table (SVC ID | LOOKUP TABLE)")
    mlist.set_defaults(func=cmd_bpf_maglev, which=None)
    mget = msub.add_parser("get", parents=[common], help="one service's table, by id or ADDR:PORT[/PROTO]")
    mget.add_argument("which", metavar="ID|FRONTEND")
    mget.set_defaults(func=cmd_bpf_maglev)
    ct = bpsub.add_parser("ct", parents=[common], help="conntrack")
    ctsub = ct.add_subparsers(dest="ct_cmd", required=True, metavar="SUBCOMMAND")
    ctlist = ctsub.add_parser("list", parents=[common], help="conntrack entries (service and reply)")
    ctlist.add_argument("--limit", type=int, default=10000, metavar="N", help="print at most N (default 10000)")
    ctlist.set_defaults(func=cmd_bpf_ct_list)
    drops = bpsub.add_parser("drops", parents=[common], help="packets the datapath dropped, by reason")
    drops.add_argument("--all", action="store_true", help="also zero reasons and every hook's outcome counters")
    drops.set_defaults(func=cmd_bpf_drops)

    config = sub.add_parser("config", parents=[common], help="offline configuration tools")
    csub = config.add_subparsers(dest="config_cmd", required=True, metavar="SUBCOMMAND")
    validate = csub.add_parser("validate", parents=[common],
                               help="load and validate every *.yaml/*.yml in DIR (no daemon needed)")
    validate.add_argument("dir")
    validate.add_argument("--config-limit", action="append", default=[], metavar="NAME=VALUE",
                          help="the same limits as vipd run --config-limit")
    validate.set_defaults(func=cmd_config_validate)

    migrate = sub.add_parser("migrate", parents=[common],
                             help="convert CiliumBGPPeeringPolicy / MetalLB bgp-config to v2 resources")
    migrate.add_argument("files", nargs="+", metavar="FILE")
    migrate.set_defaults(func=cmd_migrate)
    return parser


def parse_routes_words(words: Sequence[str]) -> tuple[vipd_pb2.ListRoutesRequest, list[str]]:
    """Cilium's positional grammar; returns the request and notes such as '(Defaulting to ...)'."""
    words = list(words)
    notes = []
    table = words.pop(0) if words and words[0] in ("available", "advertised") else None
    afi = words.pop(0) if words and words[0] in ("ipv4", "ipv6") else None
    safi = words.pop(0) if words and words[0] in ("unicast",) else None
    if table is None or afi is None or safi is None:
        table, afi, safi = table or "available", afi or "ipv4", safi or "unicast"
        notes.append(f"(Defaulting to `{table} {afi} {safi}` routes, please see help for more options)")
    req = vipd_pb2.ListRoutesRequest(
        table=vipd_pb2.AVAILABLE if table == "available" else vipd_pb2.ADVERTISED, afi=afi, safi=safi)
    while words:
        key = words.pop(0)
        if not words:
            raise CliError(f"missing value after {key!r}", 2)
        value = words.pop(0)
        if key == "vrouter":
            if not value.isdigit():
                raise CliError(f"vrouter must be an ASN, got {value!r}", 2)
            req.vrouter = int(value)
        elif key in ("peer", "neighbor"):
            req.peer = value
        else:
            raise CliError(f"unexpected argument {key!r}; expected vrouter <asn> or peer <address>", 2)
    if req.peer and req.table != vipd_pb2.ADVERTISED:
        raise CliError("a peer filter needs `advertised` routes", 2)
    return req, notes


# --------------------------------------------------------------------------------------------
# talking to daemons
# --------------------------------------------------------------------------------------------

def sockets_from(args) -> list[str]:
    given = getattr(args, "socket", None)
    if given:
        return list(given)
    env = os.environ.get("VIPD_SOCKET", "")
    return [s for s in env.split(",") if s] or [DEFAULT_SOCKET]


def _target(sock: str) -> str:
    if sock.startswith("unix:"):
        return sock
    return "unix://" + os.path.abspath(sock)


def call(sock: str, method: str, request) -> object:
    with grpc.insecure_channel(_target(sock)) as channel:
        stub = vipd_pb2_grpc.VipdStub(channel)
        try:
            return getattr(stub, method)(request, timeout=TIMEOUT)
        except grpc.RpcError as exc:
            code = exc.code()
            if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                raise CliError(f"cannot reach vipd at {sock}: {exc.details()} "
                               "(is `vipd run` up? select it with --socket or VIPD_SOCKET)") from None
            raise CliError(f"vipd at {sock}: {code.name}: {exc.details()}") from None


def to_json(msg) -> dict:
    return MessageToDict(msg, always_print_fields_with_no_presence=True)


def _gather(args, method: str, request) -> list:
    return [call(s, method, request) for s in sockets_from(args)]


def _print_json(responses: list, fmt: str = "json") -> None:
    data = [to_json(r) for r in responses]
    data = data[0] if len(data) == 1 else data
    if fmt == "yaml":
        import yaml

        sys.stdout.write(yaml.safe_dump(data, sort_keys=False))
    else:
        print(json.dumps(data, indent=2))


def _cluster(args, responses) -> bool:
    return getattr(args, "cluster", False) or len(responses) > 1


# --------------------------------------------------------------------------------------------
# commands
# --------------------------------------------------------------------------------------------

def cmd_peers(args) -> int:
    responses = _gather(args, "ListPeers", vipd_pb2.ListPeersRequest())
    if args.output in ("json", "yaml"):
        _print_json(responses, args.output)
        return 0
    if args.caps:
        for resp in responses:
            if len(responses) > 1:
                print(f"Node: {resp.node}")
            sys.stdout.write(printers.capabilities_text(resp.peers))
        return 0
    peers = [p for r in responses for p in r.peers]
    sys.stdout.write(printers.peers_table(peers, cluster=_cluster(args, responses)))
    return 0


def cmd_bfd_peers(args) -> int:
    responses = _gather(args, "ListBfdPeers", vipd_pb2.ListBfdPeersRequest())
    if args.output in ("json", "yaml"):
        _print_json(responses, args.output)
        return 0
    peers = [p for r in responses for p in r.peers]
    sys.stdout.write(printers.bfd_peers_table(peers, cluster=_cluster(args, responses)))
    return 0


def cmd_routes(args) -> int:
    request, notes = parse_routes_words(args.words)
    for note in notes:
        print(note, file=sys.stderr)
    responses = _gather(args, "ListRoutes", request)
    if args.output in ("json", "yaml"):
        _print_json(responses, args.output)
        return 0
    routes = [r for resp in responses for r in resp.routes]
    sys.stdout.write(printers.routes_table(routes, advertised=request.table == vipd_pb2.ADVERTISED,
                                           cluster=_cluster(args, responses)))
    return 0


def cmd_route_policies(args) -> int:
    request = vipd_pb2.ListRoutePoliciesRequest()
    words = list(args.words)
    if words:
        if len(words) != 2 or words[0] != "vrouter" or not words[1].isdigit():
            raise CliError("usage: vipctl bgp route-policies [vrouter <asn>]", 2)
        request.vrouter = int(words[1])
    responses = _gather(args, "ListRoutePolicies", request)
    if args.output in ("json", "yaml"):
        _print_json(responses, args.output)
        return 0
    for resp in responses:
        if len(responses) > 1:
            print(f"Node: {resp.node}")
        sys.stdout.write(printers.route_policies_table(resp.policies, families=args.families))
    return 0


def cmd_reset(args) -> int:
    request = vipd_pb2.ResetPeersRequest(peer=args.peer, soft=args.soft, vrouter=args.vrouter)
    responses = _gather(args, "ResetPeers", request)
    if args.output in ("json", "yaml"):
        _print_json(responses, args.output)
        return 0
    for resp in responses:
        for r in resp.resets:
            print(f"{resp.node}: {r.instance} {r.peer_address}: {r.action}")
    return 0


def cmd_status(args) -> int:
    responses = _gather(args, "GetStatus", vipd_pb2.GetStatusRequest())
    if args.output in ("json", "yaml"):
        _print_json(responses, args.output)
        return 0
    sys.stdout.write("\n".join(printers.status_text(r) for r in responses))
    return 0


def _structured(args, responses) -> bool:
    if args.output in ("json", "yaml"):
        _print_json(responses, args.output)
        return True
    return False


def _per_node(responses, render) -> None:
    for resp in responses:
        if len(responses) > 1:
            print(f"Node: {resp.node}")
        sys.stdout.write(render(resp))


def cmd_service_list(args) -> int:
    responses = _gather(args, "ListLbServices", vipd_pb2.ListLbServicesRequest())
    if not _structured(args, responses):
        _per_node(responses, lambda r: printers.services_table(r.frontends))
    return 0


def cmd_bpf_lb_list(args) -> int:
    responses = _gather(args, "ListLbServices", vipd_pb2.ListLbServicesRequest())
    if _structured(args, responses):
        return 0
    if args.frontends:
        _per_node(responses, lambda r: printers.tabwrite(
            [["SERVICE ADDRESS", "ID"]] + [[printers._frontend_text(f), f.id] for f in r.frontends]))
    else:
        _per_node(responses, lambda r: printers.lb_list_table(r.frontends))
    return 0


def cmd_bpf_maglev(args) -> int:
    request = vipd_pb2.ListMaglevRequest()
    if args.which is not None:
        if args.which.isdigit():
            request.id = int(args.which)
        else:
            request.frontend = args.which
    responses = _gather(args, "ListMaglev", request)
    if not _structured(args, responses):
        _per_node(responses, lambda r: printers.maglev_table(r.tables))
    return 0


def cmd_bpf_ct_list(args) -> int:
    if args.limit <= 0:
        raise CliError("--limit must be a positive number", 2)
    responses = _gather(args, "ListConntrack", vipd_pb2.ListConntrackRequest(limit=args.limit))
    if not _structured(args, responses):
        _per_node(responses, printers.conntrack_text)
    return 0


def cmd_bpf_drops(args) -> int:
    responses = _gather(args, "GetDatapathCounters", vipd_pb2.GetDatapathCountersRequest())
    if not _structured(args, responses):
        _per_node(responses, lambda r: printers.drops_table(r, all_counters=args.all))
    return 0


def cmd_config_validate(args) -> int:
    from agent.config.safeyaml import parse_limits
    from agent.sources.files import validate_dir

    try:
        limits = parse_limits(args.config_limit)
    except ValueError as exc:
        raise CliError(f"--config-limit {exc}", 2) from None
    report = validate_dir(args.dir, limits)
    if args.output in ("json", "yaml"):
        import yaml

        data = report.as_dict()
        print(json.dumps(data, indent=2) if args.output == "json" else yaml.safe_dump(data, sort_keys=False))
    else:
        sys.stdout.write(report.text())
    return 0 if report.ok else 2


def cmd_migrate(args) -> int:
    from agent.sources.files import migrate_files

    try:
        text = migrate_files(args.files)
    except ValueError as exc:
        raise CliError(str(exc), 2) from None
    sys.stdout.write(text)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "output"):
        args.output = "table"
    func: Callable = args.func
    try:
        return func(args)
    except CliError as exc:
        print(f"vipctl: {exc}", file=sys.stderr)
        return exc.code
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    sys.exit(main())
