"""The load client's scheduling policy: ``medagent bench --client-priority realtime``.

Why: the bench puts the lock-step client on the same 2-core box as the system under test. A
client woken by an ACK then waits for a CPU whenever both are busy, and that wait counts as ACK
latency. At one sender it is most of the tail: every ~10 ms the embedded hub works ~3 ms on a
batch, and about a third of the senders' waiting was in ACKs of 1 ms or more while our own
processing took ~150 µs (benchmarks/perf-log.md, session 2026-12-01 17:54). Devices in the field
are not on the gateway's box. Under ``SCHED_FIFO`` the woken client runs at once, whichever
stack it drives (Medplum's or ours, the same way), so the rows measure the gateway rather than
where the kernel placed the client.

The policy is the lowest real-time priority (1). The client blocks in ``epoll_wait`` between
ACKs and uses ~11-20 µs of CPU per message, and the kernel's real-time throttling
(``sched_rt_runtime_us``) leaves other tasks their share even if it spun. Setting it needs
``CAP_SYS_NICE`` (root) or an ``RLIMIT_RTPRIO`` of at least 1; :func:`check_allowed` says so
before any scenario starts. Linux only.
"""

from __future__ import annotations

import os
from typing import Final

__all__ = ["CLIENT_PRIORITIES", "NORMAL", "REALTIME", "PriorityError", "apply", "check_allowed"]

NORMAL: Final = "normal"
REALTIME: Final = "realtime"
CLIENT_PRIORITIES: Final = (NORMAL, REALTIME)
_FIFO_PRIORITY: Final = 1


class PriorityError(Exception):
    """The policy cannot be set here (platform or permission)."""


def check_allowed(priority: str) -> None:
    """Raise PriorityError unless this process may start a client with ``priority``: tries the
    policy on the calling thread and puts it back (a thread may always lower its own policy)."""
    if priority == NORMAL:
        return
    _require(priority)
    try:
        os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(_FIFO_PRIORITY))
    except PermissionError:
        raise PriorityError("--client-priority realtime needs root (CAP_SYS_NICE) or an RLIMIT_RTPRIO of "
                            "at least 1 (ulimit -r)") from None
    os.sched_setscheduler(0, os.SCHED_OTHER, os.sched_param(0))


def apply(pid: int, priority: str) -> None:
    """Give process ``pid`` (its main thread, and the threads it starts later) ``priority``."""
    if priority == NORMAL:
        return
    _require(priority)
    try:
        os.sched_setscheduler(pid, os.SCHED_FIFO, os.sched_param(_FIFO_PRIORITY))
    except OSError as exc:
        raise PriorityError(f"setting SCHED_FIFO on the load client (pid {pid}) failed: {exc}") from None
    if os.sched_getscheduler(pid) != os.SCHED_FIFO:
        raise PriorityError(f"the load client (pid {pid}) is not under SCHED_FIFO after setting it")


def _require(priority: str) -> None:
    if priority not in CLIENT_PRIORITIES:
        raise PriorityError(f"unknown client priority {priority!r}; choose from {', '.join(CLIENT_PRIORITIES)}")
    if not hasattr(os, "sched_setscheduler"):
        raise PriorityError("--client-priority realtime needs Linux (os.sched_setscheduler)")
