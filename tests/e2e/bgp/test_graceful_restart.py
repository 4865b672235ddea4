"""Graceful restart (RFC 4724) as the restarting speaker, against FRR as the helper.

``kill -9`` is the worst case of an agent restart: no NOTIFICATION, the kernel just closes the
TCP connection. FRR must keep our routes (stale) for the restart time we advertised; a speaker
that comes back in time re-sends its table and End-of-RIB, and FRR never withdraws anything.
"""

from __future__ import annotations

import signal
import time

import pytest

from agent.lab import wait_until
from agent.lab.peers import Neighbor

from bgp_helpers import (PEER_ADDRS, PEER_ASNS, SPEAKER_V4, learned, neighbor, peer_established,
                         wait_established, wait_routes)

RESTART_TIME = 8
PREFIXES = [f"10.9.{i}.0/24" for i in range(5)]


def test_kill9_keeps_routes_stale_then_restart_converges_without_withdrawal(bgp):
    peer_v4 = PEER_ADDRS["frr"][0]
    daemon = bgp.peer("frr", [Neighbor(SPEAKER_V4, 65001, passive=True, graceful_restart=True)],
                      graceful_restart=True,
                      extra_global_config="log timestamp precision 3\nlog stdout debugging\ndebug bgp updates in")
    spk = bgp.speaker([neighbor(peer_v4, PEER_ASNS["frr"], graceful_restart=True, restart_time=RESTART_TIME)],
                      [{"neighbor": peer_v4, "prefix": p, "attrs": {}} for p in PREFIXES])
    wait_established(spk, daemon, SPEAKER_V4, peer_v4)
    wait_routes(daemon, PREFIXES)
    caps = daemon.sessions()[SPEAKER_V4].raw
    assert caps["neighborCapabilities"]["gracefulRestart"] == "advertisedAndReceived", caps["neighborCapabilities"]
    assert caps["gracefulRestartInfo"]["timers"]["receivedRestartTimer"] == RESTART_TIME

    # 1. kill -9, come back within the restart time: nothing is ever withdrawn at FRR.
    log_mark = len(daemon.log())
    spk.kill9()
    killed = time.monotonic()
    stale = wait_until(lambda: (lambda r: r if set(r) == set(PREFIXES) and all(x.stale for x in r.values())
                                else None)(learned(daemon)),
                       timeout=RESTART_TIME - 1, interval=0.1, what="FRR marks our routes stale")
    assert set(stale) == set(PREFIXES)
    assert daemon.sessions()[SPEAKER_V4].state != "established"
    time.sleep(max(0.0, RESTART_TIME / 2 - (time.monotonic() - killed)))
    assert set(learned(daemon)) == set(PREFIXES), "stale routes must survive while the restart timer runs"

    spk.start()
    wait_established(spk, daemon, SPEAKER_V4, peer_v4, timeout=RESTART_TIME)
    wait_until(lambda: (lambda r: set(r) == set(PREFIXES) and not any(x.stale for x in r.values()))(learned(daemon)),
               timeout=10, interval=0.1, what="routes refreshed (not stale) after the restart")
    frr_log = daemon.log()[log_mark:]
    assert f"rcvd End-of-RIB for IPv4 Unicast from {SPEAKER_V4}" in frr_log, frr_log[-3000:]
    withdrawn = [line for line in frr_log.splitlines() if "withdrawn" in line]
    assert withdrawn == [], withdrawn
    eor = daemon.sessions()[SPEAKER_V4].raw["gracefulRestartInfo"]["endOfRibRecv"]
    assert eor.get("ipv4Unicast") is True, eor

    # 2. kill -9 and stay away: FRR keeps the stale routes for the restart time, then drops them.
    spk.kill9()
    killed = time.monotonic()
    wait_until(lambda: all(r.stale for r in learned(daemon).values()) and len(learned(daemon)) == len(PREFIXES),
               timeout=RESTART_TIME - 1, interval=0.1, what="stale again after the second kill")
    wait_until(lambda: learned(daemon) == {}, timeout=RESTART_TIME + 5, interval=0.1,
               what="stale routes removed when the restart time expires")
    held = time.monotonic() - killed
    assert held >= RESTART_TIME - 1, f"stale routes dropped after {held:.1f}s, restart time is {RESTART_TIME}s"


@pytest.mark.parametrize("kind", ["frr", "gobgp"])
def test_runner_planned_restart_keeps_routes_and_shutdown_withdraws_them(bgp, kind):
    """`python -m agent.bgp`: SIGUSR1 (planned restart) closes TCP without NOTIFICATION and the
    router keeps our routes; SIGTERM (deliberate shutdown) sends Cease and the router withdraws
    them at once, not after the restart time."""
    peer_v4 = PEER_ADDRS[kind][0]
    extra = {"extra_global_config": "log stdout debugging\ndebug bgp updates in"} if kind == "frr" else {}
    daemon = bgp.peer(kind, [Neighbor(SPEAKER_V4, 65001, passive=True, graceful_restart=True)],
                      graceful_restart=True, **extra)
    config = {"speaker": {"asn": 65001, "router_id": SPEAKER_V4},
              "neighbors": [neighbor(peer_v4, PEER_ASNS[kind], graceful_restart=True, restart_time=60)],
              "paths": [{"neighbor": peer_v4, "prefix": p, "attrs": {"communities": ["65000:7"]}}
                        for p in PREFIXES]}
    runner = bgp.runner(config)
    wait_until(lambda: runner.established(peer_v4) and peer_established(daemon, SPEAKER_V4), timeout=20,
               what="runner session Established")
    wait_routes(daemon, PREFIXES)

    log_mark = len(daemon.log())
    assert runner.signal(signal.SIGUSR1) == 0
    wait_until(lambda: (lambda r: set(r) == set(PREFIXES) and all(x.stale for x in r.values()))(learned(daemon)),
               timeout=5, interval=0.1, what="routes kept as stale after the planned restart")
    assert "notification" not in daemon.log()[log_mark:].lower(), daemon.log()[log_mark:]

    runner.start()
    wait_until(lambda: runner.established(peer_v4) and peer_established(daemon, SPEAKER_V4), timeout=20,
               what="runner session Established again")
    wait_until(lambda: (lambda r: set(r) == set(PREFIXES) and not any(x.stale for x in r.values()))(learned(daemon)),
               timeout=10, interval=0.1, what="routes refreshed after the restart")
    if kind == "frr":
        assert [l for l in daemon.log()[log_mark:].splitlines() if "withdrawn" in l] == []

    assert runner.signal(signal.SIGTERM) == 0
    stopped = time.monotonic()
    wait_until(lambda: learned(daemon) == {}, timeout=10, interval=0.1,
               what="routes withdrawn after a deliberate shutdown (Cease)")
    assert time.monotonic() - stopped < 10  # far below the 60 s restart time
    assert "notification" in daemon.log()[log_mark:].lower()
