"""Which implementation of the hot kernels is active: the Cython twins or the pure-Python ones.

`MEDAGENT_NO_EXTENSIONS` = 1/true/yes forces pure Python; 0, empty or unset means "use the
extensions when they are importable". Non-CPython interpreters always run pure Python.

Invariant: the selection is made once, at first import, and every selector module
(`medagent.proto.mllp`, `medagent.proto.hl7`, `medagent.proto.hl7_session`) asks `load_fast()`
rather than importing `medagent._fast` itself, so `EXTENSIONS_ACTIVE` always tells the truth about what is in use.
"""

from __future__ import annotations

import importlib
import os
import platform
from pathlib import Path
from types import ModuleType

__all__ = ["EXTENSIONS_ACTIVE", "FAST_MODULES", "NO_EXTENSIONS", "implementation_summary", "load_fast"]

#: Every Cython kernel shipped in medagent/_fast; each has a pure twin in medagent/proto.
FAST_MODULES = ("_mllp", "_hl7", "_hl7session")


def _env_disables_extensions() -> bool:
    value = os.environ.get("MEDAGENT_NO_EXTENSIONS", "").strip().lower()
    if value in ("", "0", "false", "no"):
        return False
    if value in ("1", "true", "yes"):
        return True
    raise ValueError(f"MEDAGENT_NO_EXTENSIONS must be 1/true/yes or 0/false/no/empty, not {value!r}")


NO_EXTENSIONS: bool = _env_disables_extensions() or platform.python_implementation() != "CPython"

#: Written by setup.py when an optional (auto-mode) compile failed, with the reason.
BUILD_FAILED_PATH = Path(__file__).parent / "_fast" / "BUILD_FAILED.txt"

_loaded: dict[str, ModuleType | None] = {}
_errors: dict[str, str] = {}


def load_fast(name: str) -> ModuleType | None:
    """Return the compiled module `medagent._fast.<name>`, or None when pure mode is in force."""
    if NO_EXTENSIONS:
        return None
    if name not in _loaded:
        try:
            _loaded[name] = importlib.import_module(f"medagent._fast.{name}")
        except ImportError as exc:
            _loaded[name] = None
            _errors[name] = str(exc)
    return _loaded[name]


EXTENSIONS_ACTIVE: bool = all(load_fast(name) is not None for name in FAST_MODULES)


def implementation_summary() -> str:
    """One line for logs, `--version`, status and heartbeats."""
    if EXTENSIONS_ACTIVE:
        return "extensions: active (Cython: " + ", ".join(m.lstrip("_") for m in FAST_MODULES) + ")"
    if NO_EXTENSIONS:
        return "extensions: off (pure Python, MEDAGENT_NO_EXTENSIONS set or not CPython)"
    return f"extensions: unavailable (pure Python; extensions not built: {build_failure_reason()})"


def build_failure_reason() -> str:
    """Why the compiled kernels are missing: the build's recorded reason, else the import error."""
    try:
        reason = BUILD_FAILED_PATH.read_text(encoding="utf-8").strip()
    except OSError:
        reason = ""
    if not reason:
        reason = "; ".join(f"{k}: {v}" for k, v in _errors.items()) or "not built"
    return reason
