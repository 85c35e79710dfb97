"""StorageHealth (pure state machine) and FreeSpaceWatermark: every transition, hysteresis, and
one Transition per state change (so owners log once, not per message)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from medagent.storage.health import LOW_SPACE_REASON, StorageHealth, StorageState
from medagent.storage.space import DiskSpace, FreeSpaceWatermark

MIB = 1024 * 1024
TOTAL = 1000 * MIB
WATERMARK = FreeSpaceWatermark(min_free_bytes=50 * MIB, min_free_fraction=0.02)  # low = 50 MiB here


def space(free_mib: float) -> DiskSpace:
    return DiskSpace(int(free_mib * MIB), TOTAL)


def test_watermark_is_the_larger_of_bytes_and_fraction_with_a_resume_margin() -> None:
    assert WATERMARK.low_bytes(TOTAL) == 50 * MIB
    assert WATERMARK.low_bytes(10_000 * MIB) == 200 * MIB  # 2 % of a bigger disk
    assert WATERMARK.resume_bytes(TOTAL) == 55 * MIB
    small = FreeSpaceWatermark(50 * 1024, 0.0)
    assert small.resume_bytes(TOTAL) == 100 * 1024  # margin never bigger than the watermark
    assert FreeSpaceWatermark(0, 0.0).resume_bytes(TOTAL) == MIB  # disabled: still not at 0 bytes
    assert FreeSpaceWatermark.from_config(50, 2) == WATERMARK
    with pytest.raises(ValueError):
        FreeSpaceWatermark(-1, 0.0)
    with pytest.raises(ValueError):
        FreeSpaceWatermark(0, 1.5)


def test_ok_to_low_and_back_only_above_the_resume_level() -> None:
    health = StorageHealth(WATERMARK)
    assert health.accepting and health.observe(space(500)) is None
    change = health.observe(space(49))
    assert change is not None and (change.old, change.new, change.reason) == (
        StorageState.OK, StorageState.LOW_SPACE, LOW_SPACE_REASON)
    assert not health.accepting and health.writable
    assert health.observe(space(52)) is None  # above low, below resume: no flapping
    assert health.observe(space(56), extra_bytes=8 * MIB) is None  # the reserve would not fit
    assert health.observe(space(56), ready=False) is None  # the owner is not ready yet
    change = health.observe(space(56))
    assert change is not None and change.new is StorageState.OK and health.reason is None
    assert health.changes == 2


def test_failed_is_left_only_by_a_successful_probe() -> None:
    health = StorageHealth(WATERMARK)
    change = health.write_failed("storage error: database or disk is full")
    assert change is not None and change.new is StorageState.FAILED
    assert not health.accepting and not health.writable
    assert health.write_failed("storage error: disk I/O error") is None  # no second log line
    assert health.reason == "storage error: disk I/O error"
    assert health.observe(space(900)) is None  # a sample is no proof that writes work
    change = health.probe_succeeded(space(20))
    assert change is not None and change.new is StorageState.LOW_SPACE  # writable, still short
    change = health.probe_succeeded(space(900))
    assert change is not None and change.new is StorageState.OK


def test_failed_goes_straight_to_ok_when_space_is_plentiful_and_the_owner_ready() -> None:
    health = StorageHealth(WATERMARK)
    health.write_failed("storage error: x")
    assert health.probe_succeeded(space(900), ready=False).new is StorageState.LOW_SPACE  # type: ignore[union-attr]
    health.write_failed("storage error: x")
    assert health.probe_succeeded(space(900)).new is StorageState.OK  # type: ignore[union-attr]


@given(st.lists(st.one_of(
    st.tuples(st.just("observe"), st.integers(0, 200)),
    st.tuples(st.just("fail"), st.just(0)),
    st.tuples(st.just("probe"), st.integers(0, 200)),
), max_size=60))
def test_transitions_report_exactly_the_state_changes(events: list[tuple[str, int]]) -> None:
    health = StorageHealth(WATERMARK)
    for kind, free in events:
        before = health.state
        if kind == "observe":
            change = health.observe(space(free))
        elif kind == "fail":
            change = health.write_failed("storage error: full")
        else:
            change = health.probe_succeeded(space(free))
        assert (change is not None) == (health.state is not before)
        if change is not None:
            assert (change.old, change.new) == (before, health.state)
        assert health.accepting == (health.state is StorageState.OK)
        assert (health.reason is None) == (health.state is StorageState.OK)
        if health.state is StorageState.OK and kind != "fail":
            assert free >= 50  # never accepting below the low watermark after a sample or probe
