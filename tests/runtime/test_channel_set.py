"""The channel-set owner over real sockets: reload diff cases and start-up serialization (issue 13).

Every case runs a real ChannelSet with real MLLP channels from the registry, the real Intake and
a real DurableQueue in a temporary directory, on asyncio and uvloop (the conftest's loops).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from mllp_peer import AsyncMllpClient, blocker, channel, hl7, msa, port_is_closed

from medagent.channels.base import ChannelContext
from medagent.queue import DurableQueue
from medagent.runtime.channel_set import ChangeReport, ChannelSet, DesiredChannels, channel_address
from medagent.runtime.intake import Intake


class Source:
    """The desired set a test changes between applies; optionally held back by an event."""

    def __init__(self, *channels) -> None:
        self.desired = DesiredChannels(tuple(channels))
        self.gate: asyncio.Event | None = None
        self.calls = 0

    def set(self, *channels, problems: dict[str, str] | None = None) -> None:
        self.desired = DesiredChannels(tuple(channels), problems or {})

    async def __call__(self) -> DesiredChannels:
        self.calls += 1
        desired = self.desired
        if self.gate is not None:
            await asyncio.wait_for(self.gate.wait(), 10)
        return desired


@pytest.fixture
async def queue(tmp_path: Path) -> AsyncIterator[DurableQueue]:
    q = DurableQueue(tmp_path / "queue.sqlite3")
    await q.open()
    try:
        yield q
    finally:
        await q.close()


def make_set(queue: DurableQueue, tmp_path: Path, source: Source, **kwargs) -> ChannelSet:
    return ChannelSet(ChannelContext(sink=Intake(queue), data_dir=tmp_path), source, **kwargs)


async def received(channels: ChannelSet, name: str, count: int) -> None:
    """Wait (bounded) until the channel has taken ``count`` units from its connections."""
    channel = channels.get(name)
    assert channel is not None
    for _ in range(500):
        if channel.stats().get("unitsIn", 0) >= count:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"channel {name} did not receive {count} units: {channel.stats()}")


def port_of(channel_set: ChannelSet, name: str) -> int:
    channel = channel_set.get(name)
    assert channel is not None, f"channel {name} is not running"
    return int(channel_address(channel).rsplit(":", 1)[1])


async def test_unchanged_channel_keeps_its_socket_and_connection(queue, tmp_path) -> None:
    source = Source(channel("a"), channel("b"))
    channels = make_set(queue, tmp_path, source)
    await channels.start()
    try:
        before = channels.get("a")
        client = await AsyncMllpClient.connect(port_of(channels, "a"))
        assert msa(await client.roundtrip(hl7("M1"))) == ("AA", "M1")
        report = await channels.reload()
        assert report.ok and sorted(report.kept) == ["a", "b"] and not report.restarted
        assert channels.get("a") is before
        assert msa(await client.roundtrip(hl7("M2"))) == ("AA", "M2")  # same connection, still served
        await client.close()
    finally:
        await channels.close()


async def test_changed_channel_on_the_same_address_keeps_the_port(queue, tmp_path) -> None:
    source = Source(channel("a", query="ackMode=fast"))
    channels = make_set(queue, tmp_path, source)
    await channels.start()
    try:
        port = port_of(channels, "a")
        old = await AsyncMllpClient.connect(port)
        assert msa(await old.roundtrip(hl7("M1"))) == ("AA", "M1")
        source.set(channel("a", query="ackMode=two-phase"))
        report = await channels.reload()
        assert report.ok and report.restarted == ["a"]
        assert port_of(channels, "a") == port  # the listening socket was handed over
        assert await old.closed_by_peer()  # a restarted channel closes its old connections
        await old.close()
        new = await AsyncMllpClient.connect(port)
        assert msa(await new.roundtrip(hl7("M2"))) == ("CA", "M2")  # the new options are in force
        await new.close()
    finally:
        await channels.close()


async def test_a_connection_waiting_in_the_backlog_during_the_swap_is_served(queue, tmp_path) -> None:
    source = Source(channel("a", query="ackMode=fast"))
    channels = make_set(queue, tmp_path, source)
    await channels.start()
    try:
        port = port_of(channels, "a")
        source.set(channel("a", query="ackMode=fast&maxConnections=50"))
        reload = asyncio.ensure_future(channels.reload())
        client = await AsyncMllpClient.connect(port)  # races the swap: never refused
        report = await reload
        assert report.restarted == ["a"]
        try:
            ack = await client.roundtrip(hl7("M1"))
        except (asyncio.IncompleteReadError, ConnectionError):
            # Accepted by the old channel just before it stopped (it closed the connection with
            # nothing received): a device reconnects; the port itself never refused.
            await client.close()
            client = await AsyncMllpClient.connect(port)
            ack = await client.roundtrip(hl7("M1"))
        assert msa(ack) == ("AA", "M1")
        await client.close()
    finally:
        await channels.close()


async def test_changed_address_starts_the_new_listener_before_stopping_the_old(queue, tmp_path) -> None:
    source = Source(channel("a"))
    channels = make_set(queue, tmp_path, source)
    await channels.start()
    try:
        old_port = port_of(channels, "a")
        spare = blocker()
        new_port = spare.getsockname()[1]
        spare.close()
        source.set(channel("a", port=new_port))
        report = await channels.reload()
        assert report.ok and report.restarted == ["a"]
        assert port_of(channels, "a") == new_port and port_is_closed(old_port)
        client = await AsyncMllpClient.connect(new_port)
        assert msa(await client.roundtrip(hl7("M1"))) == ("AA", "M1")
        await client.close()
    finally:
        await channels.close()


async def test_removed_channel_drains_and_closes_while_the_others_keep_serving(queue, tmp_path) -> None:
    source = Source(channel("a"), channel("b"))
    channels = make_set(queue, tmp_path, source)
    await channels.start()
    try:
        a_client = await AsyncMllpClient.connect(port_of(channels, "a"))
        b_port = port_of(channels, "b")
        b_client = await AsyncMllpClient.connect(b_port)
        await b_client.send(hl7("B1"))  # accepted before the reload removes b: still answered
        await received(channels, "b", 1)
        source.set(channel("a"))
        report = await channels.reload()
        assert report.ok and report.stopped == ["b"] and report.kept == ["a"]
        assert msa(await b_client.read_ack()) == ("AA", "B1")
        assert await b_client.closed_by_peer() and port_is_closed(b_port)
        assert channels.get("b") is None
        assert msa(await a_client.roundtrip(hl7("A1"))) == ("AA", "A1")
        await a_client.close()
        await b_client.close()
    finally:
        await channels.close()


async def test_a_bind_that_keeps_failing_leaves_the_channel_as_it_was(queue, tmp_path) -> None:
    source = Source(channel("a"))
    channels = make_set(queue, tmp_path, source, bind_attempts=2, bind_first_delay_s=0.01)
    await channels.start()
    occupied = blocker()
    try:
        before, port = channels.get("a"), port_of(channels, "a")
        client = await AsyncMllpClient.connect(port)
        taken = occupied.getsockname()[1]
        source.set(channel("a", port=taken))
        report = await channels.reload()
        assert not report.ok and report.failed == {"a": f"cannot listen on 127.0.0.1:{taken}: Address already in use"}
        assert report.error_text() == f"channel a: cannot listen on 127.0.0.1:{taken}: Address already in use"
        assert channels.get("a") is before and port_of(channels, "a") == port
        assert msa(await client.roundtrip(hl7("M1"))) == ("AA", "M1")  # its connection never noticed
        await client.close()
    finally:
        occupied.close()
        await channels.close()


async def test_an_invalid_channel_from_the_source_keeps_running_as_it_was(queue, tmp_path) -> None:
    source = Source(channel("a"), channel("b"))
    channels = make_set(queue, tmp_path, source)
    await channels.start()
    try:
        before = channels.get("a")
        source.set(channel("b"), problems={"a": "invalid endpoint: parameter 'nonsense'"})
        report = await channels.reload()
        assert not report.ok and report.invalid == {"a": "invalid endpoint: parameter 'nonsense'"}
        assert not report.stopped and channels.get("a") is before
        client = await AsyncMllpClient.connect(port_of(channels, "a"))
        assert msa(await client.roundtrip(hl7("M1"))) == ("AA", "M1")
        await client.close()
    finally:
        await channels.close()


async def test_an_added_channel_retries_the_bind_until_the_port_is_released(queue, tmp_path) -> None:
    source = Source()
    channels = make_set(queue, tmp_path, source)
    await channels.start()
    occupied = blocker()
    port = occupied.getsockname()[1]
    try:
        asyncio.get_running_loop().call_later(0.1, occupied.close)  # an old listener letting go
        source.set(channel("a", port=port))
        report = await channels.reload()
        assert report.ok and report.started == ["a"] and port_of(channels, "a") == port
    finally:
        occupied.close()
        await channels.close()


async def test_first_start_bind_failure_is_one_clear_line(queue, tmp_path) -> None:
    occupied = blocker()
    port = occupied.getsockname()[1]
    source = Source(channel("adt-in", port=port), channel("ok"))
    channels = make_set(queue, tmp_path, source, bind_attempts=2, bind_first_delay_s=0.01)
    try:
        report = await channels.start()
        assert report.error_text() == f"channel adt-in: cannot listen on 127.0.0.1:{port}: Address already in use"
        assert report.started == ["ok"]  # the runtime decides what a start-up failure means
    finally:
        occupied.close()
        await channels.close()


async def test_a_reload_during_start_up_waits_for_it(queue, tmp_path) -> None:
    occupied = blocker()
    port = occupied.getsockname()[1]
    occupied.close()
    source = Source(channel("adt-in", port=port))  # a fixed port: a racing bind would fail
    source.gate = asyncio.Event()
    channels = make_set(queue, tmp_path, source)
    start = asyncio.ensure_future(channels.start())
    await asyncio.sleep(0)  # start-up holds the lock and waits for its channel list
    reload = asyncio.ensure_future(channels.reload())
    for _ in range(5):
        await asyncio.sleep(0)
    assert source.calls == 1 and not reload.done()  # the reload did not read or apply anything yet
    source.gate.set()
    try:
        first: ChangeReport = await start
        second: ChangeReport = await reload
        assert first.started == ["adt-in"] and second.ok and second.kept == ["adt-in"]
        assert source.calls == 2 and port_of(channels, "adt-in") == port
    finally:
        await channels.close()


async def test_reloads_after_close_fail_cleanly_and_failed_start_releases_waiters(queue, tmp_path) -> None:
    source = Source(channel("a"))
    source.gate = asyncio.Event()
    channels = make_set(queue, tmp_path, source)
    start = asyncio.ensure_future(channels.start())
    await asyncio.sleep(0)
    reload = asyncio.ensure_future(channels.reload())
    start.cancel()  # start-up aborted (e.g. the agent is told to stop)
    with pytest.raises(asyncio.CancelledError):
        await start
    with pytest.raises(RuntimeError, match="did not start"):
        await reload
    await channels.close()
    with pytest.raises(RuntimeError):
        await channels.reload()
