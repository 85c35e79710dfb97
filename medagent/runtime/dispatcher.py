"""Moves committed queue rows to the hub in FIFO order and routes the hub's answers back.

Theory of operation
-------------------
The durable queue hands out committed rows in id order (`next_batch`); each becomes one
`agent:transmit:request` whose callback is ``<prefix><row id>``, where the prefix is
``Agent/<agent id>-<queue uuid>-``. The callback is therefore stable across reconnects and
restarts: a row sent twice carries the same callback, so a medagent hub recognises the resend
and does not run the bot again, and no lookup table is needed to map a callback back to its row.

Confirmation (the hub has the message) releases the row for good (`queue.confirm`). A lost link
puts every unconfirmed row back in front of the queue (`queue.release`), so it is sent again, in
order, on the next connection. A row that stays unconfirmed longer than `confirm_timeout_s`
while the link is up is released too (a hub that silently dropped it). The bot's reply, when the
channel's mode wants one, is routed to the channel with the control id remembered at send time.

Immediate-mode messages skip the queue: they are sent from a bounded in-memory buffer and
promise nothing (DESIGN.md, ACK modes).

Invariants: rows are handed to the link in id order; a row is either in flight (in
`_inflight`) or back in the queue, never both; nothing here logs a message body.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from medagent.cloud.messages import CONTENT_TYPE_HL7_V2, TransmitRequest, TransmitResponse
from medagent.proto import hl7
from medagent.queue import InboundRecord, QueuedMessage

if TYPE_CHECKING:
    from medagent.queue import DurableQueue

__all__ = ["Dispatcher", "ReplyTarget", "TransmitLink"]

log = logging.getLogger("medagent.dispatch")

#: In-memory limit for immediate-mode messages while the link is down.
IMMEDIATE_BUFFER_LIMIT = 100_000


class TransmitLink(Protocol):
    """The part of `medagent.cloud.link.AgentLink` the dispatcher uses."""

    @property
    def live(self) -> bool: ...

    @property
    def features(self) -> Mapping[str, Any]: ...

    def send_transmit(self, message: TransmitRequest) -> bool: ...


class ReplyTarget(Protocol):
    """The part of a channel the dispatcher uses: its text encoding and reply delivery."""

    encoding: str
    wants_replies: bool

    def deliver_reply(self, remote: str, control_id: str, body: str, status_code: int = 200) -> bool: ...


@dataclass(slots=True)
class _AwaitingReply:
    since: float
    channel: str
    control_id: str


#: How long a reply is still routed to the device after the message was sent.
REPLY_ROUTING_WINDOW_S = 600.0


class Dispatcher:
    def __init__(
        self,
        queue: DurableQueue,
        link: TransmitLink,
        agent_id: str,
        channels: Callable[[], Mapping[str, ReplyTarget]],
        *,
        max_batch: int = 1000,
        confirm_timeout_s: float = 60.0,
        linger_s: float = 0.002,
    ) -> None:
        self._queue = queue
        self._link = link
        self._channels = channels
        self._prefix = f"Agent/{agent_id}-{queue.queue_uuid}-"
        self._immediate_prefix = f"Agent/{agent_id}-"
        self._max_batch = max_batch
        self._confirm_timeout_s = confirm_timeout_s
        self._linger_s = linger_s
        self._inflight: dict[int, float] = {}  # row id -> monotonic send time, until confirmed
        self._awaiting_reply: dict[int, _AwaitingReply] = {}
        self._immediate: collections.deque[TransmitRequest] = collections.deque()
        self._live = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.sent = 0
        self.confirmed = 0
        self.replies_routed = 0
        self.replies_unroutable = 0
        self.immediate_dropped = 0

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="medagent-dispatcher")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None

    # -- callbacks ---------------------------------------------------------------------------
    def callback_for(self, row_id: int) -> str:
        return f"{self._prefix}{row_id}"

    def row_id_of(self, callback: str | None) -> int | None:
        if not callback or not callback.startswith(self._prefix):
            return None
        try:
            return int(callback[len(self._prefix) :])
        except ValueError:
            return None

    # -- link events -------------------------------------------------------------------------
    def on_live(self) -> None:
        self._live.set()
        self._flush_immediate()

    def on_down(self) -> None:
        self._live.clear()
        if self._inflight:
            log.info("link down: %d unconfirmed messages go back to the queue", len(self._inflight))
        self._inflight.clear()
        self._queue.release(None)

    def on_confirmed(self, callbacks: Sequence[str]) -> None:
        ids = []
        for callback in callbacks:
            row_id = self.row_id_of(callback)
            if row_id is not None and self._inflight.pop(row_id, None) is not None:
                ids.append(row_id)
        if ids:
            self.confirmed += len(ids)
            self._queue.confirm(ids)

    def on_error(self, callback: str | None, reason: str) -> None:
        """The hub refused a message (agent:error with its callback): fail the row, keep the reason."""
        row_id = self.row_id_of(callback)
        if row_id is None or self._inflight.pop(row_id, None) is None:
            return
        self._awaiting_reply.pop(row_id, None)
        log.warning("hub refused queued message %d: %s", row_id, reason)
        self._queue.fail(row_id, reason)

    def on_transmit_response(self, message: TransmitResponse) -> None:
        row_id = self.row_id_of(message.callback)
        entry = self._awaiting_reply.pop(row_id, None) if row_id is not None else None
        if entry is None:
            # Immediate-mode message, or a late reply for a row that was re-sent: nothing waits.
            self.replies_unroutable += 1
            return
        channel = self._channels().get(entry.channel)
        if channel is None:
            self.replies_unroutable += 1
            return
        status = message.status_code if message.status_code is not None else 200
        if channel.deliver_reply(message.remote, entry.control_id, message.body, status):
            self.replies_routed += 1

    # -- immediate mode ------------------------------------------------------------------------
    def send_immediate(self, record: InboundRecord) -> None:
        message = self._transmit(record.channel, record.remote, record.content_type, record.body,
                                 f"{self._immediate_prefix}{uuid.uuid4()}")
        if "batch" in self._link.features:
            message = dataclasses.replace(message, no_reply=True)  # the device had its AA already
        if self._link.live and not self._immediate and self._link.send_transmit(message):
            self.sent += 1
            return
        if len(self._immediate) >= IMMEDIATE_BUFFER_LIMIT:
            self._immediate.popleft()
            self.immediate_dropped += 1
        self._immediate.append(message)

    def _flush_immediate(self) -> None:
        while self._immediate and self._link.live:
            if not self._link.send_transmit(self._immediate[0]):
                return
            self._immediate.popleft()
            self.sent += 1

    # -- housekeeping ---------------------------------------------------------------------------
    def expire_unconfirmed(self) -> int:
        """Release rows the hub has not confirmed in time, so they are sent again."""
        now = time.monotonic()
        deadline = now - self._confirm_timeout_s
        stale = [row_id for row_id, sent_at in self._inflight.items() if sent_at < deadline]
        for row_id in stale:
            del self._inflight[row_id]
        if stale:
            log.warning("%d messages unconfirmed after %.0f s; sending them again", len(stale), self._confirm_timeout_s)
            self._queue.release(stale)
        routing_deadline = now - REPLY_ROUTING_WINDOW_S
        for row_id in [r for r, e in self._awaiting_reply.items() if e.since < routing_deadline]:
            del self._awaiting_reply[row_id]
        return len(stale)

    def stats(self) -> dict[str, Any]:
        return {
            "sent": self.sent,
            "confirmed": self.confirmed,
            "inflight": len(self._inflight),
            "awaitingReply": len(self._awaiting_reply),
            "immediateBuffered": len(self._immediate),
            "immediateDropped": self.immediate_dropped,
            "repliesRouted": self.replies_routed,
            "repliesUnroutable": self.replies_unroutable,
        }

    # -- the loop ---------------------------------------------------------------------------------
    async def _run(self) -> None:
        while True:
            await self._live.wait()
            rows = await self._queue.next_batch(self._max_batch)
            replies_awaited = self._send_rows(rows)
            if not replies_awaited and len(rows) < self._max_batch and self._linger_s > 0:
                # Nobody waits on these (fast/immediate ACKs were sent at commit): let more rows
                # gather so the hub handles fewer, larger batches. Original and two-phase rows
                # never wait here, since a device is waiting for their bot reply.
                await asyncio.sleep(self._linger_s)

    def _send_rows(self, rows: Sequence[QueuedMessage]) -> bool:
        """Hand rows to the link in order; True when a device waits for any of their replies."""
        now = time.monotonic()
        batching = "batch" in self._link.features
        channels = self._channels()
        replies_awaited = False
        for index, row in enumerate(rows):
            target = channels.get(row.channel)
            wants_reply = target is not None and target.wants_replies
            message = self._transmit(row.channel, row.remote, row.content_type, row.body, self.callback_for(row.row_id))
            if batching:  # medagent hub: extensions allowed (see messages.py)
                duplicate_of = None if row.duplicate_of is None else self.callback_for(row.duplicate_of)
                message = dataclasses.replace(message, duplicate_of=duplicate_of, no_reply=not wants_reply or None)
            if not self._link.send_transmit(message):
                self._queue.release([r.row_id for r in rows[index:]])
                return replies_awaited
            self._inflight[row.row_id] = now
            if wants_reply:
                self._awaiting_reply[row.row_id] = _AwaitingReply(now, row.channel, row.control_id)
                replies_awaited = True
            self.sent += 1
        return replies_awaited

    def _transmit(self, channel: str, remote: str, content_type: str, body: bytes, callback: str) -> TransmitRequest:
        target = self._channels().get(channel)
        encoding = target.encoding if target is not None else "utf-8"
        if content_type == CONTENT_TYPE_HL7_V2:
            try:
                text = hl7.decode(body, default=encoding)
            except hl7.Hl7Error:
                # The channel checked the charset at intake; a changed config must not wedge the queue.
                text = body.decode("latin-1")
        else:
            text = body.hex()
        return TransmitRequest(remote=remote, content_type=content_type, body=text, channel=channel, callback=callback)

