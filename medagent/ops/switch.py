"""The upgrade's switch: from a staged version to its process, with the listening sockets and the
queue's single-writer lease handed over, a post-switch health check and automatic switch-back.

Both sides run inside `medagent serve` (medagent.serve_cli); the protocol on the control
channel is medagent.ops.handover.

Old process (:func:`switch_over`, the running agent)
----------------------------------------------------
1. dup every channel's listening socket (``ChannelSet.handover_sockets``), make a socketpair for
   control, and start ``<new venv>/bin/python -P -m medagent serve <same options> --handover SPEC``
   with those descriptors inherited (``pass_fds``); wait for ``ready`` (:data:`READY_TIMEOUT_S`);
2. stop the runtime: channels stop accepting (their server objects close; the dups keep the
   sockets open, so the kernel backlog keeps queueing connections: no refused connection, no
   port gap), every message received gets its ACK/NAK, then their connections close (senders
   reconnect, to the new process); the queue flushes and closes (releasing the lease), the link
   and an embedded hub stop; send ``go`` with the time intake stopped;
3. wait for ``healthy`` (:data:`HEALTHY_TIMEOUT_S`): then return None and `serve` exits 0.
   ``failed``, a bad line, the new process exiting or the timeout: SIGTERM it (by its PID),
   SIGKILL after :data:`KILL_GRACE_S`, start a fresh runtime on the held sockets meanwhile (its
   queue waits for the lease, and its channels start only after that), delete the new
   environment, and record ``rolled-back`` with the reason.

New process (:func:`take_over`)
--------------------------------
Wraps the inherited descriptors, says ``ready`` (everything imported and the configuration
read; nothing bound, the queue not opened), waits for ``go``, then starts the runtime on the
inherited sockets (the queue's open retries while the old lease is still held), measures the
intake pause (``go``'s ``stoppedAt`` to accepting again), runs the post-switch health check
(medagent.ops.post_switch) and answers ``healthy`` (and tells systemd ``MAINPID``/``READY``) or
``failed`` (and stops). The upgrade state ``completed`` is recorded by the new process.

Windows cannot pass sockets by inheritance; there the switch is not offered (a staged version
is put in service by restarting the service; docs/operations.md).

Invariants: the old process never stops serving before ``ready``; nothing accepted is lost in
any branch (the queue is durable and unconfirmed rows are resent after the switch or the
switch-back; the hub recognises resends); the old process exits only after ``healthy``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import TYPE_CHECKING, TypeVar

from medagent import __version__
from medagent.ops import handover as ho
from medagent.ops.post_switch import post_switch_health
from medagent.ops.sdnotify import notify
from medagent.ops.upgrade import Staged, State, child_env

if TYPE_CHECKING:
    from medagent.runtime.agent import AgentRuntime

__all__ = ["HandoverFailed", "switch_available", "switch_over", "take_over"]

log = logging.getLogger("medagent.upgrade")

READY_TIMEOUT_S = 120.0  # the new process's imports and configuration on a slow box
GO_TIMEOUT_S = 120.0  # the old process's drain (channel drain timeout) and queue flush
HEALTHY_TIMEOUT_S = 90.0  # queue, hub, link, channels and the post-switch health check
POST_SWITCH_CHECK_S = 60.0
LEASE_WAIT_S = 30.0
KILL_GRACE_S = 10.0

_T = TypeVar("_T")
RuntimeFactory = Callable[[Mapping[str, socket.socket]], "AgentRuntime"]


class HandoverFailed(Exception):
    """The hand-over did not complete; ``str()`` is the reason recorded with the rollback."""


def switch_available() -> bool:
    return sys.platform != "win32"


# -- the control channel (I/O around the sans-I/O core) ------------------------------------------------
class _Control:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, role: ho.Role) -> None:
        self._reader, self._writer = reader, writer
        self.conversation = ho.Conversation(role)
        self._decoder = ho.LineDecoder()
        self._events: list[ho.Event] = []

    def send(self, kind: ho.Kind, **fields: object) -> None:
        self.conversation.sending(kind)
        self._writer.write(ho.encode(kind, **fields))

    def send_failed(self, reason: str) -> None:
        """Best effort: tell the peer why we give up (it may be gone already)."""
        if self.conversation.done:
            return
        with contextlib.suppress(Exception):
            self.send(ho.Kind.FAILED, reason=reason[:2000])

    async def receive(self, timeout_s: float, waiting_for: str) -> ho.Message:
        """The next message in order; HandoverFailed on EOF, timeout or a line we cannot accept."""
        try:
            async with asyncio.timeout(timeout_s):
                while True:
                    while self._events:
                        event = self.conversation.receive(self._events.pop(0))
                        if isinstance(event, ho.Message):
                            return event
                        if isinstance(event, ho.Ignored):
                            log.info("upgrade hand-over: ignoring a '%s' message (protocol v%d)", event.kind,
                                     event.version)
                            continue
                        self.send_failed(f"handover protocol: {event.reason}")
                        raise HandoverFailed(f"handover protocol: {event.reason}")
                    data = await self._reader.read(65536)
                    if not data:
                        raise HandoverFailed(f"the other process closed the control channel before '{waiting_for}'")
                    self._events.extend(self._decoder.feed(data))
        except TimeoutError:
            raise HandoverFailed(f"no '{waiting_for}' within {timeout_s:g} s") from None

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await self._writer.drain()
        self._writer.close()
        with contextlib.suppress(Exception):
            await self._writer.wait_closed()


async def _open_control(sock: socket.socket, role: ho.Role) -> _Control:
    sock.setblocking(False)
    reader, writer = await asyncio.open_connection(sock=sock)
    return _Control(reader, writer, role)


# -- the old process ------------------------------------------------------------------------------------
async def switch_over(runtime: AgentRuntime, staged: Staged, serve_args: Sequence[str],
                      make_runtime: RuntimeFactory) -> AgentRuntime | None:
    """Hand the agent over to ``staged``. None: the new process serves (exit 0 now). Otherwise
    the runtime that serves again after the switch-back (``runtime`` itself when it never
    stopped), with ``rolled-back`` recorded."""
    assert runtime.channel_set is not None
    held = runtime.channel_set.handover_sockets()
    ours, theirs = socket.socketpair()
    spec = ho.HandoverSpec(theirs.fileno(), {name: sock.fileno() for name, sock in held.items()})
    command = [str(staged.python), "-P", "-m", "medagent", "serve", *serve_args, "--handover", spec.to_arg()]
    log.info("upgrade: starting %s with %d listening socket(s) handed over", staged.version, len(held))
    try:
        # Popen, not asyncio's subprocess: asyncio kills a still-running child when its transport
        # is closed, and the new process must outlive this one.
        process = await asyncio.to_thread(subprocess.Popen, command, pass_fds=spec.fds, stdin=subprocess.DEVNULL,
                                          env=child_env())
    except OSError as exc:
        theirs.close()
        ours.close()
        _close_all(held)
        runtime.upgrader.record_outcome(State.ROLLED_BACK, targetVersion=staged.version,  # type: ignore[union-attr]
                                        error=f"cannot start the new version: {exc}")
        _remove(staged)
        return runtime
    theirs.close()
    control = await _open_control(ours, ho.Role.OLD)
    stopped = False
    try:
        ready = await control.receive(READY_TIMEOUT_S, "ready")
        if ready.kind is ho.Kind.FAILED:
            raise HandoverFailed(f"the new version could not prepare: {ready['reason']}")
        log.info("upgrade: %s (pid %d) is ready; stopping intake here", ready["version"], process.pid)
        stopped_at = time.time()
        stopped = True
        await runtime.stop()
        control.send(ho.Kind.GO, stoppedAt=stopped_at, **{"from": __version__})
        outcome = await control.receive(HEALTHY_TIMEOUT_S, "healthy")
        if outcome.kind is ho.Kind.HEALTHY:
            log.info("upgrade: %s (pid %d) is healthy and serving (intake paused %.3f s); this process exits",
                     staged.version, process.pid, outcome["pauseS"])
            _close_all(held)
            await control.close()
            return None
        reason = str(outcome["reason"])
    except HandoverFailed as exc:
        reason = str(exc)
    control.send_failed(reason)
    await control.close()
    # The restart overlaps the new process's exit: its queue open waits until the new process
    # released the lease (or died: SIGKILL after KILL_GRACE_S), and the channels start only after it.
    terminated = asyncio.ensure_future(_terminate(process))
    try:
        if stopped:
            log.warning("upgrade: switching back to %s (%s)", __version__, reason)
            runtime = make_runtime(held)  # it owns and closes the held sockets
            await runtime.start()
        else:
            _close_all(held)
    finally:
        await terminated
        _remove(staged)
    assert runtime.upgrader is not None
    runtime.upgrader.record_outcome(State.ROLLED_BACK, targetVersion=staged.version, error=reason)
    return runtime


async def _terminate(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM the new process by its PID, SIGKILL after KILL_GRACE_S; reaped either way."""
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(process.pid, signal.SIGTERM)
        try:
            await asyncio.to_thread(process.wait, KILL_GRACE_S)
        except subprocess.TimeoutExpired:
            log.warning("upgrade: pid %d did not stop within %g s; killing it", process.pid, KILL_GRACE_S)
            with contextlib.suppress(ProcessLookupError):
                os.kill(process.pid, signal.SIGKILL)
            await asyncio.to_thread(process.wait)
    log.info("upgrade: the new version's process %d ended (status %s)", process.pid, process.returncode)


def _remove(staged: Staged) -> None:
    shutil.rmtree(staged.environment, ignore_errors=True)


def _close_all(sockets: Mapping[str, socket.socket]) -> None:
    for sock in sockets.values():
        sock.close()


# -- the new process ------------------------------------------------------------------------------------
async def take_over(spec: ho.HandoverSpec, make_runtime: RuntimeFactory, stop: asyncio.Event) -> AgentRuntime | None:
    """Receive the agent from the process that started us. The runtime that now serves, or None
    (the switch failed or was abandoned; the old process takes everything back)."""
    control_sock = socket.socket(fileno=spec.control)
    inherited = {name: socket.socket(fileno=fd) for name, fd in spec.sockets.items()}
    control = await _open_control(control_sock, ho.Role.NEW)
    runtime: AgentRuntime | None = None
    started = False
    try:
        runtime = make_runtime(inherited)  # built (nothing bound, no queue opened); it owns the sockets now
        inherited = {}
        control.send(ho.Kind.READY, pid=os.getpid(), version=__version__)
        go = await _unless_stopped(control.receive(GO_TIMEOUT_S, "go"), stop)
        if go.kind is ho.Kind.FAILED:
            raise HandoverFailed(f"the old process gave up: {go['reason']}")
        await _unless_stopped(runtime.start(), stop)  # a failed start stops itself
        started = True
        pause_s = max(0.0, time.time() - float(go["stoppedAt"]))
        await _unless_stopped(post_switch_health(runtime, POST_SWITCH_CHECK_S), stop)
        assert runtime.upgrader is not None
        runtime.upgrader.record_outcome(State.COMPLETED, fromVersion=str(go["from"]), targetVersion=__version__,
                                        environment=sys.prefix, switchedAt=round(time.time(), 3),
                                        intakePauseS=round(pause_s, 3), error=None)
        notify(f"MAINPID={os.getpid()}", "READY=1")  # before healthy: the old main PID exits right after it
        control.send(ho.Kind.HEALTHY, pauseS=round(pause_s, 3))
        await control.close()
        return runtime
    except Exception as exc:  # noqa: BLE001 - every failure is reported to the old process, which rolls back
        reason = str(exc) or type(exc).__name__
        log.error("upgrade: taking over failed: %s", reason)
        control.send_failed(reason)
        await control.close()
        _close_all(inherited)
        if runtime is not None:
            if started:
                await runtime.stop()  # releases the lease before the old process takes it back
            else:
                await runtime.stop_unstarted()
        return None


async def _unless_stopped(work: Awaitable[_T], stop: asyncio.Event) -> _T:
    """Run ``work`` unless a stop signal arrives first (then HandoverFailed)."""
    task = asyncio.ensure_future(work)
    stopper = asyncio.ensure_future(stop.wait())
    try:
        done, _ = await asyncio.wait({task, stopper}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopper.cancel()
    if task not in done:
        task.cancel()
        with contextlib.suppress(BaseException):
            await task
        raise HandoverFailed("stopped by a signal during the switch")
    return task.result()
