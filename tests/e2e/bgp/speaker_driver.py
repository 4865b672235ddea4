"""Runs one vipd BGP speaker in this process and takes commands on a unix socket.

The e2e tests start it inside a lab namespace (``python speaker_driver.py CONFIG.json``) so the
speaker has its own PID (``kill -9`` for graceful restart) and its own log.
Only the public API (``agent.bgp.api``) is used, exactly as the control plane uses it.

CONFIG.json::

    {"speaker": {"asn": 65001, "router_id": "10.0.0.1", "listen_port": null},
     "neighbors": [{"address": "10.0.0.2", "peer_asn": 65002, "families": ["ipv4"], ...}],
     "paths": [{"neighbor": "10.0.0.2", "prefix": "10.9.0.0/24",
                "attrs": {"communities": [4259840001], "large_communities": [[65000, 1, 1]]}}],
     "control": "/tmp/.../control.sock"}

Neighbors and then all paths are added in one pass before the event loop runs again, as a
restarting agent does, so the first UPDATEs after Established carry the full table.

Control protocol: one JSON object per line in, one JSON object per line out
(``{"ok": true, "result": ...}`` or ``{"ok": false, "error": "..."}``). Operations:
``peers``, ``advertise``, ``withdraw``, ``adj_rib_out``, ``add_neighbor``, ``update_neighbor``,
``remove_neighbor``, ``stop`` (``notify``: bool, ``message``: str; the process then exits).
"""

from __future__ import annotations

import asyncio
import dataclasses
import ipaddress
import json
import signal
import sys
from pathlib import Path

from agent.bgp.api import BgpSpeaker, Family, NeighborConfig, Origin, PathAttributes, SpeakerConfig
from agent.log import get_logger

FAMILIES = {"ipv4": Family.IPV4_UNICAST, "ipv6": Family.IPV6_UNICAST}


def neighbor_config(d: dict) -> NeighborConfig:
    d = dict(d)
    d["families"] = tuple(FAMILIES[f] for f in d.get("families", ("ipv4", "ipv6")))
    return NeighborConfig(**d)


def path_attributes(d: dict) -> PathAttributes:
    d = dict(d)
    if "origin" in d:
        d["origin"] = Origin(d["origin"])
    d["communities"] = tuple(d.get("communities", ()))
    d["large_communities"] = tuple(tuple(c) for c in d.get("large_communities", ()))
    return PathAttributes(**d)


def family_of(prefix) -> Family:
    return Family.IPV4_UNICAST if prefix.version == 4 else Family.IPV6_UNICAST


def _jsonable(value):
    if dataclasses.is_dataclass(value):
        return {f.name: _jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        return {(k.name if isinstance(k, Family) else str(k)): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, Family):
        return value.name
    if isinstance(value, Origin):
        return int(value)
    return value


class Driver:
    def __init__(self, config: dict):
        self.config = config
        self.log = get_logger("bgp-control-plane")
        self.speaker = BgpSpeaker(SpeakerConfig(**config["speaker"]), logger=self.log)
        self.done = asyncio.Event()
        self.stopped = False

    async def start(self) -> None:
        await self.speaker.start()
        for n in self.config.get("neighbors", ()):
            await self.speaker.add_neighbor(neighbor_config(n))
        for p in self.config.get("paths", ()):
            self.advertise(p["neighbor"], p["prefix"], p.get("attrs", {}))

    def advertise(self, neighbor: str, prefix: str, attrs: dict) -> None:
        net = ipaddress.ip_network(prefix)
        self.speaker.advertise(neighbor, family_of(net), net, path_attributes(attrs))

    async def handle(self, req: dict):
        op = req["op"]
        if op == "peers":
            return _jsonable(self.speaker.peers())
        if op == "advertise":
            self.advertise(req["neighbor"], req["prefix"], req.get("attrs", {}))
            return None
        if op == "withdraw":
            net = ipaddress.ip_network(req["prefix"])
            self.speaker.withdraw(req["neighbor"], family_of(net), net)
            return None
        if op == "adj_rib_out":
            fam = FAMILIES[req.get("family", "ipv4")]
            return {str(k): _jsonable(v) for k, v in self.speaker.adj_rib_out(req["neighbor"], fam).items()}
        if op == "add_neighbor":
            await self.speaker.add_neighbor(neighbor_config(req["config"]))
            return None
        if op == "update_neighbor":
            await self.speaker.update_neighbor(neighbor_config(req["config"]))
            return None
        if op == "remove_neighbor":
            await self.speaker.remove_neighbor(req["address"], req.get("message", ""))
            return None
        if op == "stop":
            await self.speaker.stop(notify=req.get("notify", True), message=req.get("message", ""))
            self.stopped = True
            self.done.set()
            return None
        raise ValueError(f"unknown op {op!r}")

    async def serve_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while line := await reader.readline():
                try:
                    reply = {"ok": True, "result": await self.handle(json.loads(line))}
                except Exception as exc:  # noqa: BLE001 - reported to the test, which fails on it
                    reply = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
                writer.write(json.dumps(reply).encode() + b"\n")
                await writer.drain()
        finally:
            writer.close()


async def main(config_path: str) -> None:
    config = json.loads(Path(config_path).read_text())
    driver = Driver(config)
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, driver.done.set)
    await driver.start()
    sock = Path(config["control"])
    sock.unlink(missing_ok=True)
    server = await asyncio.start_unix_server(driver.serve_client, path=str(sock))
    driver.log.info("speaker driver ready", control=str(sock))
    await driver.done.wait()
    server.close()
    if not driver.stopped:
        await driver.speaker.stop(notify=True, message="test driver exit")


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1]))
