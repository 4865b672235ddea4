"""A minimal vipd agent for the datapath e2e tests: one process per node.

``python lbagent.py CONFIG.json [--hold]`` loads the datapath (adopting pinned maps left by
a previous process), attaches the programs, reconciles the services to exactly the ones in
the config, prints ``RESULT <json summary>`` and exits — leaving programs attached and maps pinned, as
the real daemon does. With ``--hold`` it then sleeps until killed (to test a crash mid-stream).
With ``--serve`` it stays, like the daemon, with the one loaded datapath: every line on stdin
makes it read CONFIG.json again and reconcile the services to it (printing ``RESULT`` again);
it exits when stdin closes. A compile takes seconds; a reconcile, milliseconds.

Config: {"instance", "pin_root", "netns", "node_v4", "node_v6", "xdp": [if], "tc_ingress": [if],
"tc_egress": [if], "services": [{"vip", "port", "proto", "mode", "backends": [{"addr", "port",
"local", "weight"}]}], "features": {Features field: value}}
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))

from agent.datapath.api import Datapath, Features  # noqa: E402
from agent.datapath.model import Backend, Mode, Proto, Service, ServiceKey  # noqa: E402


def service_from(d: dict) -> Service:
    key = ServiceKey(d["vip"], d["port"], Proto[d.get("proto", "TCP").upper()])
    backends = tuple(Backend(b["addr"], b["port"], weight=b.get("weight", 1), local=b.get("local", False),
                             terminating=b.get("terminating", False)) for b in d["backends"])
    return Service(key, backends, mode=Mode(d.get("mode", "snat")), maglev_m=d.get("maglev_m", 16381))


def load(cfg: dict) -> Datapath:
    dp = Datapath(instance=cfg["instance"], pin_root=cfg["pin_root"], features=Features(**cfg.get("features", {})))
    dp.load()
    return dp


def apply(cfg: dict, dp: Datapath | None = None) -> dict:
    t0 = time.monotonic()
    own = dp is None
    if own:
        dp = load(cfg)
    adopted = len(dp.services())
    if cfg.get("node_v4") or cfg.get("node_v6"):
        dp.set_node_addresses(v4=cfg.get("node_v4"), v6=cfg.get("node_v6"))
    for ifname in cfg.get("xdp", ()):
        dp.attach_xdp(ifname, netns=cfg["netns"], mode="native")
    for ifname in cfg.get("tc_ingress", ()):
        dp.attach_tc(ifname, "ingress", netns=cfg["netns"])
    for ifname in cfg.get("tc_egress", ()):
        dp.attach_tc(ifname, "egress", netns=cfg["netns"])
    desired = {s.key: s for s in map(service_from, cfg.get("services", ()))}
    written = 0
    for svc in desired.values():
        written += dp.upsert_service(svc).slots_written
    for key in set(dp.services()) - set(desired):
        dp.delete_service(key)
    summary = {"adopted_services": adopted, "services": len(desired), "slots_written": written,
               "seconds": round(time.monotonic() - t0, 3)}
    if own:
        dp.close()
    else:   # --serve: the datapath's counters so far (those that are not zero)
        c = dp.counters()
        summary["stats"] = {k: v for k, v in c.stats.items() if v}
        summary["drops"] = {k: v for k, v in c.drops.items() if v}
    return summary


def main() -> None:
    path = Path(sys.argv[1])
    cfg = json.loads(path.read_text())
    if "--serve" in sys.argv:
        dp = load(cfg)
        print("RESULT " + json.dumps(apply(cfg, dp)), flush=True)
        for _ in sys.stdin:
            print("RESULT " + json.dumps(apply(json.loads(path.read_text()), dp)), flush=True)
        dp.close()
        return
    print("RESULT " + json.dumps(apply(cfg)), flush=True)  # stdout also carries the JSON logs
    if "--hold" in sys.argv:
        while True:
            time.sleep(3600)


if __name__ == "__main__":
    main()
