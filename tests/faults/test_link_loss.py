"""Link loss between agent and hub: a TCP proxy stalls, drops or half-closes the websocket link.

Deployment: a standalone hub, a `FaultProxy` in front of it, and an agent whose `[agent] hub` is
the proxy's URL (token, FHIR reads and the websocket all cross it), with two fast-mode MLLP
channels and one `Sender` on each, paced, each message carrying a 16 KB NTE segment so that a
backlog is sizeable. For each outage the proxy breaks the link for its duration, then restores
it; the test checks that

* the agent keeps answering AA meanwhile (its queue is on disk) and delivery resumes after the
  outage (the backlog drains);
* per channel, the hub stored the originals in the order they were sent;
* while the backlog waits on disk, the agent's resident memory stays bounded: during a long
  outage VmRSS (/proc/<pid>/status) grows by less than a fixed cap (48 MB) while the backlog on
  disk exceeds 64 MB (30 s) or ~700 MB (5 minutes, long form);
* at the end every AA message is at the hub exactly once (`faultsupport.verdict`).

Short form (CI): stall, drop and half-close for 1 s each, then a 30 s stall. Long form (`long`,
MEDAGENT_LONG_TESTS=1): each mode for 30 s and for 5 minutes.
"""

from __future__ import annotations

import sys
import time

import pytest
from faultsupport import Sender, queue_stats, vm_rss_kib, wait_for_delivery
from tcp_proxy import FaultProxy
from test_remote_hub import medagent_cli, start_agent, start_hub

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc, POSIX process groups")]

NTE = "\rNTE|1||" + "X" * 16384
PACE_S = 0.01  # per sender: at most ~100 messages/s, so a 30 s backlog is ~70 MB on disk
RESUME_TIMEOUT_S = 90.0
#: RSS growth allowed during an outage of MEMORY_CHECK_S or longer, whose backlog on disk must
#: exceed BACKLOG_MIN_BYTES (a 30 s stall here: ~75 MB; 5 minutes: ~700 MB)
RSS_GROWTH_LIMIT_KIB = 48 * 1024
BACKLOG_MIN_BYTES = 64 * 1024 * 1024
MEMORY_CHECK_S = 30.0
MAX_STALL_FACTOR = 3  # a memory-check outage lasts at most 3x its length while the backlog builds


def pending(agent_dir) -> int:
    states = queue_stats(agent_dir)["states"]
    return states["received"] + states["sent"]


def run_outages(spawn, deployment, outages: list[tuple[str, float]]) -> None:
    second_port = _add_channel(deployment, "lab-in")
    _, hub_url = start_hub(spawn, deployment)
    proxy = FaultProxy(int(hub_url.rsplit(":", 1)[1]))
    try:
        agent = start_agent(spawn, deployment.agent_config(f"http://127.0.0.1:{proxy.port}"))
        agent.wait_for("link live")
        senders = [Sender(deployment.channel_port, "A", extra=NTE, pace_s=PACE_S),
                   Sender(second_port, "B", extra=NTE, pace_s=PACE_S)]
        for sender in senders:
            sender.start()
        try:
            for mode, seconds in outages:
                _one_outage(proxy, agent, deployment, mode, seconds)
        finally:
            accounts = [sender.stop() for sender in senders]
        result, stored = wait_for_delivery(deployment.hub_dir, deployment.agent_dir, accounts, RESUME_TIMEOUT_S)
        print(f"\nlink loss {outages}: {result.line} proxy_connections={proxy.accepted}")
        assert result.acked > 0 and result.ok, result
        for prefix in ("A", "B"):
            sent_order = [m["control_id"] for m in stored
                          if not m.get("duplicate_of") and m["control_id"].startswith(prefix)]
            assert sent_order == sorted(sent_order), f"channel {prefix}: hub order differs from send order"
        assert "X" * 64 not in agent.output  # no body in the log
    finally:
        proxy.close()


def _one_outage(proxy: FaultProxy, agent, deployment, mode: str, seconds: float) -> None:
    """One outage; RSS sampled every 0.5 s, the backlog read at half time and at the end."""
    pid = agent.process.pid
    before = vm_rss_kib(pid)
    proxy.outage(mode)  # type: ignore[arg-type]
    start = time.monotonic()
    peak, half, backlog_half = before, None, 0
    while (elapsed := time.monotonic() - start) < seconds:  # bounded by the outage's length
        time.sleep(min(0.5, max(0.0, seconds - elapsed)))
        rss = vm_rss_kib(pid)
        peak = max(peak, rss)
        if half is None and time.monotonic() - start >= seconds / 2:
            half, backlog_half = rss, pending(deployment.agent_dir)
    backlog = pending(deployment.agent_dir)
    if seconds >= MEMORY_CHECK_S:
        # The paced senders fall behind on a loaded machine; stall on (bounded) until the backlog
        # is big enough to tell a disk backlog from a memory one, instead of failing on load.
        while backlog * len(NTE) <= BACKLOG_MIN_BYTES and time.monotonic() - start < seconds * MAX_STALL_FACTOR:
            time.sleep(2.0)
            peak = max(peak, vm_rss_kib(pid))
            backlog = pending(deployment.agent_dir)
    proxy.restore()
    resumed_in = _wait_drained(deployment.agent_dir)
    print(f"\n{mode} {seconds:g} s: backlog {backlog} messages (~{backlog * len(NTE) // 1024} KiB), agent RSS "
          f"{before} KiB at the start, {half} at half time (backlog {backlog_half}), peak {peak}; "
          f"drained {resumed_in:.1f} s after restore")
    assert resumed_in < RESUME_TIMEOUT_S, f"delivery did not resume after a {mode} of {seconds} s"
    if seconds >= MEMORY_CHECK_S:
        # A backlog kept in memory would grow RSS by its size; the agent's working set under this
        # load varies by tens of MB (allocator high water during drains), hence an absolute cap
        # that a 30 s backlog exceeds and a 5-minute one (long form) dwarfs.
        size = backlog * len(NTE)
        assert size > BACKLOG_MIN_BYTES, f"backlog only {size} bytes: too little to tell"
        assert peak - before < RSS_GROWTH_LIMIT_KIB, (
            f"agent RSS grew {peak - before} KiB while a {size // 1024} KiB backlog waited on disk")


def _wait_drained(agent_dir) -> float:
    """Seconds until the agent owes the hub at most a handful of rows (senders keep sending)."""
    start = time.monotonic()
    while time.monotonic() - start < RESUME_TIMEOUT_S:
        if pending(agent_dir) <= 20:
            break
        time.sleep(0.3)
    return time.monotonic() - start


def _add_channel(deployment, name: str) -> int:
    from test_remote_hub import free_port

    port = free_port()
    medagent_cli("hub", "add-channel", "lab-north", name, f"mllp://127.0.0.1:{port}?ackMode=fast",
                 "--data-dir", str(deployment.hub_dir), "--json")
    return port


def test_link_stall_drop_half_close_then_a_30s_stall(spawn, deployment) -> None:
    run_outages(spawn, deployment, [("stall", 1.0), ("drop", 1.0), ("half-close", 1.0), ("stall", 30.0)])


@pytest.mark.long
def test_link_outages_of_30s_and_5min(spawn, deployment) -> None:
    run_outages(spawn, deployment, [(mode, seconds) for seconds in (30.0, 300.0)
                                    for mode in ("stall", "drop", "half-close")])
