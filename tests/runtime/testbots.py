"""Bots used by the end-to-end tests; the hub child imports them by name (PYTHONPATH is set)."""

from __future__ import annotations

import time


def failing(event):  # noqa: ANN001, ANN201 - the bot signature is the hub's BotEvent
    raise RuntimeError("the bot could not file the message")


def slow(event):  # noqa: ANN001, ANN201
    time.sleep(3)
    return None
