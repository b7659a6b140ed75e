"""A client-side token bucket, so an adapter stays under a platform's per-minute limit instead
of learning it from 429s."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

# The bucket holds this share of a minute's requests: a burst after a quiet spell. Any 60-s
# window then sees at most (1 + BURST_SHARE) x per_minute requests, which callers keep under
# the platform's own limit (see KinguinOptions).
BURST_SHARE = 0.05


class TokenBucket:
    """`per_minute` requests a minute on average, bursts of BURST_SHARE of that. Waiters are
    served in turn; the clock is monotonic, so a wall-clock jump neither stalls nor floods."""

    def __init__(
        self,
        per_minute: int,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        if per_minute < 1:
            raise ValueError("per_minute must be at least 1")
        self.rate = per_minute / 60.0  # tokens per second
        self.capacity = max(1.0, per_minute * BURST_SHARE)
        self._clock = clock
        self._sleep = sleep
        self._tokens = self.capacity
        self._at = clock()
        self._lock = asyncio.Lock()
        self.waited = 0.0  # seconds callers spent waiting, for tests and logs

    def _refill(self) -> None:
        now = self._clock()
        self._tokens = min(self.capacity, self._tokens + (now - self._at) * self.rate)
        self._at = now

    async def acquire(self) -> None:
        """Returns once a request may be sent."""
        async with self._lock:  # one waiter at a time: the others queue behind it, in order
            self._refill()
            if self._tokens < 1.0:
                wait = (1.0 - self._tokens) / self.rate
                self.waited += wait
                await self._sleep(wait)
                self._refill()
            self._tokens -= 1.0
