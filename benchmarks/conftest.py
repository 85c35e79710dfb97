"""Fixtures of the benchmark suites (pytest-benchmark; not collected by the default test run).

* `impl` parametrizes kernel benchmarks over the pure twin ("py") and the Cython twin ("c") in
  the same run; "c" is skipped in pure mode (MEDAGENT_NO_EXTENSIONS) or when it is not built.
* `pick(module, "Name", impl)` returns `module.NamePy` or `module.NameC`.
* `adt_a01` is the 625-byte ADT^A01 of the performance targets (tests/data/adt_a01.hl7, or the
  load generator's built-in copy when the test corpus is not at hand).

Run: ``pytest benchmarks/ --benchmark-group-by=func`` (see docs/benchmarks.md).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from medagent import _compat

CORPUS_MESSAGE = Path(__file__).resolve().parent.parent / "tests" / "data" / "adt_a01.hl7"


@pytest.fixture(params=["py", "c"])
def impl(request: pytest.FixtureRequest) -> str:
    if request.param == "c" and _compat.NO_EXTENSIONS:
        pytest.skip("pure mode (MEDAGENT_NO_EXTENSIONS) in force")
    return request.param


def pick(module: Any, name: str, impl: str) -> Any:
    """The Py or C twin of `name` exported by a selector module (skip if the C twin is absent)."""
    obj = getattr(module, name + ("Py" if impl == "py" else "C"), None)
    if obj is None:
        pytest.skip(f"{module.__name__}.{name}C is not built")
    return obj


@pytest.fixture(scope="session")
def adt_a01() -> bytes:
    if CORPUS_MESSAGE.is_file():
        return CORPUS_MESSAGE.read_bytes()
    from medagent.bench.loadgen import SAMPLE_ADT_A01

    return SAMPLE_ADT_A01


#: (benchmark name, impl) -> mean ns per message, for the speed-up table at the end.
_PER_MESSAGE_NS: dict[tuple[str, str], float] = {}


def record_per_message(benchmark: Any, name: str, impl: str, messages: int) -> None:
    """Store the mean time per message in extra_info and for the session's speed-up table."""
    stats = getattr(benchmark, "stats", None)
    if stats is None:  # --benchmark-disable: the function ran once, nothing was timed
        return
    per_message = stats.stats.mean * 1e9 / messages
    benchmark.extra_info["per_message_ns"] = round(per_message, 1)
    benchmark.extra_info["messages_per_call"] = messages
    benchmark.extra_info["impl"] = impl
    _PER_MESSAGE_NS[(name, impl)] = per_message


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if not _PER_MESSAGE_NS:
        return
    names = sorted({name for name, _ in _PER_MESSAGE_NS})
    terminalreporter.section("per-message time, pure vs Cython")
    terminalreporter.write_line(f"{'benchmark':<40} {'py ns':>10} {'c ns':>10} {'speed-up':>9}")
    for name in names:
        py, c = _PER_MESSAGE_NS.get((name, "py")), _PER_MESSAGE_NS.get((name, "c"))
        ratio = f"{py / c:8.1f}x" if py and c else "      n/a"
        terminalreporter.write_line(
            f"{name:<40} {py or float('nan'):>10.0f} {c or float('nan'):>10.0f} {ratio:>9}"
        )
