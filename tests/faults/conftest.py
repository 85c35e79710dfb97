"""Fault suite fixtures: the `long` marker, and the end-to-end machinery of tests/runtime.

The long forms (many kills, 5-minute link outages) run only with MEDAGENT_LONG_TESTS=1.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "runtime"))

from test_remote_hub import deployment, spawn  # noqa: F401 - re-exported as fixtures

LONG_TESTS = os.environ.get("MEDAGENT_LONG_TESTS") == "1"


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "long: long form of a fault or fuzz suite (MEDAGENT_LONG_TESTS=1 runs it)")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if LONG_TESTS:
        return
    skip = pytest.mark.skip(reason="long form: set MEDAGENT_LONG_TESTS=1")
    for item in items:
        if "long" in item.keywords and Path(str(item.fspath)).parent == Path(__file__).parent:
            item.add_marker(skip)
