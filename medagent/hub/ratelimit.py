"""Token buckets keyed by a string (a client id, a client address), for the hub's token endpoint.

Theory of operation
-------------------
Each key has a bucket of ``burst`` tokens refilled at ``per_minute / 60`` tokens per second
(a leaky bucket, as in RFC 6585 §4's "too many requests in a given amount of time"). A request
takes one token; with none left it is refused and told how long until the next token
(``Retry-After``, whole seconds, at least 1). The clock is ``time.monotonic`` unless one is
given (tests and the hub both use the real one; a test only needs "more than ``burst`` requests").

Memory is bounded: at most ``max_keys`` buckets are kept. When a new key would exceed that,
buckets that have refilled completely (indistinguishable from a new bucket) are dropped first,
then the least recently used one; an attacker rotating addresses thus costs memory O(max_keys),
never more.

Invariant: ``take`` never blocks and never raises for any key; a refused request consumes nothing.
"""

from __future__ import annotations

import collections
import math
import time
from collections.abc import Callable

__all__ = ["RateLimiter"]


class RateLimiter:
    """``take(key)`` -> 0.0 when allowed, else the seconds to wait before the next try."""

    def __init__(self, per_minute: float, burst: int, max_keys: int = 10_000,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if per_minute <= 0 or burst < 1 or max_keys < 1:
            raise ValueError("a rate limit needs per_minute > 0, burst >= 1 and max_keys >= 1")
        self._rate = per_minute / 60.0
        self._burst = float(burst)
        self._max_keys = max_keys
        self._clock = clock
        #: key -> (tokens, time of that count); ordered by last use
        self._buckets: collections.OrderedDict[str, tuple[float, float]] = collections.OrderedDict()

    def take(self, key: str) -> float:
        now = self._clock()
        tokens, stamp = self._buckets.get(key, (self._burst, now))
        tokens = min(self._burst, tokens + (now - stamp) * self._rate)
        if tokens >= 1.0:
            self._store(key, tokens - 1.0, now)
            return 0.0
        self._store(key, tokens, now)
        return (1.0 - tokens) / self._rate

    @staticmethod
    def retry_after(wait_s: float) -> str:
        """The ``Retry-After`` header value (RFC 9110 §10.2.3: delay-seconds) for a wait."""
        return str(max(1, math.ceil(wait_s)))

    def __len__(self) -> int:
        return len(self._buckets)

    def _store(self, key: str, tokens: float, now: float) -> None:
        self._buckets[key] = (tokens, now)
        self._buckets.move_to_end(key)
        if len(self._buckets) > self._max_keys:
            self._prune(now)

    def _prune(self, now: float) -> None:
        full = [k for k, (tokens, stamp) in self._buckets.items()
                if tokens + (now - stamp) * self._rate >= self._burst]
        for key in full[: len(self._buckets) - self._max_keys]:
            del self._buckets[key]
        while len(self._buckets) > self._max_keys:
            self._buckets.popitem(last=False)
