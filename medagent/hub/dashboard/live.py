"""Live figures for the dashboard pages, pushed as server-sent events (HTML Living Standard §9.2).

Theory of operation
-------------------
``GET /dashboard/events`` (overview) and ``GET /dashboard/events?agent=<id>`` (one agent) keep
a ``text/event-stream`` open and send one ``snapshot`` event every ``TICK_S`` seconds: a JSON
document the page's script writes into the elements marked ``data-live`` and into its charts,
so the pages update without reloads. Each stream reads on the dashboard's reader thread
(:mod:`.queries`, indexed, bounded windows), never on the hub's writer.

* overview snapshot: per agent — connected, version, seconds since last heard from, messages in
  the last minute and hour, failed messages, the hub's backlog of unanswered messages — and
  totals;
* agent snapshot: the same for one agent, plus per channel the messages per minute over the
  last hour and the bot's reply latency p50/p99 over the last 5 minutes (from the stored rows),
  and, every ``STATS_EVERY`` ticks while the agent is connected, its own ``$stats`` (kernels,
  link round-trip, queue depth and oldest unconfirmed age, per-channel connections, errors,
  answers by code and its ACK-latency histogram). The difference between two samples of those
  cumulative histograms gives the ACK latency p50/p99 of the interval (:func:`ack_point`); the
  hub keeps the last hour of those points per agent (``ackHistory``), for the chart.

A stream ends when the browser goes away (the write fails), when its session ends (checked
every ``SESSION_CHECK_EVERY`` ticks), after ``MAX_STREAM_S`` (EventSource reconnects), or when
the hub shuts down (the ``closing`` event, set from ``on_shutdown`` so shutdown never waits).
"""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import Mapping
from typing import Any

import orjson
from aiohttp import web

from medagent.hub.dashboard.actions import agent_stats
from medagent.hub.dashboard.queries import percentile
from medagent.hub.dashboard.security import COOKIE, secure_headers
from medagent.hub.dashboard.state import DashboardState, state_of
from medagent.hub.operations import presences_or_unknown
from medagent.hub.store import NotFound

__all__ = ["TICK_S", "agent_snapshot", "events", "overview_snapshot"]

TICK_S = 1.0
#: an open stream re-checks its session this often (ticks), so a logout also ends its streams
SESSION_CHECK_EVERY = 10
STATS_EVERY = 5
#: ACK latency samples kept per agent: one hour at one sample per STATS_EVERY ticks
ACK_HISTORY = int(3600 / (STATS_EVERY * TICK_S))
#: where the open last histogram bucket (> 5000 ms) is drawn
OPEN_BUCKET_MS = 10_000.0
#: a stream lives at most this long; the browser's EventSource reconnects by itself
MAX_STREAM_S = 3600.0


async def overview_snapshot(state: DashboardState) -> dict[str, Any]:
    ctx, reader = state.ctx, state.reader
    agents = await ctx.store.list_agents()
    counts = await reader.run(reader.agent_counts, [a.id for a in agents])
    total = await reader.run(reader.stored_total)
    now = time.time()
    rows: dict[str, Any] = {}
    presences = await presences_or_unknown(ctx, [a.id for a in agents])
    for agent in agents:
        presence = presences[agent.id]
        c = counts[agent.id]
        rows[agent.id] = {
            "online": presence.connected, "version": presence.version,
            "lastSeenS": None if presence.last_updated is None else round(now - presence.last_updated, 1),
            "minute": c.last_minute, "hour": c.last_hour, "failed": c.failed,
            "backlog": ctx.dispatcher.backlog(agent.id).count,
        }
    return {
        "at": int(now * 1000), "agents": rows, "total": total,
        "online": sum(1 for r in rows.values() if r["online"]), "count": len(rows),
        "failed": sum(r["failed"] for r in rows.values()),
    }


async def agent_snapshot(state: DashboardState, agent_id: str) -> dict[str, Any]:
    reader = state.reader
    overview = await overview_snapshot(state)
    minutes = await reader.run(reader.channel_minutes, agent_id)
    channels = {
        name: {"perMinute": figures.counts, "lastMinute": figures.counts[-1], "errors": figures.errors,
               "p50": percentile(figures.latencies_ms, 0.50), "p99": percentile(figures.latencies_ms, 0.99)}
        for name, figures in minutes.items()
    }
    return {"at": overview["at"], "agent": overview["agents"].get(agent_id), "channels": channels}


def queue_depth(queue: dict[str, Any]) -> tuple[int | None, float | None]:
    """(messages not yet confirmed by the hub, age in s of the oldest) from the agent's
    ``durableQueue`` stats: the live runtime's counters, or a store snapshot (``pending``)."""
    nested = queue.get("store")
    store: dict[str, Any] = nested if isinstance(nested, dict) else queue
    channels = store.get("channels") or {}
    oldest = max((c.get("oldest_pending_age_s", 0.0) for c in channels.values()), default=None)
    if "ready_in_memory" in queue:  # medagent.queue.durable.DurableQueue.stats()
        depth = sum(int(queue.get(k) or 0) for k in ("submitted_waiting", "ready_in_memory", "backlog_on_disk",
                                                     "inflight"))
    elif "pending" in store:
        depth = int(store["pending"])
    else:
        return None, None
    return depth, (round(oldest, 1) if oldest is not None and depth else None)


def summarize_stats(stats: dict[str, Any]) -> dict[str, Any]:
    """The parts of an agent's ``$stats`` the agent page shows."""
    link = stats.get("link") or {}
    depth, oldest = queue_depth(stats.get("durableQueue") or {})
    channels = {}
    for name, figures in (stats.get("channelStats") or {}).items():
        histogram = figures.get("latencyMs") or {}
        channels[name] = {
            "kind": figures.get("kind"), "connections": figures.get("connectionsOpen"),
            "unitsIn": figures.get("unitsIn"), "errors": figures.get("errors"), "answers": figures.get("answers"),
            "ackP50": histogram_percentile(histogram, 0.50), "ackP99": histogram_percentile(histogram, 0.99),
        }
    rtt = link.get("last_ping_ms")
    return {
        "implementation": stats.get("implementation"), "extensionsActive": stats.get("extensionsActive"),
        "rttMs": round(rtt, 2) if isinstance(rtt, (int, float)) else None, "unconfirmed": link.get("unconfirmed"),
        "queueDepth": depth, "oldestUnconfirmedS": oldest, "uptimeS": stats.get("uptimeSeconds"),
        "channels": channels,
    }


def _bound(key: str) -> float:
    return float("inf") if key == "+Inf" else float(key)


def histogram_bound(histogram: Mapping[str, int], fraction: float) -> float | None:
    """The upper bound (ms) of the bucket holding the ``fraction`` percentile (inf: the last bucket)."""
    total = sum(histogram.values())
    if total <= 0:
        return None
    seen = 0
    for key in sorted(histogram, key=_bound):
        seen += histogram[key]
        if seen >= fraction * total:
            return _bound(key)
    return None


def histogram_percentile(histogram: Mapping[str, int], fraction: float) -> str | None:
    """:func:`histogram_bound` as text: ``≤ 2 ms`` (``> 5000 ms`` for the open last bucket)."""
    value = histogram_bound(histogram, fraction)
    if value is None:
        return None
    return "> 5000 ms" if value == float("inf") else f"≤ {value:g} ms"


def ack_point(previous: dict[str, dict[str, int]], channel_stats: Mapping[str, Any]
              ) -> tuple[float | None, float | None]:
    """ACK latency p50/p99 (ms, the worst channel) of the answers given since the previous sample.

    The agent's histograms count since it started; the difference from the previous sample is
    the histogram of the interval. A count that went down means the agent restarted: then the
    current histogram is the interval's. ``previous`` is updated in place.
    """
    worst: dict[float, float | None] = {0.50: None, 0.99: None}
    for name, figures in channel_stats.items():
        current = {k: int(v) for k, v in (figures.get("latencyMs") or {}).items()}
        before = previous.get(name, {})
        delta = {k: current[k] - before.get(k, 0) for k in current}
        if any(v < 0 for v in delta.values()):
            delta = current
        previous[name] = current
        for fraction, so_far in worst.items():
            value = histogram_bound(delta, fraction)
            if value is not None:
                value = min(value, OPEN_BUCKET_MS)
                worst[fraction] = value if so_far is None else max(so_far, value)
    return worst[0.50], worst[0.99]


async def events(request: web.Request) -> web.StreamResponse:
    """``GET /dashboard/events[?agent=<id>]``: a server-sent event stream of snapshots."""
    state = state_of(request)
    agent_id = request.query.get("agent") or None
    if agent_id is not None:
        try:
            await state.ctx.store.get_agent(agent_id)
        except NotFound:
            return web.Response(status=404, text="No such agent\n")
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-store",
                                           "X-Accel-Buffering": "no"})
    secure_headers(response)
    await response.prepare(request)
    started = time.monotonic()
    stats: dict[str, Any] | None = None
    cookie = request.cookies.get(COOKIE, "")
    for tick in range(int(MAX_STREAM_S / TICK_S)):
        if tick and tick % SESSION_CHECK_EVERY == 0 and state.db.session(cookie) is None:
            break  # logged out or expired meanwhile: the stream ends with the session
        if agent_id is None:
            snapshot = await overview_snapshot(state)
        else:
            snapshot = await agent_snapshot(state, agent_id)
            online = bool(snapshot["agent"] and snapshot["agent"]["online"])
            if online and tick % STATS_EVERY == 0:
                raw = await agent_stats(state.ctx, agent_id)
                if raw is not None:
                    stats = summarize_stats(raw)
                    history = state.ack_history.setdefault(agent_id, collections.deque(maxlen=ACK_HISTORY))
                    previous = state.ack_previous.setdefault(agent_id, {})
                    first = not previous
                    p50, p99 = ack_point(previous, raw.get("channelStats") or {})
                    if not first:  # the first sample only sets the baseline
                        history.append((snapshot["at"], p50, p99))
            snapshot["stats"] = stats if online else None
            snapshot["ackHistory"] = list(state.ack_history.get(agent_id, ()))
        try:
            await response.write(b"event: snapshot\ndata: " + orjson.dumps(snapshot) + b"\n\n")
        except (ConnectionError, RuntimeError):
            break
        try:
            await asyncio.wait_for(state.closing.wait(), TICK_S)
            break  # the hub is shutting down
        except TimeoutError:
            pass
        if time.monotonic() - started > MAX_STREAM_S:
            break
    return response
