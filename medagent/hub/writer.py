"""The hub's store writer: group commit of the intake's hot-path writes.

Theory of operation
-------------------
Every message costs the hub two writes: it is stored before its batch is acknowledged
(`store_incoming`) and its bot's reply is recorded after the bot ran (`record_results`). Both
calls queue their work and await a future; the first call of a loop iteration schedules one
flush (``loop.call_soon``) that writes everything queued — replies first, then each inbound
group — in ONE transaction through :meth:`HubStore.write_round`, then resolves the futures.
Under load one commit thus covers several agents' batches and the replies of earlier ones.

The flush runs on the event loop thread. A dedicated writer thread was tried first; measured
end to end (original mode, 10 lock-step senders) the hand-off — two wake-ups and GIL convoys
per call — cost more than the commit: 3.6k msg/s threaded against 4.6-5.3k inline. Only the
loop thread writes on the hot path, so the hub never contends SQLite's writer lock with itself
(bots that write through `BotEvent.store` wait on busy_timeout like any writer). WAL
checkpoints (an fsync each) are kept out of these commits: the loop thread's connection turns
automatic checkpoints off and a `WalCheckpointer` thread runs them (medagent.storage.checkpoint).

Invariant: a call returns only after the transaction holding its work committed; if that
transaction fails, every call in it raises the store's exception (nothing was written).
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

from medagent.hub.records import IncomingMessage, IntakeResult, MessageResult
from medagent.hub.store import HubStore
from medagent.storage.checkpoint import WalCheckpointer

__all__ = ["StoreWriter"]


class StoreWriter:
    """Async front of the store's hot-path writes; one transaction per loop iteration."""

    def __init__(self, store: HubStore) -> None:
        """Create on the event loop thread: its store connection is the one tuned here."""
        self._store = store
        store.disable_autocheckpoint()
        self._checkpointer = WalCheckpointer(store.path)
        self._checkpointer.start()
        self._incoming: list[tuple[Sequence[IncomingMessage], asyncio.Future[list[IntakeResult]]]] = []
        self._results: list[tuple[Sequence[MessageResult], asyncio.Future[None]]] = []
        self._flush_scheduled = False
        self.rounds = 0

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
        if not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        incoming, self._incoming = self._incoming, []
        results, self._results = self._results, []
        waiters: list[asyncio.Future[Any]] = [f for _, f in incoming] + [f for _, f in results]
        try:
            outcome = self._store.write_round(
                [messages for messages, _ in incoming], [r for batch, _ in results for r in batch]
            )
        except Exception as exc:  # noqa: BLE001 - every caller of this round learns of it
            for future in waiters:
                if not future.done():
                    future.set_exception(exc)
            return
        self.rounds += 1
        for (_, future), intake in zip(incoming, outcome):
            if not future.done():
                future.set_result(intake)
        for _, done in results:
            if not done.done():
                done.set_result(None)

    def close(self) -> None:
        """Stop the checkpointer. Call after the intake stopped: queued work would be dropped."""
        for _, future in [*self._incoming, *self._results]:
            if not future.done():
                future.cancel()
        self._checkpointer.stop()
