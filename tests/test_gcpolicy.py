"""The start-up heap is exempted from later full collections, and later garbage is still collected."""

from __future__ import annotations

import gc
import weakref

from medagent.gcpolicy import freeze_startup_heap


class _Node:
    def __init__(self) -> None:
        self.peer: _Node | None = None


def test_freezing_moves_the_live_heap_out_of_the_collector_and_later_cycles_are_still_freed() -> None:
    assert gc.get_freeze_count() == 0
    try:
        freeze_startup_heap()
        assert gc.get_freeze_count() > 1000  # the modules, classes and objects alive now
        a, b = _Node(), _Node()
        a.peer, b.peer = b, a  # a cycle created after the freeze
        ref = weakref.ref(a)
        del a, b
        gc.collect()
        assert ref() is None
    finally:
        gc.unfreeze()
