"""The hub's store writer: where the hot-path writes of the intake run.

Theory of operation
-------------------
:meth:`HubStore.store_incoming` and :meth:`HubStore.record_results` are the two writes of every
message (stored before its batch is acknowledged; reply recorded after its bot ran). They run
on the event loop thread, one transaction per call, in call order. An earlier version ran them
in a dedicated thread so a commit would not stall the websockets; measured end to end (original
mode, 10 lock-step senders) the hand-off — two thread wake-ups and GIL convoys per call — cost
more than the commit itself: 3.6k msg/s threaded against 4.6-5.3k inline. The loop keeps
gathering frames while a group is processed, so calls still grow with load (group commit).
Only the loop thread writes on the hot path, so the hub never contends SQLite's writer lock
with itself (bots that write through `BotEvent.store` wait on busy_timeout like any writer).
WAL checkpoints (an fsync each) are kept out of these commits: the loop thread's connection
turns automatic checkpoints off and a `WalCheckpointer` thread runs them (medagent.queue.checkpoint).

Invariant: a call returns only after its transaction committed (or was rolled back, in which
case the store's exception propagates).
"""

from __future__ import annotations

from collections.abc import Sequence

from medagent.hub.records import IncomingMessage, IntakeResult, MessageResult
from medagent.hub.store import HubStore
from medagent.queue.checkpoint import WalCheckpointer

__all__ = ["StoreWriter"]


class StoreWriter:
    """Async front of the store's hot-path writes (awaitable so the intake's shape does not change
    if the writes move off the loop again, e.g. to a PostgreSQL pool)."""

    def __init__(self, store: HubStore) -> None:
        """Create on the event loop thread: its store connection is the one tuned here."""
        self._store = store
        store.disable_autocheckpoint()
        self._checkpointer = WalCheckpointer(store.path)
        self._checkpointer.start()

    async def store_incoming(self, messages: Sequence[IncomingMessage]) -> list[IntakeResult]:
        return self._store.store_incoming(messages)

    async def record_results(self, results: Sequence[MessageResult]) -> None:
        self._store.record_results(results)

    def close(self) -> None:
        """Stop the checkpointer; no write is pending (each completed before its call returned)."""
        self._checkpointer.stop()
