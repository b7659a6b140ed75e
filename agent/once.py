"""Saying a thing once per process: a poison order listed at every poll is logged the first
time, not every few seconds for ever."""

from __future__ import annotations

from collections.abc import Hashable

# Far more distinct bad orders than a shop sees; small enough to hold for ever.
DEFAULT_SIZE = 10_000


class FirstSeen:
    """Remembers up to `size` keys, forgetting the oldest first (so it stays bounded)."""

    def __init__(self, size: int = DEFAULT_SIZE) -> None:
        self._size = size
        self._seen: dict[Hashable, None] = {}  # insertion-ordered: the oldest comes first

    def first(self, key: Hashable) -> bool:
        """True the first time `key` is seen (or again once it has been forgotten)."""
        if key in self._seen:
            return False
        self._seen[key] = None
        if len(self._seen) > self._size:
            del self._seen[next(iter(self._seen))]
        return True
