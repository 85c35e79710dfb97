"""Bots of the DICOM end-to-end tests (imported by the hub child through PYTHONPATH)."""

from __future__ import annotations

import json


def instance_seen(event):
    """Accept Medplum's DICOM JSON document; fail loudly if it is not one."""
    document = json.loads(event.input)
    if "association" not in document or "dataset" not in document:
        raise ValueError("not a DICOM instance document")
