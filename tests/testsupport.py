"""Helpers imported by test modules (kept out of conftest.py, of which there are several)."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

DATA_DIR = Path(__file__).parent / "data"


def pick(module: Any, name: str, impl: str) -> Any:
    """The Py or C twin of `name` exported by a selector module (`MllpDecoderPy` / `MllpDecoderC`)."""
    obj = getattr(module, name + ("Py" if impl == "py" else "C"), None)
    if obj is None:
        pytest.fail(f"{module.__name__}.{name}C is missing although extensions are expected")
    return obj


def wait_until_sync(condition: Callable[[], bool], timeout: float = 10.0) -> bool:
    """Poll ``condition`` every 20 ms until it holds (True) or ``timeout`` seconds passed (False):
    for tests that watch a background thread (e.g. the WAL checkpointer) from plain code."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.02)
    return False
