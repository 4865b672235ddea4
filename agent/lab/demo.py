"""The lab harness's own demo: an FRR router and a GoBGP router exchange prefixes.

Run with ``make demo`` (or ``python -m agent.lab.demo`` as root). Prints the sessions and
each side's BGP table, then tears the lab down.
"""

from __future__ import annotations

import time

from . import Lab, wait_until
from .peers import Announce, FrrPeer, GobgpPeer, Neighbor


def print_table(title: str, header: list[str], rows: list[list[object]]) -> None:
    print(f"\n{title}")
    cols = [header, *[[str(c) for c in r] for r in rows]]
    widths = [max(len(r[i]) for r in cols) for i in range(len(header))]
    for r in cols:
        print("  " + "  ".join(c.ljust(w) for c, w in zip(r, widths)))


def main() -> None:
    start = time.monotonic()
    with Lab("demo") as lab:
        print("building lab: hosts r1 (FRR, AS 65001) and r2 (GoBGP, AS 65002) on 10.0.0.0/24 + fd00::/64")
        r1, r2 = lab.host("r1"), lab.host("r2")
        lab.link(r1, r2, ["10.0.0.1/24", "fd00::1/64"], ["10.0.0.2/24", "fd00::2/64"])
        frr = lab.frr(r1, FrrPeer(asn=65001, router_id="1.1.1.1",
                                  neighbors=[Neighbor("10.0.0.2", 65002, families=("ipv4", "ipv6"))],
                                  announce=[Announce("10.9.0.0/24", communities=("65001:100",),
                                                     large_communities=("65001:1:1",)),
                                            Announce("2001:db8:9::/48", communities=("65001:600",))]))
        go = lab.gobgp(r2, GobgpPeer(asn=65002, router_id="2.2.2.2",
                                     neighbors=[Neighbor("10.0.0.1", 65001, families=("ipv4", "ipv6"))],
                                     announce=[Announce("10.8.0.0/24", communities=("65002:200",),
                                                        large_communities=("65002:2:2",))]))
        wait_until(lambda: frr.sessions().get("10.0.0.2", None) and
                   frr.sessions()["10.0.0.2"].state == "established", timeout=30, what="session")
        wait_until(lambda: len([r for r in go.routes("ipv4") if r.source]) == 1 and
                   len([r for r in frr.routes("ipv4") if r.source]) == 1, timeout=20, what="routes")
        for name, d in (("r1 (FRR)", frr), ("r2 (GoBGP)", go)):
            print_table(f"{name} sessions", ["Neighbor", "State", "Hold", "Keepalive", "Received", "Accepted"],
                        [[a, s.state, s.hold_time, s.keepalive, s.received, s.accepted]
                         for a, s in d.sessions().items()])
            for afi in ("ipv4", "ipv6"):
                print_table(f"{name} {afi} unicast table",
                            ["Prefix", "NextHop", "AS path", "Origin", "Communities", "Large communities"],
                            [[r.prefix, r.next_hop, " ".join(map(str, r.as_path)) or "(local)", r.origin,
                              " ".join(r.communities), " ".join(r.large_communities)]
                             for r in sorted(d.routes(afi), key=lambda r: r.prefix)])
        print("\ntearing down")
    print(f"done in {time.monotonic() - start:.1f}s; no namespaces or processes left behind")


if __name__ == "__main__":
    main()
