"""Both ends of the agent protocol core wired together, under random interleavings (hypothesis).

An :class:`AgentSession` and a :class:`HubSession` exchange frames through two in-memory queues.
Hypothesis draws a program of steps — new device messages, agent flushes, partial deliveries in
either direction, hub commits (a cumulative ``agent:batch:ack`` in batch mode, a transmit
response or ``agent:error`` per message in plain mode), clock ticks (heartbeats, dead-link
detection), dropped connections — in batch mode and in plain (Medplum) mode. A small runtime model
re-sends what a session left unconfirmed on the next connection, as the agent runtime does on
``on_down``. After the program, a bounded drain without ticks delivers everything.

Checked: every message is confirmed exactly once over all connections; within a connection
confirmations arrive in send order; nothing is confirmed that was not sent on that connection; no
``agent:batch`` or extension field crosses a plain connection; the hub never acks a seq it has not
received; neither side ever answers the other with ``agent:error``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import orjson
from hypothesis import given, settings
from hypothesis import strategies as st

from medagent.cloud import messages as m
from medagent.proto import agent_session as core
from medagent.proto.agent_session import AgentSession, BatchSettings, HubSession, SessionEnd

AGENT = "agent-1"
PERIOD = 1.0


@dataclass
class Connection:
    """One websocket connection: both cores and the frames in flight each way."""

    agent: AgentSession
    hub: HubSession
    to_hub: list[bytes] = field(default_factory=list)
    to_agent: list[bytes] = field(default_factory=list)
    sent: list[str] = field(default_factory=list)  # callbacks send_transmit accepted, in order
    confirmed: list[str] = field(default_factory=list)
    uncommitted: list[core.TransmitsReceived] = field(default_factory=list)
    acked_seq: int = 0


class World:
    def __init__(self, batching: bool, max_messages: int) -> None:
        self.batching = batching
        self.max_messages = max_messages
        self.now = 0.0
        self.created = 0
        self.outbox: list[m.TransmitRequest] = []  # the runtime's queue: not yet sent on a live link
        self.messages: dict[str, m.TransmitRequest] = {}
        self.confirmed: list[str] = []
        self.connections = 0
        self.conn = self._connect()

    # -- the runtime model --

    def _connect(self) -> Connection:
        self.connections += 1
        agent = AgentSession(version="a", now=self.now, heartbeat_s=PERIOD, max_missed_heartbeats=2,
                             batching=BatchSettings(True, self.max_messages, 1 << 20))
        hub = HubSession(version="h", now=self.now, heartbeat_s=PERIOD)
        agent.connect("tok", AGENT)
        return Connection(agent, hub)

    def reconnect(self) -> None:
        """The connection is gone (dropped, dead, refused): re-send the unconfirmed on a new one."""
        old = self.conn
        old.agent.close()
        done = set(old.confirmed)
        self.outbox = [self.messages[cb] for cb in old.sent if cb not in done] + self.outbox
        self.conn = self._connect()

    def offer(self) -> None:
        """What the runtime does while live: hand every queued message to the link."""
        conn = self.conn
        while self.outbox and conn.agent.send_transmit(self.outbox[0]):
            conn.sent.append(self.outbox.pop(0).callback)  # type: ignore[arg-type]

    def new_messages(self, count: int) -> None:
        for _ in range(count):
            self.created += 1
            message = m.TransmitRequest(
                remote="10.0.0.1:1", content_type=m.CONTENT_TYPE_HL7_V2, body=f"MSH|^~\\&|{self.created}",
                channel="adt-in", callback=f"Agent/{AGENT}-{self.created}", no_reply=True,
            )
            self.messages[message.callback] = message  # type: ignore[index]
            self.outbox.append(message)
        self.offer()

    # -- the wire --

    def flush_agent(self) -> None:
        self.conn.to_hub.extend(self.conn.agent.data_to_send())

    def deliver_to_hub(self, count: int) -> None:
        conn = self.conn
        for frame in conn.to_hub[:count]:
            data = orjson.loads(frame)
            if not self.batching:  # plain mode: Medplum must never see the extension
                assert data["type"] != "agent:batch" and "duplicateOf" not in data and "noReply" not in data
            for event in conn.hub.receive_frame(frame):
                if isinstance(event, core.ConnectRequested):
                    features = {"batch": {"maxMessages": 1000}} if self.batching else {}
                    conn.hub.accept(event.agent_id, features, event.callback)
                elif isinstance(event, core.TransmitsReceived):
                    conn.uncommitted.append(event)
                else:
                    assert not isinstance(event, core.Violation), event
        del conn.to_hub[:count]
        conn.to_agent.extend(conn.hub.data_to_send())

    def commit(self) -> None:
        """The hub stored everything received: ack it (batch) or answer each message (plain)."""
        conn = self.conn
        seqs = [e.seq for e in conn.uncommitted if e.seq is not None]
        if seqs:
            conn.hub.acknowledge(max(seqs))
        for event in conn.uncommitted:
            for request in event.requests:
                if self.batching:
                    continue  # noReply: the batch ack is the confirmation
                if int(request.callback.rsplit("-", 1)[1]) % 3 == 0:  # type: ignore[union-attr]
                    conn.hub.send(m.ErrorMessage("Bot failed", request.callback))
                else:
                    conn.hub.send(m.TransmitResponse(remote=request.remote, content_type="c", body="MSA|AA",
                                                     channel=request.channel, callback=request.callback))
        conn.uncommitted = []
        for frame in conn.hub.data_to_send():
            data = orjson.loads(frame)
            if data["type"] == "agent:batch:ack":
                assert conn.acked_seq < data["seq"] <= conn.agent.batches_sent
                conn.acked_seq = data["seq"]
            conn.to_agent.append(frame)

    def deliver_to_agent(self, count: int) -> None:
        conn = self.conn
        frames, conn.to_agent = conn.to_agent[:count], conn.to_agent[count:]
        for frame in frames:
            events = conn.agent.receive_frame(frame)
            if self._on_agent_events(events):
                return

    def tick(self) -> None:
        self.now += PERIOD
        conn = self.conn
        conn.hub.tick(self.now)
        conn.to_agent.extend(conn.hub.data_to_send())
        self._on_agent_events(conn.agent.tick(self.now))

    def _on_agent_events(self, events: list[core.Event]) -> bool:
        """Apply the agent's events; True when the connection ended."""
        conn = self.conn
        for event in events:
            if isinstance(event, core.Confirmed):
                conn.confirmed.extend(event.callbacks)
                self.confirmed.extend(event.callbacks)
            elif isinstance(event, core.Live):
                self.offer()
            elif isinstance(event, SessionEnd):
                self.reconnect()
                return True
            else:
                assert isinstance(event, (core.TransmitFailed, core.TransmitAnswered, core.HeartbeatAnswered)), event
        return False

    def check_connection(self) -> None:
        conn = self.conn
        assert conn.confirmed == conn.sent[: len(conn.confirmed)]  # in send order, only what was sent
        in_flight = conn.agent.unconfirmed_count() + conn.agent.queued_transmits()
        assert in_flight == len(conn.sent) - len(conn.confirmed)

    def drain(self) -> None:
        for _ in range(50):  # bounded: each round moves every frame one hop
            self.offer()
            self.flush_agent()
            self.deliver_to_hub(len(self.conn.to_hub))
            self.commit()
            self.deliver_to_agent(len(self.conn.to_agent))
            self.check_connection()
            if not self.outbox and len(self.conn.confirmed) == len(self.conn.sent) and not self.conn.to_hub:
                return
        raise AssertionError("the drain did not settle")


STEPS = st.one_of(
    st.tuples(st.just("new"), st.integers(1, 7)),
    st.tuples(st.just("flush"), st.just(0)),
    st.tuples(st.just("to_hub"), st.integers(1, 4)),
    st.tuples(st.just("commit"), st.just(0)),
    st.tuples(st.just("to_agent"), st.integers(1, 4)),
    st.tuples(st.just("tick"), st.just(0)),
    st.tuples(st.just("drop"), st.just(0)),
)


@settings(max_examples=400, deadline=None)
@given(batching=st.booleans(), max_messages=st.integers(1, 5), program=st.lists(STEPS, max_size=60))
def test_every_message_is_confirmed_exactly_once(batching: bool, max_messages: int,
                                                 program: list[tuple[str, int]]) -> None:
    world = World(batching, max_messages)
    for step, n in program:
        if step == "new":
            world.new_messages(n)
        elif step == "flush":
            world.flush_agent()
        elif step == "to_hub":
            world.deliver_to_hub(n)
        elif step == "commit":
            world.commit()
        elif step == "to_agent":
            world.deliver_to_agent(n)
        elif step == "tick":
            world.tick()
        else:
            world.reconnect()
        world.check_connection()
    world.drain()
    assert len(world.confirmed) == len(set(world.confirmed)), "a message was confirmed twice"
    assert set(world.confirmed) == set(world.messages), "a message was never confirmed"
    assert world.conn.agent.live


def test_a_silent_hub_is_declared_dead_and_the_messages_move_to_the_next_connection() -> None:
    world = World(batching=True, max_messages=10)
    world.flush_agent()
    world.deliver_to_hub(1)
    world.deliver_to_agent(1)
    world.new_messages(3)
    world.flush_agent()  # sent, never delivered: the hub went silent
    for _ in range(3):
        world.tick()
    assert world.connections == 2 and len(world.outbox) == 3  # dead link -> re-sent on connection 2
    world.drain()
    assert sorted(world.confirmed) == sorted(world.messages)
