"""An in-memory implementation of the speaker contract (docs/internal/speaker-api.md) that
records every call, so reconciler tests can assert the exact effects and their order. The
real speaker against real FRR is exercised by tests/e2e/controlplane."""

from __future__ import annotations

from dataclasses import dataclass, field

from agent.controlplane.types import Family


@dataclass(frozen=True)
class Counts:
    received: int = 0
    accepted: int = 0
    advertised: int = 0


@dataclass(frozen=True)
class FakePeerState:
    address: str
    port: int
    local_address: str | None
    local_asn: int
    peer_asn: int
    state: str = "established"
    uptime_seconds: float | None = 10.0
    established_at: float | None = 1_700_000_000.0
    hold_time: int | None = 90
    keepalive: int | None = 30
    local_capabilities: tuple = ()
    remote_capabilities: tuple = ()
    families: dict = field(default_factory=dict)
    last_error: str | None = None


class RecordingSpeaker:
    def __init__(self, instance, log: list, *, fail_on: set[str] | None = None):
        self.instance = instance
        self.asn = instance.local_asn
        self.log = log                      # shared list of (instance, call, args...)
        self.fail_on = fail_on if fail_on is not None else set()
        self.neighbors: dict[str, object] = {}
        self.rib: dict[tuple[str, Family], dict] = {}
        self.started = False
        self.stopped_with: dict | None = None

    def _call(self, name, *args):
        self.log.append((self.instance.name, name, *args))
        if name in self.fail_on:
            raise RuntimeError(f"injected failure in {name}")

    async def start(self):
        self._call("start")
        self.started = True

    async def stop(self, *, notify: bool = True, message: str = ""):
        self._call("stop", notify)
        self.stopped_with = {"notify": notify, "message": message}

    async def add_neighbor(self, cfg):
        self._call("add_neighbor", cfg.address)
        self.neighbors[cfg.address] = cfg

    async def update_neighbor(self, cfg):
        self._call("update_neighbor", cfg.address)
        self.neighbors[cfg.address] = cfg

    async def remove_neighbor(self, address, message=""):
        self._call("remove_neighbor", address)
        self.neighbors.pop(address)
        for key in [k for k in self.rib if k[0] == address]:
            del self.rib[key]

    def advertise(self, address, family, prefix, attrs):
        if address not in self.neighbors:
            raise KeyError(address)
        self._call("advertise", address, family, str(prefix))
        self.rib.setdefault((address, family), {})[prefix] = attrs

    def withdraw(self, address, family, prefix):
        self._call("withdraw", address, family, str(prefix))
        self.rib.get((address, family), {}).pop(prefix, None)

    def advertise_many(self, address, family, prefixes, attrs):
        changed = 0
        for prefix in prefixes:
            if self.rib.get((address, family), {}).get(prefix) != attrs:
                self.advertise(address, family, prefix, attrs)
                changed += 1
        return changed

    def withdraw_many(self, address, family, prefixes):
        changed = 0
        for prefix in prefixes:
            if prefix in self.rib.get((address, family), {}):
                self.withdraw(address, family, prefix)
                changed += 1
        return changed

    def adj_rib_out(self, address, family):
        return dict(self.rib.get((address, family), {}))

    def adj_rib_out_sent(self, address, family):
        """As the real speaker: each attribute set through the session's own encoder (the
        fake's sessions are all Established, four-octet AS, IPv4 local address)."""
        from agent.bgp.rib import UpdateEncoder

        cfg = self.neighbors[address]
        enc = UpdateEncoder(local_asn=self.asn, ibgp=cfg.peer_asn == self.asn, four_octet_as=True,
                            max_size=4096, local_address=cfg.local_address or "10.0.0.100")
        out = {}
        for prefix, attrs in self.rib.get((address, family), {}).items():
            sent = enc.sent_path(family, attrs)
            if sent is not None:
                out[prefix] = sent
        return out

    def adj_rib_in(self, address, family):
        return {}

    def peers(self):
        return [FakePeerState(address=a, port=c.port, local_address=c.local_address or "10.0.0.100",
                              local_asn=self.asn, peer_asn=c.peer_asn,
                              families={f: Counts(advertised=len(self.rib.get((a, f), {})))
                                        for f in c.families})
                for a, c in self.neighbors.items()]
