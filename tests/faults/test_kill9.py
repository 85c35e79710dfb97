"""kill -9 of the agent, of the hub and of both, at random moments during fast-mode load.

A standalone `medagent hub serve` and a `medagent serve` agent with one fast-mode MLLP channel
(the deployment of tests/runtime/test_remote_hub.py). A `Sender` thread keeps sending; the test
kills the chosen processes with SIGKILL (their whole process group, no clean shutdown) after a
random delay, restarts them on the same ports and data directories, and goes on. At the end the
hub must hold every AA-answered message exactly once as an original (re-sends flagged
duplicates), and no message answered only with a NAK (one message in 50 is one the agent must
reject: an unknown MSH-18 character set, answered AR). The figures of each run are printed:
sent / AA / NAK / unanswered / delivered / flagged duplicates / lost.

Short form (CI): agent, hub, both, one kill each, about a minute. Long form (`long`,
MEDAGENT_LONG_TESTS=1): 24 kills of random kinds. The seed is printed; MEDAGENT_FAULT_SEED
replays a run's kill schedule.
"""

from __future__ import annotations

import json
import os
import random
import signal
import sys
import time

import pytest
from faultsupport import Sender, wait_for_delivery
from test_remote_hub import start_agent, start_hub

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
