"""Where pending rows may be: a few id runs plus an open tail (no I/O here).

Why: schema 3 dropped the partial index on pending rows, so the store finds them by walking rowid
ranges. A walk from a single floor is cheap while the queue keeps up, but one old row left pending
(a message the hub keeps refusing) pins the floor, and every load from below it then walks every
settled row after it (~170 ms per million rows). This map remembers such rows as short runs below
the tail, so a walk visits the runs and then the tail, never the settled rows between them.

The map is a SUPERSET of the pending ids: every pending id is in a run or >= `tail`; an id in the
map may have been settled meanwhile (walks filter on the state). So every change must keep that:
confirming or failing rows may only remove those ids; rows put back to pending must be added
before anyone relies on the map; new rows get ids above every id handed out, hence >= `tail`
(the store never moves `tail` past its newest id + 1).

Cost on the intake path: nothing for inserts (they land in the tail); one comparison per
confirmed run of ids (the hub confirms in order, so a confirmation usually just moves the tail).
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable, Iterator, Sequence

__all__ = ["PendingMap", "decode_runs", "encode_runs", "id_runs"]

#: Runs kept before the map coarsens (neighbouring runs merged: still a superset, walks a bit more).
MAX_RUNS = 4096
#: Runs written to meta; a map with more is not saved (the next opener falls back to the floor).
MAX_SAVED_RUNS = 256


def id_runs(ids: Iterable[int]) -> list[tuple[int, int]]:
    """The distinct `ids` as (first, last) runs of consecutive integers, ascending:
    [7, 3, 4, 5, 9, 8, 4] -> [(3, 5), (7, 9)]. Every id of a run is in `ids`."""
    runs: list[tuple[int, int]] = []
    for row_id in sorted(set(ids)):
        if runs and row_id == runs[-1][1] + 1:
            runs[-1] = (runs[-1][0], row_id)
        else:
            runs.append((row_id, row_id))
    return runs


def _normalized(runs: Iterable[tuple[int, int]]) -> list[tuple[int, int]]:
    """Sorted, with overlapping or touching runs merged."""
    merged: list[tuple[int, int]] = []
    for first, last in sorted(runs):
        if merged and first <= merged[-1][1] + 1:
            if last > merged[-1][1]:
                merged[-1] = (merged[-1][0], last)
        else:
            merged.append((first, last))
    return merged


class PendingMap:
    """Pending ids are within `runs` (sorted, disjoint, all below `tail`) or >= `tail`."""

    __slots__ = ("runs", "tail")

    def __init__(self, tail: int, runs: Sequence[tuple[int, int]] = ()) -> None:
        self.tail = max(1, int(tail))
        self.runs: list[tuple[int, int]] = [r for r in _normalized(runs) if r[0] < self.tail]
        if self.runs and self.runs[-1][1] >= self.tail:
            self.runs[-1] = (self.runs[-1][0], self.tail - 1)

    @property
    def floor(self) -> int:
        """No id below this is pending."""
        return self.runs[0][0] if self.runs else self.tail

    # ----------------------------------------------------------------- changes

    def settle(self, first: int, last: int, newest: int) -> None:
        """Ids first..last are no longer pending (confirmed or failed). `newest` is the largest id
        handed out: the tail never passes newest + 1, so later rows stay inside it."""
        last = min(last, newest)
        if first > last:
            return
        tail = self.tail
        if self.runs and first <= self.runs[-1][1]:
            self._remove(first, min(last, tail - 1))
        if last >= tail:
            if first > tail:  # ids tail..first-1 may still be pending: keep them as a run
                self.runs.append((tail, first - 1))
                self._coarsen()
            self.tail = last + 1

    def add(self, runs: Iterable[tuple[int, int]]) -> None:
        """These ids may be pending again (a retry of FAILED rows)."""
        extra = [(first, min(last, self.tail - 1)) for first, last in runs if first < self.tail]
        if extra:
            self.runs = _normalized(self.runs + extra)
            self._coarsen()

    def lower_floor(self, floor: int) -> None:
        """Every id >= `floor` may be pending (a retry whose ids are not known)."""
        if floor < self.tail:
            self._remove(floor, self.tail - 1)
            self.tail = max(1, floor)

    def learn(self, first: int, last: int, found: Sequence[int]) -> None:
        """A walk of first..last (all below the tail) found exactly `found` pending."""
        self._remove(first, last)
        if found:
            self.runs = _normalized(self.runs + id_runs(found))

    def raise_tail(self, first_pending: int) -> None:
        """A walk from the tail found its first pending row at `first_pending` (or none below it)."""
        self.tail = max(self.tail, first_pending)

    def walked_tail(self, found: Sequence[int]) -> None:
        """A walk from the tail found exactly `found` pending up to its last id: they become runs
        and the tail moves past them, so a row left far behind is not walked past again."""
        if found and found[0] >= self.tail:
            self.runs = _normalized(self.runs + id_runs(found))
            self.tail = found[-1] + 1
            self._coarsen()

    def _remove(self, first: int, last: int) -> None:
        runs = self.runs
        start = bisect.bisect_left(runs, (first, first)) - 1
        start = max(start, 0)
        kept: list[tuple[int, int]] = []
        end = start
        while end < len(runs) and runs[end][0] <= last:
            a, b = runs[end]
            if b >= first:
                if a < first:
                    kept.append((a, first - 1))
                if b > last:
                    kept.append((last + 1, b))
            else:
                kept.append((a, b))
            end += 1
        runs[start:end] = kept

    def _coarsen(self) -> None:
        """Bound memory: past MAX_RUNS, merge each pair of neighbours (a superset still)."""
        if len(self.runs) > MAX_RUNS:
            runs = self.runs
            self.runs = [(runs[i][0], runs[min(i + 1, len(runs) - 1)][1]) for i in range(0, len(runs), 2)]

    # ----------------------------------------------------------------- walks

    def spans(self, after_id: int, up_to_id: int | None) -> Iterator[tuple[int, int | None, bool]]:
        """The id ranges to walk for pending rows with after_id < id <= up_to_id, ascending:
        (first, last or None for open-ended, whether it is the tail)."""
        low = after_id + 1
        for first, last in self.runs:
            if last < low:
                continue
            if up_to_id is not None and first > up_to_id:
                return
            yield max(first, low), last if up_to_id is None else min(last, up_to_id), False
        first = max(self.tail, low)
        if up_to_id is None or first <= up_to_id:
            yield first, up_to_id, True

    # ----------------------------------------------------------------- saving

    def encode(self) -> str | None:
        """"tail:a-b,c-d", or None when too many runs to save."""
        runs = encode_runs(self.runs)
        return None if runs is None else f"{self.tail}:{runs}"

    @classmethod
    def decode(cls, text: str) -> PendingMap:
        """The inverse of `encode`; ValueError for anything else."""
        tail, separator, runs = text.partition(":")
        if not separator:
            raise ValueError("no tail in a saved pending map")
        return cls(int(tail), decode_runs(runs))


def encode_runs(runs: Sequence[tuple[int, int]]) -> str | None:
    """"a-b,c-d", or None for more than MAX_SAVED_RUNS runs."""
    if len(runs) > MAX_SAVED_RUNS:
        return None
    return ",".join(f"{a}-{b}" for a, b in runs)


def decode_runs(text: str) -> list[tuple[int, int]]:
    """The inverse of `encode_runs`; ValueError for anything else."""
    runs = []
    for part in filter(None, text.split(",")):
        first, separator, last = part.partition("-")
        if not separator or int(first) > int(last) or int(first) < 1:
            raise ValueError(f"bad id run {part!r}")
        runs.append((int(first), int(last)))
    return runs
