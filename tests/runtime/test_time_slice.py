"""The hub's CPU time slice (medagent/ops/time_slice.py): asked for on the real kernel, in child
processes so the test process keeps its own; passed from `[hub] cpu_slice_ms` to the embedded
hub; refused with a clear error when out of range.

On a kernel without custom slices (before 6.12) the same tests check the documented fallback:
the request reports None and nothing changes.
"""

from __future__ import annotations

import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from medagent.ops import time_slice

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="time slices are a Linux scheduler feature")


def _kernel_has_custom_slices() -> bool:
    match = re.match(r"(\d+)\.(\d+)", platform.release())  # "6.18.44-fc", "6.12-rc1"
    assert match, platform.release()
    return (int(match[1]), int(match[2])) >= (6, 12)


def _in_child(code: str) -> list[str]:
    out = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout.split()


@pytest.mark.parametrize("value", [0, 0.1, 20, 100])
def test_accepted_settings(value: float) -> None:
    assert time_slice.setting_problem(value) is None


@pytest.mark.parametrize("value", [-1, 0.05, 100.5, 1000])
def test_refused_settings_say_the_range(value: float) -> None:
    problem = time_slice.setting_problem(value)
    assert problem is not None and "0.1..100 ms" in problem and f"got {value!r}" in problem


def test_request_rejects_zero_and_out_of_range() -> None:
    for value in (0, 150):
        with pytest.raises(ValueError, match="0.1..100 ms"):
            time_slice.request_slice(value)


def test_the_slice_is_granted_and_inherited_by_later_threads_and_children() -> None:
    code = (
        "import os, subprocess, sys, threading\n"
        "from medagent.ops import time_slice as t\n"
        "before = t.current_slice_ms()\n"
        "granted = t.request_slice(7.5)\n"
        "seen = []\n"
        "thread = threading.Thread(target=lambda: seen.append(t.current_slice_ms())); thread.start(); thread.join()\n"
        "child = subprocess.run([sys.executable, '-c', 'from medagent.ops import time_slice as t; "
        "print(t.current_slice_ms())'], capture_output=True, text=True).stdout.strip()\n"
        "print(before, granted, seen[0], child)\n"
    )
    before, granted, thread, child = _in_child(code)
    if _kernel_has_custom_slices():
        assert float(before) != 7.5
        assert (granted, thread, child) == ("7.5", "7.5", "7.5")
    else:
        assert granted == "None"


def test_a_process_under_another_policy_keeps_it() -> None:
    """An operator who ran the hub under `chrt --idle` keeps that policy: no slice is set."""
    code = (
        "import os\n"
        "from medagent.ops import time_slice as t\n"
        "os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))\n"
        "print(t.request_slice(20), os.sched_getscheduler(0) == os.SCHED_IDLE)\n"
    )
    assert _in_child(code) == ["None", "True"]


def test_the_nice_value_is_kept() -> None:
    code = (
        "import os\n"
        "from medagent.ops import time_slice as t\n"
        "os.nice(5)\n"
        "t.request_slice(20)\n"
        "print(os.getpriority(os.PRIO_PROCESS, 0))\n"
    )
    assert _in_child(code) == ["5"]


def test_hub_serve_refuses_an_out_of_range_slice(tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "medagent", "hub", "serve", "--data-dir", str(tmp_path), "--port", "0",
         "--cpu-slice-ms", "250"],
        check=False, capture_output=True, text=True, timeout=60,
    )
    assert out.returncode == 2
    assert "cpu_slice_ms must be 0 (the kernel's default) or 0.1..100 ms, got 250.0" in out.stderr


def _hub_child(serve_pid: int) -> int:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        children = [pid for task in Path(f"/proc/{serve_pid}/task").iterdir()
                    for pid in (task / "children").read_text().split()]
        for pid in children:
            if b"hub" in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0"):
                return int(pid)
        time.sleep(0.1)
    raise AssertionError("no embedded hub child found")


@pytest.mark.parametrize(("setting", "expected"), [(None, 20.0), ("7.5", 7.5)])
def test_the_embedded_hub_runs_with_the_configured_slice_and_the_agent_keeps_the_default(
    serve_factory, monkeypatch: pytest.MonkeyPatch, setting: str | None, expected: float
) -> None:
    if setting is not None:
        monkeypatch.setenv("MEDAGENT_HUB_CPU_SLICE_MS", setting)
    serve = serve_factory('[[channel]]\nname = "adt-in"\nendpoint = "mllp://127.0.0.1:0?ackMode=fast"\n')
    hub_pid = _hub_child(serve.process.pid)
    threads = [int(tid) for tid in os.listdir(f"/proc/{hub_pid}/task")]
    slices = {time_slice.current_slice_ms(tid) for tid in threads}
    agent_slice = time_slice.current_slice_ms(serve.process.pid)
    if _kernel_has_custom_slices():
        assert slices == {expected}, f"hub threads' slices {slices}"
        assert agent_slice != expected  # the device-facing agent keeps the kernel's default
    else:
        assert len(slices) == 1
