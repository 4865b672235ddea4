"""The vipd speaker as the benchmark's sender, in its own process (so its peak RSS is its own).

Started by ``bgp_scale.py`` inside the sender namespace. It adds one neighbor and then the whole
table in the same event-loop pass (as a restarting agent does), so the first UPDATEs after
Established carry the full table. Signals: SIGUSR1 withdraws every prefix, SIGTERM stops.
One JSON line on stdout reports how long the API calls took.

    python benchmarks/bench_speaker.py --peer 10.0.0.2 --peer-asn 65000 --prefixes 100000
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import json
import signal
import sys
import time

from agent.bgp.api import BgpSpeaker, Family, NeighborConfig, PathAttributes, SpeakerConfig

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from prefixes import bench_prefix_sets  # noqa: E402  (benchmarks/ is not a package)


def report(**fields) -> None:
    print(json.dumps(fields), flush=True)


async def run(args) -> None:
    speaker = BgpSpeaker(SpeakerConfig(asn=args.asn, router_id=args.router_id))
    await speaker.start()
    sets = bench_prefix_sets(args.prefixes, args.sets)
    attrs = [PathAttributes(communities=((args.asn << 16) | i,)) for i in range(len(sets))]
    await speaker.add_neighbor(NeighborConfig(address=args.peer, peer_asn=args.peer_asn,
                                              families=(Family.IPV4_UNICAST,), connect_retry=1))
    t0 = time.perf_counter()
    for set_attrs, prefixes in zip(attrs, sets):
        for prefix in prefixes:
            speaker.advertise(args.peer, Family.IPV4_UNICAST, prefix, set_attrs)
    report(event="advertised", prefixes=args.prefixes, api_seconds=round(time.perf_counter() - t0, 3))

    loop = asyncio.get_running_loop()
    done = asyncio.Event()

    def withdraw_all() -> None:
        t = time.perf_counter()
        for prefixes in sets:
            for prefix in prefixes:
                speaker.withdraw(args.peer, Family.IPV4_UNICAST, prefix)
        report(event="withdrawn", api_seconds=round(time.perf_counter() - t, 3))

    loop.add_signal_handler(signal.SIGUSR1, withdraw_all)
    loop.add_signal_handler(signal.SIGTERM, done.set)
    await done.wait()
    await speaker.stop(notify=True, message="benchmark done")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--asn", type=int, default=65001)
    p.add_argument("--router-id", default="10.0.0.1")
    p.add_argument("--peer", required=True)
    p.add_argument("--peer-asn", type=int, required=True)
    p.add_argument("--prefixes", type=int, default=100_000)
    p.add_argument("--sets", type=int, default=10)
    p.add_argument("--profile", help="write cProfile stats here on exit")
    args = p.parse_args()
    if args.profile:
        prof = cProfile.Profile()
        prof.enable()
        try:
            asyncio.run(run(args))
        finally:
            prof.disable()
            prof.dump_stats(args.profile)
    else:
        asyncio.run(run(args))


if __name__ == "__main__":
    main()
