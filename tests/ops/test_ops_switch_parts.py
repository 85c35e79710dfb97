"""The parts of the upgrade switch that need no second version: the channel set on inherited
sockets, its hand-over dups and temporary channel (real MLLP channels, a real queue), a site
that forbids remote upgrade (by its configuration), which environment a restarted service
runs after a completed switch, and the taking-over side answering a bad control line."""

from __future__ import annotations

import asyncio
import json
import os
import socket
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from opstest import http, send_messages, start_site

from medagent.channels.base import ChannelContext
from medagent.channels.endpoint import parse_endpoint
from medagent.config import ChannelConfig, channel_options, load_config
from medagent.hub import HubServer
from medagent.ops import handover as ho
from medagent.ops.sdnotify import notify
from medagent.ops.switch import take_over
from medagent.ops.upgrade import State, upgraded_python, venv_python
from medagent.queue import DurableQueue
from medagent.runtime.agent import AgentRuntime
from medagent.runtime.channel_set import ChannelSet, DesiredChannels
from medagent.runtime.intake import Intake


def _mllp(name: str, port: int = 0) -> ChannelConfig:
    endpoint = parse_endpoint(f"mllp://127.0.0.1:{port}?ackMode=fast")
    return ChannelConfig(name=name, endpoint=endpoint, options=channel_options(endpoint))


@pytest.fixture
async def queue(tmp_path: Path) -> AsyncIterator[DurableQueue]:
    q = DurableQueue(tmp_path / "queue.sqlite3")
    await q.open()
    try:
        yield q
    finally:
        await q.close()


def _channel_set(queue: DurableQueue, tmp_path: Path, *configs: ChannelConfig, **kwargs: object) -> ChannelSet:
    async def source() -> DesiredChannels:
        return DesiredChannels(configs)

    channels = ChannelSet(ChannelContext(sink=Intake(queue), data_dir=tmp_path), source, **kwargs)  # type: ignore[arg-type]
    return channels


def _port(channels: ChannelSet, name: str) -> int:
    channel = channels.get(name)
    assert channel is not None
    return int(channel.listening_sockets()[0].getsockname()[1])


async def test_channels_start_on_inherited_sockets_and_bind_nothing(queue: DurableQueue, tmp_path: Path) -> None:
    inherited = socket.create_server(("127.0.0.1", 0))
    stray = socket.create_server(("127.0.0.1", 0))
    port = inherited.getsockname()[1]
    channels = _channel_set(queue, tmp_path, _mllp("a"), inherited={"a": inherited, "ghost": stray})
    await channels.start()
    try:
        assert _port(channels, "a") == port  # port 0 in the config: the inherited socket's port
        assert inherited.fileno() == -1 and stray.fileno() == -1  # taken (dup'd) / unused: closed
        [ack] = await send_messages(port, ["INHERITED"])
        assert b"MSA|AA|INHERITED" in ack
    finally:
        await channels.close()


async def test_an_inherited_socket_on_another_port_than_configured_is_not_used(queue: DurableQueue,
                                                                                tmp_path: Path) -> None:
    inherited = socket.create_server(("127.0.0.1", 0))
    with socket.create_server(("127.0.0.1", 0)) as probe:
        wanted = probe.getsockname()[1]
    channels = _channel_set(queue, tmp_path, _mllp("a", wanted), inherited={"a": inherited})
    await channels.start()
    try:
        assert _port(channels, "a") == wanted and inherited.fileno() == -1
    finally:
        await channels.close()


async def test_handover_dups_keep_the_port_queueing_while_no_channel_serves(queue: DurableQueue,
                                                                             tmp_path: Path) -> None:
    channels = _channel_set(queue, tmp_path, _mllp("a"))
    await channels.start()
    port = _port(channels, "a")
    held = channels.handover_sockets()
    assert list(held) == ["a"] and held["a"].getsockname()[1] == port
    await channels.close()  # the old process stops accepting; the dup keeps the socket listening
    try:
        pending = asyncio.ensure_future(send_messages(port, ["BACKLOG"]))  # connects: the kernel queues it
        await asyncio.sleep(0.2)
        assert not pending.done()
        again = _channel_set(queue, tmp_path, _mllp("a"), inherited=held)  # the next owner of the socket
        await again.start()
        try:
            [ack] = await asyncio.wait_for(pending, 10)
            assert b"MSA|AA|BACKLOG" in ack
        finally:
            await again.close()
    finally:
        for sock in held.values():
            sock.close()


async def test_a_temporary_channel_runs_beside_the_set_and_goes_away(queue: DurableQueue, tmp_path: Path) -> None:
    channels = _channel_set(queue, tmp_path, _mllp("a"))
    await channels.start()
    try:
        async with channels.temporary(_mllp("probe")) as probe:
            assert channels.get("probe") is probe
            [ack] = await send_messages(probe.listening_sockets()[0].getsockname()[1], ["PROBE"])
            assert b"MSA|AA|PROBE" in ack
        assert channels.get("probe") is None and channels.get("a") is not None
        with pytest.raises(RuntimeError, match="already exists"):
            async with channels.temporary(_mllp("a")):
                pass
    finally:
        await channels.close()


async def test_a_site_that_forbids_remote_upgrade_refuses_it(hub: HubServer, tmp_path: Path) -> None:
    site = await start_site(hub, tmp_path / "agent", allow_remote_upgrade="false")
    try:
        status, text = await http(hub, "POST", f"/fhir/R4/Agent/{site.credentials.agent_id}/$upgrade",
                                  json={"version": "9.9.9", "force": True})
        assert status == 400 and "allow_remote_upgrade" in text
        assert site.runtime.upgrader is not None and site.runtime.upgrader.state is State.IDLE
        assert not (site.runtime.data_dir / "versions").exists()
    finally:
        await site.runtime.stop()


def test_a_restarted_service_runs_the_version_it_switched_to(tmp_path: Path) -> None:
    environment = tmp_path / "versions" / "0.9.0"
    python = venv_python(environment)
    python.parent.mkdir(parents=True)
    python.write_text("")
    state = tmp_path / "upgrade.json"

    def write(**status: object) -> None:
        state.write_text(json.dumps({"state": "completed", "targetVersion": "0.9.0", "environment": str(environment),
                                     **status}))

    assert upgraded_python(tmp_path, "0.1.0") is None  # no state file
    write()
    assert upgraded_python(tmp_path, "0.1.0") == python
    assert upgraded_python(tmp_path, "0.9.0") is None  # it is what runs
    assert upgraded_python(tmp_path, "1.0.0") is None  # the site installed a newer base version since
    write(state="rolled-back")
    assert upgraded_python(tmp_path, "0.1.0") is None
    write(environment=str(tmp_path / "elsewhere" / "0.9.0"))
    assert upgraded_python(tmp_path, "0.1.0") is None  # only environments of this data directory
    state.write_text("{not json")
    assert upgraded_python(tmp_path, "0.1.0") is None


async def test_the_new_side_answers_a_line_it_cannot_accept_with_failed(tmp_path: Path) -> None:
    """Over a real socketpair: the taking-over side says ready, gets junk instead of go, answers
    `failed` naming the problem, releases what it was handed and gives up (the old side rolls back)."""
    ours, theirs = socket.socketpair()
    inherited = socket.create_server(("127.0.0.1", 0))
    spec = ho.HandoverSpec(os.dup(theirs.fileno()), {"adt-in": os.dup(inherited.fileno())})
    theirs.close()
    inherited.close()
    config = load_config(None, env={}, overrides={"agent": {"data_dir": str(tmp_path / "data")}})
    task = asyncio.ensure_future(take_over(spec, lambda socks: AgentRuntime(config, inherited=socks), asyncio.Event()))
    ours.setblocking(False)
    reader, writer = await asyncio.open_connection(sock=ours)
    try:
        ready = ho.decode_line(await asyncio.wait_for(reader.readline(), 20))
        assert isinstance(ready, ho.Message) and ready.kind is ho.Kind.READY and ready["pid"] == os.getpid()
        writer.write(ho.encode(ho.Kind.READY, pid=1, version="9.9.9"))  # out of order: answered too
        failed = ho.decode_line(await asyncio.wait_for(reader.readline(), 20))
        assert failed == ho.Message(ho.Kind.FAILED, {"reason": "handover protocol: unexpected 'ready' "
                                                                "(waiting for go or failed)"})
        assert await asyncio.wait_for(task, 20) is None
        assert await reader.read() == b""  # it closed the control channel
        assert not (tmp_path / "data" / "queue.sqlite3").exists()  # it never touched the queue
    finally:
        writer.close()


def test_sd_notify_sends_one_datagram_to_the_notify_socket(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert notify("READY=1") is False  # not under systemd: nothing to do
    path = tmp_path / "notify"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as manager:  # what systemd listens on
        manager.bind(str(path))
        manager.settimeout(5)
        monkeypatch.setenv("NOTIFY_SOCKET", str(path))
        assert notify("MAINPID=4242", "READY=1") is True
        assert manager.recv(4096) == b"MAINPID=4242\nREADY=1"
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "gone"))
    assert notify("READY=1") is False  # logged, never raised
