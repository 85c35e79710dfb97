"""The bus between hub processes over Redis pub/sub (``--bus redis://host:port/db``).

Theory of operation
-------------------
Each hub process has one Redis connection for pub/sub (read by one reader task) and a small
pool for commands (PUBLISH, presence scripts and reads). It subscribes its inbox when it starts
and the channel of every agent whose socket it holds (:mod:`medagent.hub.bus.envelope` has the
names and the wire format, :mod:`medagent.hub.bus.redis_presence` the presence keys).

Requesting (any process): PUBLISH returns how many processes received the request. 0 means
no process holds the agent: :class:`AgentNotConnected` at once, without waiting the timeout.
Otherwise the caller waits for the first reply carrying the agent's frame; error replies
(``not-connected``, ``timeout``, ``failed``) count down the receivers, and when every receiver
has answered with an error the most telling one is raised. A request for an agent this process
holds itself never goes through Redis.

Holding (the process with the socket): :meth:`attach` subscribes the agent's channel and waits
for Redis to confirm it *before* the presence says "connected" (so a caller that sees the agent
connected reaches it), then announces the lease and publishes a ``taken`` notice so that a
process still holding an older socket of the agent unsubscribes at once. A renewal task keeps
the leases (and the heartbeat/version that :meth:`touch` noted in memory) fresh every
``lease_ttl_s / 3``; a renewal that finds another process's lease stops routing to this one.

Redis lost: the reader logs one line, fails every waiting request with
:class:`BusUnavailable`, and reconnects with jittered exponential backoff (0.1 s .. 5 s); until
it is back, requests fail at once with :class:`BusUnavailable` while the agents' sockets and
inbound traffic carry on untouched. On reconnection it subscribes again, re-takes the leases that
are free or still its own (a restarted Redis has lost them all) and logs one line.

Invariants: the reader task never dies of a Redis error (only :meth:`close` ends it); a request
waits for at most its timeout and is answered by exactly one outcome; nothing logs frame
contents.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Sequence
from typing import Any

from redis.asyncio import Redis
from redis.asyncio.client import PubSub
from redis.asyncio.connection import BlockingConnectionPool
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError

from medagent.cloud.link import Backoff
from medagent.cloud.messages import AgentMessage
from medagent.hub.bus import envelope as env
from medagent.hub.bus.base import AgentBus, Deliver, Hold, Presence
from medagent.hub.bus.errors import AgentNotConnected, AgentTimeout, BusError, BusUnavailable
from medagent.hub.bus.redis_presence import RedisPresence

__all__ = ["DEFAULT_LEASE_TTL_S", "RedisBus"]

log = logging.getLogger(__name__)

DEFAULT_LEASE_TTL_S = 15.0
#: connections for PUBLISH and presence per process (the pub/sub connection is apart)
COMMAND_CONNECTIONS = 16
#: bound on how long attach waits for Redis to confirm a SUBSCRIBE
SUBSCRIBE_TIMEOUT_S = 5.0
#: the reader's poll period (also the cadence of the pub/sub connection's health check)
_POLL_S = 1.0
_HEALTH_CHECK_S = 5


class _Waiter:
    """One request waiting for replies from ``expected`` receivers (known once PUBLISH returns)."""

    __slots__ = ("agent_id", "errors", "expected", "future", "timeout_s")

    def __init__(self, agent_id: str, timeout_s: float) -> None:
        self.agent_id = agent_id
        self.timeout_s = timeout_s
        self.future: asyncio.Future[AgentMessage] = asyncio.get_running_loop().create_future()
        self.expected: int | None = None
        self.errors: list[str] = []

    def on_reply(self, reply: env.RouteReply) -> None:
        if self.future.done():
            return
        if reply.message is not None:
            self.future.set_result(reply.message)
        else:
            self.errors.append(reply.error or env.FAILED)
            self._settle_if_all_failed()

    def expect(self, receivers: int) -> None:
        self.expected = receivers
        self._settle_if_all_failed()

    def _settle_if_all_failed(self) -> None:
        if self.expected is None or len(self.errors) < self.expected or self.future.done():
            return
        if env.TIMEOUT in self.errors:
            self.future.set_exception(AgentTimeout(self.agent_id, self.timeout_s))
        elif env.FAILED in self.errors:
            self.future.set_exception(BusError(f"the hub process holding agent {self.agent_id} failed to deliver "
                                               "the request (its log says why)"))
        else:
            self.future.set_exception(AgentNotConnected(self.agent_id))

    def fail(self, exc: BaseException) -> None:
        if not self.future.done():
            self.future.set_exception(exc)


class RedisBus(AgentBus):
    def __init__(self, url: str, *, cluster: str = "default", process_id: str | None = None,
                 lease_ttl_s: float = DEFAULT_LEASE_TTL_S) -> None:
        """``url`` is a redis-py URL (``redis://``, ``rediss://``, ``unix://``); raises ValueError if invalid."""
        super().__init__(process_id)
        if not lease_ttl_s > 0:
            raise ValueError(f"the presence lease TTL must be positive, not {lease_ttl_s!r}")
        self._ns = env.Namespace(cluster)
        self._inbox = self._ns.inbox_channel(self.process_id)
        self._where = _redacted(url)
        common: dict[str, Any] = {"socket_connect_timeout": 2.0, "socket_keepalive": True}
        # Commands retry once, at once, on a connection error: a pooled connection that Redis closed
        # (a restart) is replaced; a Redis that is down still fails fast. A burst of requests waits
        # for a pooled connection rather than failing (redis-py's default pool raises).
        pool = BlockingConnectionPool.from_url(url, max_connections=COMMAND_CONNECTIONS, timeout=3.0,
                                               socket_timeout=3.0, retry=Retry(NoBackoff(), 1),
                                               retry_on_error=[RedisConnectionError], **common)
        self._commands: Redis = Redis(connection_pool=pool)
        # pub/sub never retries behind our back: the reader owns reconnection and re-subscription
        self._subscriber: Redis = Redis.from_url(url, health_check_interval=_HEALTH_CHECK_S,
                                                 retry=Retry(NoBackoff(), 0), retry_on_error=[], **common)
        self._presence = RedisPresence(self._commands, self._ns, self.process_id, lease_ttl_s)
        self._renew_every_s = lease_ttl_s / 3
        self._pubsub: PubSub | None = None
        self._available = False
        self._closing = False
        self._reader: asyncio.Task[None] | None = None
        self._renewer: asyncio.Task[None] | None = None
        self._waiting: dict[str, _Waiter] = {}
        self._confirming: dict[str, asyncio.Future[bool]] = {}
        self._subscribed: set[str] = set()  # agent ids whose channel the current pub/sub connection has
        self._serving: set[asyncio.Task[None]] = set()

    @property
    def available(self) -> bool:
        return self._available

    # -- lifecycle ----------------------------------------------------------------------------

    async def start(self, deliver: Deliver) -> None:
        """Connect (raising BusUnavailable if Redis cannot be reached now), then serve."""
        await super().start(deliver)
        try:
            await self._connect()
        except (RedisError, OSError) as exc:
            await self._drop_pubsub()
            self._deliver = None
            raise BusUnavailable(f"cannot reach the Redis bus at {self._where}: {_reason(exc)}") from None
        self._reader = asyncio.create_task(self._read_forever(), name="medagent-bus-reader")
        self._renewer = asyncio.create_task(self._renew_forever(), name="medagent-bus-renewer")
        log.info("hub bus: process %s routing agent requests over Redis at %s", self.process_id, self._where)

    async def close(self) -> None:
        if self._closing:
            return
        self._closing = True
        for task in (self._renewer, self._reader, *self._serving):
            if task is not None:
                task.cancel()
        await asyncio.gather(*(t for t in (self._renewer, self._reader, *self._serving) if t is not None),
                             return_exceptions=True)
        holds, self._holds = list(self._holds.values()), {}
        if self._available:
            try:
                await self._presence.release(holds)  # clean shutdown: disconnected at once, not after the TTL
            except (RedisError, OSError) as exc:
                log.warning("hub bus: could not clear presence of %d agent(s) (%s); it expires within the lease TTL",
                            len(holds), _reason(exc))
        self._available = False
        self._fail_waiting(BusUnavailable("the hub bus is closed"))
        await self._drop_pubsub()
        await self._commands.aclose(close_connection_pool=True)
        await self._subscriber.aclose()

    # -- connection ---------------------------------------------------------------------------

    async def _connect(self) -> None:
        """Open pub/sub, subscribe the inbox and every held agent, confirm, then re-take leases."""
        self._pubsub = pubsub = self._subscriber.pubsub()
        held = list(self._holds)
        channels = [self._inbox, *(self._ns.agent_channel(a) for a in held)]
        pending = [self._expect_confirmation(c) for c in channels]
        await pubsub.subscribe(*channels)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + SUBSCRIBE_TIMEOUT_S
        while not all(f.done() for f in pending):
            if loop.time() > deadline:
                raise TimeoutError("Redis did not confirm the subscriptions")
            await self._read_one(pubsub, _POLL_S)
        self._subscribed = set(held)
        await self._renew_once()
        self._available = True

    def _expect_confirmation(self, channel: str) -> asyncio.Future[bool]:
        """Resolved True when Redis confirms SUBSCRIBE ``channel``, False if the connection drops first."""
        future: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._confirming[channel] = future
        return future

    async def _read_forever(self) -> None:
        backoff = Backoff(0.1, 5.0)
        while not self._closing:
            pubsub = self._pubsub
            try:
                if pubsub is None:
                    await self._connect()
                    log.info("hub bus: reconnected to Redis at %s; %d agent(s) re-announced", self._where,
                             len(self._holds))
                    backoff.reset()
                    continue
                await self._read_one(pubsub, _POLL_S)
            except asyncio.CancelledError:
                raise
            except (RedisError, OSError, TimeoutError) as exc:
                if self._available:
                    log.warning("hub bus: lost Redis at %s (%s); agent requests between hub processes fail until "
                                "it is back; reconnecting", self._where, _reason(exc))
                self._available = False
                self._fail_waiting(BusUnavailable(f"lost the Redis bus at {self._where}"))
                await self._drop_pubsub()
                await asyncio.sleep(backoff.next_delay())

    async def _drop_pubsub(self) -> None:
        pubsub, self._pubsub = self._pubsub, None
        for future in self._confirming.values():
            if not future.done():
                future.set_result(False)
        self._confirming.clear()
        self._subscribed.clear()
        if pubsub is not None:
            try:
                await pubsub.aclose()
            except (RedisError, OSError):
                pass  # the connection is already gone

    async def _read_one(self, pubsub: PubSub, timeout_s: float) -> None:
        message = await pubsub.get_message(timeout=timeout_s)
        if message is None:
            return
        kind, channel = message["type"], _text(message["channel"])
        if kind == "subscribe":
            future = self._confirming.pop(channel, None)
            if future is not None and not future.done():
                future.set_result(True)
        elif kind == "message":
            self._dispatch(channel, message["data"])

    def _fail_waiting(self, exc: BusError) -> None:
        for waiter in list(self._waiting.values()):
            waiter.fail(exc)

    # -- presence -----------------------------------------------------------------------------

    async def _renew_forever(self) -> None:
        while True:
            await asyncio.sleep(self._renew_every_s)
            if not self._available:
                continue  # the reader re-takes the leases when Redis is back
            try:
                await self._renew_once()
            except (RedisError, OSError) as exc:
                log.debug("hub bus: presence renewal failed (%s)", _reason(exc))

    async def _renew_once(self) -> None:
        """Renew every lease; route here exactly the agents whose lease is ours."""
        holds = list(self._holds.values())
        for hold, ours in zip(holds, await self._presence.renew(holds), strict=True):
            if ours != hold.owned:
                log.info("hub bus: agent %s %s", hold.agent_id, "is routed to this process again (its lease was free)"
                         if ours else "is held by another hub process now; its requests go there")
            hold.owned = ours
        await self._sync_subscriptions()

    async def _sync_subscriptions(self) -> None:
        """Subscribe the channels of owned holds, unsubscribe the others (no confirmation wait)."""
        pubsub = self._pubsub
        if pubsub is None:
            return
        wanted = {agent_id for agent_id, hold in self._holds.items() if hold.owned}
        extra, missing = self._subscribed - wanted, wanted - self._subscribed
        self._subscribed = wanted
        if extra:
            await pubsub.unsubscribe(*(self._ns.agent_channel(a) for a in extra))
        if missing:
            await pubsub.subscribe(*(self._ns.agent_channel(a) for a in missing))

    async def _announce(self, hold: Hold) -> None:
        pubsub = self._pubsub
        if not self._available or pubsub is None:
            return  # the reader announces every held agent when Redis is back
        channel = self._ns.agent_channel(hold.agent_id)
        try:
            if hold.agent_id not in self._subscribed:
                confirmed = self._expect_confirmation(channel)
                self._subscribed.add(hold.agent_id)
                await pubsub.subscribe(channel)
                if not await asyncio.wait_for(confirmed, SUBSCRIBE_TIMEOUT_S):
                    raise ConnectionError("the pub/sub connection dropped")
            await self._presence.announce(hold)
            await self._commands.publish(channel, env.encode_envelope(env.Taken(hold.agent_id, self.process_id)))
        except (RedisError, OSError, TimeoutError) as exc:
            log.warning("hub bus: could not announce agent %s (%s); retried when Redis answers", hold.agent_id,
                        _reason(exc))

    async def _release(self, hold: Hold) -> None:
        if not self._available or self._pubsub is None:
            return  # the lease expires by itself
        try:
            await self._sync_subscriptions()
            await self._presence.release([hold])
        except (RedisError, OSError) as exc:
            log.debug("hub bus: release of agent %s failed (%s); its lease expires", hold.agent_id, _reason(exc))

    async def presence_many(self, agent_ids: Sequence[str]) -> dict[str, Presence]:
        self._check_available()
        try:
            return await self._presence.read(agent_ids)
        except (RedisError, OSError) as exc:
            raise BusUnavailable(f"cannot read agent presence from Redis at {self._where}: {_reason(exc)}") from None

    # -- requesting ---------------------------------------------------------------------------

    async def request(self, agent_id: str, message: AgentMessage, timeout_s: float) -> AgentMessage:
        self._check_request(message, timeout_s)
        if self._owned_here(agent_id):
            return await self._request_here(agent_id, message, timeout_s)
        self._check_available()
        request_id = uuid.uuid4().hex
        waiter = self._waiting[request_id] = _Waiter(agent_id, timeout_s)
        try:
            route = env.RouteRequest(agent_id, message, request_id, self._inbox, max(1, round(timeout_s * 1000)))
            waiter.expect(await self._publish(agent_id, route))
            return await asyncio.wait_for(waiter.future, timeout_s)
        except TimeoutError:
            raise AgentTimeout(agent_id, timeout_s) from None
        finally:
            del self._waiting[request_id]

    async def send(self, agent_id: str, message: AgentMessage) -> None:
        if self._owned_here(agent_id):
            return await self._send_here(agent_id, message)
        self._check_available()
        await self._publish(agent_id, env.RouteRequest(agent_id, message))

    async def _publish(self, agent_id: str, route: env.RouteRequest) -> int:
        try:
            receivers = int(await self._commands.publish(self._ns.agent_channel(agent_id), env.encode_envelope(route)))
        except (RedisError, OSError) as exc:
            raise BusUnavailable(f"cannot publish to the Redis bus at {self._where}: {_reason(exc)}") from None
        if receivers == 0:
            raise AgentNotConnected(agent_id)
        return receivers

    def _check_available(self) -> None:
        self._started()
        if not self._available:
            raise BusUnavailable(f"the Redis bus at {self._where} is unreachable; retrying in the background")

    # -- holding ------------------------------------------------------------------------------

    def _dispatch(self, channel: str, data: bytes) -> None:
        try:
            envelope = env.decode_envelope(data)
        except env.EnvelopeError as exc:
            log.warning("hub bus: ignored a message on %s: %s", channel, exc)
            return
        if isinstance(envelope, env.RouteReply):
            waiter = self._waiting.get(envelope.request_id)
            if waiter is not None:
                waiter.on_reply(envelope)
        elif isinstance(envelope, env.RouteRequest):
            self._spawn(self._serve(envelope), f"medagent-bus-serve-{envelope.agent_id}")
        elif envelope.process_id != self.process_id:
            hold = self._holds.get(envelope.agent_id)
            if hold is not None and hold.owned:
                log.info("hub bus: agent %s reconnected to hub process %s; its requests go there",
                         envelope.agent_id, envelope.process_id)
                hold.owned = False
                self._spawn(self._sync_subscriptions(), f"medagent-bus-unsubscribe-{envelope.agent_id}")

    def _spawn(self, coro: Any, name: str) -> None:
        task = asyncio.create_task(coro, name=name)
        self._serving.add(task)
        task.add_done_callback(self._reap)

    def _reap(self, task: asyncio.Task[None]) -> None:
        self._serving.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.info("hub bus: %s failed (%s); the next presence renewal repairs it", task.get_name(),
                     _reason(task.exception()))  # type: ignore[arg-type]

    async def _serve(self, route: env.RouteRequest) -> None:
        """Deliver a routed request to this process's socket and publish the outcome."""
        agent_id = route.agent_id
        if not route.wants_reply:
            try:
                if self._owned_here(agent_id):
                    await self._send_here(agent_id, route.message)
            except AgentNotConnected:
                log.info("hub bus: agent %s left before a routed %s could be sent", agent_id, route.message.TYPE)
            except Exception as exc:  # noqa: BLE001 - a failed delivery must not end the reader's work
                log.warning("hub bus: routed %s to agent %s failed: %s", route.message.TYPE, agent_id,
                            type(exc).__name__)
            return
        assert route.request_id is not None and route.reply_to is not None and route.timeout_ms is not None
        try:
            if not self._owned_here(agent_id):
                raise AgentNotConnected(agent_id)
            reply = env.RouteReply(route.request_id, await self._request_here(agent_id, route.message,
                                                                              route.timeout_ms / 1000))
        except AgentNotConnected:
            reply = env.RouteReply(route.request_id, error=env.NOT_CONNECTED)
        except AgentTimeout:
            reply = env.RouteReply(route.request_id, error=env.TIMEOUT)
        except Exception as exc:  # noqa: BLE001 - any failure is answered, so the caller need not wait
            log.warning("hub bus: routed %s to agent %s failed: %s", route.message.TYPE, agent_id, type(exc).__name__)
            reply = env.RouteReply(route.request_id, error=env.FAILED)
        try:
            await self._commands.publish(route.reply_to, env.encode_envelope(reply))
        except (RedisError, OSError) as exc:
            log.info("hub bus: the reply for agent %s was lost with Redis (%s)", agent_id, _reason(exc))


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _reason(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _redacted(url: str) -> str:
    """The URL without its password, for log lines."""
    scheme, sep, rest = url.partition("://")
    if "@" in rest:
        rest = "***@" + rest.rsplit("@", 1)[1]
    return f"{scheme}{sep}{rest}"
