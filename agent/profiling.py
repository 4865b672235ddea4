"""``VIPD_PROFILE=FILE vipd run ...``: a cProfile of the agent's start-up, every thread of it.

Off unless the variable is set. The profile starts when ``run_agent`` starts and is written to
FILE (``{pid}`` in it: the agent's PID, so restarts do not overwrite each other) when the
start-up passes are done (just before "vipd running": the datapath programmed,
every VIP announced). Threads started meanwhile (the asyncio worker threads: capacity plan,
datapath load, map writes) get their own profiler, merged into FILE. Read it with
``python -m pstats FILE`` (``sort cumtime``, ``stats 40``). The configuration parser process
and the BPF loader child are other processes and are not in it.
"""

from __future__ import annotations

import cProfile
import os
import pstats
import threading

__all__ = ["ENV_VAR", "StartupProfile"]

ENV_VAR = "VIPD_PROFILE"


class StartupProfile:
    def __init__(self, path: str):
        self.path = path
        self._profiles: list[cProfile.Profile] = []
        self._lock = threading.Lock()

    @classmethod
    def from_env(cls) -> "StartupProfile | None":
        path = os.environ.get(ENV_VAR)
        return cls(path.replace("{pid}", str(os.getpid()))) if path else None

    def start(self) -> None:
        main = cProfile.Profile()
        self._profiles.append(main)
        threading.setprofile(self._in_new_thread)   # runs in each thread started from now on
        main.enable()

    def _in_new_thread(self, frame, event, arg) -> None:
        prof = cProfile.Profile()
        with self._lock:
            self._profiles.append(prof)
        prof.enable()                               # replaces this hook for the thread

    def write(self) -> str:
        """Stop profiling and write the merged profile; returns the path."""
        threading.setprofile(None)
        main, *others = self._profiles
        main.disable()
        stats = pstats.Stats(main)
        with self._lock:
            for prof in others:
                try:
                    stats.add(prof)
                except (TypeError, ValueError):   # a thread that recorded nothing
                    pass
        stats.dump_stats(self.path)
        return self.path
