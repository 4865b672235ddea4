"""How late the event loop runs: a task that sleeps ``interval`` and measures how much later it
woke. A parse, a big reconcile pass or a blocking call on the loop shows up here; the BGP
keepalive and hold timers run on this loop, so a lag near the hold time loses sessions.

Exposed as ``vipd_event_loop_lag_seconds_max`` (since start) and logged when a single stall
exceeds ``warn_s``.
"""

from __future__ import annotations

import asyncio


class LoopLagMonitor:
    def __init__(self, *, interval: float = 0.01, warn_s: float = 0.1, log=None):
        self.interval = interval
        self.warn_s = warn_s
        self.log = log
        self.max_lag = 0.0
        self.stalls = 0          # wake-ups later than warn_s

    async def run(self, stop: asyncio.Event) -> None:
        loop = asyncio.get_running_loop()
        while not stop.is_set():
            t0 = loop.time()
            await asyncio.sleep(self.interval)
            lag = loop.time() - t0 - self.interval
            if lag > self.max_lag:
                self.max_lag = lag
            if lag > self.warn_s:
                self.stalls += 1
                if self.log is not None:
                    self.log.warning("event loop stalled", lag_s=round(lag, 3))
