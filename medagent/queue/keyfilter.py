"""Which duplicate keys the queue has certainly never stored: lets the duplicate check skip its
SQLite lookup for a new message (issue 19, one sender).

Why: every keyed record is checked against earlier rows with its (channel, sender, control id)
inside the duplicate window. Almost every record is new, yet the check was an SQLite query per
lone record (a read transaction on the WAL: locks, a B-tree seek). Measured at one lock-step
sender in fast mode (benchmarks/perf-log.md): with the check turned off the agent spent 16-56 µs
less CPU per message and answered 8-33 % more messages per second. This filter answers "not
stored" for almost every new key from memory, so the query runs only for a key that may be there.

What it is: Bloom filters (k = 3 bit positions per key, ~8 bits per key at capacity: ~3 % false
positives per full generation) in generations, each covering up to a third of the duplicate window
of receive times; a lookup ORs the generations that hold keys received inside the record's window
(~7 % false positives over the four a window spans, measured). A false positive
costs the SQLite query the store always ran; there are no false negatives for the keys it was
given. Memory is at most `max_bytes`: ~1.5 bytes per key received in one window (32 MB: an hour's
window at ~6k keyed messages per second).

What it covers: only keys added since the store opened. `covers(oldest)` says whether every row
the store may hold from `oldest` on had its key added: false for windows that reach back before
the store opened (rows written by an earlier process: `covered_after`, from the table's newest
rows) or into a generation dropped early (the memory cap, or a clock that stepped back). The
store then asks SQLite, exactly as without the filter.
"""

from __future__ import annotations

import math
from collections.abc import Hashable

__all__ = ["KeyFilter"]

_BITS_PER_KEY = 8  # with 3 hashes: ~3 % false positives when a generation is full
_HEADROOM = 1.1  # a generation is sized for the rate seen so far plus this margin (one filled early
# simply starts the next: the margin is memory held by every live generation)
_SLICES = 3  # generations per window: memory ~(1 + 1/_SLICES) windows of keys, misses test each
_MIN_KEYS = 1 << 14
_HASH_MASK = (1 << 64) - 1


class _Generation:
    __slots__ = ("bits", "capacity", "count", "first_at", "nbits", "newest_at")

    def __init__(self, capacity: int, first_at: float) -> None:
        self.capacity = capacity
        self.nbits = capacity * _BITS_PER_KEY
        self.bits = bytearray((self.nbits + 7) // 8)
        self.count = 0
        self.first_at = first_at
        self.newest_at = first_at

    # Three positions by double hashing from one 64-bit hash; written out in add/has because
    # both run once per keyed message on the event loop (a helper call costs as much as the test).
    def add(self, h: int, received_at: float) -> None:
        bits, nbits = self.bits, self.nbits
        step = (h >> 32) | 1
        p = h % nbits
        bits[p >> 3] |= 1 << (p & 7)
        p = (p + step) % nbits
        bits[p >> 3] |= 1 << (p & 7)
        p = (p + step) % nbits
        bits[p >> 3] |= 1 << (p & 7)
        self.count += 1
        self.newest_at = max(self.newest_at, received_at)

    def has(self, h: int) -> bool:
        bits, nbits = self.bits, self.nbits
        step = (h >> 32) | 1
        p = h % nbits
        if not bits[p >> 3] & (1 << (p & 7)):
            return False
        p = (p + step) % nbits
        if not bits[p >> 3] & (1 << (p & 7)):
            return False
        p = (p + step) % nbits
        return bool(bits[p >> 3] & (1 << (p & 7)))


class KeyFilter:
    """An approximate set of the keys added, by receive time; see the module docstring."""

    def __init__(self, window_s: float, *, covered_after: float = -math.inf, max_bytes: int = 32 << 20) -> None:
        """`covered_after`: the newest receive time of a row already stored when the store
        opened (-inf for an empty table); `max_bytes`: the memory cap of all generations."""
        self._window_s = max(float(window_s), 0.0)
        self._slice_s = max(self._window_s / _SLICES, 1.0)
        self._covered_after = covered_after
        self._max_bytes = max(int(max_bytes), _MIN_KEYS * _BITS_PER_KEY // 8)
        self._generations: list[_Generation] = []  # oldest first
        self.lookups_skipped = 0

    @property
    def nbytes(self) -> int:
        return sum(len(g.bits) for g in self._generations)

    def covers(self, oldest: float) -> bool:
        """True when every row received at `oldest` or later had its key added."""
        return oldest > self._covered_after

    def may_contain(self, key: Hashable, oldest: float) -> bool:
        """False only when no key equal to `key` received at `oldest` or later was added (given
        `covers(oldest)`; otherwise the answer means nothing)."""
        h = hash(key) & _HASH_MASK
        for generation in self._generations:
            if generation.newest_at >= oldest and generation.has(h):
                return True
        self.lookups_skipped += 1
        return False

    def add(self, key: Hashable, received_at: float) -> None:
        generations = self._generations
        current = generations[-1] if generations else None
        if current is None or current.count >= current.capacity or received_at - current.first_at > self._slice_s:
            current = self._start_generation(current, received_at)
        current.add(hash(key) & _HASH_MASK, received_at)

    def _start_generation(self, previous: _Generation | None, received_at: float) -> _Generation:
        capacity = _MIN_KEYS
        if previous is not None:  # sized for the rate seen over a whole slice
            span = max(previous.newest_at - previous.first_at, 1.0)
            capacity = max(capacity, math.ceil(previous.count / span * self._slice_s * _HEADROOM))
        capacity = min(capacity, self._max_bytes * 8 // _BITS_PER_KEY)
        self._drop_expired(received_at)
        generations = self._generations
        budget = self._max_bytes - capacity * _BITS_PER_KEY // 8
        while generations and self.nbytes > budget:  # the memory cap: forget the oldest keys
            self._forget(generations[0])
        generation = _Generation(capacity, received_at)
        generations.append(generation)
        return generation

    def _drop_expired(self, now: float) -> None:
        """Generations whose newest key is older than any window still to be checked."""
        generations = self._generations
        while generations and generations[0].newest_at < now - self._window_s:
            self._forget(generations[0])

    def _forget(self, generation: _Generation) -> None:
        """Drop the oldest generation: windows reaching into its keys are no longer covered."""
        self._generations.remove(generation)
        self._covered_after = max(self._covered_after, generation.newest_at)
