"""Helpers imported by test modules (kept out of conftest.py, of which there are several)."""

from __future__ import annotations

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
