"""kill -9 of the agent, of the hub and of both, at random moments during fast-mode load.

A standalone `medagent hub serve` and a `medagent serve` agent with one fast-mode MLLP channel
(the deployment of tests/runtime/test_remote_hub.py). A `Sender` thread keeps sending; the test
kills the chosen processes with SIGKILL (their whole process group, no clean shutdown) after a
random delay, restarts them on the same ports and data directories, and goes on. At the end the
hub must hold every AA-answered message exactly once as an original (re-sends flagged
duplicates), and no message answered only with a NAK (one message in 50 is one the agent must
reject: an unknown MSH-18 character set, answered AR). The figures of each run are printed:
sent / AA / NAK / unanswered / delivered / flagged duplicates / lost.

The intake journal (docs/intake-journal.md, on by default) is in play in these runs; two
smaller forms kill a queue process at the journal's two critical points: with records only in the
journal, and between the mover's COMMIT and its truncate.

Short form (CI): agent, hub, both, one kill each, about a minute. Long form (`long`,
MEDAGENT_LONG_TESTS=1): 24 kills of random kinds. The seed is printed; MEDAGENT_FAULT_SEED
replays a run's kill schedule.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import time

import pytest
from faultsupport import Sender, wait_for_delivery
from test_remote_hub import start_agent, start_hub

from medagent.queue.durable import DurableQueue

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not sys.platform.startswith("linux"), reason="POSIX process groups, /proc")]

DELIVERY_TIMEOUT_S = 120.0
POISON_EVERY = 50  # one message in 50 names an unknown MSH-18 charset: answered AR, never delivered


def _kill(child) -> None:
    child._signal(signal.SIGKILL)
    child.process.wait(10)


def run_kills(spawn, deployment, kinds: list[str], rng: random.Random, delay_s: tuple[float, float]) -> None:
    hub, hub_url = start_hub(spawn, deployment)
    hub_port = int(hub_url.rsplit(":", 1)[1])
    config = deployment.agent_config(hub_url)
    agent = start_agent(spawn, config)
    agent.wait_for("link live")
    sender = Sender(deployment.channel_port, "K", poison_every=POISON_EVERY)
    sender.start()
    try:
        for kind in kinds:
            time.sleep(rng.uniform(*delay_s))
            print(f"\nkill -9 {kind} after message {sender.account.order[-1] if sender.account.order else None}")
            if kind in ("agent", "both"):
                _kill(agent)
            if kind in ("hub", "both"):
                _kill(hub)
            if kind in ("hub", "both"):
                hub, _ = start_hub(spawn, deployment, port=hub_port)
            if kind in ("agent", "both"):
                agent = start_agent(spawn, config)
        time.sleep(rng.uniform(*delay_s))
    finally:
        account = sender.stop()
    result, stored = wait_for_delivery(deployment.hub_dir, deployment.agent_dir, [account], DELIVERY_TIMEOUT_S)
    print(f"\nkill -9 run {kinds}: {result.line} resends={account.resends}")
    suspects = set(result.lost) | set(result.doubled) | set(result.nak_delivered)
    assert result.acked > 0 and result.naked > 0 and result.ok, (result, [json.dumps(m) for m in stored if m["control_id"] in suspects],
                                            {cid: account.outcome[cid] for cid in suspects},
                                            sorted(account.unanswered_once & suspects))
    assert "DOE^JOHN" not in agent.output + hub.output  # no message body in any log line


def _seed() -> int:
    seed = int(os.environ.get("MEDAGENT_FAULT_SEED", random.randrange(1 << 32)))
    print(f"\nMEDAGENT_FAULT_SEED={seed}")
    return seed


def test_kill_agent_hub_and_both_under_load(spawn, deployment) -> None:
    run_kills(spawn, deployment, ["agent", "hub", "both"], random.Random(_seed()), (1.0, 4.0))


@pytest.mark.long
def test_kill_many_times_under_load(spawn, deployment) -> None:
    rng = random.Random(_seed())
    run_kills(spawn, deployment, [rng.choice(["agent", "hub", "both"]) for _ in range(24)], rng, (0.2, 6.0))


# ------------------------------------------------------------ the intake journal (docs/intake-journal.md)

# A child process that commits `count` lone records (each one's submit_wait returned: the device
# would have its ACK) and then kills itself with SIGKILL while the records are still in the
# intake journal (the mover's timer is set far out; its count trigger is 256). With
# "after-commit" the mover ran and committed, and the journal is put back as it was before its
# truncate: a kill between the mover's COMMIT and its ftruncate.
_JOURNAL_CHILD = r"""
import asyncio, os, signal, sys, time
from pathlib import Path
import medagent.queue.durable as durable
from medagent.queue.records import InboundRecord

durable._MOVE_AFTER_S = 3600.0

async def main(path, mode, count):
    queue = durable.DurableQueue(Path(path))
    await queue.open()
    for i in range(count):
        record = InboundRecord("adt", "127.0.0.1:1", "LAB", f"k{i}", "ADT^A01", b"MSH|k%d" % i, time.time())
        assert (await queue.submit_wait(record)).ok
    journal = Path(path + ".intake.journal")
    if mode == "after-commit":
        saved = journal.read_bytes()
        await queue._call(queue._require_store().move_journal)
        journal.write_bytes(saved)
    print(journal.stat().st_size, queue.stats()["journal_records"], flush=True)
    os.kill(os.getpid(), signal.SIGKILL)

asyncio.run(main(sys.argv[1], sys.argv[2], int(sys.argv[3])))
"""


@pytest.mark.parametrize("mode", ["journal-only", "after-commit"])
def test_kill9_with_records_in_the_intake_journal_loses_and_doubles_nothing(tmp_path, mode: str) -> None:
    count = 100
    path = tmp_path / "queue.db"
    child = subprocess.run([sys.executable, "-c", _JOURNAL_CHILD, str(path), mode, str(count)],
                           check=False, capture_output=True, text=True, timeout=60)
    assert child.returncode == -signal.SIGKILL, child.stderr
    journal_bytes, resident = map(int, child.stdout.split())
    assert journal_bytes > 0 and resident == (count if mode == "journal-only" else 0)

    async def drain() -> list[str]:
        async with DurableQueue(path) as queue:
            got: list[str] = []
            for _ in range(count + 1):
                if len(got) >= count:
                    break
                got += [m.control_id for m in await asyncio.wait_for(queue.next_batch(count), 10)]
            return got

    assert asyncio.run(drain()) == [f"k{i}" for i in range(count)]
    conn = sqlite3.connect(path)
    try:
        assert conn.execute("SELECT count(*), count(DISTINCT control_id) FROM messages").fetchone() == (count, count)
    finally:
        conn.close()
    assert path.with_name("queue.db.intake.journal").stat().st_size == 0
