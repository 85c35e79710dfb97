"""Moves committed queue rows to the hub in FIFO order, routes the hub's answers back, and is the
link's :class:`~medagent.cloud.link.LinkHandler`.

Theory of operation
-------------------
The durable queue hands out committed rows in id order (`next_batch`); each becomes one
`agent:transmit:request` whose callback is ``<prefix><row id>``, where the prefix is
``Agent/<agent id>-<queue uuid>-``. The callback is therefore stable across reconnects and
restarts: a row sent twice carries the same callback, so a medagent hub recognises the resend
and does not run the bot again, and no lookup table is needed to map a callback back to its row.

The queue alone owns in-flight rows (it decides what is handed out, confirmed, failed or
released). Confirmation (the hub has the message) settles the row (`queue.confirm`, which also
copes with a late confirmation of a row already released). A lost link puts every in-flight row
back in front of the queue (`queue.release(None)`), so it is sent again, in order, on the next
connection. The dispatcher keeps only each sent row's send time, as the clock of
`confirm_timeout_s`: a row the hub leaves unconfirmed that long while the link is up is released
(a hub that silently dropped it). The bot's reply, when the channel wants replies, goes back
through the channel's ``deliver_reply`` with the control id remembered at send time.

File payloads (a row whose record is a file in the data directory, e.g. a DICOM instance): before
the transmit, the file is delivered by the :class:`~medagent.channels.base.FileUploader`
registered for the row's content type, with the runtime's :class:`HubClient`; the transmit then
carries the body and content type the uploader returned. Consecutive file rows upload
concurrently (at most `upload_concurrency`); rows are still handed to the link in id order. An
upload that fails puts the row and every later row of its batch back in the queue (the row stays
pending), and the next batch waits with exponential backoff (`upload_backoff`).

Wake-ups (issue 19). The task waits in `next_batch` when it has nothing in hand; the queue's
rows listener (`_rows_committed`) then sends freshly committed rows in the commit's own loop
turn and ends the batch with the link's `flush()`, so the frame leaves in that turn too: at one
lock-step sender in original mode no task wakes per message. Rows nobody awaits replies to are
left to the task, whose linger batches them.

Hub requests (`agent:transmit:request` pushes, reload-config, logs, stats) are answered by the
request handler given at construction.

Immediate-mode messages skip the queue: they are sent from a bounded in-memory buffer and
promise nothing (DESIGN.md, ACK modes). Like rows nobody awaits, they linger up to `linger_s` (or
until `max_batch` gathered) so the link writes one batch frame for many; their callback is ``Agent/<agent id>-<random uuid of this
dispatcher>.<n>``.

Invariants: rows are handed to the link in id order; nothing here logs a message body; a row is
confirmed, failed or released only through the queue.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from medagent.channels.base import HubClient, file_uploader
from medagent.cloud.messages import AgentMessage, TransmitRequest, TransmitResponse
from medagent.proto import hl7
from medagent.records import HL7_V2_CONTENT_TYPE, OCTET_STREAM_CONTENT_TYPE, InboundRecord

if TYPE_CHECKING:
    from medagent.queue import DurableQueue, QueuedMessage

__all__ = ["Dispatcher", "ReplyTarget", "TransmitLink", "UploadBackoff"]

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

    @property
    def encoding(self) -> str: ...

    @property
    def wants_replies(self) -> bool: ...

    def deliver_reply(self, remote: str, control_id: str, body: str, status_code: int = 200) -> bool: ...


@dataclass(slots=True)
class _AwaitingReply:
    since: float
    channel: str
    control_id: str


#: How long a reply is still routed to the device after the message was sent.
REPLY_ROUTING_WINDOW_S = 600.0


@dataclass(frozen=True, slots=True)
class UploadBackoff:
    """Waits between batches after a failed file upload: first, doubling, at most."""

    first_s: float = 0.5
    max_s: float = 30.0


#: Rows handed to the link and not yet confirmed, at most (a few seconds of traffic at full rate).
MAX_UNCONFIRMED = 5_000
#: ... and at most this many body bytes (one more batch may go over it), whatever the row sizes.
MAX_UNCONFIRMED_BYTES = 8 * 1024 * 1024

#: After a batch whose replies nobody awaits (fast/immediate modes), wait this long so more rows
#: gather into the next agent:batch. The hub's cost is mostly per batch (one store round, one
#: ack), so at one lock-step sender (~2k msg/s) 2 ms gave ~3 rows per batch and 10 ms ~18:
#: hub CPU per message -40 %, agent -8 % (benchmarks/perf-log.md). It delays only the hub's copy;
#: devices in these modes were answered at commit (or receipt), and original/two-phase rows never
#: wait here. Immediate-mode messages linger in their buffer the same way.
LINGER_S = 0.010

#: A byte-stream channel (tcp://, serial://) configured with bodyEncoding=utf-8.
BYTES_AS_UTF8 = "bytes-as-utf-8"
_BYTE_STREAM_KINDS = frozenset({"tcp", "serial"})


class _Batch:
    """What a batch of sends looks up once instead of per row: the link, whether the hub takes
    medagent's extensions, the send time, and per channel name (wants replies, encoding)."""

    __slots__ = ("channels", "extended", "link", "lookup", "now")

    def __init__(self, link: TransmitLink, lookup: Callable[[str], ReplyTarget | None]) -> None:
        self.link = link
        self.extended = "batch" in link.features  # medagent hub: extensions allowed (see messages.py)
        self.now = time.monotonic()
        self.lookup = lookup
        self.channels: dict[str, tuple[bool, str]] = {}

    def channel(self, name: str) -> tuple[bool, str]:
        """(a device waits for the bot's reply, the text encoding) of channel `name`."""
        info = self.channels.get(name)
        if info is None:
            target = self.lookup(name)
            info = self.channels[name] = (target is not None and target.wants_replies, _encoding_of(target))
        return info


def _encoding_of(channel: Any) -> str:
    """How a channel's bodies become transmit text: its text encoding, or BYTES_AS_UTF8."""
    if channel is None:
        return "utf-8"
    if getattr(channel, "kind", None) in _BYTE_STREAM_KINDS and channel.encoding == "utf-8":
        return BYTES_AS_UTF8
    return channel.encoding


#: medagent's hub ends an agent:error with this when the failure is its own and passing (a store
#: error): the row goes back to pending and is sent again, instead of failing for good.
TRANSIENT_ERROR_SUFFIX = "; resend it"


class Dispatcher:
    def __init__(
        self,
        queue: DurableQueue,
        agent_id: str,
        channels: Callable[[str], ReplyTarget | None],
        requests: Callable[[AgentMessage], Awaitable[AgentMessage | None]],
        *,
        hub: HubClient | None = None,
        data_dir: Path | None = None,
        max_batch: int = 1000,
        confirm_timeout_s: float = 60.0,
        linger_s: float = LINGER_S,
        upload_concurrency: int = 4,
        upload_backoff: UploadBackoff = UploadBackoff(),
        max_unconfirmed: int | None = None,
    ) -> None:
        self._queue = queue
        self._link: TransmitLink | None = None
        self._channel = channels
        self._requests = requests
        self._hub = hub
        self._data_dir = data_dir
        self._prefix = f"Agent/{agent_id}-{queue.queue_uuid}-"
        # Immediate units have no row: a random id per dispatcher plus a counter keeps their
        # callbacks unique (the hub deduplicates by callback) without a uuid4 per message.
        self._immediate_prefix = f"Agent/{agent_id}-{uuid.uuid4()}."
        self._immediate_ids = itertools.count(1)
        self._max_batch = max_batch
        self._confirm_timeout_s = confirm_timeout_s
        self._linger_s = linger_s
        self._upload_slots = asyncio.Semaphore(max(1, upload_concurrency))
        self._upload_backoff = upload_backoff
        self._upload_delay = 0.0
        self._sent_at: dict[int, float] = {}  # row id -> monotonic send time (confirm timeout clock)
        # Rows the hub asked to resend: Medplum's plain protocol settles a transmit on its agent:error,
        # and that settlement must not confirm a row the hub did not store.
        self._resend: set[int] = set()
        self._awaiting_reply: dict[int, _AwaitingReply] = {}
        # Rows whose reply reached the device before the hub confirmed them (a medagent hub sends
        # the bot's reply while the row commits): a resend of one must not answer the device twice.
        self._replied: set[int] = set()
        self._immediate: collections.deque[InboundRecord] = collections.deque()
        self._immediate_timer: asyncio.TimerHandle | None = None  # the buffer's linger
        self._live = asyncio.Event()
        # Flow control: at most max_unconfirmed rows out on the link; a stalled link (alive but
        # not confirming) must not pull the whole backlog from disk into memory.
        self._max_unconfirmed = max(1, MAX_UNCONFIRMED if max_unconfirmed is None else max_unconfirmed)
        self._window = asyncio.Event()
        self._window.set()
        self._sent_bytes: dict[int, int] = {}  # row id -> body bytes out on the link
        self._inflight_bytes = 0
        self._task: asyncio.Task[None] | None = None
        self._link_flush: Callable[[], None] | None = None  # the link's flush(), when it has one
        # The task waits in next_batch with no rows in hand: rows committed now may be sent by
        # _rows_committed in the commit's loop turn (ordering holds: nothing older is in hand).
        self._parked = False
        self.stopping = False
        self.sent = 0
        self.confirmed = 0
        self.window_waits = 0
        self.replies_routed = 0
        self.replies_unroutable = 0
        self.immediate_dropped = 0
        self.uploads = 0
        self.upload_failures = 0

    # -- lifecycle ---------------------------------------------------------------------------
    def attach(self, link: TransmitLink) -> None:
        """The link this dispatcher sends on (the link is built with the dispatcher as handler)."""
        self._link = link
        self._link_flush = getattr(link, "flush", None)

    def start(self) -> None:
        assert self._link is not None, "attach(link) first"
        self._queue.set_rows_listener(self._rows_committed)
        self._task = asyncio.get_running_loop().create_task(self._run(), name="medagent-dispatcher")

    async def stop(self) -> None:
        self.stopping = True
        self._queue.set_rows_listener(None)
        if self._link is not None:
            self._flush_immediate()  # what lingers goes out before the link closes (timer cancelled)
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

    # -- LinkHandler -------------------------------------------------------------------------
    def on_live(self, features: Mapping[str, Any]) -> None:
        log.info("link live (hub features: %s)", ", ".join(sorted(features)) or "none")
        self._live.set()
        self._flush_immediate()

    def on_down(self, reason: str) -> None:
        log.log(logging.INFO if self.stopping else logging.WARNING, "link down: %s", reason)
        self._live.clear()
        if self._sent_at:
            log.info("link down: %d unconfirmed messages go back to the queue", len(self._sent_at))
        self._sent_at.clear()
        self._sent_bytes.clear()
        self._inflight_bytes = 0
        self._queue.release(None)
        self._update_window()

    def on_confirmed(self, callbacks: Sequence[str]) -> None:
        ids = []
        for callback in callbacks:
            row_id = self.row_id_of(callback)
            if row_id is not None and row_id not in self._resend:
                self._forget(row_id)
                self._replied.discard(row_id)
                ids.append(row_id)
        if ids:
            self.confirmed += len(ids)
            self._queue.confirm(ids)
            self._update_window()

    def _forget(self, row_id: int) -> float | None:
        """Drop a row from the in-flight books; its send time, or None when it was not out."""
        self._inflight_bytes -= self._sent_bytes.pop(row_id, 0)
        return self._sent_at.pop(row_id, None)

    def _update_window(self) -> None:
        if len(self._sent_at) < self._max_unconfirmed and self._inflight_bytes < MAX_UNCONFIRMED_BYTES:
            self._window.set()
        else:
            self._window.clear()

    def on_transmit_error(self, callback: str | None, reason: str) -> None:
        """The hub refused a message (agent:error with its callback): fail the row, keep the reason."""
        row_id = self.row_id_of(callback)
        if row_id is None or self._forget(row_id) is None:
            return  # not ours, or already settled/released: the queue has the row's fate
        self._awaiting_reply.pop(row_id, None)
        if reason.rstrip().endswith(TRANSIENT_ERROR_SUFFIX):
            # The hub could not store it this time (its disk, its database): not the message's fault.
            log.info("hub asked to resend queued message %d later: %s", row_id, reason)
            self._resend.add(row_id)
            self._queue.release([row_id])
            self._update_window()
            return
        log.warning("hub refused queued message %d: %s", row_id, reason)
        self._replied.discard(row_id)
        self._queue.fail(row_id, reason)
        self._update_window()

    def on_transmit_response(self, message: TransmitResponse) -> None:
        row_id = self.row_id_of(message.callback)
        entry = None if row_id is None else self._awaiting_reply.pop(row_id, None)
        if row_id is None or entry is None:
            # Immediate-mode message, or a late reply for a row that was re-sent: nothing waits.
            self.replies_unroutable += 1
            return
        channel = self._channel(entry.channel)
        if channel is None:
            self.replies_unroutable += 1
            return
        status = message.status_code if message.status_code is not None else 200
        if channel.deliver_reply(message.remote, entry.control_id, message.body, status):
            self.replies_routed += 1
        if row_id in self._sent_at:  # answered before its confirmation (see _replied)
            self._replied.add(row_id)

    async def on_request(self, message: AgentMessage) -> AgentMessage | None:
        return await self._requests(message)

    # -- immediate mode ------------------------------------------------------------------------
    def send_immediate(self, record: InboundRecord) -> None:
        """Buffer an immediate-mode unit; its transmit is built and sent with the buffer's batch."""
        immediate = self._immediate
        if len(immediate) >= IMMEDIATE_BUFFER_LIMIT:
            immediate.popleft()
            self.immediate_dropped += 1
        immediate.append(record)
        if not self._live.is_set():
            return  # on_live sends the buffer
        if len(immediate) >= self._max_batch or self._linger_s <= 0:
            self._flush_immediate()
        elif self._immediate_timer is None:
            self._immediate_timer = asyncio.get_running_loop().call_later(self._linger_s, self._flush_immediate)

    def _flush_immediate(self) -> None:
        if self._immediate_timer is not None:
            self._immediate_timer.cancel()
            self._immediate_timer = None
        immediate = self._immediate
        link = self._require_link()
        if not immediate or not link.live:
            return
        batch = _Batch(link, self._channel)
        no_reply = True if batch.extended else None  # the device had its AA already
        prefix, ids = self._immediate_prefix, self._immediate_ids
        while immediate:
            record = immediate[0]
            message = self._transmit(record.channel, record.remote, record.content_type, record.body,
                                     f"{prefix}{next(ids)}", batch.channel(record.channel)[1], None, no_reply)
            if not link.send_transmit(message):
                break
            immediate.popleft()
            self.sent += 1
        self._flush_link()

    def _flush_link(self) -> None:
        """The transmits queued in this loop turn leave now, as one write (AgentLink.flush)."""
        if self._link_flush is not None:
            self._link_flush()

    # -- housekeeping ---------------------------------------------------------------------------
    def expire_unconfirmed(self) -> int:
        """Release rows the hub has not confirmed in time, so they are sent again."""
        now = time.monotonic()
        deadline = now - self._confirm_timeout_s
        stale = [row_id for row_id, sent_at in self._sent_at.items() if sent_at < deadline]
        for row_id in stale:
            self._forget(row_id)
        if stale:
            log.warning("%d messages unconfirmed after %.0f s; sending them again", len(stale), self._confirm_timeout_s)
            self._queue.release(stale)
            self._update_window()
        routing_deadline = now - REPLY_ROUTING_WINDOW_S
        for row_id in [r for r, e in self._awaiting_reply.items() if e.since < routing_deadline]:
            del self._awaiting_reply[row_id]
        return len(stale)

    def stats(self) -> dict[str, Any]:
        return {
            "sent": self.sent,
            "confirmed": self.confirmed,
            "inflight": len(self._sent_at),
            "maxUnconfirmed": self._max_unconfirmed,
            "inflightBytes": self._inflight_bytes,
            "windowWaits": self.window_waits,
            "awaitingReply": len(self._awaiting_reply),
            "immediateBuffered": len(self._immediate),
            "immediateDropped": self.immediate_dropped,
            "repliesRouted": self.replies_routed,
            "repliesUnroutable": self.replies_unroutable,
            "uploads": self.uploads,
            "uploadFailures": self.upload_failures,
        }

    # -- the loop ---------------------------------------------------------------------------------
    async def _run(self) -> None:
        while True:
            await self._live.wait()
            self._update_window()
            if not self._window.is_set():
                self.window_waits += 1
                await self._window.wait()
                continue
            if self._upload_delay:
                await asyncio.sleep(self._upload_delay)
            room = self._max_unconfirmed - len(self._sent_at)
            self._parked = True
            try:
                rows = await self._queue.next_batch(min(self._max_batch, room))
            finally:
                self._parked = False
            replies_awaited = await self._send_rows(rows)
            self._flush_link()
            if not replies_awaited and len(rows) < self._max_batch and self._linger_s > 0:
                # Nobody waits on these (fast/immediate ACKs were sent at commit): let more rows
                # gather so the hub handles fewer, larger batches. Original and two-phase rows
                # never wait here, since a device is waiting for their bot reply.
                await asyncio.sleep(self._linger_s)

    def _rows_committed(self) -> None:
        """The queue's rows listener: rows were just committed. While the task is parked in
        next_batch and a device waits for the first row's reply, send them now, in the commit's
        loop turn, and write the frame (at one lock-step sender in original mode: no dispatcher or
        writer task wake-up per message). Rows nobody awaits are left to the task: its wake-up and
        linger gather them into larger batches (sending them here too doubled the batches, and
        the hub's rounds, at 50 senders in immediate mode)."""
        link = self._link
        if not self._parked or self.stopping or self._upload_delay or link is None or not link.live:
            return
        first = self._queue.peek_ready()
        if first is None:
            return
        target = self._channel(first.channel)
        if target is None or not target.wants_replies:
            return
        room = self._max_unconfirmed - len(self._sent_at)
        if room <= 0 or self._inflight_bytes >= MAX_UNCONFIRMED_BYTES:
            return
        rows = self._queue.take_ready(min(self._max_batch, room))
        if rows:
            self._send_inline(rows, 0, len(rows))
            self._flush_link()

    async def _send_rows(self, rows: Sequence[QueuedMessage]) -> bool:
        """Hand rows to the link in order (uploading file payloads first); True when a device
        waits for any of their replies."""
        replies_awaited = False
        index = 0
        while index < len(rows):
            end = index
            while end < len(rows) and _file_of(rows[end]) is None:
                end += 1
            sent, waits = self._send_inline(rows, index, end)
            replies_awaited |= waits
            if not sent:
                return replies_awaited
            index = end
            while end < len(rows) and _file_of(rows[end]) is not None:
                end += 1
            if index == end:
                continue
            uploaded = await self._upload(rows[index:end])
            batch = _Batch(self._require_link(), self._channel)  # after the await: a fresh look
            for offset, result in enumerate(uploaded):
                if result is None:  # this row and every later one go back, in order
                    self._queue.release([r.row_id for r in rows[index + offset :]])
                    return replies_awaited
                reply_wanted = self._send_row(rows, index + offset, *result, batch)
                if reply_wanted is None:
                    return replies_awaited
                replies_awaited |= reply_wanted
            index = end
        return replies_awaited

    def _send_inline(self, rows: Sequence[QueuedMessage], start: int, end: int) -> tuple[bool, bool]:
        waits = False
        if start == end:
            return True, waits
        batch = _Batch(self._require_link(), self._channel)
        for index in range(start, end):
            row = rows[index]
            sent = self._send_row(rows, index, row.body, row.content_type, batch)
            if sent is None:
                return False, waits
            waits |= sent
        return True, waits

    def _send_row(self, rows: Sequence[QueuedMessage], index: int, body: bytes, content_type: str,
                  batch: _Batch) -> bool | None:
        """Send rows[index] with ``body``: whether a device waits for its reply, or None when the
        link refused the write (then it and every later row went back to the queue)."""
        row = rows[index]
        wants_reply, encoding = batch.channel(row.channel)
        duplicate_of: str | None = None
        no_reply: bool | None = None
        if batch.extended:
            duplicate_of = None if row.duplicate_of is None else self.callback_for(row.duplicate_of)
            no_reply = not wants_reply or None
        message = self._transmit(row.channel, row.remote, content_type, body, self.callback_for(row.row_id),
                                 encoding, duplicate_of, no_reply)  # one object per row, no replace()
        if not batch.link.send_transmit(message):
            self._queue.release([r.row_id for r in rows[index:]])
            return None
        now = batch.now
        self._sent_at[row.row_id] = now
        self._sent_bytes[row.row_id] = len(body)
        self._inflight_bytes += len(body)
        self._resend.discard(row.row_id)
        awaited = wants_reply and row.row_id not in self._replied  # (a device already answered waits for nothing)
        if awaited:
            self._awaiting_reply[row.row_id] = _AwaitingReply(now, row.channel, row.control_id)
        self.sent += 1
        return awaited

    async def _upload(self, rows: Sequence[QueuedMessage]) -> list[tuple[bytes, str] | None]:
        """Upload the rows' files concurrently; per row (body, content type) or None on failure."""
        results = await asyncio.gather(*(self._upload_one(row) for row in rows))
        if any(result is None for result in results):
            backoff = self._upload_backoff
            self._upload_delay = min(backoff.max_s, self._upload_delay * 2 if self._upload_delay else backoff.first_s)
        else:
            self._upload_delay = 0.0
        return list(results)

    async def _upload_one(self, row: QueuedMessage) -> tuple[bytes, str] | None:
        payload = _file_of(row)
        assert payload is not None
        uploader = file_uploader(row.content_type)
        if uploader is None or self._hub is None or self._data_dir is None:
            self.upload_failures += 1
            log.error("queued message %d: no file uploader for %s; it stays queued", row.row_id, row.content_type)
            return None
        async with self._upload_slots:
            try:
                result = await uploader(self._hub, self._data_dir / payload.path, payload, row.body)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - any failure leaves the row pending for a retry
                self.upload_failures += 1
                log.warning("queued message %d: file upload failed (%s); retrying later", row.row_id,
                            str(exc) or type(exc).__name__)
                return None
        self.uploads += 1
        return result

    def _require_link(self) -> TransmitLink:
        link = self._link
        assert link is not None, "attach(link) first"
        return link

    @staticmethod
    def _transmit(channel: str, remote: str, content_type: str, body: bytes, callback: str,
                  encoding: str, duplicate_of: str | None = None, no_reply: bool | None = None) -> TransmitRequest:
        """The transmit of one unit; ``encoding`` is its channel's text encoding; `duplicate_of`
        and `no_reply` are the medagent hub's extensions (None towards a Medplum hub)."""
        if content_type == HL7_V2_CONTENT_TYPE:
            try:
                text = hl7.decode(body, default=encoding)
            except hl7.Hl7Error:
                # The channel checked the charset at intake; a changed config must not wedge the queue.
                text = body.decode("latin-1")
        elif content_type == OCTET_STREAM_CONTENT_TYPE:
            # Medplum's byte-stream channels send hex (bytestream.ts); bodyEncoding=utf-8 sends text
            text = body.decode("utf-8", errors="replace") if encoding == BYTES_AS_UTF8 else body.hex()
        else:  # JSON documents (file uploaders' results) are UTF-8; other text is in the channel's encoding
            json_like = content_type == "application/json" or content_type.endswith("+json")
            text = body.decode("utf-8" if json_like else encoding, errors="replace")
        return TransmitRequest(remote=remote, content_type=content_type, body=text, channel=channel, callback=callback,
                               duplicate_of=duplicate_of, no_reply=no_reply)


def _file_of(row: QueuedMessage) -> Any:
    """The row's FilePayload, or None (``file`` arrives on QueuedMessage with the queue migration)."""
    return getattr(row, "file", None)
