"""Bots of the DICOM end-to-end tests (imported by the hub child through PYTHONPATH)."""

from __future__ import annotations

import json


def instance_seen(event):  # noqa: ANN001, ANN201 - the hub's BotEvent
    """Accept Medplum's DICOM JSON document; fail loudly if it is not one."""
    document = json.loads(event.input)
    if "association" not in document or "dataset" not in document:
        raise ValueError("not a DICOM instance document")
    return None
