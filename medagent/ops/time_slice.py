"""Ask the kernel for a longer CPU time slice for a throughput process: the hub.

Why: Linux's scheduler (EEVDF, 6.6+) lets a task that wakes preempt the running one at once
only when the woken task's slice is shorter (``PREEMPT_SHORT``, 6.12+); between equal slices
the woken task waits until the running one has used up its slice, ~1.4 ms on a 2-core box and
more on bigger ones. When the embedded hub works through a batch (~3 ms every ~10 ms at one
sender), the agent and the device it answers wait behind it for up to a slice, and at one
sender that waiting was a third of the ACK time (benchmarks/perf-log.md, session 2026-12-01
17:54). A hub that asks for a long slice is preempted by every waking task with the default
slice: the agent, the device, the database. Its CPU share stays the same (the slice is not a
priority; EEVDF stays fair over time), so unlike ``SCHED_IDLE`` or a nice value it cannot be
starved by other busy processes.

Unprivileged (a task may set its own slice), inherited by the threads and child processes
started afterwards, so it is set first thing in the process. Kernels before 6.12 ignore the
request: :func:`request_slice` then reports ``None`` and nothing changes. Only
``SCHED_OTHER`` and ``SCHED_BATCH`` tasks are touched: a process an operator put under
another policy (``chrt``) keeps it.
"""

from __future__ import annotations

import ctypes
import os
import platform
import struct
import sys
from typing import Final

__all__ = ["DEFAULT_SLICE_MS", "MAX_SLICE_MS", "MIN_SLICE_MS", "current_slice_ms", "request_slice", "setting_problem"]

#: The kernel clamps a custom slice to 0.1-100 ms.
MIN_SLICE_MS: Final = 0.1
MAX_SLICE_MS: Final = 100.0
#: The hub's default: long against the kernel's ~1-3 ms, short enough that its own threads
#: (the loop, the WAL checkpointer, bot workers) still take turns within a batch.
DEFAULT_SLICE_MS: Final = 20.0

# struct sched_attr (include/uapi/linux/sched/types.h, SCHED_ATTR_SIZE_VER1): size, policy,
# flags, nice, priority, runtime (the fair slice in ns), deadline, period, util_min, util_max.
_ATTR: Final = struct.Struct("IIQiIQQQII")
_SYSCALLS: Final = {"x86_64": (314, 315), "aarch64": (274, 275)}  # sched_setattr, sched_getattr


def setting_problem(slice_ms: float) -> str | None:
    """What is wrong with ``slice_ms`` as the ``cpu_slice_ms`` setting (0 = the kernel's default), or None."""
    if slice_ms == 0 or MIN_SLICE_MS <= slice_ms <= MAX_SLICE_MS:
        return None
    return f"must be 0 (the kernel's default) or {MIN_SLICE_MS:g}..{MAX_SLICE_MS:g} ms, got {slice_ms!r}"


def request_slice(slice_ms: float) -> float | None:
    """Give the calling thread (and the threads and processes it starts later) a time slice
    of ``slice_ms``. Returns the slice the kernel now reports in ms, or None where custom slices
    are not supported (not Linux, an older kernel, another policy, or refused)."""
    if slice_ms == 0 or setting_problem(slice_ms) is not None:
        raise ValueError(f"a time slice must be {MIN_SLICE_MS:g}..{MAX_SLICE_MS:g} ms, not {slice_ms!r}")
    calls = _syscalls()
    if calls is None:
        return None
    policy = os.sched_getscheduler(0)
    if policy not in (os.SCHED_OTHER, os.SCHED_BATCH):
        return None
    wanted = round(slice_ms * 1_000_000)
    attr = _ATTR.pack(_ATTR.size, policy, 0, os.getpriority(os.PRIO_PROCESS, 0), 0, wanted, 0, 0, 0, 0)
    if _libc().syscall(calls[0], 0, ctypes.create_string_buffer(attr, _ATTR.size), 0) != 0:
        return None
    granted = current_slice_ms()
    # Before 6.12 the kernel keeps no custom slice and reports 0 or its default.
    return granted if granted is not None and abs(granted * 1_000_000 - wanted) < 1_000 else None


def current_slice_ms(tid: int = 0) -> float | None:
    """Thread ``tid``'s (0: the calling thread's) time slice in ms as the kernel reports it
    (None: not available)."""
    calls = _syscalls()
    if calls is None:
        return None
    buffer = ctypes.create_string_buffer(_ATTR.size)
    if _libc().syscall(calls[1], tid, buffer, _ATTR.size, 0) != 0:
        return None
    return float(_ATTR.unpack(buffer.raw)[5]) / 1_000_000


def _syscalls() -> tuple[int, int] | None:
    if sys.platform != "linux":
        return None
    return _SYSCALLS.get(platform.machine())


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)
