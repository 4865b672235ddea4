"""A per-pass memo for pure functions of unchanged objects.

The file source hands out the *same* objects for unchanged files (``ParseCache``), so work
derived from one object — its effective copy, its datapath frontends, the prefixes it
announces — can be reused by identity from one pass to the next. At 20,000 Services this
turns a ~6 s pass into a fraction of a second when one Service changes.

An entry is found by ``(kind, id(anchor))`` and valid while the anchor is the very same object
(``is``) and ``extra`` (the other inputs: related objects, plain values) compares equal —
tuples compare their items by identity first, so unchanged objects cost a pointer compare.
The memo keeps a reference to every anchor, so an id cannot be reused while its entry lives.
``rotate()`` after each pass drops what the pass did not use, so the memo never holds more
than two passes' worth.
"""

from __future__ import annotations

from typing import Any, Callable

__all__ = ["Memo"]


class Memo:
    def __init__(self) -> None:
        self._old: dict = {}
        self._new: dict = {}
        self.hits = self.misses = 0

    def get(self, kind: Any, anchor: object, extra: tuple, compute: Callable[..., Any], *args) -> Any:
        """The value for (kind, anchor, extra); else ``compute(*args)``, remembered. One entry
        per (kind, anchor): ``kind`` must tell apart results that coexist in a pass."""
        key = (kind, id(anchor))
        hit = self._new.get(key)
        if hit is None:
            hit = self._old.get(key)
        if hit is not None and hit[0] is anchor and hit[1] == extra:
            self._new[key] = hit
            self.hits += 1
            return hit[2]
        self.misses += 1
        value = compute(*args)
        self._new[key] = (anchor, extra, value)
        return value

    def rotate(self) -> None:
        """End of a pass: forget entries this pass did not use."""
        self._old, self._new = self._new, {}
