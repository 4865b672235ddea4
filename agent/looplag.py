"""How late the event loop runs: a task that sleeps ``interval`` and measures how much later it
woke. A parse, a big reconcile pass or a blocking call on the loop shows up here; the BGP
keepalive and hold timers run on this loop, so a lag near the hold time loses sessions.

Two figures, because a late wake-up has two causes: the loop was busy running vipd's code
(something to fix in vipd), or it was ready but not running (the kernel ran other processes on a
loaded machine, or another thread held the GIL). ``busy`` is the part of each lag during which
the loop's own thread was on the CPU (``time.thread_time``), so ``max_busy_lag`` is the longest
the loop itself was held by work.

Exposed as ``vipd_event_loop_lag_seconds_max`` and ``vipd_event_loop_busy_lag_seconds_max``
(since start); each wake-up later than ``warn_s`` is logged with both.
"""

from __future__ import annotations

import asyncio
import time


class LoopLagMonitor:
    def __init__(self, *, interval: float = 0.01, warn_s: float = 0.1, log=None):
        self.interval = interval
        self.warn_s = warn_s
        self.log = log
        self.max_lag = 0.0
        self.max_busy_lag = 0.0
        self.stalls = 0          # wake-ups later than warn_s

    async def run(self, stop: asyncio.Event) -> None:
        loop = asyncio.get_running_loop()
        while not stop.is_set():
            t0, cpu0 = loop.time(), time.thread_time()
            await asyncio.sleep(self.interval)
            lag = loop.time() - t0 - self.interval
            busy = min(lag, time.thread_time() - cpu0)
            self.max_lag = max(self.max_lag, lag)
            self.max_busy_lag = max(self.max_busy_lag, busy)
            if lag > self.warn_s:
                self.stalls += 1
                if self.log is not None:
                    self.log.warning("event loop stalled", lag_s=round(lag, 3),
                                     busy_s=round(busy, 3))
