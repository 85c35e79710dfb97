"""Inbound messages from agents: store, confirm, run the channel's bot, answer.

Theory of operation
-------------------
Every connection has an :class:`IntakePipeline`. The socket reader hands it the transmit
requests of each frame (one, or all of an ``agent:batch``); a single task drains everything
received meanwhile and, per drained group:

1. checks ``Agent.status`` (``off`` -> ``agent:error "Agent.status is currently set to off"``
   for each message, nothing stored — medplum-protocol.md §2), then the free-space watermark
   (:class:`~medagent.hub.diskspace.DiskWatermark`): while the disk is nearly full the group
   *waits* — not stored, not acknowledged, not failed — and, the backlog filling, the socket
   reader stops and TCP flow control holds the agent (like any backpressure). The agent is told
   once per episode with an ``agent:error`` *without* callback ("Hub storage is nearly full
   ..."; agents only log those), because an error carrying a transmit's callback makes an agent
   give that message up (ours fails the queue row, Medplum's drops it). When there is room
   again the waiting group is stored and acknowledged as usual: nothing is lost or failed;
2. refuses a message for a channel the sending agent does not have with ``agent:error
   "Channel not found"`` (Medplum's ``handleTransmit`` does the same), nothing stored — an agent
   can never write into another agent's channel (issue 18, defect 6); then stores every other
   message in **one** transaction (deduplicated by callback). Inside that transaction, once
   its lookup found which messages need their bot, the inline bots
   (:func:`~medagent.hub.botrunner.inline_bot`, e.g. the built-in ACK bot) of channels with
   nothing queued run (:meth:`IntakePipeline._answerer`): each such message is inserted with
   its result, one row write. On a store that allows it (SQLite: the round is the only writer,
   so only a failing COMMIT can still change its outcome) their replies are written to the
   agent right before the COMMIT (:meth:`IntakePipeline._send_early`), so the reply travels,
   and the agent answers its device, while the hub commits: at one lock-step sender the commit
   leaves the round trip. This promises no more than before: the agent keeps the message until
   the batch ack, which still follows the commit; if the COMMIT fails the agent is told to
   resend, as after any failed round, and does not answer its device a second time (its
   dispatcher remembers rows answered before their confirmation). On PostgreSQL the replies
   leave after the commit (step 4);
3. answers resends of already answered callbacks with the stored reply (or, while that reply's
   result is not yet committed, with the reply kept in memory; the bot is not run again) and
   hands every message not answered yet to the hub-wide :class:`ChannelDispatcher`, which runs
   the inline bots right here, in this task, when their channel has nothing queued;
4. sends ``agent:batch:ack`` with the highest ``seq`` of the group (cumulative), then the
   replies not sent yet (stored replies of resends, errors, inline bots' replies on
   PostgreSQL), in one flush of the connection (one TCP segment), so that the agent wakes once
   for all. An ack with nothing to send beside it waits up to
   :data:`~medagent.hub.websocket.ACK_LINGER_S` for the connection's next write (at one sender
   in original mode, the next message's reply) and rides in it.

Other bots (thread, async) and channels with messages still queued go through the dispatcher's
FIFO per (agent, channel), so one channel's messages reach its bot in the order received, while
channels proceed independently. A channel worker drains its FIFO, runs the bot for each message
in order, then sends the ``agent:transmit:response`` frames — to the agent's *current*
connection, so a reply survives a reconnect — wrapped in ``agent:batch`` frames when that
connection batches.

Replies of bots run outside the round go out as soon as the bot answered; the bot's result
(reply, status) is recorded by the writer's *next* round (:meth:`StoreWriter.defer_results`),
normally the one storing the next inbound group. The reply never claims more than is
committed: the message itself was committed before its batch ack, and the agent keeps a message
until that ack. A hub that stops between a
reply and its result's commit leaves the message stored without a result; if the agent resends
it (it lost the reply with the link), the bot runs again — built-in bots are idempotent, a user
bot must be too (or tolerate it).

The agent's post-switch health message (channel :data:`HEALTH_CHANNEL`, medagent.ops.post_switch)
is, on a hub without a channel of that name, answered AA and not stored: it is a probe of the
new agent version, not data, and a "Channel not found" error would log a WARNING at every upgrade.

Backpressure: each agent has a :class:`Backlog` of messages received but not yet answered; when
it exceeds ``max_backlog_messages`` the socket reader waits, and TCP flow control slows the agent.

Invariants: ``agent:batch:ack`` for seq n is sent only after every message of the batches up to
n was committed or answered with an ``agent:error`` (which settles that send: the agent's
session never counts it as acked by a later cumulative ack); a callback is in the hub's
in-flight map from storage until its result is committed, and a resend arriving meanwhile is
not run again; nothing here logs message text.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import orjson

from medagent.cloud.messages import (
    CONTENT_TYPE_HL7_V2,
    CONTENT_TYPE_TEXT,
    AgentMessage,
    BatchAck,
    ErrorMessage,
    TransmitRequest,
    TransmitResponse,
    new_callback,
)
from medagent.hub import hl7text
from medagent.hub.botrunner import NO_REPLY_STATUS, BotEvent, BotOutcome, BotRunner, failure_outcome
from medagent.hub.botstore import BotStore
from medagent.hub.diskspace import CHECK_INTERVAL_S, DiskWatermark
from medagent.hub.records import (
    AgentStatus,
    Answer,
    ChannelStatus,
    IncomingMessage,
    IntakeKind,
    IntakeResult,
    MessageResult,
    StoredReply,
)
from medagent.hub.registry import AgentRegistry, Connection
from medagent.hub.store import HubStore, NotFound, now_ms
from medagent.hub.writer import StoreWriter

if TYPE_CHECKING:
    from medagent.proto.hl7 import Header

__all__ = [
    "AGENT_OFF_ERROR", "CHANNEL_NOT_FOUND", "HEALTH_CHANNEL", "Backlog", "ChannelDispatcher", "Inflight", "IntakePipeline",
]

log = logging.getLogger(__name__)

AGENT_OFF_ERROR = "Agent.status is currently set to off"
CHANNEL_NOT_FOUND = "Channel not found"
#: the channel of an agent's post-switch health message (medagent.ops.post_switch.HEALTH_CHANNEL);
#: a hub without a channel of that name answers it AA and stores nothing (no "Channel not found")
HEALTH_CHANNEL = "upgrade-health"
#: a message with a NUL character, on a store that cannot keep one (PostgreSQL text)
NUL_REFUSED = "The message contains a NUL character, which this hub's store cannot keep"
_WORKER_GROUP_MAX = 1000
#: How long agent status and channel -> bot lookups are reused.
LOOKUP_TTL_S = 1.0


def dicom_ids(content_type: str, body: str) -> tuple[str | None, str | None]:
    """(SOP Instance UID, modality or SOP class) of a DICOM channel's transmit (Medplum's JSON
    document plus medagent's ``instance``), so DICOM instances list like other messages; else Nones."""
    if content_type != "application/json" or '"sopInstanceUid"' not in body:
        return None, None
    try:
        document = orjson.loads(body)
        instance = document["instance"]
        modality = ((document.get("dataset") or {}).get("00080060") or {}).get("Value") or [None]
        return str(instance["sopInstanceUid"]), str(modality[0] or instance.get("sopClassUid") or "") or None
    except (orjson.JSONDecodeError, KeyError, TypeError, AttributeError):
        return None, None


class Backlog:
    """Count of an agent's messages received but not answered, with a high-water mark."""

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._count = 0
        self._room = asyncio.Event()
        self._room.set()

    def try_reserve(self, n: int) -> bool:
        """Take ``n`` at once when under the mark (the common case: no coroutine, no wait)."""
        if self._count >= self._limit:
            return False
        self._count += n
        return True

    async def reserve(self, n: int) -> None:
        while self._count >= self._limit:
            self._room.clear()
            await self._room.wait()
        self._count += n

    def release(self, n: int = 1) -> None:
        self._count = max(0, self._count - n)
        if self._count < self._limit:
            self._room.set()

    @property
    def count(self) -> int:
        return self._count


@dataclass(frozen=True, slots=True)
class BotJob:
    """One stored message waiting for its channel's bot (or refused with ``refusal``)."""

    message: IncomingMessage
    header: Header | None
    bot: str | None
    refusal: str | None


def response_for(message: IncomingMessage, reply: StoredReply) -> TransmitResponse:
    return TransmitResponse(
        remote=message.remote, content_type=reply.content_type, body=reply.body, channel=message.channel,
        callback=message.callback, status_code=reply.status_code,
    )


class EarlyReplies:
    """The replies a store round's inline bots gave (by position in the group), and whether
    they were sent before the round's COMMIT (IntakePipeline._send_early)."""

    __slots__ = ("replies", "sent")

    def __init__(self) -> None:
        self.replies: dict[int, AgentMessage] = {}
        self.sent = False


class Inflight(dict[str, "StoredReply | None"]):
    """Callbacks being answered: None while the bot runs, then the reply until its result is
    committed (a resend meanwhile gets that reply, and the bot does not run again)."""

    def add(self, callback: str) -> None:
        self[callback] = None


class ChannelDispatcher:
    """Hub-wide FIFO per (agent, channel) feeding the bots; answers through the registry."""

    def __init__(self, store: HubStore, writer: StoreWriter, bots: BotRunner,
                 registry: AgentRegistry[Connection], backlog_limit: int, disk: DiskWatermark | None = None) -> None:
        self._store = store
        self._bot_store = BotStore(store, asyncio.get_running_loop())
        #: the free-space watermark every connection's intake checks before storing
        self.disk = disk
        self._writer = writer
        self._bots = bots
        #: the hub's agent -> current connection map (answers go to the current one)
        self.registry = registry
        self._backlog_limit = backlog_limit
        self._queues: dict[tuple[str, str], collections.deque[BotJob]] = {}
        self._tasks: dict[tuple[str, str], asyncio.Task[None]] = {}
        self._backlogs: dict[str, Backlog] = {}
        self.inflight = Inflight()

    def backlog(self, agent_id: str) -> Backlog:
        backlog = self._backlogs.get(agent_id)
        if backlog is None:
            backlog = self._backlogs[agent_id] = Backlog(self._backlog_limit)
        return backlog

    def dispatch(self, agent_id: str, jobs: Sequence[BotJob]) -> list[AgentMessage]:
        """Run the jobs of channels with an inline bot and nothing queued right here, and return
        their replies; queue every other job on its channel's worker (which answers itself).

        Once a job of a channel is queued, the later jobs of that channel queue behind it, so a
        channel's messages are answered in the order received either way."""
        done: list[BotJob] = []
        outcomes: list[BotOutcome] = []
        for job in jobs:
            outcome = self.answer_now(agent_id, job.message, job.header, job.bot, job.refusal)
            if outcome is None:
                self._enqueue((agent_id, job.message.channel), job)
            else:
                outcomes.append(outcome)
                done.append(job)
        return self._finish(agent_id, done, outcomes) if done else []

    def answer_now(self, agent_id: str, message: IncomingMessage, header: Header | None, bot: str | None,
                   refusal: str | None) -> BotOutcome | None:
        """The outcome of ``message`` when its channel's bot is inline (or it is refused) and the
        channel has nothing queued; ``None`` when it must queue behind its channel's worker."""
        if (agent_id, message.channel) in self._queues or (bot is not None and not self._bots.is_inline(bot)):
            return None
        event = self._event(agent_id, message, header)
        if bot is None:
            return failure_outcome(event, "AR", refusal or "no bot for this channel")
        return self._bots.run_inline(bot, event)

    def submit(self, jobs: Sequence[BotJob]) -> None:
        """Queue every job on its channel's worker (which answers through the registry)."""
        for job in jobs:
            self._enqueue((job.message.agent_id, job.message.channel), job)

    def _enqueue(self, key: tuple[str, str], job: BotJob) -> None:
        queue = self._queues.get(key)
        if queue is None:
            queue = self._queues[key] = collections.deque()
            self._tasks[key] = asyncio.create_task(self._work(key, queue), name=f"medagent-hub-channel-{key[1]}")
        queue.append(job)

    async def _work(self, key: tuple[str, str], queue: collections.deque[BotJob]) -> None:
        try:
            while queue:
                jobs = [queue.popleft() for _ in range(min(len(queue), _WORKER_GROUP_MAX))]
                await self._process(key[0], jobs)
        finally:
            # no await between the last emptiness check and this: dispatch() sees a consistent state
            del self._queues[key]
            del self._tasks[key]

    def _event(self, agent_id: str, message: IncomingMessage, header: Header | None) -> BotEvent:
        return BotEvent(
            input=message.body, header=header, content_type=message.content_type, agent_id=agent_id,
            channel=message.channel, remote=message.remote, callback=message.callback,
            received_at=message.received_at, store=self._bot_store,
        )

    async def _process(self, agent_id: str, jobs: list[BotJob]) -> None:
        outcomes: list[BotOutcome] = []
        try:
            for job in jobs:
                event = self._event(agent_id, job.message, job.header)
                if job.bot is None:
                    outcomes.append(failure_outcome(event, "AR", job.refusal or "no bot for this channel"))
                else:
                    outcomes.append(await self._bots.run(job.bot, event))
        finally:  # cancelled (hub stopping): the jobs not run are forgotten, the agent resends them
            for job in jobs[len(outcomes):]:
                self.inflight.pop(job.message.callback, None)
            self.backlog(agent_id).release(len(jobs) - len(outcomes))
        await send_to_agent(self.registry, agent_id, self._finish(agent_id, jobs, outcomes))

    def _finish(self, agent_id: str, jobs: Sequence[BotJob], outcomes: Sequence[BotOutcome]) -> list[AgentMessage]:
        """Answered: keep each reply in :attr:`inflight` (a resend gets it) until the result,
        deferred to the writer's next round, is committed; release the backlog; the replies."""
        at = now_ms()
        results: list[MessageResult] = []
        responses: list[AgentMessage] = []
        inflight = self.inflight
        for job, outcome in zip(jobs, outcomes):
            message = job.message
            results.append(MessageResult(message.callback, outcome.status, outcome.reply, outcome.error, at))
            inflight[message.callback] = outcome.reply
            if message.reply_wanted:
                responses.append(response_for(message, outcome.reply))
        self.backlog(agent_id).release(len(jobs))
        self._writer.defer_results(results, functools.partial(self._recorded, [job.message.callback for job in jobs]))
        return responses

    def _recorded(self, callbacks: list[str], error: BaseException | None) -> None:
        for callback in callbacks:
            self.inflight.pop(callback, None)
        if error is not None and not isinstance(error, asyncio.CancelledError):
            log.error("recording the results of %d answered messages failed (%s); they stay stored without a reply",
                      len(callbacks), type(error).__name__)

    async def close(self) -> None:
        tasks = list(self._tasks.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def send_to_agent(registry: AgentRegistry[Connection], agent_id: str, messages: list[AgentMessage]) -> None:
    """Send to the agent's current connection; when it has none, the agent's resend gets them."""
    if not messages:
        return
    connection = registry.current(agent_id)
    if connection is None:
        log.info("agent %s is not connected; %d replies wait for its resend", agent_id, len(messages))
        return
    try:
        await connection.send_many(messages)
    except (ConnectionError, RuntimeError) as exc:
        log.info("sending %d replies to agent %s failed (%s); they wait for its resend",
                 len(messages), agent_id, type(exc).__name__)


def health_reply(request: TransmitRequest) -> list[AgentMessage]:
    """The answer to an agent's post-switch health message (medagent.ops.post_switch) on a hub
    with no channel of that name: not stored, no bot, AA (its ACK when the MSH is readable)."""
    if request.no_reply:
        return []
    header = hl7text.scan_header(request.body) if request.content_type == CONTENT_TYPE_HL7_V2 else None
    try:
        reply = StoredReply(hl7text.ack_text(request.body, header, "AA"), CONTENT_TYPE_HL7_V2, 200)
    except hl7text.Hl7Error:
        reply = StoredReply("", CONTENT_TYPE_TEXT, NO_REPLY_STATUS)
    return [TransmitResponse(remote=request.remote, content_type=reply.content_type, body=reply.body,
                             channel=request.channel, callback=request.callback, status_code=reply.status_code)]


class IntakePipeline:
    """Per-connection intake: store each drained group in one transaction, ack, dispatch."""

    def __init__(self, agent_id: str, connection: Connection, store: HubStore, writer: StoreWriter,
                 dispatcher: ChannelDispatcher) -> None:
        self.agent_id = agent_id
        self._connection = connection
        self._store = store
        self._writer = writer
        self._dispatcher = dispatcher
        self._backlog = dispatcher.backlog(agent_id)
        self._pending: list[tuple[Sequence[TransmitRequest], int | None]] = []
        self._wake = asyncio.Event()
        # Agent status and channel -> bot change rarely; reading them per group cost the loop a
        # SQLite query each time. A change is seen within LOOKUP_TTL_S.
        self._active_until = 0.0
        self._bots: dict[str, tuple[str | None, str | None] | None] = {}
        self._bots_until = 0.0
        self._active_generation = -1
        self._bots_generation = -1
        self._task = asyncio.create_task(self._run(), name=f"medagent-hub-intake-{agent_id}")

    async def submit(self, requests: Sequence[TransmitRequest], seq: int | None) -> None:
        """Queue one frame's transmit requests (``seq`` for an ``agent:batch``); may wait for room."""
        if requests and not self._backlog.try_reserve(len(requests)):
            await self._backlog.reserve(len(requests))
        self._pending.append((requests, seq))
        self._wake.set()

    async def _run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            group, self._pending = self._pending, []
            if not group:
                continue
            try:
                await self._process(group)
            except ConnectionError as exc:
                log.info("agent %s: answering a frame failed (%s)", self.agent_id, type(exc).__name__)
            except Exception:  # keep taking frames: the agent resends what was not acknowledged
                log.exception("agent %s: processing %d frames failed", self.agent_id, len(group))

    async def _process(self, group: list[tuple[Sequence[TransmitRequest], int | None]]) -> None:
        requests = [r for frame, _ in group for r in frame]
        seqs = [seq for _, seq in group if seq is not None]
        committed = True
        replies: list[AgentMessage] = []
        answers: list[AgentMessage] = []
        if requests and not (self._active_cached() or await self._agent_active()):
            replies = [ErrorMessage(AGENT_OFF_ERROR, r.callback) for r in requests]
            self._backlog.release(len(requests))
        elif requests:
            disk = self._dispatcher.disk
            if disk is not None and disk.refusal() is not None:
                await self._wait_for_room(disk, len(requests))
            committed, replies, answers = await self._store_group(requests)
        if answers and self._dispatcher.registry.current(self.agent_id) is not self._connection:
            await send_to_agent(self._dispatcher.registry, self.agent_id, answers)  # it reconnected meanwhile
            answers = []
        # the ack first, then the replies, in one flush (one segment: the agent wakes once)
        if seqs and committed:
            await self._connection.send_many([BatchAck(max(seqs)), *replies, *answers])
        elif replies or answers:
            await self._connection.send_many(replies + answers)

    async def _wait_for_room(self, disk: DiskWatermark, count: int) -> None:
        """Hold this group while the disk is under the watermark (see the module docstring)."""
        if (reason := disk.refusal()) is None:
            return
        disk.held += count
        await self._connection.send(ErrorMessage(f"{reason}; intake paused until there is room"))
        while disk.refusal() is not None:  # ends with room, or when close() cancels this task
            await asyncio.sleep(CHECK_INTERVAL_S)

    def _active_cached(self) -> bool:
        """The agent was seen active within LOOKUP_TTL_S and the hub's configuration is unchanged."""
        return time.monotonic() < self._active_until and self._active_generation == self._store.config_generation

    async def _agent_active(self) -> bool:
        now = time.monotonic()
        try:
            active = (await self._store.get_agent(self.agent_id)).status is AgentStatus.ACTIVE
        except NotFound:
            return False
        if active:
            self._active_until, self._active_generation = now + LOOKUP_TTL_S, self._store.config_generation
        return active

    async def _store_group(self, requests: list[TransmitRequest]) -> tuple[bool, list[AgentMessage], list[AgentMessage]]:
        """Store the group and run its inline bots; ``(committed, replies for this connection,
        bot answers for the agent's current connection)``."""
        received_at = now_ms()
        incoming: list[IncomingMessage] = []
        headers: list[Header | None] = []
        replies: list[AgentMessage] = []
        channels = self._channels()
        for r in requests:
            if not r.channel:
                replies.append(ErrorMessage("Missing channel", r.callback))
                self._backlog.release()
                continue
            if r.channel not in channels:
                channels[r.channel] = await self._channel_bot(r.channel)
            if channels[r.channel] is None:
                if r.channel == HEALTH_CHANNEL:
                    replies.extend(health_reply(r))
                else:
                    replies.append(ErrorMessage(CHANNEL_NOT_FOUND, r.callback))
                self._backlog.release()
                continue
            if not self._store.stores_nul and "\x00" in f"{r.body}{r.remote}{r.callback}{r.duplicate_of}":
                # PostgreSQL text cannot hold NUL: refuse this message alone, not the whole round
                replies.append(ErrorMessage(NUL_REFUSED, r.callback))
                self._backlog.release()
                continue
            header = hl7text.scan_header(r.body) if r.content_type == CONTENT_TYPE_HL7_V2 else None
            headers.append(header)
            if header is not None:
                control_id, message_type = header.control_id, hl7text.short_type(header)
            else:
                control_id, message_type = dicom_ids(r.content_type, r.body)
            incoming.append(IncomingMessage(
                agent_id=self.agent_id, channel=r.channel, remote=r.remote,
                callback=r.callback or new_callback(self.agent_id), content_type=r.content_type, body=r.body,
                received_at=received_at, control_id=control_id, message_type=message_type,
                duplicate_of=r.duplicate_of, reply_wanted=not r.no_reply,
            ))
        early = EarlyReplies()
        try:
            results = await self._writer.store_incoming(incoming, self._answerer(incoming, headers, channels, early),
                                                        functools.partial(self._send_early, early))
        except Exception as exc:
            log.error("storing %d messages of agent %s failed: %s", len(incoming), self.agent_id, type(exc).__name__)
            self._backlog.release(len(incoming))
            return False, replies + [
                ErrorMessage(f"The hub could not store the message ({type(exc).__name__}); resend it", m.callback)
                for m in incoming
            ], []
        answers: list[AgentMessage] = []
        jobs = await self._jobs(incoming, headers, results, replies, answers, early)
        return True, replies, answers + self._dispatcher.dispatch(self.agent_id, jobs)

    def _answerer(self, incoming: list[IncomingMessage], headers: list[Header | None],
                  channels: dict[str, tuple[str | None, str | None] | None], early: EarlyReplies) -> Answer:
        """The store round's :data:`~medagent.hub.records.Answer` for this group: the inline bots
        run inside the round (after the round's lookup found the message needs its bot), so each
        such message is written once, with its result, and is never in :attr:`ChannelDispatcher.inflight`.
        A callback being answered elsewhere, or a channel with messages queued, is left to
        :meth:`_jobs`. The replies wanted go into ``early``, for :meth:`_send_early`."""
        agent_id, inflight, answer_now = self.agent_id, self._dispatcher.inflight, self._dispatcher.answer_now

        def answer(i: int) -> MessageResult | None:
            message = incoming[i]
            if message.callback in inflight:
                return None
            found = channels.get(message.channel)
            bot, refusal = found if found is not None else (None, CHANNEL_NOT_FOUND)
            outcome = answer_now(agent_id, message, headers[i], bot, refusal)
            if outcome is None:
                return None
            if message.reply_wanted:
                early.replies[i] = response_for(message, outcome.reply)
            return MessageResult(message.callback, outcome.status, outcome.reply, outcome.error, now_ms())

        return answer

    def _send_early(self, early: EarlyReplies) -> None:
        """The round's ``before_commit``: send the replies its inline bots gave while the commit
        runs, when this connection is still the agent's (else, or when the store never calls
        this, :meth:`_jobs` sends them after the commit, to the current connection).

        Safe because the agent keeps each message until the batch ack that follows the commit:
        if the commit fails, the agent is told to resend (and its bot runs again, as after a
        hub that stops between a reply and its result); the reply itself claims only that the
        bot processed the message, which it did."""
        if not early.replies or self._dispatcher.registry.current(self.agent_id) is not self._connection:
            return
        try:
            self._connection.send_now(list(early.replies.values()))
        except ConnectionError:
            return  # the normal path after the commit meets the closed connection too, and logs it
        early.sent = True

    async def _jobs(self, incoming: list[IncomingMessage], headers: list[Header | None], results: list[IntakeResult],
                    replies: list[AgentMessage], answers: list[AgentMessage], early: EarlyReplies) -> list[BotJob]:
        """Sort the stored group: the replies of messages answered in the round go to ``answers``
        (unless ``early`` sent them), stored replies of resends to ``replies``; the rest are the
        jobs for the dispatcher."""
        sent = early.replies if early.sent else {}
        jobs: list[BotJob] = []
        channels = self._channels()
        inflight = self._dispatcher.inflight
        answered = 0
        for i, (message, header, result) in enumerate(zip(incoming, headers, results)):
            if result.kind is IntakeKind.NEW and result.reply is not None:  # answered in the round
                if message.reply_wanted and i not in sent:
                    answers.append(response_for(message, result.reply))
                answered += 1
                continue
            if result.kind is IntakeKind.DUPLICATE:
                # the reply is stored, or answered but its result not yet committed (then in memory)
                reply = result.reply or inflight.get(message.callback) or inflight.get(message.duplicate_of or "")
                if reply is not None:
                    if i not in sent:
                        replies.append(response_for(message, reply))
                    self._backlog.release()
                    continue
                if message.callback in inflight:
                    self._backlog.release()  # the first copy is being answered right now
                    continue
            if message.channel not in channels:  # the cache expired while the group was stored
                channels[message.channel] = await self._channel_bot(message.channel)
            found = channels[message.channel]
            bot, refusal = found if found is not None else (None, CHANNEL_NOT_FOUND)
            inflight[message.callback] = None
            jobs.append(BotJob(message, header, bot, refusal))
        self._backlog.release(answered)
        return jobs

    def _channels(self) -> dict[str, tuple[str | None, str | None] | None]:
        """Channel name -> (bot, refusal), or None for a channel this agent does not have (cached)."""
        now = time.monotonic()
        if now >= self._bots_until or self._bots_generation != self._store.config_generation:
            self._bots, self._bots_until = {}, now + LOOKUP_TTL_S
            self._bots_generation = self._store.config_generation
        return self._bots

    async def _channel_bot(self, channel: str) -> tuple[str | None, str | None] | None:
        found = await self._store.channel_bot(self.agent_id, channel)
        if found is None:
            return None
        record, bot = found
        if record.status is not ChannelStatus.ACTIVE:
            return None, f"channel {channel!r} is off on the hub"
        return bot.callable, None

    async def close(self) -> None:
        """Stop taking frames; requests not yet stored are dropped (never acked: the agent resends)."""
        self._task.cancel()
        try:
            await self._task
        except asyncio.CancelledError:
            pass
        dropped = sum(len(frame) for frame, _ in self._pending)
        self._pending = []
        self._backlog.release(dropped)
