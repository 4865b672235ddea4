"""The desired-state store: sources write snapshots into it, reconcilers read them.

One direction only (see docs/architecture.md): a source replaces the whole snapshot (the
file source re-reads the directory; the content fingerprint says whether anything changed),
and every change bumps ``generation`` and wakes the waiters. Snapshots are immutable, so a
reconciler that started on generation N keeps a consistent view while N+1 arrives.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any

__all__ = ["Snapshot", "Store"]


def _empty_objects():
    from agent.config import ObjectSet

    return ObjectSet.from_objects([])


@dataclass(frozen=True)
class Snapshot:
    generation: int
    objects: Any                          # agent.config.ObjectSet
    errors: tuple = ()                    # agent.config.ConfigError, one per rejected document
    ignored: tuple[str, ...] = ()         # documents of kinds vipd does not use
    fingerprint: str = ""                 # content hash of the source (unchanged -> no new generation)
    source: str = ""                      # e.g. the config directory
    kept: tuple[str, ...] = ()            # objects whose invalid edit was rejected (previous version kept)
    loaded_at: float = field(default_factory=time.time)


class Store:
    def __init__(self) -> None:
        self._snapshot = Snapshot(generation=0, objects=None)
        self._changed = asyncio.Event()

    @property
    def current(self) -> Snapshot:
        return self._snapshot

    def replace(self, objects, *, errors=(), ignored=(), fingerprint: str = "", source: str = "",
                kept=()) -> bool:
        """Install a new snapshot; False (nothing happens) when the fingerprint is unchanged."""
        if fingerprint and fingerprint == self._snapshot.fingerprint and self._snapshot.generation:
            return False
        self._snapshot = Snapshot(generation=self._snapshot.generation + 1, objects=objects,
                                  errors=tuple(errors), ignored=tuple(ignored),
                                  fingerprint=fingerprint, source=source, kept=tuple(kept))
        # Wake everyone waiting, then re-arm for the next change.
        self._changed.set()
        self._changed = asyncio.Event()
        return True

    async def wait_for_change(self, after_generation: int) -> Snapshot:
        """Return the first snapshot newer than ``after_generation``."""
        while self._snapshot.generation <= after_generation:
            await self._changed.wait()
        return self._snapshot

    def objects(self):
        return self._snapshot.objects if self._snapshot.objects is not None else _empty_objects()
