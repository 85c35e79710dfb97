"""Hub retention: bounded storage by age and by size, bodies before metadata, in small steps.

Theory of operation
-------------------
Every ``interval_s`` a pass runs as a task on the event loop; its steps are awaited store calls
(SQLite: where the intake's group commit runs — inline on the loop thread by default — so
retention never waits on SQLite's writer lock and intake never waits on retention's;
PostgreSQL: on the server). A pass is a sequence of *steps*; each step is ONE short transaction
over at most ``batch_rows`` rows, and the pass rests between steps — for as long as the step took (at most 50 ms), so retention takes at most
half of the writer's time and its WAL writes leave the checkpointer time to keep the WAL short. The rows per step
adapt to the time a step takes (halved above ``TARGET_STEP_S`` = 10 ms, grown back up to
``retention_batch_rows`` when fast), so a slow disk or a busy machine gets smaller steps. A pass never holds
the loop longer than one step (measured: see docs/hub.md, "Retention and disk use"). Steps, in
order:

1. **age, rows**: for each channel with stored messages, delete its messages older than its
   policy's ``max_age_s`` (``retention_channels[name]``, else the hub-wide ``retention``);
2. **age, bodies**: blank the message and reply bodies (the PHI) of that channel's remaining
   messages older than ``body_max_age_s`` (rows first, so no body is blanked just before its
   row goes: that halved a pass's writes; a body is still never kept longer than its row);
3. **size**: while the live size of the store (``hub.sqlite3``: its pages less the free ones;
   PostgreSQL: the live rows' bytes) exceeds
   ``retention_max_bytes``, delete the oldest rows (all channels). Not bodies first here: a
   blanked body does not give its page back (rows stay in their b-tree leaf, and new rows go to
   the right-most leaf, never into the holes) — measured: blanking 300 bodies of 1.5 KB freed
   1 % of the pages, deleting 150 of the rows freed 45 %, and new rows reused those pages
   without growing the file. Bodies are purged before rows by age (privacy); space comes back
   from whole rows.

Deleted and blanked rows leave the pages SQLite reuses for new rows, so the file stops growing
once retention keeps pace; it does not shrink (no VACUUM: that would stall intake). The indexes
the steps use list only rows a step may still change (schema v2), so a step reads what it
changes and nothing it skipped before.

Invariants: a message younger than every limit is never touched; a body is always purged
before (or with) its row; a pass that fails (e.g. a disk error) is logged once and retried at
the next interval, never ends the hub; nothing logged names a patient or quotes a body.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass

from medagent.hub.records import RetentionPolicy
from medagent.hub.store import HubStore, now_ms
from medagent.ops.logs import RateLimitedLog

__all__ = ["RetentionStats", "RetentionWorker"]

log = logging.getLogger(__name__)

#: upper bound of steps in one pass (with 500-row steps: 1M rows); the next pass continues
MAX_STEPS_PER_PASS = 5000
#: what one step should cost the event loop, and the fewest rows a step may take
TARGET_STEP_S = 0.010
MIN_BATCH_ROWS = 20
#: the longest rest between two steps (a rest as long as the step: retention takes <= half the loop)
_MAX_REST_S = 0.05


@dataclass(slots=True)
class RetentionStats:
    passes: int = 0
    bodies_purged: int = 0
    messages_deleted: int = 0
    #: the longest single step (one transaction, the longest the loop was held), seconds
    longest_step_s: float = 0.0
    steps: int = 0
    #: the sum of every step's time (mean step = step_time_s / steps)
    step_time_s: float = 0.0
    last_pass_s: float = 0.0


class RetentionWorker:
    """Runs retention passes on the event loop; ``start()``/``await stop()``, or ``await run_pass()``."""

    def __init__(self, store: HubStore, policy: RetentionPolicy, channels: Mapping[str, RetentionPolicy],
                 max_bytes: int | None, interval_s: float, batch_rows: int,
                 clock: Callable[[], int] = now_ms) -> None:
        self._store = store
        self._policy = policy
        self._channels = dict(channels)
        self._max_bytes = max_bytes
        self._interval_s = interval_s
        self._max_batch = batch_rows
        #: rows per step now (adapted between MIN_BATCH_ROWS and batch_rows, see _step)
        self.batch = batch_rows
        self._clock = clock
        self._task: asyncio.Task[None] | None = None
        self._failures = RateLimitedLog(log, 600.0)
        self.stats = RetentionStats()

    def policy_of(self, channel: str) -> RetentionPolicy:
        return self._channels.get(channel, self._policy)

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._loop(), name="medagent-hub-retention")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self._interval_s)
            try:
                await self.run_pass()
            except Exception as exc:  # noqa: BLE001 - a failed pass is retried at the next interval
                self._failures.error("pass", "retention pass failed (%s: %s); retrying in %.0f s",
                                     type(exc).__name__, exc, self._interval_s)

    async def run_pass(self) -> RetentionStats:
        """One pass over every step; returns the cumulative stats."""
        started = time.perf_counter()
        purged_before, deleted_before = self.stats.bodies_purged, self.stats.messages_deleted
        budget = [MAX_STEPS_PER_PASS]
        now = self._clock()
        for channel in await self._store.message_channels():
            policy = self.policy_of(channel)
            if policy.max_age_s is not None:
                cutoff = now - int(policy.max_age_s * 1000)
                await self._drain(lambda n, c=channel, t=cutoff: self._store.delete_messages(c, t, n),
                                  "messages_deleted", budget)
            if policy.body_max_age_s is not None:
                cutoff = now - int(policy.body_max_age_s * 1000)
                await self._drain(lambda n, c=channel, t=cutoff: self._store.purge_bodies(c, t, n),
                                  "bodies_purged", budget)
        if self._max_bytes is not None:
            await self._enforce_size(budget)
        self.stats.passes += 1
        self.stats.last_pass_s = time.perf_counter() - started
        purged = self.stats.bodies_purged - purged_before
        deleted = self.stats.messages_deleted - deleted_before
        if purged or deleted:
            log.info("retention: %d bodies purged, %d messages deleted in %.2f s (longest step %.1f ms)",
                     purged, deleted, self.stats.last_pass_s, self.stats.longest_step_s * 1000)
        return self.stats

    async def _enforce_size(self, budget: list[int]) -> None:
        assert self._max_bytes is not None
        while budget[0] > 0 and await self._store.live_bytes() > self._max_bytes:
            done, _ = await self._step(self._store.delete_oldest_messages, "messages_deleted", budget)
            if not done:
                return  # nothing left to remove: the budget is below what the schema itself takes

    async def _drain(self, step: Callable[[int], Awaitable[int]], counter: str, budget: list[int]) -> None:
        """Repeat ``step`` until it changes fewer rows than it was allowed to."""
        while budget[0] > 0 and (await self._step(step, counter, budget))[1]:
            pass

    async def _step(self, step: Callable[[int], Awaitable[int]], counter: str, budget: list[int]) -> tuple[int, bool]:
        """One transaction of at most ``self.batch`` rows; ``(rows changed, was the batch full)``.

        The batch adapts to the step's time: halved when a step took longer than
        ``TARGET_STEP_S`` (a slow disk, a busy machine), doubled back up to the configured size
        when it took under a quarter of that; so a step holds the loop about ``TARGET_STEP_S``.
        """
        budget[0] -= 1
        limit = self.batch
        started = time.perf_counter()
        done = await step(limit)
        took = time.perf_counter() - started
        setattr(self.stats, counter, getattr(self.stats, counter) + done)
        self.stats.longest_step_s = max(self.stats.longest_step_s, took)
        self.stats.steps += 1
        self.stats.step_time_s += took
        if took > TARGET_STEP_S:
            self.batch = max(MIN_BATCH_ROWS, limit // 2)
        elif took < TARGET_STEP_S / 4:
            self.batch = min(self._max_batch, limit * 2)
        await asyncio.sleep(min(took, _MAX_REST_S))  # intake runs meanwhile; the WAL gets checkpointed
        return done, done >= limit
