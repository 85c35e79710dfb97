"""Real database engines started by fixtures (PostgreSQL, Redis) in temporary directories."""

from __future__ import annotations

import os
import socket
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
