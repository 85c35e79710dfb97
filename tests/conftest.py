"""Shared test fixtures.

* `impl` parametrizes protocol tests over the pure twin ("py") and the Cython twin ("c"); the
  c case is skipped only when pure mode is in force (MEDAGENT_NO_EXTENSIONS) — a missing build
  without that variable is a failure, caught by tests/test_compat.py.
* Every async test runs on both the stock asyncio loop and uvloop (where installed), through
  pytest-asyncio's loop-factory hook. MEDAGENT_TEST_LOOPS=asyncio (or uvloop) narrows the set.
* Helpers that tests import (`pick`, `DATA_DIR`) live in tests/testsupport.py: several conftest.py
  files exist, so `from conftest import ...` would resolve to whichever one loaded first.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import pytest
from testsupport import DATA_DIR

from medagent import _compat

# Child processes (`python -m medagent ...`) must import the installed package, as the test
# process does, not the source tree in the working directory (which has no compiled kernels).
os.environ["PYTHONSAFEPATH"] = "1"


def _loop_factories() -> dict[str, Callable[[], asyncio.AbstractEventLoop]]:
    factories: dict[str, Callable[[], asyncio.AbstractEventLoop]] = {"asyncio": asyncio.new_event_loop}
    try:
        import uvloop
    except ImportError:
        pass
    else:
        factories["uvloop"] = uvloop.new_event_loop
    wanted = [w.strip() for w in os.environ.get("MEDAGENT_TEST_LOOPS", "").split(",") if w.strip()]
    if wanted:
        factories = {name: f for name, f in factories.items() if name in wanted}
    return factories


def pytest_asyncio_loop_factories(config: pytest.Config, item: pytest.Item) -> Mapping[str, Any]:
    return _loop_factories()


@pytest.fixture(params=["py", "c"])
def impl(request: pytest.FixtureRequest) -> str:
    if request.param == "c" and _compat.NO_EXTENSIONS:
        pytest.skip("pure mode (MEDAGENT_NO_EXTENSIONS) in force")
    return request.param


@pytest.fixture
def data_dir() -> Path:
    return DATA_DIR


#: The long fault, fuzz and soak forms (marker `long`) run only when asked for.
LONG_TESTS = os.environ.get("MEDAGENT_LONG_TESTS", "").strip() == "1"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if LONG_TESTS:
        return
    skip = pytest.mark.skip(reason="long form: set MEDAGENT_LONG_TESTS=1")
    for item in items:
        if "long" in item.keywords:
            item.add_marker(skip)
