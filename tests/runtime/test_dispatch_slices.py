"""A large batch is handed to the link in slices, and devices are served between them (issue 19,
the fast-mode ACK tail): a message that arrives while the dispatcher sends hundreds of rows is
committed (its device answered) after at most one more slice, not after the whole batch, and
the link still writes the batch once, at its end. Counted, not timed. Real DurableQueue,
AgentLink and Dispatcher against the Medplum stand-in (tests/cloud), every wait bounded.
"""

from __future__ import annotations

import asyncio
from typing import Any

from test_dispatch_same_turn import WAIT_S, record, until, wired  # noqa: F401 - the fixture

from medagent.records import CommitResult
from medagent.runtime.dispatcher import SLICE_ROWS

ROWS = 8 * SLICE_ROWS


async def test_a_commit_during_a_large_batch_waits_at_most_one_slice(wired: Any) -> None:  # noqa: F811
    queue, dispatcher, link, _ = wired
    loop = asyncio.get_running_loop()
    sent_before, frames_before = dispatcher.sent, link.stats()["frames_sent"]
    for n in range(ROWS):  # one group commit; the task takes all of them in one next_batch
        queue.submit(record("fast", n), lambda result: None)
    for _ in range(100_000):  # bounded: wait, a loop turn at a time, for the first slice
        if dispatcher.sent > sent_before:
            break
        await asyncio.sleep(0)
    at_submit = dispatcher.sent
    assert at_submit - sent_before == SLICE_ROWS  # the batch is under way, one slice sent
    seen: asyncio.Future[tuple[int, int]] = loop.create_future()

    def on_commit(result: CommitResult) -> None:
        assert result.error is None
        seen.set_result((dispatcher.sent, link.stats()["frames_sent"]))

    queue.submit(record("fast", ROWS), on_commit)  # a device's message, mid-batch
    at_commit, frames_at_commit = await asyncio.wait_for(seen, WAIT_S)
    assert at_commit - at_submit <= SLICE_ROWS  # committed (answered) within one more slice
    assert at_commit - sent_before < ROWS  # ... while the batch was still being handed over
    assert frames_at_commit == frames_before  # the held link wrote nothing mid-batch
    await until(lambda: dispatcher.sent == sent_before + ROWS + 1, "every row to be sent")
    assert dispatcher.stats()["slices"] >= ROWS // SLICE_ROWS
    await until(lambda: dispatcher.stats()["inflight"] == 0, "the confirmations")
    assert queue.stats()["confirmed"] >= ROWS + 1


async def test_rows_listener_sends_at_most_one_slice_in_the_commit_turn(wired: Any) -> None:  # noqa: F811
    """Original-mode rows go out in their commit's turn (test_dispatch_same_turn), but a backlog
    committed at once is not sent in that one turn: one slice there, the rest by the task."""
    queue, dispatcher, _, channels = wired
    loop = asyncio.get_running_loop()
    sent_before = dispatcher.sent
    seen: asyncio.Future[int] = loop.create_future()

    def last_commit(result: CommitResult) -> None:
        assert result.error is None
        loop.call_soon(lambda: seen.set_result(dispatcher.sent))  # the turn after the commit

    rows = 3 * SLICE_ROWS
    for n in range(rows - 1):
        queue.submit(record("orig", n), lambda result: None)
    queue.submit(record("orig", rows - 1), last_commit)
    assert await asyncio.wait_for(seen, WAIT_S) - sent_before == SLICE_ROWS
    await until(lambda: len(channels["orig"].replies) == rows, "every reply")
    assert channels["orig"].replies == [str(n) for n in range(rows)]  # in order
