"""The hub's store writer: group commit of the intake's hot-path writes, on any store engine.

Theory of operation
-------------------
Every message costs the hub two writes: it is stored before its batch is acknowledged
(`store_incoming`) and its bot's reply is recorded after the bot ran (`record_results`). Both
calls queue their work and await a future. ONE drain task per hub process takes everything
queued — replies first, then each inbound group — and writes it in ONE transaction through
:meth:`HubStore.write_round`, resolves the futures, and repeats while work is queued. Under load
one commit thus covers several agents' batches and the replies of earlier ones.

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
from collections.abc import Sequence
from typing import Any

from medagent.hub.records import IncomingMessage, IntakeResult, MessageResult
from medagent.hub.store import HubStore

__all__ = ["StoreWriter"]


class StoreWriter:
    """Async front of the store's hot-path writes; one transaction per round."""

    def __init__(self, store: HubStore) -> None:
        self._store = store
        self._incoming: list[tuple[Sequence[IncomingMessage], asyncio.Future[list[IntakeResult]]]] = []
        self._results: list[tuple[Sequence[MessageResult], asyncio.Future[None]]] = []
        self._drain_task: asyncio.Task[None] | None = None
        self._started = False
        self.rounds = 0

    async def start(self) -> None:
        """Let the store tune its hot path (SQLite: checkpoints off the committing connection)."""
        await self._store.start_hot_path()
        self._started = True

    async def store_incoming(self, messages: Sequence[IncomingMessage]) -> list[IntakeResult]:
        future: asyncio.Future[list[IntakeResult]] = asyncio.get_running_loop().create_future()
        self._incoming.append((messages, future))
        self._schedule()
        return await future

    async def record_results(self, results: Sequence[MessageResult]) -> None:
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._results.append((results, future))
        self._schedule()
        await future

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
        waiters: list[asyncio.Future[Any]] = [f for _, f in incoming] + [f for _, f in results]
        try:
            outcome = await self._store.write_round(
                [messages for messages, _ in incoming], [r for batch, _ in results for r in batch]
            )
        except Exception as exc:  # noqa: BLE001 - every caller of this round learns of it
            for future in waiters:
                if not future.done():
                    future.set_exception(exc)
            return
        except asyncio.CancelledError:
            for future in waiters:
                future.cancel()
            raise
        self.rounds += 1
        for (_, future), intake in zip(incoming, outcome):
            if not future.done():
                future.set_result(intake)
        for _, done in results:
            if not done.done():
                done.set_result(None)

    async def close(self) -> None:
        """Finish the round in progress, cancel what is still queued, stop the store's hot path.
        Call after the intake stopped."""
        task = self._drain_task
        if task is not None:
            await asyncio.wait({task}, timeout=30)
        for _, future in [*self._incoming, *self._results]:
            if not future.done():
                future.cancel()
        self._incoming, self._results = [], []
        if self._started:
            await self._store.stop_hot_path()
