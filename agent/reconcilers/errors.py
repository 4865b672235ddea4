"""Reconcile errors with per-(reconciler, instance) exponential backoff.

A failing reconciler records its error here and the controller retries it later; the
other reconcilers (and the other instances of the same reconciler) carry on. The recorded
errors are what Cilium reports as the ``cilium.io/BGPReconcileError`` condition of the
CiliumBGPNodeConfig: lines of ``<instance>: <error>``.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["ErrorBook", "ErrorRecord", "backoff_delay"]

BACKOFF_BASE = 1.0
BACKOFF_FACTOR = 2.0
BACKOFF_MAX = 30.0


def backoff_delay(attempts: int, *, base: float = BACKOFF_BASE, factor: float = BACKOFF_FACTOR,
                  cap: float = BACKOFF_MAX) -> float:
    """Delay before retry number ``attempts`` (1 = after the first failure): 1, 2, 4, ... 30 s."""
    return min(cap, base * factor ** max(attempts - 1, 0))


@dataclass
class ErrorRecord:
    reconciler: str
    instance: str
    error: str
    attempts: int
    since: float          # first failure of this streak
    retry_at: float       # monotonic-ish time (the same clock as ``now``) of the next attempt


class ErrorBook:
    """``record`` on failure, ``clear`` on success; ``due(now)`` says whether a retry is due."""

    def __init__(self) -> None:
        self._records: dict[tuple[str, str], ErrorRecord] = {}
        self.totals: dict[str, int] = {}  # reconciler -> failures ever recorded (a counter metric)

    def record(self, reconciler: str, instance: str, error: BaseException | str, now: float) -> ErrorRecord:
        key = (reconciler, instance)
        self.totals[reconciler] = self.totals.get(reconciler, 0) + 1
        text = (str(error) or type(error).__name__) if isinstance(error, BaseException) else error
        prev = self._records.get(key)
        attempts = prev.attempts + 1 if prev else 1
        rec = ErrorRecord(reconciler, instance, text, attempts, prev.since if prev else now,
                          now + backoff_delay(attempts))
        self._records[key] = rec
        return rec

    def clear(self, reconciler: str, instance: str) -> bool:
        return self._records.pop((reconciler, instance), None) is not None

    def clear_missing(self, reconciler: str, instances: set[str]) -> None:
        """Forget errors of instances that no longer exist."""
        for key in [k for k in self._records if k[0] == reconciler and k[1] not in instances]:
            del self._records[key]

    def records(self) -> list[ErrorRecord]:
        return sorted(self._records.values(), key=lambda r: (r.instance, r.reconciler))

    def next_retry(self) -> float | None:
        return min((r.retry_at for r in self._records.values()), default=None)

    def by_instance(self) -> dict[str, list[str]]:
        """The shape ``node_config_status`` takes: instance -> error strings."""
        out: dict[str, list[str]] = {}
        for r in self.records():
            out.setdefault(r.instance, []).append(f"{r.reconciler}: {r.error}")
        return out

    def __bool__(self) -> bool:
        return bool(self._records)
