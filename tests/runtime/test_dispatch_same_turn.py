"""The dispatcher sends a row in its commit's loop turn when it has nothing else in hand, and the
link writes the frame in that turn too (issue 19: at one lock-step sender in original mode that
is two task wake-ups and a loop turn fewer per message). Real DurableQueue, AgentLink and
Dispatcher against the Medplum stand-in (websocket on 127.0.0.1, port 0); every wait bounded."""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "cloud"))
from medplum_standin import MedplumStandIn

from medagent.cloud.link import AgentLink, LinkSettings
from medagent.queue.durable import DurableQueue
from medagent.records import CommitResult, InboundRecord
from medagent.runtime.dispatcher import Dispatcher

WAIT_S = 5.0
BODY = b"MSH|^~\\&|LAB|NORTH|HIS|MAIN|20261130120000||ADT^A01|{n}|P|2.5\rPID|1||12345\r"


class Channel:
    """The two things the dispatcher asks a channel: its encoding and whether a device waits."""

    encoding = "utf-8"

    def __init__(self, wants_replies: bool) -> None:
        self.wants_replies = wants_replies
        self.replies: list[str] = []

    def deliver_reply(self, remote: str, control_id: str, body: str, status_code: int = 200) -> bool:
        self.replies.append(control_id)
        return True


async def _no_requests(message: Any) -> None:
    return None


async def until(predicate: Any, what: str) -> None:
    for _ in range(int(WAIT_S / 0.01)):
        if predicate():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture
async def wired(tmp_path: Path) -> AsyncIterator[tuple[DurableQueue, Dispatcher, AgentLink, dict[str, Channel]]]:
    standin = MedplumStandIn()
    await standin.start()
    queue = DurableQueue(tmp_path / "queue.sqlite3")
    await queue.open()
    channels = {"orig": Channel(wants_replies=True), "fast": Channel(wants_replies=False)}
    dispatcher = Dispatcher(queue, standin.agent_id, channels.get, _no_requests)
    settings = LinkSettings(base_url=standin.base_url, client_id=standin.client_id,
                            client_secret=standin.client_secret, agent_id=standin.agent_id,
                            heartbeat_s=5.0, request_timeout_s=2.0)
    link = AgentLink(settings, dispatcher)
    dispatcher.attach(link)
    await link.start()
    dispatcher.start()
    try:
        await until(lambda: link.live, "the link to go live")
        yield queue, dispatcher, link, channels
    finally:
        await dispatcher.stop()
        await link.close()
        await queue.close()
        await standin.stop()


def record(channel: str, n: int) -> InboundRecord:
    return InboundRecord(channel, "127.0.0.1:4000", "LAB^NORTH", str(n), "ADT^A01",
                         BODY.replace(b"{n}", str(n).encode()), time.time())


async def commit_and_look(queue: DurableQueue, link: AgentLink, rec: InboundRecord) -> int:
    """Submit `rec`; return how many transmits the link had written when the loop turn after
    the commit began (on_commit runs in the commit's turn and schedules the look)."""
    loop = asyncio.get_running_loop()
    seen: asyncio.Future[int] = loop.create_future()

    def on_commit(result: CommitResult) -> None:
        assert result.error is None
        loop.call_soon(lambda: seen.set_result(link.stats()["messages_sent"]))

    queue.submit(rec, on_commit)
    return await asyncio.wait_for(seen, WAIT_S)


async def test_a_row_awaiting_its_reply_is_written_in_its_commit_turn(wired: Any) -> None:
    queue, dispatcher, link, channels = wired
    before = link.stats()["messages_sent"]
    for n in range(3):  # each: committed, sent and written before the next loop turn starts
        assert await commit_and_look(queue, link, record("orig", n)) == before + n + 1
        await until(lambda n=n: len(channels["orig"].replies) == n + 1, "the hub's reply")
    assert channels["orig"].replies == ["0", "1", "2"]
    await until(lambda: dispatcher.stats()["inflight"] == 0, "the confirmations")


async def test_rows_nobody_awaits_are_left_to_the_task_and_its_linger(wired: Any) -> None:
    """Fast-mode rows are not sent in their commit's turn (no device waits for them): the
    dispatcher's task takes them when it wakes, and its linger gathers the rows that follow into
    fewer, larger batches for the hub."""
    queue, dispatcher, link, _ = wired
    before = link.stats()["messages_sent"]
    assert await commit_and_look(queue, link, record("fast", 0)) == before  # left to the task
    await until(lambda: link.stats()["messages_sent"] == before + 1, "the task to send the first row")
    assert await commit_and_look(queue, link, record("fast", 1)) == before + 1  # the task lingers
    await until(lambda: link.stats()["messages_sent"] == before + 2, "the task to send the second row")
    await until(lambda: dispatcher.stats()["inflight"] == 0, "the confirmations")
