"""The hub bus (issue 20): routing agent operations to the hub process that holds the socket.

One contract, run over :class:`LocalBus` (a single process: the holder and the caller are the
same bus) and :class:`RedisBus` (two bus instances, holder and caller, over one real
``redis-server``); then what only the Redis bus has: an agent moving between processes, a
holder process killed with SIGKILL (its presence expires), a clean close (presence cleared at
once), Redis stopped and restarted (requests fail fast, then the bus recovers by itself), and
the wire format. The sockets a bus holds are played by :class:`EchoAgents`, the deliver handler
the hub's websocket layer provides in production.

Run as a script (``python test_hub_bus.py holder URL AGENT``) this module is the holder process
of the two-process tests: it attaches AGENT, prints its process id and echoes requests.
"""

from __future__ import annotations

import asyncio
import os
import random
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from engines.redis_server import RedisServer, own_redis_server, redis_server  # noqa: F401  (fixtures)

from medagent.cloud.messages import AgentMessage, TransmitRequest, TransmitResponse, new_callback
from medagent.hub.bus import (
    AgentBus,
    AgentNotConnected,
    AgentTimeout,
    BusConfigError,
    BusUnavailable,
    LocalBus,
    make_bus,
)
from medagent.hub.bus import envelope as env

#: how long a test waits for something that must happen (a bound, not a measurement)
WAIT_S = 15.0
#: presence lease of the Redis buses under test: short, so expiry is quick to observe
LEASE_S = 0.9


class EchoAgents:
    """The agent sockets one bus's process holds: each answers a request with ``<tag>:<body>``."""

    def __init__(self, tag: str) -> None:
        self.tag = tag
        self.open: set[str] = set()
        self.silent: set[str] = set()  # hold a socket but never answer
        self.broken: set[str] = set()  # the socket fails on send
        self.sent: list[tuple[str, AgentMessage]] = []  # fire-and-forget frames received
        self.max_delay_s = 0.0

    async def deliver(self, agent_id: str, message: AgentMessage, timeout_s: float | None) -> AgentMessage | None:
        if agent_id in self.broken:
            raise ConnectionError("socket closed")
        if agent_id not in self.open:
            raise AgentNotConnected(agent_id)
        if timeout_s is None:
            self.sent.append((agent_id, message))
            return None
        if agent_id in self.silent:
            await asyncio.sleep(3600)
        if self.max_delay_s:
            await asyncio.sleep(random.uniform(0, self.max_delay_s))
        return echo(message, self.tag)


def echo(message: AgentMessage, tag: str) -> TransmitResponse:
    assert isinstance(message, TransmitRequest)
    return TransmitResponse(remote=message.remote, content_type=message.content_type, body=f"{tag}:{message.body}",
                            callback=message.callback, status_code=200)


def push(agent_id: str, body: str = "MSH|^~\\&|") -> TransmitRequest:
    return TransmitRequest(remote="mllp://127.0.0.1:2575", content_type="x-application/hl7-v2+er7", body=body,
                           callback=new_callback(agent_id))


def redis_bus_url(server: RedisServer, cluster: str) -> str:
    return f"{server.url}?cluster={cluster}&presence_ttl={LEASE_S}"


async def eventually(check: object, what: str) -> None:
    """Poll ``check()`` (sync or async) until it is true, at most WAIT_S."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + WAIT_S
    while True:
        result = check()  # type: ignore[operator]
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return
        if loop.time() > deadline:
            pytest.fail(f"not within {WAIT_S} s: {what}")
        await asyncio.sleep(0.05)


class Side:
    """One hub process as the bus sees it: its bus and the sockets it holds."""

    def __init__(self, bus: AgentBus, agents: EchoAgents) -> None:
        self.bus = bus
        self.agents = agents

    async def connect(self, agent_id: str, version: str | None = None):  # -> Hold
        self.agents.open.add(agent_id)
        return await self.bus.attach(agent_id, version)


async def started(bus: AgentBus, tag: str) -> Side:
    agents = EchoAgents(tag)
    await bus.start(agents.deliver)
    return Side(bus, agents)


@pytest.fixture(params=["local", "redis"])
async def pair(request: pytest.FixtureRequest) -> AsyncIterator[tuple[Side, Side]]:
    """(holder, caller): the same process for the local bus, two processes' buses for Redis."""
    if request.param == "local":
        holder = await started(LocalBus(), "local")
        try:
            yield holder, holder
        finally:
            await holder.bus.close()
        return
    url = redis_bus_url(request.getfixturevalue("redis_server"), f"t{uuid.uuid4().hex[:12]}")
    holder = await started(make_bus(url), "holder")
    caller = await started(make_bus(url), "caller")
    try:
        yield holder, caller
    finally:
        await caller.bus.close()
        await holder.bus.close()


# -- the contract, both buses --------------------------------------------------------------------


async def test_request_reaches_the_holder_and_the_answer_comes_back(pair: tuple[Side, Side]) -> None:
    holder, caller = pair
    await holder.connect("a1")
    message = push("a1", "hello")
    reply = await caller.bus.request("a1", message, 5.0)
    assert isinstance(reply, TransmitResponse)
    assert reply.callback == message.callback
    assert reply.body == f"{holder.agents.tag}:hello"


async def test_an_agent_no_process_holds_is_refused_at_once(pair: tuple[Side, Side]) -> None:
    _, caller = pair
    # the request's own timeout is far beyond the bound: only a fast answer passes
    with pytest.raises(AgentNotConnected):
        await asyncio.wait_for(caller.bus.request("nobody", push("nobody"), 600.0), WAIT_S)
    with pytest.raises(AgentNotConnected):
        await asyncio.wait_for(caller.bus.send("nobody", push("nobody")), WAIT_S)


async def test_an_agent_that_does_not_answer_times_out(pair: tuple[Side, Side]) -> None:
    holder, caller = pair
    await holder.connect("quiet")
    holder.agents.silent.add("quiet")
    with pytest.raises(AgentTimeout):
        await caller.bus.request("quiet", push("quiet"), 0.3)


async def test_a_socket_that_fails_on_send_reads_as_not_connected(pair: tuple[Side, Side]) -> None:
    holder, caller = pair
    await holder.connect("flaky")
    holder.agents.broken.add("flaky")
    with pytest.raises(AgentNotConnected):
        await caller.bus.request("flaky", push("flaky"), 5.0)


async def test_fire_and_forget_reaches_the_holder(pair: tuple[Side, Side]) -> None:
    holder, caller = pair
    await holder.connect("a1")
    message = TransmitRequest(remote="mllp://127.0.0.1:2575", content_type="x-application/hl7-v2+er7", body="B")
    await caller.bus.send("a1", message)
    await eventually(lambda: holder.agents.sent == [("a1", message)], "the holder got the frame")


async def test_a_request_needs_a_callback_and_a_positive_timeout(pair: tuple[Side, Side]) -> None:
    holder, caller = pair
    await holder.connect("a1")
    with pytest.raises(ValueError, match="callback"):
        await caller.bus.request("a1", TransmitRequest(remote="x", content_type="t", body="b"), 5.0)
    with pytest.raises(ValueError, match="timeout"):
        await caller.bus.request("a1", push("a1"), 0)


async def test_presence_follows_connect_heartbeat_and_disconnect(pair: tuple[Side, Side]) -> None:
    holder, caller = pair
    assert (await caller.bus.presence("a1")).connected is False
    hold = await holder.connect("a1", version="1.0.0")
    seen = await caller.bus.presence("a1")
    assert (seen.connected, seen.version, seen.process_id) == (True, "1.0.0", holder.bus.process_id)
    assert seen.connected_since is not None and seen.last_updated is not None
    holder.bus.touch("a1", version="1.1.0")  # a heartbeat answer: in memory, published by the renewal
    await eventually(lambda: _version(caller.bus, "a1", "1.1.0"), "the heartbeat's version is visible")
    await holder.bus.detach(hold)
    gone = await caller.bus.presence("a1")
    assert (gone.connected, gone.version, gone.process_id) == (False, "1.1.0", None)
    assert gone.last_updated is not None  # when it was last heard from, as Medplum's $status
    with pytest.raises(AgentNotConnected):
        await caller.bus.request("a1", push("a1"), 5.0)


async def _version(bus: AgentBus, agent_id: str, version: str) -> bool:
    return (await bus.presence(agent_id)).version == version


async def test_a_replaced_connection_does_not_detach_the_newer_one(pair: tuple[Side, Side]) -> None:
    holder, caller = pair
    old = await holder.connect("a1")
    await holder.connect("a1")  # the agent reconnected to the same process
    await holder.bus.detach(old)  # the old socket's close arrives late
    assert (await caller.bus.presence("a1")).connected
    assert isinstance(await caller.bus.request("a1", push("a1"), 5.0), TransmitResponse)


async def test_many_parallel_requests_each_get_their_own_answer(pair: tuple[Side, Side]) -> None:
    holder, caller = pair
    agents = [f"a{i}" for i in range(5)]
    for agent_id in agents:
        await holder.connect(agent_id)
    holder.agents.max_delay_s = 0.05  # answers come back in another order than the requests left
    requests = [(agent_id, push(agent_id, f"{agent_id}-{n}")) for n in range(40) for agent_id in agents]
    replies = await asyncio.gather(*(caller.bus.request(a, m, WAIT_S) for a, m in requests))
    for (_, message), reply in zip(requests, replies, strict=True):
        assert isinstance(reply, TransmitResponse)
        assert (reply.callback, reply.body) == (message.callback, f"{holder.agents.tag}:{message.body}")


async def test_close_shows_every_held_agent_disconnected(pair: tuple[Side, Side]) -> None:
    holder, caller = pair
    await holder.connect("a1")
    await holder.bus.close()
    if caller is not holder:
        assert (await caller.bus.presence("a1")).connected is False  # at once, not after the lease TTL
    else:
        assert (await holder.bus.presence("a1")).connected is False


# -- only the Redis bus ------------------------------------------------------------------------


@pytest.fixture
async def cluster_url(redis_server: RedisServer) -> str:  # noqa: F811
    return redis_bus_url(redis_server, f"t{uuid.uuid4().hex[:12]}")


async def test_an_agent_that_moves_to_another_process_is_reached_there(cluster_url: str) -> None:
    first, second, caller = [await started(make_bus(cluster_url), tag) for tag in ("first", "second", "caller")]
    try:
        old = await first.connect("a1")
        assert (await caller.bus.request("a1", push("a1", "x"), 5.0)).body == "first:x"  # type: ignore[attr-defined]
        await second.connect("a1")  # the agent reconnected through the load balancer
        # the first process stops taking a1's requests as soon as it hears of the takeover
        await eventually(lambda: _subscribers(caller.bus, "a1", 1), "one subscriber of a1's channel")
        for n in range(5):
            reply = await caller.bus.request("a1", push("a1", str(n)), 5.0)
            assert reply.body == f"second:{n}"  # type: ignore[attr-defined]
        await first.bus.detach(old)  # the old socket's close: must not clear the new holder's presence
        seen = await caller.bus.presence("a1")
        assert (seen.connected, seen.process_id) == (True, second.bus.process_id)
    finally:
        for side in (caller, second, first):
            await side.bus.close()


async def _subscribers(bus: AgentBus, agent_id: str, count: int) -> bool:
    channel = bus._ns.agent_channel(agent_id)  # type: ignore[attr-defined]
    return dict(await bus._commands.pubsub_numsub(channel))[channel.encode()] == count  # type: ignore[attr-defined]


async def test_a_holder_process_killed_leaves_its_agents_disconnected_within_the_ttl(cluster_url: str) -> None:
    caller = await started(make_bus(cluster_url), "caller")
    holder = HolderProcess(cluster_url, "a1")
    try:
        holder_id = await holder.start()
        reply = await caller.bus.request("a1", push("a1", "over"), WAIT_S)  # across two OS processes
        assert reply.body == f"{holder_id}:over"  # type: ignore[attr-defined]
        seen = await caller.bus.presence("a1")
        assert (seen.connected, seen.process_id, seen.version) == (True, holder_id, "9.9.9")
        await holder.kill()  # no clean shutdown: nothing removes its presence but the TTL
        # Redis drops the subscription of the closed socket; from then on a request is refused at
        # once, even while the lease (presence) has not expired yet
        await eventually(lambda: _subscribers(caller.bus, "a1", 0), "Redis saw the holder's socket close")
        with pytest.raises(AgentNotConnected):
            await asyncio.wait_for(caller.bus.request("a1", push("a1"), 600.0), WAIT_S)
        await eventually(lambda: _disconnected(caller.bus, "a1"), "the dead holder's lease expired")
        assert (await caller.bus.presence("a1")).version == "9.9.9"  # still shown after the disconnect
    finally:
        await holder.kill()
        await caller.bus.close()


async def _disconnected(bus: AgentBus, agent_id: str) -> bool:
    return not (await bus.presence(agent_id)).connected


class HolderProcess:
    """This module run as a script in its own OS process: a hub process holding one agent."""

    def __init__(self, url: str, agent_id: str) -> None:
        self._args = [sys.executable, __file__, "holder", url, agent_id]
        self._process: asyncio.subprocess.Process | None = None

    async def start(self) -> str:
        env_vars = dict(os.environ)
        tests_dir = str(Path(__file__).resolve().parents[1])
        env_vars["PYTHONPATH"] = os.pathsep.join(p for p in (tests_dir, env_vars.get("PYTHONPATH")) if p)
        self._process = await asyncio.create_subprocess_exec(*self._args, stdout=subprocess.PIPE, env=env_vars)
        assert self._process.stdout is not None
        line = await asyncio.wait_for(self._process.stdout.readline(), WAIT_S)
        if not line:
            pytest.fail("the holder process exited before attaching its agent")
        return line.decode().strip()

    async def kill(self) -> None:
        process = self._process
        if process is not None and process.returncode is None:
            process.kill()  # SIGKILL, by this process's own handle
            await asyncio.wait_for(process.wait(), WAIT_S)


async def test_redis_lost_fails_requests_fast_and_the_bus_recovers(own_redis_server: RedisServer) -> None:  # noqa: F811
    url = redis_bus_url(own_redis_server, "restart")
    holder, caller = await started(make_bus(url), "holder"), await started(make_bus(url), "caller")
    try:
        await holder.connect("a1", version="2.0.0")
        assert (await caller.bus.request("a1", push("a1", "before"), 5.0)).body == "holder:before"  # type: ignore
        own_redis_server.stop()
        await eventually(lambda: not caller.bus.available and not holder.bus.available, "both buses saw Redis go")
        with pytest.raises(BusUnavailable):
            await asyncio.wait_for(caller.bus.request("a1", push("a1"), 600.0), WAIT_S)
        with pytest.raises(BusUnavailable):
            await caller.bus.presence("a1")
        # the holder's own agents are still served locally while Redis is down
        assert (await holder.bus.request("a1", push("a1", "local"), 5.0)).body == "holder:local"  # type: ignore
        own_redis_server.start()  # same port, empty: every lease and subscription is gone
        await eventually(lambda: caller.bus.available and holder.bus.available, "both buses reconnected")
        await eventually(lambda: _connected(caller.bus, "a1"), "the holder re-announced a1")
        assert (await caller.bus.request("a1", push("a1", "after"), 5.0)).body == "holder:after"  # type: ignore
        assert (await caller.bus.presence("a1")).version == "2.0.0"
    finally:
        await caller.bus.close()
        await holder.bus.close()


async def _connected(bus: AgentBus, agent_id: str) -> bool:
    return (await bus.presence(agent_id)).connected


async def test_start_without_redis_is_a_clear_error(own_redis_server: RedisServer) -> None:  # noqa: F811
    own_redis_server.stop()
    bus = make_bus(redis_bus_url(own_redis_server, "down"))
    with pytest.raises(BusUnavailable, match=f"cannot reach the Redis bus at redis://127.0.0.1:{own_redis_server.port}"):
        await bus.start(EchoAgents("x").deliver)
    await bus.close()


async def test_junk_on_an_agent_channel_is_ignored(cluster_url: str, caplog: pytest.LogCaptureFixture) -> None:
    holder, caller = await started(make_bus(cluster_url), "holder"), await started(make_bus(cluster_url), "caller")
    try:
        await holder.connect("a1")
        channel = caller.bus._ns.agent_channel("a1")  # type: ignore[attr-defined]
        await caller.bus._commands.publish(channel, b"not an envelope")  # type: ignore[attr-defined]
        assert (await caller.bus.request("a1", push("a1", "still"), 5.0)).body == "holder:still"  # type: ignore
        assert "ignored a message on" in caplog.text
    finally:
        await caller.bus.close()
        await holder.bus.close()


# -- configuration -----------------------------------------------------------------------------


@pytest.mark.parametrize(("url", "problem"), [
    ("http://127.0.0.1:6379", "expected 'local' or a Redis URL"),
    ("redis://127.0.0.1:6379/zero", "database number"),
    ("redis://127.0.0.1:6379/0?pool=3", "unknown parameter(s) pool"),
    ("redis://127.0.0.1:6379/0?presence_ttl=soon", "presence_ttl must be a number"),
    ("redis://127.0.0.1:6379/0?presence_ttl=0", "must be positive"),
    ("redis://127.0.0.1:6379/0?cluster=a:b", "cluster name 'a:b'"),
    ("redis://:s3cret@127.0.0.1:6379/0?socket_timeout=x", "socket_timeout"),
])
def test_a_bad_bus_url_is_a_config_error_that_names_it(url: str, problem: str) -> None:
    with pytest.raises(BusConfigError, match=problem.replace("(", r"\(").replace(")", r"\)")) as raised:
        make_bus(url)
    assert "s3cret" not in str(raised.value)


def test_no_bus_or_local_is_the_local_bus() -> None:
    assert all(isinstance(make_bus(url), LocalBus) for url in (None, "", "local"))


def test_a_redis_url_without_the_redis_package_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    # as if redis-py were not installed: importing a module that sys.modules maps to None fails,
    # and the bus modules that import it are imported afresh
    # (whether or not this worker imported redis-py yet: a test run alone may not have)
    loaded = {n for n in sys.modules if n == "redis" or n.startswith("redis.")}
    for name in loaded | {"redis", "redis.asyncio", "redis.asyncio.connection"}:
        monkeypatch.setitem(sys.modules, name, None)  # type: ignore[arg-type]
    for name in ("medagent.hub.bus.redisbus", "medagent.hub.bus.redis_presence"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    with pytest.raises(BusConfigError, match=r"pip install 'medagent\[scale\]'"):
        make_bus("redis://127.0.0.1:6379/0")


# -- the wire format ---------------------------------------------------------------------------


@pytest.mark.parametrize("envelope", [
    env.RouteRequest("a1", push("a1")),
    env.RouteRequest("a1", push("a1"), "r1", "medagent:c:inbox:p", 5000),
    env.RouteReply("r1", echo(push("a1"), "p")),
    env.RouteReply("r1", error=env.TIMEOUT),
    env.Taken("a1", "host-1-abc"),
])
def test_envelopes_round_trip(envelope: env.Envelope) -> None:
    assert env.decode_envelope(env.encode_envelope(envelope)) == envelope


@pytest.mark.parametrize("raw", [
    b"", b"[]", b'{"v":2,"kind":"reply","id":"r"}', b'{"v":1,"kind":"shout"}',
    b'{"v":1,"kind":"reply","id":"r","error":"nope"}', b'{"v":1,"kind":"reply","id":"","error":"timeout"}',
    b'{"v":1,"kind":"request","agent":"a","frame":{"type":"agent:transmit:request"}}',
    (b'{"v":1,"kind":"request","agent":"a","id":"r","replyTo":"c","timeoutMs":0,'
    b'"frame":{"type":"agent:stats:request","callback":"x"}}'),
    b'{"v":1,"kind":"taken","agent":"a"}',
])
def test_bad_envelopes_raise_envelope_error(raw: bytes) -> None:
    with pytest.raises(env.EnvelopeError):
        env.decode_envelope(raw)


def test_random_bytes_raise_envelope_error_and_nothing_else() -> None:
    rng = random.Random(20)
    good = env.encode_envelope(env.RouteRequest("a1", push("a1"), "r1", "inbox", 5000))
    for _ in range(500):
        raw = bytearray(good)
        for _ in range(rng.randint(1, 8)):
            raw[rng.randrange(len(raw))] = rng.randrange(256)
        try:
            env.decode_envelope(bytes(raw))
        except env.EnvelopeError:
            pass


def test_namespace_names_are_per_cluster() -> None:
    ns = env.Namespace("prod")
    assert ns.agent_channel("a1") == "medagent:prod:agent:a1"
    assert ns.lease_key("a1") != env.Namespace("test").lease_key("a1")


# -- the holder process of the two-process tests -----------------------------------------------


async def _hold(url: str, agent_id: str) -> None:
    bus = make_bus(url)
    agents = EchoAgents(bus.process_id)
    agents.open.add(agent_id)
    await bus.start(agents.deliver)
    await bus.attach(agent_id, version="9.9.9")
    print(bus.process_id, flush=True)
    await asyncio.sleep(WAIT_S * 4)  # killed by the test long before; bounded if the test died


if __name__ == "__main__" and sys.argv[1:2] == ["holder"]:
    asyncio.run(_hold(sys.argv[2], sys.argv[3]))
