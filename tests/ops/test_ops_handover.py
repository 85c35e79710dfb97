"""The upgrade hand-over protocol core (medagent.ops.handover): lines, order, tolerance, bad input."""

from __future__ import annotations

import json
import random

import pytest

from medagent.ops import handover as ho


def _line(**document: object) -> bytes:
    return json.dumps(document).encode() + b"\n"


def test_a_whole_switch_round_trips_in_order() -> None:
    old, new = ho.Conversation(ho.Role.OLD), ho.Conversation(ho.Role.NEW)
    old_in, new_in = ho.LineDecoder(), ho.LineDecoder()
    new.sending(ho.Kind.READY)
    [ready] = old_in.feed(ho.encode(ho.Kind.READY, pid=42, version="0.2.0"))
    assert old.receive(ready) == ho.Message(ho.Kind.READY, {"pid": 42, "version": "0.2.0"})
    old.sending(ho.Kind.GO)
    [go] = new_in.feed(ho.encode(ho.Kind.GO, stoppedAt=1.5, **{"from": "0.1.0"}))
    assert new.receive(go)["from"] == "0.1.0" and new.phase == "go"
    new.sending(ho.Kind.HEALTHY)
    [healthy] = old_in.feed(ho.encode(ho.Kind.HEALTHY, pauseS=0.25))
    assert old.receive(healthy).kind is ho.Kind.HEALTHY
    assert old.done and new.done and old.outcome is not None and old.outcome["pauseS"] == 0.25


def test_lines_split_anywhere_decode_the_same() -> None:
    stream = (ho.encode(ho.Kind.READY, pid=7, version="1.0.0") + b"\n" +  # blank lines are skipped
              ho.encode(ho.Kind.FAILED, reason="post-switch health check: no AA"))
    rng = random.Random(16)
    for _ in range(50):
        decoder, events, rest = ho.LineDecoder(), [], stream
        while rest:
            cut = rng.randint(1, len(rest))
            events += decoder.feed(rest[:cut])
            rest = rest[cut:]
        assert [e.kind for e in events if isinstance(e, ho.Message)] == [ho.Kind.READY, ho.Kind.FAILED]


def test_a_newer_peer_is_understood_as_far_as_known() -> None:
    decoder = ho.LineDecoder()
    newer_go, progress = decoder.feed(_line(v=2, type="go", stoppedAt=3, **{"from": "0.1.0"}, drained=12)
                                      + _line(v=2, type="progress", step="queue"))
    assert isinstance(newer_go, ho.Message) and newer_go.version == 2 and newer_go["drained"] == 12
    assert progress == ho.Ignored("progress", 2)
    new = ho.Conversation(ho.Role.NEW)
    assert new.receive(progress) == progress and new.phase == "start"  # ignored: order unchanged
    assert new.receive(newer_go).kind is ho.Kind.GO


@pytest.mark.parametrize(("line", "reason"), [
    (b"hello\n", "not a JSON line"),
    (b"[1, 2]\n", "not a JSON object"),
    (_line(type="ready", pid=1, version="1"), "protocol version"),
    (_line(v="1", type="ready", pid=1, version="1"), "protocol version"),
    (_line(v=True, type="ready", pid=1, version="1"), "protocol version"),
    (_line(v=1, kind="ready"), "no message 'type'"),
    (_line(v=1, type="ready", version="1"), "'ready' needs the field 'pid'"),
    (_line(v=1, type="ready", pid="1", version="1"), "'ready' needs the field 'pid'"),
    (_line(v=1, type="failed"), "'failed' needs the field 'reason'"),
    (_line(v=1, type="healthy", pauseS=True), "'healthy' needs the field 'pauseS'"),
])
def test_bad_lines_are_invalid_with_a_reason(line: bytes, reason: str) -> None:
    [event] = ho.LineDecoder().feed(line)
    assert isinstance(event, ho.Invalid) and reason in event.reason, event


def test_an_over_long_line_is_invalid_and_the_decoder_recovers() -> None:
    decoder = ho.LineDecoder()
    [event] = decoder.feed(b"x" * (ho.MAX_LINE_BYTES + 1))
    assert isinstance(event, ho.Invalid) and "longer than" in event.reason
    assert decoder.feed(b"\n") == []  # the tail of the long line is dropped with it
    [ok] = decoder.feed(ho.encode(ho.Kind.HEALTHY, pauseS=0))
    assert isinstance(ok, ho.Message)


def test_messages_out_of_order_are_answered_as_invalid() -> None:
    old = ho.Conversation(ho.Role.OLD)
    early = old.receive(ho.Message(ho.Kind.HEALTHY, {"pauseS": 0.1}))
    assert early == ho.Invalid("unexpected 'healthy' (waiting for ready or failed)")
    new = ho.Conversation(ho.Role.NEW)
    assert isinstance(new.receive(ho.Message(ho.Kind.READY, {"pid": 1, "version": "1"})), ho.Invalid)
    new.receive(ho.Message(ho.Kind.GO, {"stoppedAt": 1, "from": "0.1.0"}))
    again = new.receive(ho.Message(ho.Kind.GO, {"stoppedAt": 1, "from": "0.1.0"}))
    assert again == ho.Invalid("unexpected 'go' (waiting for failed)")
    with pytest.raises(RuntimeError, match="cannot send 'go'"):
        new.sending(ho.Kind.GO)
    with pytest.raises(RuntimeError, match="cannot send 'healthy'"):
        ho.Conversation(ho.Role.NEW).sending(ho.Kind.HEALTHY)  # not before go
    old = ho.Conversation(ho.Role.OLD)
    old.sending(ho.Kind.GO)
    old.sending(ho.Kind.FAILED)  # after go: the new process took too long; it is told, then killed
    assert old.done
    with pytest.raises(RuntimeError, match="cannot send 'failed'"):
        old.sending(ho.Kind.FAILED)


def test_encode_refuses_an_incomplete_message() -> None:
    with pytest.raises(ValueError, match="'go' needs the field 'from'"):
        ho.encode(ho.Kind.GO, stoppedAt=1.0)


def test_the_spec_round_trips_and_bad_specs_say_what_is_wrong() -> None:
    spec = ho.HandoverSpec(5, {"adt-in": 6, "lab": 7})
    assert ho.parse_spec(spec.to_arg()) == spec and spec.fds == [5, 6, 7]
    for text, problem in (("{", "not JSON"), ("[]", "not a JSON object"), ('{"sockets": {}}', "'control'"),
                          ('{"control": -1}', "'control'"), ('{"control": 3, "sockets": {"a": "4"}}', "'sockets'"),
                          ('{"control": 3, "sockets": [4]}', "'sockets'")):
        with pytest.raises(ValueError, match=problem):
            ho.parse_spec(text)
