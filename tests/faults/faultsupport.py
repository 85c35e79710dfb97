"""Fault-suite machinery: a steady MLLP sender that keeps an account of every answer, the hub's
stored messages read back, and the delivery verdict.

Theory of operation
-------------------
`Sender` is one thread sending fast-mode HL7 messages with increasing control ids to one channel
(one connection at a time, one message in flight, like a real interface engine). Each message ends
in one of three outcomes: AA (the agent committed it: it must reach the hub exactly once), a
negative ACK (AE/AR/CE/CR: it must never be delivered), or no answer (the connection broke first:
the agent may or may not have committed it). A message without an answer is re-sent on the next
connection, as an engine does, so a committed-but-unanswered message comes back as a resend that
the agent must flag as a duplicate rather than deliver twice. Every wait is bounded.

`Verdict` compares the account with what the hub stored. A hub row is one agent queue row (its
callback is UNIQUE): the agent re-sending it after a lost confirmation only increments the row's
``duplicate`` counter; a row with ``duplicate_of`` is a sender's re-send that the agent's queue
flagged. `lost` are AA messages with no original row at the hub, `doubled` control ids stored twice as originals (a resend not flagged),
`nak_delivered` negatively answered messages that reached the hub anyway. All three must be empty.

The processes, their kill and restart, come from tests/runtime (test_remote_hub's `Child`,
`Deployment`, `spawn`, and serve_harness's MLLP client), so these tests drive the real
`medagent hub serve` and `medagent serve` exactly as an operator runs them.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from serve_harness import MllpClient, ServeProcess, ack_fields, hl7_message

CONNECT_RETRY_S = 0.05
ANSWER_TIMEOUT_S = 20.0  # an ACK slower than this counts as "no answer" (the sender re-sends)


@dataclass
class Account:
    """What the sender saw, per control id (the last outcome wins: a re-send may turn none into AA)."""

    outcome: dict[str, str] = field(default_factory=dict)  # control id -> "AA" | "NAK" | "none"
    unanswered_once: set[str] = field(default_factory=set)  # had no answer at least once
    order: list[str] = field(default_factory=list)  # control ids in first-send order
    resends: int = 0
    errors: list[str] = field(default_factory=list)

    def with_outcome(self, wanted: str) -> set[str]:
        return {cid for cid, seen in self.outcome.items() if seen == wanted}


class Sender(threading.Thread):
    """Sends `prefix`-numbered messages to 127.0.0.1:`port` until stopped or `limit` is reached."""

    def __init__(self, port: int, prefix: str, *, limit: int = 1_000_000, extra: str = "",
                 pace_s: float = 0.0, poison_every: int = 0) -> None:
        super().__init__(daemon=True, name=f"sender-{prefix}")
        self.port, self.prefix, self.limit, self.extra, self.pace_s = port, prefix, limit, extra, pace_s
        self.poison_every = poison_every  # every n-th message names an unknown charset: AR, not stored
        self.account = Account()
        self.stop_event = threading.Event()
        self._client: MllpClient | None = None

    def stop(self, timeout: float = 30.0) -> Account:
        self.stop_event.set()
        self.join(timeout)
        assert not self.is_alive(), "sender did not stop"
        return self.account

    def run(self) -> None:
        pending: str | None = None  # a control id to (re-)send first
        number = 0
        while not self.stop_event.is_set() and (pending is not None or number < self.limit):
            if pending is None:
                pending = f"{self.prefix}{number:07d}"
                number += 1
                self.account.order.append(pending)
            if self._send(pending):
                pending = None
            if self.pace_s:
                self.stop_event.wait(self.pace_s)
        if self._client is not None:
            self._client.close()

    def _send(self, control_id: str) -> bool:
        """True when the message was answered (AA or negative); False: send it again."""
        client = self._connect()
        if client is None:
            return False  # nothing was written: not a re-send yet
        if control_id in self.account.unanswered_once:
            self.account.resends += 1
        try:
            code = ack_fields(client.roundtrip(self._message(control_id)))[0]
        except (OSError, ConnectionError, AssertionError):
            client.close()
            self._client = None
            self.account.outcome[control_id] = "none"
            self.account.unanswered_once.add(control_id)
            return False
        self.account.outcome[control_id] = "AA" if code == "AA" else "NAK"
        return True

    def _message(self, control_id: str) -> bytes:
        message = hl7_message(control_id, extra=self.extra)
        if self.poison_every and int(control_id[len(self.prefix):]) % self.poison_every == self.poison_every - 1:
            return message.replace(b"|2.5.1", b"|2.5.1||||||KLINGON", 1)  # MSH-18: unknown charset
        return message

    def _connect(self) -> MllpClient | None:
        if self._client is None:
            try:
                self._client = MllpClient(self.port, timeout=ANSWER_TIMEOUT_S)
            except OSError:
                self.stop_event.wait(CONNECT_RETRY_S)  # the agent is restarting
                return None
            self._client.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return self._client


def hub_messages(hub_dir: Path) -> list[dict]:
    """Every message the hub stored, in storage order (the harness's paging `hub messages` reader)."""
    assert hub_dir.name == "hub"
    return ServeProcess(process=None, data_dir=hub_dir.parent).hub_messages()  # type: ignore[arg-type]


@dataclass(frozen=True)
class Verdict:
    sent: int
    acked: int
    naked: int
    unanswered: int
    delivered: int
    flagged_duplicates: int
    absorbed_resends: int
    lost: list[str]
    doubled: list[str]
    nak_delivered: list[str]

    @property
    def line(self) -> str:
        return (f"sent={self.sent} AA={self.acked} NAK={self.naked} unanswered={self.unanswered} "
                f"delivered={self.delivered} flagged_duplicates={self.flagged_duplicates} "
                f"hub_absorbed_resends={self.absorbed_resends} "
                f"lost={len(self.lost)} doubled={len(self.doubled)} nak_delivered={len(self.nak_delivered)}")

    @property
    def ok(self) -> bool:
        return not (self.lost or self.doubled or self.nak_delivered)


def verdict(accounts: list[Account], stored: list[dict]) -> Verdict:
    # A hub row is one agent queue row (callback UNIQUE): `duplicate` counts the agent's re-sends of
    # it (absorbed), `duplicate_of` marks a row the agent's queue flagged as a sender's re-send.
    originals = Counter(m["control_id"] for m in stored if not m.get("duplicate_of"))
    acked = set().union(*(a.with_outcome("AA") for a in accounts))
    # a NAK after a lost answer may follow a commit: only a message NAKed on its every try counts
    naked = set().union(*(a.with_outcome("NAK") - a.unanswered_once for a in accounts))
    return Verdict(
        sent=sum(len(a.order) for a in accounts),
        acked=len(acked),
        naked=len(naked),
        unanswered=sum(len(a.unanswered_once) for a in accounts),
        delivered=len(originals),
        flagged_duplicates=sum(1 for m in stored if m.get("duplicate_of")),
        absorbed_resends=sum(int(m.get("duplicate") or 0) for m in stored),
        lost=sorted(acked - set(originals)),
        doubled=sorted(cid for cid, count in originals.items() if count > 1),
        nak_delivered=sorted(naked & set(originals)),
    )


def wait_for_delivery(hub_dir: Path, agent_dir: Path, accounts: list[Account],
                      timeout: float) -> tuple[Verdict, list[dict]]:
    """Read the hub until every AA message is there, or the agent owes the hub nothing more
    (twice in a row), or `timeout`; the verdict and what the hub stored."""
    deadline = time.monotonic() + timeout
    drained = 0
    while True:
        stored = hub_messages(hub_dir)
        result = verdict(accounts, stored)
        if not result.lost or drained >= 2 or time.monotonic() > deadline:
            return result, stored
        states = queue_stats(agent_dir)["states"]
        drained = drained + 1 if states["received"] + states["sent"] == 0 else 0
        time.sleep(0.5)


def vm_rss_kib(pid: int) -> int:
    """Resident set size of `pid` in KiB (/proc/<pid>/status VmRSS)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS for {pid}")


def queue_stats(agent_dir: Path) -> dict:
    from test_remote_hub import medagent_cli

    return json.loads(medagent_cli("queue", "stats", "--data-dir", str(agent_dir), "--json").stdout)
