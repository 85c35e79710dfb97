"""Fault suite fixtures: the end-to-end machinery of tests/runtime.

The long forms (many kills, 5-minute link outages) are marked `long` and run only with
MEDAGENT_LONG_TESTS=1 (tests/conftest.py).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "runtime"))

from test_remote_hub import deployment, spawn  # noqa: F401 - re-exported as fixtures
