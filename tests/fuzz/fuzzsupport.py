"""`fuzz_pair`: one property, two tests (the CI form and the `long` form with many examples)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

CI_EXAMPLES = 150
LONG_EXAMPLES = 20_000
_CHECKS = [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.function_scoped_fixture]


def fuzz_pair(strategy: st.SearchStrategy[bytes], check: Callable[[bytes], None],
              ci: int = CI_EXAMPLES) -> tuple[Callable[..., Any], Callable[..., Any]]:
    """(CI test, long test) running `check` on inputs drawn from `strategy`."""

    def run(data: bytes) -> None:
        check(data)

    short = settings(max_examples=ci, deadline=None, suppress_health_check=_CHECKS)(given(data=strategy)(run))
    long = settings(max_examples=LONG_EXAMPLES, deadline=None, suppress_health_check=_CHECKS)(given(data=strategy)(run))
    return short, pytest.mark.long(long)


def with_cuts(stream: st.SearchStrategy[bytes]) -> st.SearchStrategy[bytes]:
    """The targets' input layout for stream decoders: a count byte, chunk-size bytes, the stream."""
    sizes = st.lists(st.integers(0, 255), max_size=7)
    return st.tuples(sizes, stream).map(lambda t: bytes([len(t[0])]) + bytes(t[0]) + t[1])


def mutated(base: st.SearchStrategy[bytes]) -> st.SearchStrategy[bytes]:
    """`base`, sometimes with a few bytes overwritten, inserted or cut off (the ugly cases)."""

    @st.composite
    def build(draw: st.DrawFn) -> bytes:
        data = bytearray(draw(base))
        for _ in range(draw(st.integers(0, 3))):
            kind = draw(st.sampled_from(["flip", "insert", "truncate"]))
            pos = draw(st.integers(0, len(data)))
            if kind == "flip" and data:
                data[min(pos, len(data) - 1)] = draw(st.integers(0, 255))
            elif kind == "insert":
                data[pos:pos] = draw(st.binary(max_size=4))
            else:
                del data[pos:]
        return bytes(data)

    return build()
