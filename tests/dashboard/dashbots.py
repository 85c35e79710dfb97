"""Bots of the dashboard's end-to-end tests; the hub child imports them by name (PYTHONPATH is set)."""

from __future__ import annotations

import os

from medagent.hub.bots import ack

#: while the file named by this variable exists, ``flaky`` fails (a downstream system is "down")
FAIL_WHILE_ENV = "MEDAGENT_TEST_FAIL_WHILE"


def flaky(event):
    marker = os.environ.get(FAIL_WHILE_ENV)
    if marker and os.path.exists(marker):
        raise RuntimeError("the downstream system is unavailable")
    return ack.handler(event)
