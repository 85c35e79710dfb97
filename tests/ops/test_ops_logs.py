"""Logs: the main log file (text or JSON lines, rotated, 0600) and $fetch-logs without PHI."""

from __future__ import annotations

import json
import logging
import os
import stat
from pathlib import Path

import orjson
from opstest import PHI_NAME, OpsSite, http, send_messages

from medagent.ops.logs import LOG_FILENAME, add_file_log


def _mode(path: Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_json_lines_rotate_and_every_generation_is_private(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        handler = add_file_log(tmp_path, json_lines=True, max_bytes=400, backups=2)
        logger = logging.getLogger("medagent.test.rotation")
        logger.setLevel(logging.INFO)
        try:
            for i in range(30):
                logger.info("line %d", i)
            try:
                raise ValueError("bad thing")
            except ValueError:
                logger.exception("failed")
        finally:
            logging.getLogger().removeHandler(handler)
            handler.close()
    finally:
        os.umask(old)
    files = sorted(tmp_path.glob(LOG_FILENAME + "*"))
    assert [f.name for f in files] == [LOG_FILENAME, LOG_FILENAME + ".1", LOG_FILENAME + ".2"]
    assert all(_mode(f) == 0o600 for f in files)
    last = [json.loads(line) for line in (tmp_path / LOG_FILENAME).read_text().splitlines()]
    assert last[-1]["msg"] == "failed" and last[-1]["exc"] == "ValueError: bad thing"
    assert set(last[0]) >= {"level", "msg", "timestamp", "logger"}


async def test_fetch_logs_remotely_has_no_phi_and_honours_limits(site: OpsSite) -> None:
    await send_messages(site.port, ["L1", "L2"])
    path = f"/fhir/R4/Agent/{site.credentials.agent_id}/$fetch-logs"
    status, text = await http(site.hub, "GET", path, params={"limit": "1000"})
    assert status == 200, text
    lines = orjson.loads(text)["parameter"][0]["valueString"].splitlines()
    entries = [json.loads(line) for line in lines]
    assert entries and all({"level", "msg", "timestamp"} <= set(e) for e in entries)
    assert any("listening on mllp:" in e["msg"] for e in entries)
    # one "listening" line per channel: the runtime's; the kind's own is DEBUG
    assert not any(e["msg"].startswith("hl7 channel") and "listening on" in e["msg"] for e in entries)
    assert PHI_NAME.split("^")[0] not in text
    main_log = site.runtime.data_dir / LOG_FILENAME
    assert _mode(main_log) == 0o600 and PHI_NAME.split("^")[0] not in main_log.read_text()

    status, text = await http(site.hub, "GET", path)  # Medplum's default: 20
    assert len(orjson.loads(text)["parameter"][0]["valueString"].splitlines()) <= 20
    status, text = await http(site.hub, "GET", path, params={"limit": "2"})
    assert len(orjson.loads(text)["parameter"][0]["valueString"].splitlines()) == 2
    for bad in ("0", "1001"):
        status, text = await http(site.hub, "GET", path, params={"limit": bad})
        assert status == 400 and "limit" in text
