"""The channels' InboundSink: durable units go to the queue, immediate ones straight to the link.

Theory of operation
-------------------
Every channel the runtime builds gets this object as ``ChannelContext.sink``. A unit whose answer
promises durability (``durable=True``) is submitted to the durable queue, whose group commit calls
the channel's ``on_commit`` on the loop thread; the channel answers the device then. An
immediate-mode unit (``durable=False``) is handed to the dispatcher's bounded in-memory buffer.

Backpressure: while more than ``high`` units wait for their group commit, every channel stops
reading its sockets (``ChannelSet.pause_reading``); reading resumes below ``low``. It is checked
on every accept and on the runtime's housekeeping tick (so a paused agent resumes even when no
unit arrives).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

from medagent.records import CommitResult, DuplicatePolicy, InboundRecord

if TYPE_CHECKING:
    from medagent.queue import DurableQueue
    from medagent.runtime.channel_set import ChannelSet
    from medagent.runtime.dispatcher import Dispatcher

__all__ = ["BACKPRESSURE_HIGH", "BACKPRESSURE_LOW", "Intake"]

log = logging.getLogger("medagent.agent")

#: Above this many units waiting for their group commit, channels stop reading sockets.
BACKPRESSURE_HIGH = 50_000
BACKPRESSURE_LOW = 10_000


class Intake:
    def __init__(self, queue: DurableQueue, *, high: int = BACKPRESSURE_HIGH, low: int = BACKPRESSURE_LOW) -> None:
        self._queue = queue
        self._dispatcher: Dispatcher | None = None
        self._channels: ChannelSet | None = None
        self._high = high
        self._low = low
        self.paused = False

    def attach(self, dispatcher: Dispatcher, channels: ChannelSet) -> None:
        """Where immediate units go and which channels to pause (both are built after the sink)."""
        self._dispatcher = dispatcher
        self._channels = channels

    def accept(
        self,
        record: InboundRecord,
        *,
        durable: bool,
        dedup: DuplicatePolicy,
        on_commit: Callable[[CommitResult], None] | None,
    ) -> None:
        if not durable:
            assert self._dispatcher is not None, "attach() first"
            self._dispatcher.send_immediate(record)
            return
        assert on_commit is not None, "a durable unit needs its commit callback"
        self._queue.submit(record, on_commit, dedup)
        self.apply_backpressure()

    def apply_backpressure(self) -> None:
        channels = self._channels
        if channels is None:
            return
        backlog = self._queue.uncommitted
        if not self.paused and backlog > self._high:
            self.paused = True
            log.warning("queue commit backlog %d: pausing reads on all channels", backlog)
            channels.pause_reading()
        elif self.paused and backlog < self._low:
            self.paused = False
            channels.resume_reading()
