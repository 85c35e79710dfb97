"""Real database engines started by fixtures (PostgreSQL, Redis) in temporary directories."""

from __future__ import annotations

import os
import socket
import subprocess
import time
from collections.abc import Callable
from typing import NoReturn

import pytest


def engine_missing(message: str) -> NoReturn:
    """Skip for want of an engine on a developer's machine; fail under ``CI=true``, where CI
    installs it and a silent skip would hide the tests that need it."""
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(message)
    pytest.skip(message)


def free_port() -> int:
    """A port that was free a moment ago (servers that cannot bind port 0 themselves retry)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def await_ready(process: subprocess.Popen[bytes], ready: Callable[[], bool], start_timeout_s: float,
                poll_s: float, failure: str) -> bool:
    """Poll ``ready`` until the engine answers (True) or its process exits first (False: most
    likely its port was taken meanwhile, so the caller retries on another). A process that neither
    answers nor exits in time is killed and waited for, and ``failure`` is raised."""
    deadline = time.monotonic() + start_timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            return False
        if ready():
            return True
        time.sleep(poll_s)
    process.kill()
    process.wait(start_timeout_s)
    raise RuntimeError(f"{failure} within {start_timeout_s} s")
