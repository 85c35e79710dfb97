"""The one owner of the running channels: start-up and every reload apply a desired set as a diff.

Theory of operation
-------------------
A :class:`ChannelSet` holds the running channels by name, each with the :class:`ChannelConfig`
it was built from. Channels are built only through the kind registry
(``channel_kind(scheme).create(name, endpoint, options, context)``), so a new kind needs no
change here. Every change goes through one ``asyncio.Lock``:

* :meth:`start` (agent start-up) reads the desired set from the ``source`` and applies it;
  a channel that cannot start is reported, and the runtime turns that into a StartupError.
* :meth:`reload` (``agent:reloadconfig:request``) first waits until :meth:`start` has finished
  (a reload that arrives during start-up, as a Medplum server's bulk ``$reload-config`` can,
  waits for it: issue 13, defect 1), then reads the desired set *inside* the lock, so two
  reloads apply in arrival order and the last one wins.

Applying a desired set is a diff against the running set:

* unchanged (equal name, endpoint, options, bot): kept, sockets and connections untouched;
* removed: stopped with ``stop(drain_timeout)``, so every committed unit still gets its answer;
* added: built and started, with a bounded retry of the bind while the address is in use;
* changed, same listening address: the listening socket is handed over (a ``dup`` of the old
  channel's socket is kept open while the old channel drains and closes, then the new channel
  ``start(sock=...)`` on it), so the port never closes and connection attempts during the swap
  wait in the kernel's backlog;
* changed, other address: the new channel binds first and the old one keeps serving until it
  is up, then the old one drains;
* a problem (bad endpoint from the hub, a kind that cannot be built, a bind that keeps
  failing): that channel stays as it was (the old channel keeps running; a new one is not
  added) and the problem is reported per channel in the :class:`ChangeReport`.

Invariants
----------
* Exactly one apply runs at a time; nothing else changes ``_running``.
* Once the agent is serving, no channel-set change raises out of :meth:`reload` for a channel
  problem: problems are reported, never fatal (a failing ``source`` raises, leaving the set).
* A running channel is always in ``_running`` with the config it runs; a channel that is not
  running is not in it.
* Channels started while reads are paused (backpressure) start paused.

Upgrade hand-over (medagent.ops.switch): :meth:`handover_sockets` gives a dup of each
channel's listening socket for the new process; the new process's set is built with those
sockets as ``inherited`` and each channel ``start(sock=...)`` on its own (by name, when the
address still matches), binding nothing. An inherited socket no channel takes is closed after
:meth:`start`. :meth:`temporary` runs one extra channel (the post-switch health check's) under
the lock, so no reload sees or stops it.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from medagent.channels.base import Channel, ChannelContext, channel_kind
from medagent.config import ChannelConfig

__all__ = ["ChangeReport", "ChannelSet", "DesiredChannels", "channel_address"]

log = logging.getLogger("medagent.channels")

#: Bind attempts while the address is in use (an old listener releasing it) and the first delay;
#: the delay doubles: 0.05 + 0.1 + 0.2 + 0.4 + 0.8 s at most in all.
BIND_ATTEMPTS = 6
BIND_FIRST_DELAY_S = 0.05


@dataclass(frozen=True, slots=True)
class DesiredChannels:
    """A channel set to apply: the valid channels, and per channel name what is wrong with the
    others (their running version, if any, is kept)."""

    channels: tuple[ChannelConfig, ...]
    problems: Mapping[str, str] = field(default_factory=dict)


@dataclass(slots=True)
class ChangeReport:
    """What one apply did, by channel name.

    ``failed`` maps a channel that could not be built or started to its problem; ``invalid``
    maps a channel the source could not describe (a bad endpoint from the hub) to its problem.
    Either way the channel's running version, if any, is kept.
    """

    kept: list[str] = field(default_factory=list)
    started: list[str] = field(default_factory=list)
    restarted: list[str] = field(default_factory=list)
    stopped: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    invalid: dict[str, str] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.failed and not self.invalid

    def error_text(self) -> str:
        """One line naming every failed or invalid channel and why (agent:error, StartupError)."""
        problems = {**self.invalid, **self.failed}
        return "; ".join(f"channel {name}: {problem}" for name, problem in problems.items())

    def summary(self) -> str:
        parts = [f"{len(names)} {what}" for what, names in (
            ("kept", self.kept), ("started", self.started), ("restarted", self.restarted),
            ("stopped", self.stopped), ("failed", self.failed), ("invalid", self.invalid)) if names]
        return ", ".join(parts) or "no channels"


class _StartFailed(Exception):
    """A channel could not be built or started; ``str()`` is the problem (without the name)."""


@dataclass(frozen=True, slots=True)
class _Running:
    config: ChannelConfig
    channel: Channel


def channel_address(channel: Channel) -> str:
    """``scheme://host:port`` the channel really listens on (the bound port for port 0)."""
    endpoint = channel.endpoint
    sockets = channel.listening_sockets()
    if sockets:
        host, port = sockets[0].getsockname()[:2]
        return f"{endpoint.scheme}://{host}:{port}"
    path = getattr(endpoint, "path", "")
    if path:  # a device path (serial:///dev/ttyUSB0)
        return f"{endpoint.scheme}://{path}"
    return f"{endpoint.scheme}://{endpoint.host}:{endpoint.port}"


class ChannelSet:
    def __init__(
        self,
        context: ChannelContext,
        source: Callable[[], Awaitable[DesiredChannels]],
        *,
        drain_timeout_s: float = 5.0,
        bind_attempts: int = BIND_ATTEMPTS,
        bind_first_delay_s: float = BIND_FIRST_DELAY_S,
        inherited: Mapping[str, socket.socket] | None = None,
    ) -> None:
        self._context = context
        self._source = source
        self._drain_timeout_s = drain_timeout_s
        self._bind_attempts = max(1, bind_attempts)
        self._bind_first_delay_s = bind_first_delay_s
        self._lock = asyncio.Lock()
        self._running: dict[str, _Running] = {}
        self._channels: dict[str, Channel] = {}
        self._started: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._closed = False
        self._paused = False
        self.reloads = 0
        self.reload_failures = 0
        self._inherited: dict[str, socket.socket] = dict(inherited or {})

    # -- views -----------------------------------------------------------------------------------
    @property
    def channels(self) -> Mapping[str, Channel]:
        """The running channels by name (read-only; changes only through apply)."""
        return MappingProxyType(self._channels)

    def get(self, name: str) -> Channel | None:
        return self._channels.get(name)

    def stats(self) -> dict[str, Any]:
        return {name: channel.stats() for name, channel in self._channels.items()}

    # -- changes ---------------------------------------------------------------------------------
    async def start(self) -> ChangeReport:
        """Apply the source's set for the first time; reloads wait until this has finished."""
        try:
            async with self._lock:
                report = await self._apply(await self._source())
        except BaseException as exc:
            if not self._started.done():
                self._started.set_exception(RuntimeError(f"the agent did not start ({exc or type(exc).__name__})"))
                self._started.exception()  # retrieved: nobody may be waiting
            raise
        finally:
            for name, sock in self._inherited.items():  # handed over, but no channel of that name/address
                log.info("channel %s: the inherited listening socket is not used; closing it", name)
                sock.close()
            self._inherited.clear()
        if not self._started.done():
            self._started.set_result(None)
        return report

    async def reload(self) -> ChangeReport:
        """Re-read the desired set and apply it as a diff (after start-up, one at a time)."""
        await asyncio.shield(self._started)
        async with self._lock:
            if self._closed:
                raise RuntimeError("the agent is stopping")
            desired = await self._source()
            report = await self._apply(desired)
        self.reloads += 1
        if report.ok:
            log.info("reload: channels %s", report.summary())
        else:
            self.reload_failures += 1
            log.error("reload: channels %s; %s", report.summary(), report.error_text())
        return report

    def handover_sockets(self) -> dict[str, socket.socket]:
        """A dup of each running channel's listening socket, by name (port-based kinds with one
        socket); the caller owns and closes them. Channels without one bind anew after a switch."""
        held: dict[str, socket.socket] = {}
        for name, running in self._running.items():
            sock = _held_socket(running, running.config)
            if sock is not None:
                held[name] = sock
        return held

    @asynccontextmanager
    async def temporary(self, config: ChannelConfig) -> AsyncIterator[Channel]:
        """Run one extra channel (not part of the desired set) while the block runs; reloads wait."""
        async with self._lock:
            if self._closed:
                raise RuntimeError("the agent is stopping")
            if config.name in self._running:
                raise RuntimeError(f"channel {config.name} already exists")
            try:
                await self._add(config)
            except _StartFailed as exc:
                raise RuntimeError(f"channel {config.name}: {exc}") from None
            try:
                yield self._channels[config.name]
            finally:
                await self._stop(self._forget(config.name))

    async def apply(self, desired: DesiredChannels) -> ChangeReport:
        """Apply ``desired`` directly (tests, tools); serialized with start and reload."""
        async with self._lock:
            return await self._apply(desired)

    async def close(self) -> None:
        """Stop every channel (draining); later reloads fail with "the agent is stopping"."""
        self._closed = True
        if not self._started.done():
            self._started.set_exception(RuntimeError("the agent is stopping"))
            self._started.exception()
        async with self._lock:
            # All at once: each drains for at most drain_timeout_s, so stopping takes that long at most.
            await asyncio.gather(*(self._stop(self._forget(name)) for name in list(self._running)))

    # -- backpressure ----------------------------------------------------------------------------
    def pause_reading(self) -> None:
        self._paused = True
        for channel in self._channels.values():
            channel.pause_reading()

    def resume_reading(self) -> None:
        self._paused = False
        for channel in self._channels.values():
            channel.resume_reading()

    # -- the diff --------------------------------------------------------------------------------
    async def _apply(self, desired: DesiredChannels) -> ChangeReport:
        report = ChangeReport()
        wanted = {config.name: config for config in desired.channels}
        for name in list(self._running):  # removed first: their ports may be reused below
            if name not in wanted and name not in desired.problems:
                await self._stop(self._forget(name))
                report.stopped.append(name)
        report.invalid.update(desired.problems)
        for config in desired.channels:
            current = self._running.get(config.name)
            if current is not None and current.config == config:
                report.kept.append(config.name)
                continue
            try:
                if current is None:
                    await self._add(config)
                    report.started.append(config.name)
                else:
                    await self._replace(current, config)
                    report.restarted.append(config.name)
            except _StartFailed as exc:
                report.failed[config.name] = str(exc)
        return report

    async def _add(self, config: ChannelConfig) -> None:
        channel = self._build(config)
        held = self._take_inherited(config)
        try:
            await self._start(channel, config, held)
        finally:
            _close(held)
        self._remember(config, channel)

    def _take_inherited(self, config: ChannelConfig) -> socket.socket | None:
        """The handed-over socket for this channel, if its address still matches the config."""
        sock = self._inherited.pop(config.name, None)
        if sock is None:
            return None
        host, port = sock.getsockname()[:2]
        wanted = config.endpoint
        same_host = wanted.host == host or (wanted.host == "localhost" and host in ("127.0.0.1", "::1"))
        if wanted.port not in (0, port) or not same_host:
            log.warning("channel %s: the inherited socket listens on %s:%s, the config says %s:%s; binding anew",
                        config.name, host, port, wanted.host, wanted.port)
            sock.close()
            return None
        return sock

    async def _replace(self, current: _Running, config: ChannelConfig) -> None:
        new = self._build(config)
        held = _held_socket(current, config)
        if held is None and _address(current.config) != _address(config):
            await self._start(new, config)  # the old channel serves until the new one is up
            await self._stop(self._forget(config.name))
            self._remember(config, new)
            return
        await self._stop(self._forget(config.name))  # releases the port (the held dup keeps it open)
        try:
            try:
                await self._start(new, config, held)
            except _StartFailed as exc:
                # Put the running configuration back as it was, on the same socket when held.
                try:
                    old = self._build(current.config)
                    await self._start(old, current.config, held)
                except _StartFailed as restore:
                    raise _StartFailed(f"{exc}; the previous configuration could not be restarted "
                                       f"either ({restore}): the channel is stopped") from None
                self._remember(current.config, old)
                raise _StartFailed(f"{exc} (the previous configuration keeps running)") from None
            self._remember(config, new)
        finally:
            if held is not None:
                held.close()

    def _build(self, config: ChannelConfig) -> Channel:
        try:
            kind = channel_kind(config.endpoint.scheme)
            return kind.create(config.name, config.endpoint, config.options, self._context)
        except Exception as exc:  # noqa: BLE001 - any kind's failure is this channel's problem only
            raise _StartFailed(f"cannot build the {config.endpoint.scheme} channel: {exc}") from None

    async def _start(self, channel: Channel, config: ChannelConfig, held: socket.socket | None = None) -> None:
        delay = self._bind_first_delay_s
        for attempt in range(1, self._bind_attempts + 1):
            sock = _dup(held) if held is not None else None
            try:
                await channel.start(sock)
                break
            except OSError as exc:
                _close(sock)
                if exc.errno != errno.EADDRINUSE or held is not None or attempt == self._bind_attempts:
                    raise _StartFailed(_listen_problem(config, exc)) from None
                log.debug("channel %s: address in use, bind attempt %d", config.name, attempt)
                await asyncio.sleep(delay)
                delay *= 2
            except Exception as exc:  # noqa: BLE001 - a kind's failure to start is reported, not raised
                _close(sock)
                raise _StartFailed(f"cannot start: {exc}") from None
        if self._paused:
            channel.pause_reading()
        log.info("channel %s listening on %s", config.name, channel_address(channel))

    async def _stop(self, running: _Running) -> None:
        try:
            await running.channel.stop(self._drain_timeout_s)
        except Exception:
            log.exception("channel %s: error while stopping", running.config.name)

    def _remember(self, config: ChannelConfig, channel: Channel) -> None:
        self._running[config.name] = _Running(config, channel)
        self._channels[config.name] = channel

    def _forget(self, name: str) -> _Running:
        self._channels.pop(name, None)
        return self._running.pop(name)


def _address(config: ChannelConfig) -> tuple[str, int, str]:
    """What a channel occupies: host and port, or a device path (serial kinds)."""
    endpoint = config.endpoint
    return endpoint.host, endpoint.port, getattr(endpoint, "path", "")


def _held_socket(current: _Running, config: ChannelConfig) -> socket.socket | None:
    """A dup of the old channel's listening socket when the new config listens on the same
    address (one socket, a port-based kind), else None."""
    if _address(current.config) != _address(config):
        return None
    try:
        if not channel_kind(config.endpoint.scheme).needs_port:
            return None
    except Exception:  # noqa: BLE001 - an unknown kind fails in _build with its reason
        return None
    sockets = current.channel.listening_sockets()
    if len(sockets) != 1:
        return None
    return _dup(sockets[0])


def _dup(sock: Any) -> socket.socket:
    """A new socket object on a duplicate descriptor (works for asyncio's and uvloop's wrappers)."""
    return socket.socket(sock.family, sock.type, sock.proto, fileno=os.dup(sock.fileno()))


def _close(sock: socket.socket | None) -> None:
    if sock is not None:
        sock.close()


def _listen_problem(config: ChannelConfig, exc: OSError) -> str:
    reason = os.strerror(exc.errno) if exc.errno else str(exc)
    return f"cannot listen on {config.endpoint.host}:{config.endpoint.port}: {reason}"
