"""The hub's store writer: group commit of the intake's hot-path writes, on any store engine.

Theory of operation
-------------------
A message is stored before its batch is acknowledged (`store_incoming`). One whose inline bot
answers it inside that round (the caller's :data:`~medagent.hub.records.Answer`) is stored with
its result: one row write. Any other bot's reply is recorded after the bot ran: a second write
of the row. ONE drain task per hub process takes everything queued — replies first, then each
inbound group — and writes it in ONE transaction through :meth:`HubStore.write_round`, resolves
the callers, and repeats while work is queued. Under load one commit thus covers several agents' batches and the replies of earlier
ones.

Inbound messages start a round at once: their batch ack waits for it. The intake records the
results of bots run outside the round with :meth:`StoreWriter.defer_results`, which does *not*
start a round: the results ride the next one an inbound group starts (at one sender, the next message's), or a round of their own
after :data:`RESULT_LINGER_S` when nothing arrives. That halves the rounds per message when
traffic is sparse; the reply has already gone to the agent, which holds nothing for it (the
message itself was committed before its batch ack). :meth:`record_results` (awaitable, starts a
round) remains for callers that must know the result is durable.

Rounds never overlap (one writer, so the hub never contends with itself for the database's
write lock or a row), and they pipeline: while a round waits for its commit (PostgreSQL: the
network and the server's fsync; SQLite with a writer thread: that thread), the next one
accumulates, so groups grow with the load. With SQLite inline (the default, see
docs/hub-store.md for the measurement) a round commits without yielding, which gives exactly
one round per loop iteration.

Invariant: a call returns only after the transaction holding its work committed; if that
transaction fails, every call in it raises the store's exception (nothing was written).
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable, Sequence
from typing import Any

from medagent.hub.records import Answer, IncomingMessage, IntakeResult, MessageResult
from medagent.hub.store import HubStore

__all__ = ["RESULT_LINGER_S", "StoreWriter"]

#: How long deferred results wait for an inbound round to ride before they get one of their own.
RESULT_LINGER_S = 0.005

#: Told once the deferred results are committed (None) or their round failed (the exception).
ResultsDone = Callable[[BaseException | None], None]
#: One caller's inbound group: its messages, its answer, its future, its before_commit hook.
_Inbound = tuple[Sequence[IncomingMessage], "Answer | None", "asyncio.Future[list[IntakeResult]]",
                 "Callable[[], None] | None"]


class StoreWriter:
    """Async front of the store's hot-path writes; one transaction per round."""

    def __init__(self, store: HubStore) -> None:
        self._store = store
        self._incoming: list[_Inbound] = []
        self._results: list[tuple[Sequence[MessageResult], asyncio.Future[None] | ResultsDone]] = []
        self._drain_task: asyncio.Task[None] | None = None
        self._linger: asyncio.TimerHandle | None = None
        self._started = False
        self.rounds = 0

    async def start(self) -> None:
        """Let the store tune its hot path (SQLite: checkpoints off the committing connection)."""
        await self._store.start_hot_path()
        self._started = True

    async def store_incoming(self, messages: Sequence[IncomingMessage], answer: Answer | None = None,
                             before_commit: Callable[[], None] | None = None) -> list[IntakeResult]:
        """Store ``messages`` in the next round; ``answer`` (see :data:`~medagent.hub.records.Answer`)
        gives results that commit with the rows; ``before_commit`` as in :meth:`HubStore.write_round`."""
        future: asyncio.Future[list[IntakeResult]] = asyncio.get_running_loop().create_future()
        self._incoming.append((messages, answer, future, before_commit))
        self._schedule()
        return await future

    async def record_results(self, results: Sequence[MessageResult]) -> None:
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._results.append((results, future))
        self._schedule()
        await future

    def defer_results(self, results: Sequence[MessageResult], done: ResultsDone) -> None:
        """Queue results for the next round without starting one (see the module docstring);
        ``done`` is called after that round committed or failed."""
        self._results.append((results, done))
        if self._drain_task is None and self._linger is None:
            self._linger = asyncio.get_running_loop().call_later(RESULT_LINGER_S, self._linger_over)

    def _linger_over(self) -> None:
        self._linger = None
        if self._results:
            self._schedule()

    def _schedule(self) -> None:
        if self._drain_task is None:
            self._drain_task = asyncio.get_running_loop().create_task(self._drain(), name="medagent-hub-writer")

    async def _drain(self) -> None:
        try:
            while self._incoming or self._results:
                await self._round()
        finally:
            self._drain_task = None

    async def _round(self) -> None:
        incoming, self._incoming = self._incoming, []
        results, self._results = self._results, []
        if self._linger is not None:
            self._linger.cancel()
            self._linger = None
        waiters: list[asyncio.Future[Any]] = [f for _, _, f, _ in incoming] + [
            f for _, f in results if isinstance(f, asyncio.Future)]
        hooks = [hook for _, _, _, hook in incoming if hook is not None]
        try:
            outcome = await self._store.write_round(
                [messages for messages, _, _, _ in incoming], [r for batch, _ in results for r in batch],
                [answer for _, answer, _, _ in incoming], functools.partial(_call_each, hooks) if hooks else None,
            )
        except Exception as exc:  # noqa: BLE001 - every caller of this round learns of it
            for future in waiters:
                if not future.done():
                    future.set_exception(exc)
            _tell(results, exc)
            return
        except asyncio.CancelledError as exc:
            for future in waiters:
                future.cancel()
            _tell(results, exc)
            raise
        self.rounds += 1
        for (_, _, future, _), intake in zip(incoming, outcome):
            if not future.done():
                future.set_result(intake)
        for _, done in results:
            if not isinstance(done, asyncio.Future):
                done(None)
            elif not done.done():
                done.set_result(None)

    async def close(self) -> None:
        """Finish the round in progress, cancel what is still queued, stop the store's hot path.
        Call after the intake stopped."""
        if self._results:
            self._schedule()  # deferred results are written, not dropped
        task = self._drain_task
        if task is not None:
            await asyncio.wait({task}, timeout=30)
        if self._linger is not None:
            self._linger.cancel()
            self._linger = None
        for _, _, future, _ in self._incoming:
            if not future.done():
                future.cancel()
        _tell(self._results, asyncio.CancelledError())
        self._incoming, self._results = [], []
        if self._started:
            await self._store.stop_hot_path()


def _call_each(hooks: list[Callable[[], None]]) -> None:
    for hook in hooks:
        hook()


def _tell(results: list[tuple[Sequence[MessageResult], asyncio.Future[None] | ResultsDone]],
          error: BaseException) -> None:
    """Fail the waiters of results that were not written (futures, or deferred callbacks)."""
    for _, done in results:
        if not isinstance(done, asyncio.Future):
            done(error)
        elif not done.done() and isinstance(error, asyncio.CancelledError):
            done.cancel()
