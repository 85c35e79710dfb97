"""Sample messages shipped with medagent so a new user has something real to send.

``medagent send --example adt|oru|orm|siu`` sends one; the files are also usable directly, e.g.
``medagent send --to mllp://127.0.0.1:2575 "$(python -c 'import medagent.samples as s; print(s.path("oru"))')"``.
All patients are fictitious. The ORU asks for an accept ACK only (MSH-15 AL, MSH-16 NE).
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

__all__ = ["SAMPLES", "path", "read"]

#: name -> file in this package
SAMPLES = {
    "adt": "adt_a01.hl7",  # ADT^A01 admit, 625 bytes (the benchmark message)
    "oru": "oru_r01.hl7",  # ORU^R01 lab results with 200 OBX segments, accept ACK only
    "orm": "orm_o01.hl7",  # ORM^O01 order
    "siu": "siu_s12.hl7",  # SIU^S12 appointment
}


def path(name: str) -> Path:
    """The file of sample ``name`` (one of :data:`SAMPLES`)."""
    try:
        filename = SAMPLES[name]
    except KeyError:
        raise ValueError(f"unknown sample {name!r}; choose one of: {', '.join(SAMPLES)}") from None
    return Path(str(resources.files(__package__).joinpath(filename)))


def read(name: str) -> bytes:
    """The bytes of sample ``name`` (segments separated by CR, not MLLP-framed)."""
    return path(name).read_bytes()
