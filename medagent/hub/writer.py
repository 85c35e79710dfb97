"""The hub's store writer: one dedicated thread that runs every hot-path write.

Theory of operation
-------------------
Storing a batch of messages takes milliseconds (SQLite commit, and now and then a WAL
checkpoint with fsync). Doing that on the event loop would stall every websocket, so the
writes of the hot path — :meth:`HubStore.store_incoming` and :meth:`HubStore.record_results` —
run in one thread of their own, one transaction per call, in submission order. The event loop
awaits the result; meanwhile it keeps reading frames, so the next call is usually a larger
batch (natural group commit). One writer thread also means SQLite's single-writer lock is
never contended by the hub itself.

Invariant: a call's future resolves only after its transaction committed (or failed and rolled
back, in which case it raises the store's exception).
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

from medagent.hub.records import IncomingMessage, IntakeResult, MessageResult
from medagent.hub.store import HubStore

__all__ = ["StoreWriter"]


class StoreWriter:
    """Async front of the store's hot-path writes, executed in a single thread."""

    def __init__(self, store: HubStore) -> None:
        self._store = store
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="medagent-hub-writer")

    async def store_incoming(self, messages: Sequence[IncomingMessage]) -> list[IntakeResult]:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._thread, self._store.store_incoming, messages)

    async def record_results(self, results: Sequence[MessageResult]) -> None:
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._thread, self._store.record_results, results)

    def close(self) -> None:
        """Finish the writes already submitted, then stop the thread."""
        self._thread.shutdown(wait=True)
