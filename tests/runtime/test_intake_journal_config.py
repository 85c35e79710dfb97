"""`agent.intake_journal` reaches the queue: on by default with durability "normal", off when
set false, and never with "fsync" (the journal does not fsync; docs/intake-journal.md)."""

from __future__ import annotations

from pathlib import Path

import pytest

from medagent.config import load_config
from medagent.runtime.agent import AgentRuntime


@pytest.mark.parametrize(("env", "journal"), [
    ({}, True),
    ({"MEDAGENT_AGENT_INTAKE_JOURNAL": "false"}, False),
    ({"MEDAGENT_AGENT_DURABILITY": "fsync"}, False),
    ({"MEDAGENT_AGENT_DURABILITY": "fsync", "MEDAGENT_AGENT_INTAKE_JOURNAL": "true"}, False),
])
async def test_the_setting_decides_whether_the_queue_journals(tmp_path: Path, env: dict[str, str], journal: bool) -> None:
    config = load_config(None, env={"MEDAGENT_AGENT_DATA_DIR": str(tmp_path / "data"), **env})
    runtime = AgentRuntime(config)
    await runtime._open_queue()
    queue = runtime.queue
    assert queue is not None
    try:
        assert queue.stats()["journal_records"] == 0
        assert (tmp_path / "data").is_dir()
        journals = list((tmp_path / "data").glob("*.intake.journal"))
        assert bool(journals) is journal
    finally:
        await queue.close()
