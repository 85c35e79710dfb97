"""The agent's stats document: Medplum's `agent:stats` shape plus medagent's own figures.

Theory of operation
-------------------
Medplum's agent answers `agent:stats:request` with ``{hl7ConnectionsOpen, ping, live,
outstandingHeartbeats, webSocketQueueDepth, hl7QueueDepth, hl7ClientCount, channelStats,
clientStats}`` where ``channelStats[name].rtt = {count, min, max, average, p50, p95, p99,
pendingCount}`` (channel-stats-tracker.ts: the last 1000 samples, -1 when there are none,
pending entries forgotten after 5 min; medplum-next-waves.md §0, §2.5). :func:`build_stats`
keeps every key the runtime already reports (the dashboard reads them) and adds those, plus
ours: per-channel rates over 1/5/15 minutes, queue depth and the age of the oldest unconfirmed
message, kernels, event loop, uptime and data-directory disk use.

* :class:`RttTracker` measures a message's round trip over the link: from the moment the
  dispatcher hands its transmit to the link until the hub answers it (a confirmation, a bot
  reply or an error, whichever comes first). It sees these events through two thin proxies
  (:meth:`RttTracker.wrap_link`, :meth:`RttTracker.wrap_handler`) so neither the dispatcher
  nor the link knows it exists.
* :class:`RateMeter` turns cumulative counters into rates: it keeps one sample per
  ``interval_s`` for 15 minutes and divides the difference to the sample nearest the window's
  start by the time between them (a counter that went down restarts the window; a counter
  missing from a sample, e.g. of a channel added since, counts as 0 there).

Invariants: memory is bounded (1000 RTT samples per channel, ``PENDING_MAX`` pending sends,
15 min / interval rate samples); nothing here reads message bodies.
"""

from __future__ import annotations

import asyncio
import collections
import math
import os
import shutil
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = ["RATE_WINDOWS_S", "RateMeter", "RttTracker", "build_stats", "directory_usage", "rtt_summary"]

#: Medplum's window: the last 1000 round trips per channel.
RTT_WINDOW = 1000
#: Medplum forgets a pending send after 5 minutes.
PENDING_TTL_S = 300.0
#: A hard bound on pending sends (a link that never answers must not grow memory).
PENDING_MAX = 100_000
#: How often a send looks for pending entries past PENDING_TTL_S (not on every send: per-message
#: glue on the one-sender hot path, issue 19).
EXPIRE_EVERY_S = 1.0
RATE_WINDOWS_S: dict[str, float] = {"1m": 60.0, "5m": 300.0, "15m": 900.0}


def _percentile(ordered: Sequence[float], fraction: float) -> float:
    """Nearest-rank percentile of an ascending sequence (non-empty)."""
    rank = max(1, math.ceil(fraction * len(ordered)))
    return ordered[rank - 1]


def rtt_summary(samples: Iterable[float], pending: int) -> dict[str, float | int]:
    """Medplum's RttStats: ``{count, min, max, average, p50, p95, p99, pendingCount}``, -1 if empty."""
    ordered = sorted(samples)
    if not ordered:
        return {"count": 0, "min": -1, "max": -1, "average": -1, "p50": -1, "p95": -1, "p99": -1,
                "pendingCount": pending}
    return {
        "count": len(ordered),
        "min": round(ordered[0], 3),
        "max": round(ordered[-1], 3),
        "average": round(sum(ordered) / len(ordered), 3),
        "p50": round(_percentile(ordered, 0.50), 3),
        "p95": round(_percentile(ordered, 0.95), 3),
        "p99": round(_percentile(ordered, 0.99), 3),
        "pendingCount": pending,
    }


class RttTracker:
    """Round trips (ms) per channel, keyed by the transmit's callback."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._pending: dict[str, tuple[str, float]] = {}  # callback -> (channel, sent at); insertion-ordered
        self._samples: dict[str, collections.deque[float]] = {}
        self._expire_due = -math.inf

    def sent(self, callback: str | None, channel: str | None) -> None:
        if not callback or channel is None:
            return
        now = self._clock()
        pending = self._pending
        pending[callback] = (channel, now)
        if len(pending) > PENDING_MAX:
            pending.pop(next(iter(pending)))
        if now >= self._expire_due:  # amortised: one look at the oldest entry per second, not per send
            self._expire_due = now + EXPIRE_EVERY_S
            self._expire(now)

    def answered(self, callback: str | None) -> None:
        entry = self._pending.pop(callback, None) if callback else None
        if entry is not None:
            self._sample(entry, self._clock())

    def answered_all(self, callbacks: Sequence[str]) -> None:
        """:meth:`answered` for a batch (a confirmation frame): one clock read for all of them."""
        pop = self._pending.pop
        now: float | None = None
        for callback in callbacks:
            entry = pop(callback, None)
            if entry is not None:
                if now is None:
                    now = self._clock()
                self._sample(entry, now)

    def _sample(self, entry: tuple[str, float], now: float) -> None:
        channel, sent_at = entry
        window = self._samples.get(channel)
        if window is None:
            window = self._samples[channel] = collections.deque(maxlen=RTT_WINDOW)
        window.append((now - sent_at) * 1000.0)

    def _expire(self, now: float) -> None:
        # Oldest first (dicts keep insertion order): stop at the first young entry.
        while self._pending:
            callback, (_, sent_at) = next(iter(self._pending.items()))
            if now - sent_at < PENDING_TTL_S:
                return
            del self._pending[callback]

    def summary(self, channel: str) -> dict[str, float | int]:
        pending = sum(1 for name, _ in self._pending.values() if name == channel)
        return rtt_summary(self._samples.get(channel, ()), pending)

    # -- the proxies: the link sees a handler, the dispatcher sees a link --------------------------
    def wrap_link(self, link: Any) -> Any:
        return _TrackedLink(link, self)

    def wrap_handler(self, handler: Any) -> Any:
        return _TrackedHandler(handler, self)


class _TrackedLink:
    """The link as the dispatcher sees it: every successful ``send_transmit`` starts a round trip.

    ``live`` and ``features`` are read on every send: they are forwarded explicitly, because the
    ``__getattr__`` fallback first fails a normal lookup (an AttributeError raised and cleared
    inside CPython per access)."""

    def __init__(self, link: Any, tracker: RttTracker) -> None:
        self._link = link
        self._send = link.send_transmit
        self._sent = tracker.sent

    def send_transmit(self, message: Any) -> bool:
        if self._send(message):
            self._sent(message.callback, message.channel)
            return True
        return False

    @property
    def live(self) -> Any:
        return self._link.live

    @property
    def features(self) -> Any:
        return self._link.features

    def __getattr__(self, name: str) -> Any:
        return getattr(self._link, name)


class _TrackedHandler:
    """The dispatcher as the link sees it: confirmations, replies and errors end round trips."""

    def __init__(self, handler: Any, tracker: RttTracker) -> None:
        self._handler = handler
        self._tracker = tracker

    def on_confirmed(self, callbacks: Sequence[str]) -> None:
        self._tracker.answered_all(callbacks)
        self._handler.on_confirmed(callbacks)

    def on_transmit_response(self, message: Any) -> None:
        self._tracker.answered(message.callback)
        self._handler.on_transmit_response(message)

    def on_transmit_error(self, callback: str | None, reason: str) -> None:
        self._tracker.answered(callback)
        self._handler.on_transmit_error(callback, reason)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._handler, name)


class RateMeter:
    """Per-second rates of cumulative counters over the windows of :data:`RATE_WINDOWS_S`."""

    def __init__(self, interval_s: float = 5.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.interval_s = interval_s
        self._clock = clock
        horizon = max(RATE_WINDOWS_S.values())
        self._samples: collections.deque[tuple[float, dict[str, float]]] = collections.deque(
            maxlen=int(horizon / interval_s) + 2)

    def sample(self, counters: Mapping[str, float]) -> None:
        now = self._clock()
        if self._samples and now - self._samples[-1][0] < self.interval_s / 2:
            return  # a stats request right after a tick adds nothing
        self._samples.append((now, dict(counters)))

    def rates(self, counters: Mapping[str, float]) -> dict[str, dict[str, float]]:
        """``{counter: {"1m": per_s, "5m": ..., "15m": ...}}`` against the current values."""
        now = self._clock()
        out: dict[str, dict[str, float]] = {}
        for key, value in counters.items():
            out[key] = {}
            for label, window in RATE_WINDOWS_S.items():
                base = self._base(key, value, now - window)
                if base is None:
                    out[key][label] = 0.0
                    continue
                at, old = base
                out[key][label] = round((value - old) / (now - at), 3) if now > at else 0.0
        return out

    def _base(self, key: str, value: float, start: float) -> tuple[float, float] | None:
        """The oldest sample at or after ``start`` that is not above ``value`` (a restart resets)."""
        chosen = None
        for at, counters in reversed(self._samples):
            old = counters.get(key, 0.0)  # a counter not yet there (a new channel) had counted nothing
            if old > value:
                break
            if at < start:
                break
            chosen = (at, old)
        return chosen


def directory_usage(path: Path) -> dict[str, int | None]:
    """Bytes used under ``path`` (files only, no symlinks followed) and the file system's free bytes."""
    used = 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            try:
                used += os.lstat(os.path.join(root, name)).st_size
            except OSError:
                continue  # removed while we walked
    try:
        free: int | None = shutil.disk_usage(path).free
    except OSError:
        free = None
    return {"usedBytes": used, "freeBytes": free}


def _queue_depth(queue: Mapping[str, Any]) -> tuple[int, float | None]:
    depth = sum(int(queue.get(k) or 0) for k in ("submitted_waiting", "ready_in_memory", "backlog_on_disk", "inflight"))
    store = queue.get("store") or {}
    channels = (store.get("channels") or {}) if isinstance(store, dict) else {}
    ages = [float(c.get("oldest_pending_age_s") or 0.0) for c in channels.values() if isinstance(c, dict)]
    return depth, (round(max(ages), 1) if ages and depth else None)


def channel_counters(channel_stats: Mapping[str, Mapping[str, Any]]) -> dict[str, float]:
    """The cumulative counters whose rates are reported, as flat ``channel.counter`` keys."""
    out: dict[str, float] = {}
    for name, figures in channel_stats.items():
        for key in ("unitsIn", "unitsOut", "bytesIn", "bytesOut", "errors"):
            out[f"{name}\0{key}"] = float(figures.get(key) or 0)
    return out


def build_stats(
    base: Mapping[str, Any],
    rtt: RttTracker,
    rates: RateMeter,
    disk: Mapping[str, Any] | None,
    event_loop: str,
) -> dict[str, Any]:
    """The full stats document from the runtime's ``stats()`` (``base``), round trips and rates."""
    stats = dict(base)
    link = stats.get("link") or {}
    queue = stats.get("durableQueue") or {}
    channel_stats: dict[str, dict[str, Any]] = {name: dict(figures) for name, figures in (stats.get("channelStats") or {}).items()}
    counters = channel_counters(channel_stats)
    per_counter = rates.rates(counters)
    for name, figures in channel_stats.items():
        figures["rtt"] = rtt.summary(name)
        figures["rates"] = {key: per_counter[f"{name}\0{key}"]
                            for key in ("unitsIn", "unitsOut", "bytesIn", "bytesOut", "errors")}
    depth, oldest = _queue_depth(queue)
    clients = stats.get("clientStats") or {}
    stats.update({
        "channelStats": channel_stats,
        "hl7ConnectionsOpen": sum(int(f.get("connectionsOpen") or 0) for f in channel_stats.values()
                                  if f.get("kind") == "mllp"),
        "ping": link.get("last_ping_ms"),
        "live": bool(stats.get("live")),
        "outstandingHeartbeats": int(link.get("outstanding_heartbeats") or 0),
        "webSocketQueueDepth": int(link.get("backlog") or 0),
        "hl7QueueDepth": depth,
        "hl7ClientCount": len(clients) if isinstance(clients, Mapping) else 0,
        "queueDepth": depth,
        "oldestUnconfirmedAgeSeconds": oldest,
        "kernels": "cython" if stats.get("extensionsActive") else "pure",
        "eventLoop": event_loop,
        "pythonImplementation": sys.implementation.name,
        "dataDir": dict(disk) if disk is not None else None,
    })
    return stats


def event_loop_name() -> str:
    """``uvloop`` or ``asyncio`` (the running loop's package)."""
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        return "none"
    return type(loop).__module__.split(".")[0]
