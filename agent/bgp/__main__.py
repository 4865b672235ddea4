"""Run one BGP speaker from a JSON file: ``python -m agent.bgp CONFIG.json``.

Used to run the speaker alone in a network namespace (interop tests, graceful-restart tests
with ``kill -9``, the benchmark). The same file format as tests/e2e/bgp/speaker_driver.py::

    {
      "speaker":   {"asn": 65001, "router_id": "10.0.0.1",
                    "listen_port": null, "listen_addresses": ["0.0.0.0", "::"]},
      "neighbors": [{"address": "10.0.0.2", "peer_asn": 65002,      # any NeighborConfig field;
                     "families": ["ipv4", "ipv6"], "hold_time": 90,  # families: "ipv4"/"ipv6"
                     "password": null, "graceful_restart": true}],
      "paths": [
        {"neighbor": "10.0.0.2", "prefix": "10.9.0.0/24",            # "neighbor" omitted: every
         "attrs": {"origin": 0, "med": 10, "local_pref": 200,         #  neighbor of that family
                   "communities": [4259840001, "65000:2", "no-export"],
                   "large_communities": [[65000, 1, 1]], "next_hop": null}}
      ],
      "generate": [                                                   # optional bulk paths
        {"neighbor": "10.0.0.2", "start": "10.128.0.0", "prefixlen": 24, "count": 100000,
         "attribute_sets": 10, "attrs": {}}   # set i adds community 65000:i (i = 0..sets-1)
      ],
      "status_file": "/tmp/speaker-status.json",   # optional: peers() as JSON, every second
      "log_level": "info"
    }

Communities may be integers or "A:B" strings or well-known names (RFC 1997 / RFC 7999 …).

Signals:
  SIGTERM, SIGINT  stop with Cease 6/2 Administrative Shutdown ("vipd speaker shutting down"), exit 0
  SIGUSR1          graceful-restart stop: close TCP without NOTIFICATION (peers keep routes), exit 0
  SIGHUP           re-read the file; apply the difference (neighbors added/removed/updated, paths
                   advertised/withdrawn) without resetting sessions that did not change
  SIGUSR2          write the status file now
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import os
import signal
import sys
from dataclasses import asdict, fields
from pathlib import Path

from agent.bgp.api import BgpSpeaker, Family, NeighborConfig, Origin, PathAttributes, SpeakerConfig
from agent.bgp.communities import community_value

FAMILIES = {"ipv4": Family.IPV4_UNICAST, "ipv6": Family.IPV6_UNICAST,
            "ipv4-unicast": Family.IPV4_UNICAST, "ipv6-unicast": Family.IPV6_UNICAST}


def community(value) -> int:
    return value if isinstance(value, int) else community_value(str(value))


def path_attributes(d: dict | None) -> PathAttributes:
    d = dict(d or {})
    return PathAttributes(
        origin=Origin(d.get("origin", 0)), med=d.get("med"), local_pref=d.get("local_pref"),
        communities=tuple(community(c) for c in d.get("communities", ())),
        large_communities=tuple(tuple(int(x) for x in lc) for lc in d.get("large_communities", ())),
        next_hop=d.get("next_hop"))


def neighbor_config(d: dict) -> NeighborConfig:
    d = dict(d)
    names = {f.name for f in fields(NeighborConfig)}
    unknown = set(d) - names
    if unknown:
        raise ValueError(f"unknown neighbor fields {sorted(unknown)}")
    d["families"] = tuple(FAMILIES[f] for f in d.get("families", ("ipv4", "ipv6")))
    return NeighborConfig(**d)


def desired_paths(doc: dict, neighbors: dict[str, NeighborConfig]) -> dict:
    """(neighbor, family) -> {prefix: PathAttributes}."""
    out: dict = {}

    def add(nbr, net, attrs):
        fam = Family.IPV4_UNICAST if net.version == 4 else Family.IPV6_UNICAST
        targets = [nbr] if nbr else [a for a, c in neighbors.items() if fam in c.families]
        for a in targets:
            out.setdefault((str(ipaddress.ip_address(a)), fam), {})[net] = attrs

    for p in doc.get("paths", ()):
        add(p.get("neighbor"), ipaddress.ip_network(p["prefix"]), path_attributes(p.get("attrs")))
    for g in doc.get("generate", ()):
        base = path_attributes(g.get("attrs"))
        sets = max(1, int(g.get("attribute_sets", 1)))
        variants = [PathAttributes(base.origin, base.med, base.local_pref,
                                   base.communities + ((65000 << 16) | i,), base.large_communities,
                                   base.next_hop) for i in range(sets)]
        start = ipaddress.ip_address(g["start"])
        plen = int(g.get("prefixlen", 24 if start.version == 4 else 64))
        step = 1 << ((32 if start.version == 4 else 128) - plen)
        first = int(start)
        cls = ipaddress.IPv4Network if start.version == 4 else ipaddress.IPv6Network
        for i in range(int(g["count"])):
            add(g.get("neighbor"), cls((first + i * step, plen)), variants[i % sets])
    return out


class Runner:
    def __init__(self, path: Path):
        self.path = path
        self.doc = json.loads(path.read_text())
        from agent.log import configure, get_logger

        configure(self.doc.get("log_level", "info"))
        self.log = get_logger("bgp-control-plane")
        self.speaker = BgpSpeaker(SpeakerConfig(**{**self.doc["speaker"], "listen_addresses": tuple(
            self.doc["speaker"].get("listen_addresses", ("0.0.0.0", "::")))}), logger=self.log)
        self.neighbors: dict[str, NeighborConfig] = {}
        self.paths: dict = {}
        self.done = asyncio.Event()
        self.graceful = False

    async def apply(self, doc: dict) -> None:
        want = {c.address: c for c in (neighbor_config(n) for n in doc.get("neighbors", ()))}
        for addr in [a for a in self.neighbors if a not in want]:
            await self.speaker.remove_neighbor(addr, "removed from the runner configuration")
            del self.neighbors[addr]
            self.paths = {k: v for k, v in self.paths.items() if k[0] != addr}
        for addr, cfg in want.items():
            if addr not in self.neighbors:
                await self.speaker.add_neighbor(cfg)
            elif self.neighbors[addr] != cfg:
                await self.speaker.update_neighbor(cfg)
            self.neighbors[addr] = cfg
        desired = desired_paths(doc, self.neighbors)
        for (addr, fam), current in self.paths.items():
            target = desired.get((addr, fam), {})
            for net in current:
                if net not in target:
                    self.speaker.withdraw(addr, fam, net)
        for (addr, fam), target in desired.items():
            current = self.paths.get((addr, fam), {})
            for net, attrs in target.items():
                if current.get(net) != attrs:
                    self.speaker.advertise(addr, fam, net, attrs)
        self.paths = desired
        self.log.info("runner configuration applied", neighbors=len(self.neighbors),
                      paths=sum(len(v) for v in desired.values()))

    def write_status(self) -> None:
        target = self.doc.get("status_file")
        if not target:
            return
        peers = []
        for p in self.speaker.peers():
            d = asdict(p)
            d["families"] = {f.short: asdict(c) for f, c in p.families.items()}
            peers.append(d)
        tmp = Path(target + ".tmp")
        tmp.write_text(json.dumps({"pid": os.getpid(), "peers": peers}, indent=1))
        tmp.replace(target)

    async def reload(self) -> None:
        try:
            doc = json.loads(self.path.read_text())
            if doc.get("speaker") != self.doc.get("speaker"):
                self.log.warning("the speaker section changed; it applies only after a restart")
            await self.apply(doc)
            self.doc = doc
        except Exception as exc:  # noqa: BLE001 - a bad edit must not kill the running speaker
            self.log.error("reload failed; keeping the previous configuration", error=str(exc))

    async def status_loop(self) -> None:
        while not self.done.is_set():
            self.write_status()
            try:
                await asyncio.wait_for(self.done.wait(), 1.0)
            except asyncio.TimeoutError:
                pass

    async def run(self) -> int:
        loop = asyncio.get_running_loop()

        def stop(graceful: bool):
            self.graceful = graceful
            self.done.set()

        loop.add_signal_handler(signal.SIGTERM, stop, False)
        loop.add_signal_handler(signal.SIGINT, stop, False)
        loop.add_signal_handler(signal.SIGUSR1, stop, True)
        loop.add_signal_handler(signal.SIGHUP, lambda: loop.create_task(self.reload()))
        loop.add_signal_handler(signal.SIGUSR2, self.write_status)
        # Neighbors and all paths first, then start: the first UPDATEs carry the whole table.
        try:
            await self.apply(self.doc)
            await self.speaker.start()
        except (OSError, ValueError, KeyError, TypeError) as exc:
            self.log.error("cannot start the speaker", config=str(self.path), error=f"{type(exc).__name__}: {exc}")
            return 2
        self.log.info("speaker running", pid=os.getpid(), config=str(self.path))
        status = loop.create_task(self.status_loop())
        await self.done.wait()
        if self.graceful:
            await self.speaker.stop(notify=False)
        else:
            await self.speaker.stop(notify=True, message="vipd speaker shutting down")
        self.write_status()
        await status
        return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1 or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 2
    try:
        runner = Runner(Path(argv[0]))
    except (OSError, ValueError, KeyError, TypeError) as exc:  # bad file: say which and why, no traceback
        print(f"agent.bgp: {argv[0]}: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2
    return asyncio.run(runner.run())


if __name__ == "__main__":
    sys.exit(main())
