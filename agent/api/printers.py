"""Pure renderers for vipctl: API messages in, text out (no I/O, unit-tested).

The tables copy Cilium's column sets and its Go ``text/tabwriter`` layout (min width 5,
padding 3, space padded, the last column unpadded), so scripts written against
``cilium bgp peers`` / ``cilium-dbg bgp peers`` keep working:

* per-node layout (``cilium-dbg``, seed 002): ``Local AS  Peer AS  Peer Address(addr:port)
  Session  Uptime  Family  Received  Advertised``
* cluster layout (``cilium bgp peers``, seed 004): ``Node`` first, ``Session State``, the
  node name only on its first row, peer address without the port.

Extra address families go on continuation rows with blank leading cells, as Cilium does.
"""

from __future__ import annotations

import ipaddress
from typing import Iterable, Sequence

__all__ = [
    "tabwrite", "go_duration", "peers_table", "routes_table", "route_policies_table",
    "status_text", "format_attrs", "family_label", "capabilities_text",
]

MIN_WIDTH = 5
PADDING = 3


def tabwrite(rows: Sequence[Sequence[object]]) -> str:
    """Lay out rows like Go's tabwriter.NewWriter(w, 5, 0, 3, ' ', 0) with tab-separated cells.

    Every cell but the last of a row is padded to its column's width + 3 (at least 5); the last
    cell is written as is, and trailing blanks are never emitted.
    """
    rows = [[str(c) for c in r] for r in rows]
    if not rows:
        return ""
    ncols = max(len(r) for r in rows)
    widths = [0] * ncols
    for r in rows:
        for i, cell in enumerate(r[:-1]):
            widths[i] = max(widths[i], len(cell))
    widths = [max(w + PADDING, MIN_WIDTH) for w in widths]
    out = []
    for r in rows:
        line = "".join(cell.ljust(widths[i]) for i, cell in enumerate(r[:-1])) + (r[-1] if r else "")
        out.append(line.rstrip())
    return "\n".join(out) + "\n"


def go_duration(seconds: float) -> str:
    """Go's time.Duration.String() of a duration rounded to whole seconds: 0s, 5s, 11m34s, 1h0m0s."""
    total = int(round(max(seconds, 0.0)))
    h, rem = divmod(total, 3600)
    m, s = divmod(rem, 60)
    if h:
        return f"{h}h{m}m{s}s"
    if m:
        return f"{m}m{s}s"
    return f"{s}s"


def family_label(afi: str, safi: str) -> str:
    return f"{afi}/{safi}"


def _peer_address(addr: str, port: int) -> str:
    # cilium-dbg prints netip.AddrPortFrom(addr, port).String(): brackets for IPv6.
    try:
        ip = ipaddress.ip_address(addr)
    except ValueError:
        return f"{addr}:{port}"
    return f"[{ip}]:{port}" if ip.version == 6 else f"{ip}:{port}"


def _peer_sort_key(p) -> tuple:
    try:
        ip = ipaddress.ip_address(p.peer_address)
        addr_key = (ip.version, int(ip))
    except ValueError:
        addr_key = (9, 0)
    return (p.node, p.local_asn, addr_key)


def peers_table(peers: Iterable, *, cluster: bool = False) -> str:
    """``bgp peers``; ``peers`` are ``vipd_pb2.Peer`` (or anything with the same attributes)."""
    peers = sorted(peers, key=_peer_sort_key)
    if cluster:
        header = ["Node", "Local AS", "Peer AS", "Peer Address", "Session State", "Uptime",
                  "Family", "Received", "Advertised"]
    else:
        header = ["Local AS", "Peer AS", "Peer Address", "Session", "Uptime", "Family",
                  "Received", "Advertised"]
    rows: list[list[object]] = [header]
    last_node = None
    for p in peers:
        uptime = go_duration(p.uptime_seconds) if p.session_state == "established" else "0s"
        lead = [p.local_asn, p.peer_asn,
                p.peer_address if cluster else _peer_address(p.peer_address, p.peer_port),
                p.session_state, uptime]
        if cluster:
            lead = [p.node if p.node != last_node else "", *lead]
            last_node = p.node
        families = list(p.families) or [None]
        for i, fam in enumerate(families):
            tail = ["", "", ""] if fam is None else [family_label(fam.afi, fam.safi), fam.received,
                                                   fam.advertised]
            rows.append((lead if i == 0 else [""] * len(lead)) + tail)
    return tabwrite(rows)


def bfd_peers_table(peers: Iterable, *, cluster: bool = False) -> str:
    """``bfd peers``; ``peers`` are ``vipd_pb2.BfdPeer``. Intervals are those in effect."""
    header = ["Peer Address", "Local Address", "State", "Remote", "Uptime", "TX ms", "RX ms",
              "Mult", "Detect ms", "Up/Down", "Diagnostic"]
    rows: list[list[object]] = [["Node", *header] if cluster else header]
    for p in sorted(peers, key=lambda p: (p.node, ipaddress.ip_address(p.peer_address).version,
                                          ipaddress.ip_address(p.peer_address))):
        row = [p.peer_address, p.local_address, p.state, p.remote_state,
               go_duration(p.uptime_seconds) if p.state == "up" else "0s",
               f"{p.transmit_interval_ms:g}", f"{p.receive_interval_ms:g}", p.detect_multiplier,
               f"{p.detection_time_ms:g}", f"{p.up_transitions}/{p.down_transitions}",
               p.diagnostic if p.state != "up" else (p.last_down_diagnostic if p.down_transitions else "")]
        rows.append([p.node, *row] if cluster else row)
    return tabwrite(rows)


def _cap_key(name: str) -> str:
    # multiprotocol(ipv4-unicast) is per family; other capabilities match by kind, since their
    # parameters (ASN, restart time) differ between the two sides.
    return name if name.startswith("multiprotocol") else name.split("(", 1)[0]


def capabilities_text(peers: Iterable) -> str:
    """``bgp peers --caps``, in cilium-dbg's format: per neighbor, each capability seen in the
    OPEN messages and whether it was advertised, received or both (our value shown)."""
    out = []
    for p in sorted(peers, key=_peer_sort_key):
        out.append(f"BGP neighbor is {p.peer_address}, remote AS {p.peer_asn}")
        out.append("Neighbor capabilities:")
        local = {_cap_key(c): c for c in p.local_capabilities}
        remote = {_cap_key(c): c for c in p.remote_capabilities}
        for key in list(local) + [k for k in remote if k not in local]:
            if key in local and key in remote:
                how, shown = "advertised and received", local[key]
            elif key in local:
                how, shown = "advertised", local[key]
            else:
                how, shown = "received", remote[key]
            out.append(f"\t{shown}: {how}")
        out.append("")
    return "\n".join(out)


ORIGIN_LETTER = {"igp": "i", "egp": "e", "incomplete": "?", "i": "i", "e": "e", "?": "?"}


def format_attrs(*, origin: str, as_path: Sequence[int], next_hop: str, afi: str, prefix: str,
                 local_pref: int | None = None, med: int | None = None,
                 communities: Sequence[str] = (), large_communities: Sequence[str] = ()) -> str:
    """GoBGP's path-attribute String() rendering that Cilium prints in the ``Attrs`` column.

    IPv4 unicast carries ``{Nexthop: x}``; IPv6 (and IPv4 over an IPv6 next hop) an MP_REACH
    ``{MpReach(ipv6-unicast): {Nexthop: x, NLRIs: [p]}}``.
    """
    parts = [f"{{Origin: {ORIGIN_LETTER.get(origin, origin)}}}"]
    if as_path:
        parts.append("{AsPath: " + " ".join(str(a) for a in as_path) + "}")
    nh_is_v6 = ":" in next_hop
    if afi == "ipv4" and not nh_is_v6:
        parts.append(f"{{Nexthop: {next_hop}}}")
    if med is not None:
        parts.append(f"{{Med: {med}}}")
    if local_pref is not None:
        parts.append(f"{{LocalPref: {local_pref}}}")
    if communities:
        parts.append("{Communities: " + ", ".join(communities) + "}")
    if large_communities:
        parts.append("{LargeCommunity: [ " + ", ".join(large_communities) + "]}")
    if afi == "ipv6" or nh_is_v6:
        parts.append(f"{{MpReach({afi}-unicast): {{Nexthop: {next_hop}, NLRIs: [{prefix}]}}}}")
    return "[" + " ".join(parts) + "]"


def _prefix_key(prefix: str):
    try:
        n = ipaddress.ip_network(prefix, strict=False)
        return (n.version, int(n.network_address), n.prefixlen)
    except ValueError:
        return (9, 0, 0)


def routes_table(routes: Iterable, *, advertised: bool, cluster: bool = False) -> str:
    """``bgp routes available|advertised``: ``[Node] VRouter [Peer] Prefix NextHop Age Attrs``."""
    routes = sorted(routes, key=lambda r: (r.node, r.vrouter, _prefix_key(r.peer + "/32") if r.peer
                                           else (0, 0, 0), _prefix_key(r.prefix)))
    header = (["Node"] if cluster else []) + ["VRouter"] + (["Peer"] if advertised else []) + [
        "Prefix", "NextHop", "Age", "Attrs"]
    rows: list[list[object]] = [header]
    last_node = None
    for r in routes:
        row: list[object] = []
        if cluster:
            row.append(r.node if r.node != last_node else "")
            last_node = r.node
        row.append(r.vrouter)
        if advertised:
            row.append(r.peer)
        row += [r.prefix, r.next_hop, go_duration(r.age_seconds), r.attrs]
        rows.append(row)
    return tabwrite(rows)


def _multi(values: Sequence[str], how: str) -> str:
    # Cilium: several values are "{a} {b}" prefixed by (any)/(all); one value is printed bare.
    if not values:
        return ""
    if len(values) == 1:
        return values[0]
    return f"({how}) " + " ".join("{" + v + "}" for v in values)


def route_policies_table(policies: Iterable, *, families: bool = False) -> str:
    """``bgp route-policies``: the release layout of seed 004 (``families=True`` adds
    ``Match Families`` as the newest cilium-dbg does). Extra statements go on continuation rows."""
    header = ["VRouter", "Policy Name", "Type", "Match Peers"] + (["Match Families"] if families else []) + [
        "Match Prefixes (Min..Max Len)", "RIB Action", "Path Actions"]
    rows: list[list[object]] = [header]
    for pol in sorted(policies, key=lambda p: (p.vrouter, p.type != "export", p.name)):
        statements = list(pol.statements) or [None]
        for i, st in enumerate(statements):
            lead = [pol.vrouter, pol.name, pol.type] if i == 0 else ["", "", ""]
            if st is None:
                rows.append(lead + [""] * (len(header) - 3))
                continue
            cells = [_multi(list(st.match_peers), "any")]
            if families:
                cells.append(_multi(list(st.match_families), "any"))
            cells += [_multi(list(st.match_prefixes), "any"), st.rib_action,
                      " ".join(st.path_actions)]
            rows.append(lead + cells)
    return tabwrite(rows)


def status_text(status) -> str:
    """``vipctl status``: config errors, resource conditions, reconcile errors."""
    out = [f"Node:        {status.node}",
           f"Config:      {status.config_dir} (generation {status.config_generation})",
           f"Uptime:      {go_duration(status.uptime_seconds)}"]
    out.append("")
    if status.config_errors:
        out.append("Configuration problems (rejected objects, warnings):")
        for e in status.config_errors:
            where = ", ".join(x for x in (e.file, e.object) if x)
            out.append(f"  {where}: {e.message}" if where else f"  {e.message}")
    else:
        out.append("Configuration problems: none")
    out.append("")
    rows: list[list[object]] = [["Kind", "Name", "Condition", "Status", "Reason", "Message"]]
    for res in sorted(status.resources, key=lambda r: (r.kind, r.namespace, r.name)):
        name = f"{res.namespace}/{res.name}" if res.namespace else res.name
        for i, c in enumerate(sorted(res.conditions, key=lambda c: c.type)):
            rows.append([res.kind if i == 0 else "", name if i == 0 else "", c.type, c.status,
                         c.reason, c.message.replace("\n", "; ")])
    if len(rows) > 1:
        out.append("Conditions:")
        out += ["  " + line for line in tabwrite(rows).splitlines()]
    else:
        out.append("Conditions: none")
    out.append("")
    if status.reconcile_errors:
        out.append("Reconcile errors (cilium.io/BGPReconcileError):")
        rows = [["Reconciler", "Instance", "Attempts", "Since", "Error"]]
        rows += [[e.reconciler, e.instance, e.attempts, e.since, e.error]
                 for e in status.reconcile_errors]
        out += ["  " + line for line in tabwrite(rows).splitlines()]
    else:
        out.append("Reconcile errors: none")
    return "\n".join(out) + "\n"


# ---- load balancer (shapes of cilium-dbg service list / bpf lb list / bpf lb maglev list) ----

def _frontend_text(f) -> str:
    host = f"[{f.address}]" if ":" in f.address else f.address
    return f"{host}:{f.port}/{f.protocol}"


def _backend_text(b) -> str:
    host = f"[{b.address}]" if ":" in b.address else b.address
    return f"{host}:{b.port}"


def services_table(frontends: Iterable, *, cluster_nodes: Sequence[str] = ()) -> str:
    """``ID  Frontend  Service Type  Backend`` with one line per backend (``1 => addr (state)``)."""
    rows: list[list[object]] = [["ID", "Frontend", "Service Type", "Service", "Mode", "Backend"]]
    for f in frontends:
        if f.wildcard:
            continue
        mode = ",".join(f.flags)
        first = [f.id, _frontend_text(f), f.type or "-", f.service or "-", mode]
        if not f.backends:
            rows.append(first + ["(no backends)"])
            continue
        for i, b in enumerate(f.backends):
            text = f"{b.slot} => {_backend_text(b)}/{f.protocol} ({b.state})"
            rows.append((first if i == 0 else ["", "", "", "", ""]) + [text])
    return tabwrite(rows)


def lb_list_table(frontends: Iterable) -> str:
    """``SERVICE ADDRESS | BACKEND ADDRESS (REVNAT_ID) (SLOT)``, as cilium-dbg bpf lb list."""
    rows: list[list[object]] = [["SERVICE ADDRESS", "BACKEND ADDRESS (REVNAT_ID) (SLOT)"]]
    for f in frontends:
        if f.wildcard:
            host = f"[{f.address}]" if ":" in f.address else f.address
            rows.append([f"{host}:0/ANY", f"0.0.0.0:0 ({f.id}) (0) [wildcard: packets to other ports are dropped]"])
            continue
        front = _frontend_text(f)
        flags = ", ".join([f.type or "Frontend", *f.flags])
        rows.append([front, f"0.0.0.0:0 ({f.id}) (0) [{flags}] maglev={f.maglev_size}"])
        for b in f.backends:
            extra = "" if b.state == "active" else f" [{b.state}]"
            rows.append(["", f"{_backend_text(b)}/{f.protocol} ({f.id}) ({b.slot}){extra} "
                             f"slots={b.maglev_slots}"])
    return tabwrite(rows)


def maglev_table(tables: Iterable) -> str:
    """``SVC ID | LOOKUP TABLE`` with the key ``[id]/v4``; the value lists backend ids per slot."""
    rows: list[list[object]] = [["SVC ID", "LOOKUP TABLE"]]
    for t in tables:
        rows.append([f"[{t.id}]/{t.family}", "[" + " ".join(str(x) for x in t.table) + "]"])
    return tabwrite(rows)


def conntrack_text(resp) -> str:
    lines = []
    for e in resp.entries:
        flags = ",".join(e.flags) or "-"
        line = (f"{e.protocol} {e.direction.upper()} {e.source} -> {e.destination} "
                f"service={e.service_id} backend={e.backend_id} flags={flags}")
        if e.rewrite_source:
            line += f" rewrite-source={e.rewrite_source}"
        if e.nat_port:
            line += f" nat-port={e.nat_port}"
        lines.append(line)
    shown = len(resp.entries)
    if resp.total > shown:
        lines.append(f"({shown} of {resp.total} entries shown; raise --limit to see more)")
    return "\n".join(lines) + ("\n" if lines else "")


def drops_table(resp, *, all_counters: bool = False) -> str:
    """``REASON  CODE  PACKETS`` (non-zero unless ``all_counters``), then per-hook outcomes."""
    rows: list[list[object]] = [["REASON", "CODE", "PACKETS"]]
    for d in resp.drops:
        if d.packets or all_counters:
            rows.append([d.reason, d.code, int(d.packets)])
    out = tabwrite(rows)
    if all_counters:
        rows = [["HOOK", "OUTCOME", "PACKETS"]]
        rows += [[c.hook, c.outcome, int(c.packets)] for c in resp.counters]
        out += "\n" + tabwrite(rows)
    return out
