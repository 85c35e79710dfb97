"""Running bots: user callables that process one inbound message and return the reply.

Theory of operation
-------------------
A bot is named ``"module:function"`` and loaded once (imported, then cached). It is called
with a :class:`BotEvent` and returns the reply:

* ``str`` — the reply body, with the message's content type, status 200;
* ``bytes`` — HL7 bytes (decoded with their BOM/MSH-18, else UTF-8), status 200;
* :class:`BotReply` — body, content type and status code chosen by the bot;
* ``dict``/``list`` — JSON (``application/json``), status 200;
* ``None`` — no reply: the agent gets status 204 with an empty ``text/plain`` body, which tells
  it to send nothing to the device.

How a bot runs depends on its kind:

* ``async def`` bots run on the event loop under ``asyncio.wait_for(bot_timeout_s)``;
* plain functions run in a ``ThreadPoolExecutor`` of ``bot_workers`` threads, so a slow or
  blocking bot never stalls the loop; after ``bot_timeout_s`` the hub stops waiting (Python
  cannot kill the thread: it finishes in the background and its result is dropped);
* functions marked with :func:`inline_bot` run directly on the event loop, without a thread
  hop and without a timeout — only for bots that take microseconds and never block (the
  built-in ACK bot is one).

Failures (HL7 v2 ch. 2.9.2, application acknowledgment): an exception, or a bot that cannot be
loaded, gives an ``AE`` ACK; a timeout gives an ``AR`` ACK; MSA-3 says what happened (bot name,
exception type and message — never a stack trace, never message content) and the status code
is 400. For non-HL7 content, or HL7 whose MSH cannot be read, the error text itself is the body
(``text/plain``, 400). The outcome carries ``MessageStatus.ERROR`` and the error text so the store
records the failure.

Invariants: :meth:`BotRunner.run` never raises (except ``CancelledError``); every outcome has a
reply; log lines carry the bot name, the exception type and the callback, never message text.
"""

from __future__ import annotations

import asyncio
import enum
import importlib
import inspect
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

import orjson

from medagent.cloud.messages import CONTENT_TYPE_HL7_V2, CONTENT_TYPE_JSON, CONTENT_TYPE_TEXT
from medagent.hub import hl7text
from medagent.hub.records import MessageStatus, StoredReply

if TYPE_CHECKING:
    from medagent.hub.botstore import BotStore
    from medagent.proto.hl7 import Header

__all__ = [
    "NO_REPLY_STATUS",
    "BotEvent",
    "BotKind",
    "BotLoadError",
    "BotOutcome",
    "BotReply",
    "BotRunner",
    "failure_reply",
    "inline_bot",
    "load_bot",
]

log = logging.getLogger(__name__)

NO_REPLY_STATUS = 204
_ERROR_TEXT_MAX = 300
_INLINE_ATTRIBUTE = "__medagent_inline__"

F = TypeVar("F", bound=Callable[..., Any])


@dataclass(slots=True, unsafe_hash=True)  # per message: not frozen (see medagent.hub.records)
class BotEvent:
    """One inbound message, as a bot sees it.

    ``input`` is the message text; ``header`` its MSH (HL7 only, else ``None``); ``received_at``
    is when the hub stored it (epoch ms); ``store`` lets a bot keep what it derives (FHIR
    resources: ``store.upsert_resource`` from a plain bot, ``store.upsert_resource_async`` from an
    ``async def`` bot; see :mod:`medagent.hub.botstore`). Treat it as read-only: it is not
    frozen only because a frozen dataclass costs microseconds more per message.
    """

    input: str
    header: Header | None
    content_type: str
    agent_id: str
    channel: str
    remote: str
    callback: str | None
    received_at: int
    store: BotStore | None = None


@dataclass(frozen=True, slots=True)
class BotReply:
    """A reply with an explicit content type and status code."""

    body: str | bytes
    content_type: str = CONTENT_TYPE_HL7_V2
    status_code: int = 200


@dataclass(slots=True, unsafe_hash=True)  # per message: not frozen (see medagent.hub.records)
class BotOutcome:
    """What running a bot produced: the reply to send, and what to record in the store."""

    reply: StoredReply
    status: MessageStatus
    error: str | None = None


class BotKind(enum.IntEnum):
    INLINE = 0  #: sync, runs on the loop (marked with @inline_bot)
    ASYNC = 1  #: coroutine function, runs on the loop with a timeout
    THREAD = 2  #: sync, runs in the bot thread pool with a timeout


class BotTimeout(Exception):
    """The hub stopped waiting for a bot after ``bot_timeout_s``."""


class BotLoadError(ValueError):
    """A bot name that does not resolve to a callable."""


@dataclass(frozen=True, slots=True)
class LoadedBot:
    spec: str
    function: Callable[[BotEvent], Any]
    kind: BotKind


def inline_bot(function: F) -> F:
    """Mark a sync bot as safe to run on the event loop (microseconds, never blocks)."""
    setattr(function, _INLINE_ATTRIBUTE, True)
    return function


def load_bot(spec: str) -> LoadedBot:
    """Import ``"module:function"`` (``function`` may be dotted: ``module:Class.method``)."""
    module_name, sep, attribute = spec.partition(":")
    if not sep or not module_name or not attribute:
        raise BotLoadError(f"a bot must be named 'module:function', not {spec!r}")
    try:
        target: Any = importlib.import_module(module_name)
        for part in attribute.split("."):
            target = getattr(target, part)
    except Exception as exc:  # import errors of user code come in every shape
        raise BotLoadError(f"bot {spec} could not be loaded: {_describe(exc)}") from None
    if not callable(target):
        raise BotLoadError(f"bot {spec} is not callable")
    return LoadedBot(spec, target, _kind(target))


def _kind(function: Callable[..., Any]) -> BotKind:
    if inspect.iscoroutinefunction(function) or inspect.iscoroutinefunction(getattr(function, "__call__", None)):
        return BotKind.ASYNC
    if getattr(function, _INLINE_ATTRIBUTE, False):
        return BotKind.INLINE
    return BotKind.THREAD


class BotRunner:
    """Loads bots by name and runs them with the hub's timeout and thread pool."""

    def __init__(self, workers: int, timeout_s: float) -> None:
        self.timeout_s = timeout_s
        self._pool = ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="medagent-bot")
        self._bots: dict[str, LoadedBot] = {}

    def load(self, spec: str) -> LoadedBot:
        bot = self._bots.get(spec)
        if bot is None:
            bot = self._bots[spec] = load_bot(spec)
        return bot

    def is_inline(self, spec: str) -> bool:
        """Whether bot ``spec`` runs on the loop without awaiting (an :func:`inline_bot`, or a bot
        that cannot be loaded: its AE outcome is immediate too), so the intake may run it in place."""
        try:
            return self.load(spec).kind is BotKind.INLINE
        except BotLoadError:
            return True

    def run_inline(self, spec: str, event: BotEvent) -> BotOutcome:
        """:meth:`run` for a bot for which :meth:`is_inline` is true, without a coroutine."""
        bot = self._loaded(spec, event)
        return _called(bot, event) if isinstance(bot, LoadedBot) else bot

    async def run(self, spec: str, event: BotEvent) -> BotOutcome:
        """Run bot ``spec`` on ``event``; failures become AE/AR outcomes (see module docstring)."""
        bot = self._loaded(spec, event)
        if not isinstance(bot, LoadedBot):
            return bot
        if bot.kind is BotKind.INLINE:
            return _called(bot, event)
        try:
            result = await self._call(bot, event)
        except BotTimeout:
            log.warning("bot %s timed out after %gs (callback %s)", spec, self.timeout_s, event.callback)
            return failure_outcome(event, "AR", f"bot {spec} did not answer within {self.timeout_s:g} s")
        except Exception as exc:
            return _raised(spec, exc, event)
        return _outcome(spec, result, event)

    def _loaded(self, spec: str, event: BotEvent) -> LoadedBot | BotOutcome:
        """The bot, or the AE outcome of ``event`` when it cannot be loaded (logged)."""
        try:
            return self.load(spec)
        except BotLoadError as exc:
            log.error("bot load failed: %s", exc)
            return failure_outcome(event, "AE", str(exc))

    async def _call(self, bot: LoadedBot, event: BotEvent) -> Any:
        """An async bot on the loop, or a plain one in the pool, under ``bot_timeout_s``."""
        scope = asyncio.timeout(self.timeout_s)
        try:
            async with scope:
                if bot.kind is BotKind.ASYNC:
                    return await bot.function(event)
                return await asyncio.get_running_loop().run_in_executor(self._pool, bot.function, event)
        except TimeoutError:
            if scope.expired():
                raise BotTimeout from None
            raise

    def close(self) -> None:
        """Stop accepting work; threads still running a bot finish in the background."""
        self._pool.shutdown(wait=False, cancel_futures=True)


def _called(bot: LoadedBot, event: BotEvent) -> BotOutcome:
    """Call an inline bot on the loop; a raised exception becomes its AE outcome."""
    try:
        result = bot.function(event)
    except Exception as exc:
        return _raised(bot.spec, exc, event)
    return _outcome(bot.spec, result, event)


def _raised(spec: str, exc: Exception, event: BotEvent) -> BotOutcome:
    log.warning("bot %s raised %s (callback %s)", spec, type(exc).__name__, event.callback)
    return failure_outcome(event, "AE", f"bot {spec} failed: {_describe(exc)}")


def _outcome(spec: str, result: Any, event: BotEvent) -> BotOutcome:
    try:
        return BotOutcome(_reply_from_result(result, event), MessageStatus.PROCESSED)
    except TypeError as exc:
        return failure_outcome(event, "AE", f"bot {spec} returned an unusable reply: {exc}")


def _reply_from_result(result: Any, event: BotEvent) -> StoredReply:
    if result is None:
        return StoredReply("", CONTENT_TYPE_TEXT, NO_REPLY_STATUS)
    if isinstance(result, BotReply):
        return StoredReply(_body_text(result.body), result.content_type, int(result.status_code))
    if isinstance(result, str):
        return StoredReply(result, event.content_type, 200)
    if isinstance(result, (bytes, bytearray, memoryview)):
        return StoredReply(_body_text(bytes(result)), event.content_type, 200)
    if isinstance(result, (dict, list)):
        return StoredReply(orjson.dumps(result).decode(), CONTENT_TYPE_JSON, 200)
    raise TypeError(f"expected str, bytes, BotReply, dict, list or None, got {type(result).__name__}")


def _body_text(body: str | bytes) -> str:
    return body if isinstance(body, str) else hl7text.bytes_to_text(bytes(body))


def failure_reply(event: BotEvent, code: str, error: str) -> StoredReply:
    """The reply for a failed message: an HL7 ``code`` ACK when possible, else the error text."""
    if event.content_type == CONTENT_TYPE_HL7_V2 and event.header is not None:
        try:
            return StoredReply(hl7text.ack_text(event.input, event.header, code, error), CONTENT_TYPE_HL7_V2, 400)
        except hl7text.Hl7Error:
            pass
    return StoredReply(error, CONTENT_TYPE_TEXT, 400)


def failure_outcome(event: BotEvent, code: str, error: str) -> BotOutcome:
    return BotOutcome(failure_reply(event, code, error), MessageStatus.ERROR, error)


def _describe(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    return text if len(text) <= _ERROR_TEXT_MAX else text[: _ERROR_TEXT_MAX - 3] + "..."
