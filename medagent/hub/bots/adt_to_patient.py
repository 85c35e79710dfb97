"""Bot: HL7 v2 ADT^A01/A04/A08 -> FHIR R4 ``Patient``, upserted in the hub store.

Theory of operation
-------------------
The PID segment (HL7 v2.5.1 ch. 3.4.2) is mapped the way the HL7 v2-to-FHIR mapping guide
("PID[Patient]") does for the common fields:

==========  ==============================  =================================================
PID-3       CX  patient identifier list     ``identifier[]`` (CX.1 value, CX.4 system, CX.5 type)
PID-5       XPN patient name                ``name[]`` (family, given + middle, prefix, suffix)
PID-7       DTM date/time of birth          ``birthDate`` (YYYY, YYYY-MM or YYYY-MM-DD)
PID-8       IS  administrative sex          ``gender`` (table 0001 -> male/female/other/unknown)
PID-11      XAD patient address             ``address[]`` (lines, city, state, postal, country)
PID-13      XTN home phone                  ``telecom[]`` (phone/email/fax, home/mobile)
==========  ==============================  =================================================

The resource is keyed by its first identifier, ``"<system>|<value>"``: a later A08 for the same
patient replaces the resource and keeps its id. Escape sequences (ch. 2.7) for the delimiters
are resolved; other escapes are kept as written. The reply is an AA ACK; other message types
get AR "unsupported message type"; a message without PID-3 raises (AE, recorded by the hub).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from medagent.hub import hl7text
from medagent.hub.botrunner import BotEvent

__all__ = ["handler", "patient_from_pid", "SUPPORTED_EVENTS"]

SUPPORTED_EVENTS = frozenset({"A01", "A04", "A08"})

_GENDER = {"M": "male", "F": "female", "O": "other", "A": "other", "U": "unknown", "N": "unknown"}
_ADDRESS_USE = {"H": "home", "B": "work", "O": "work", "C": "temp", "BA": "old", "M": "home"}
_PHONE_USE = {"PRN": "home", "ORN": "home", "VHN": "home", "WPN": "work", "PRS": "mobile"}
_SEGMENT_SPLIT = re.compile(r"[\r\n]+")


@dataclass(frozen=True, slots=True)
class _Delimiters:
    field: str
    component: str
    repetition: str
    escape: str
    subcomponent: str

    def unescape(self, value: str) -> str:
        if not self.escape or self.escape not in value:
            return value
        e = self.escape
        for code, char in (("F", self.field), ("S", self.component), ("T", self.subcomponent),
                           ("R", self.repetition), ("E", self.escape)):
            value = value.replace(f"{e}{code}{e}", char)
        return value


def handler(event: BotEvent) -> str:
    """Store a Patient for ADT^A01/A04/A08 and answer AA; AR for any other message type."""
    header = event.header
    if header is None:
        raise ValueError("adt_to_patient handles HL7 v2 messages only; this message has no MSH")
    if header.message_code != "ADT" or header.trigger_event not in SUPPORTED_EVENTS:
        return hl7text.ack_text(event.input, header, "AR", f"unsupported message type {hl7text.short_type(header)}")
    if event.store is None:
        raise RuntimeError("adt_to_patient needs the hub store")
    delimiters = _delimiters(header.field_separator, header.encoding_characters)
    pid = _segment(event.input, "PID", delimiters.field)
    if pid is None:
        raise ValueError("the message has no PID segment")
    patient = patient_from_pid(pid, delimiters)
    key = _identifier_key(patient)
    event.store.upsert_resource("Patient", key, patient)
    return hl7text.ack_text(event.input, header, "AA")


def patient_from_pid(pid: list[str], d: _Delimiters) -> dict[str, Any]:
    """The FHIR Patient of a PID segment split into fields (``pid[n]`` = PID-n)."""
    def field(n: int) -> str:
        return pid[n] if n < len(pid) else ""

    identifiers = [i for i in (_identifier(r, d) for r in _repetitions(field(3), d)) if i]
    if not identifiers:
        raise ValueError("PID-3 (patient identifier list) is empty")
    patient: dict[str, Any] = {"resourceType": "Patient", "identifier": identifiers}
    names = [n for n in (_name(r, d) for r in _repetitions(field(5), d)) if n]
    if names:
        patient["name"] = names
    birth_date = _date(field(7))
    if birth_date:
        patient["birthDate"] = birth_date
    if field(8):
        patient["gender"] = _GENDER.get(field(8).upper(), "unknown")
    addresses = [a for a in (_address(r, d) for r in _repetitions(field(11), d)) if a]
    if addresses:
        patient["address"] = addresses
    telecoms = [t for t in (_telecom(r, d) for r in _repetitions(field(13), d)) if t]
    if telecoms:
        patient["telecom"] = telecoms
    return patient


def _delimiters(field: str, encoding_characters: str) -> _Delimiters:
    chars = (encoding_characters + "^~\\&"[len(encoding_characters):])[:4]
    return _Delimiters(field or "|", chars[0], chars[1], chars[2], chars[3])


def _segment(text: str, name: str, field_separator: str) -> list[str] | None:
    for segment in _SEGMENT_SPLIT.split(text):
        if segment.startswith(name + field_separator):
            return segment.split(field_separator)
    return None


def _repetitions(value: str, d: _Delimiters) -> list[str]:
    return [r for r in value.split(d.repetition) if r] if value else []


def _components(value: str, d: _Delimiters) -> list[str]:
    return value.split(d.component)


def _part(parts: list[str], n: int, d: _Delimiters) -> str:
    """Component n (1-based), first subcomponent, unescaped."""
    if n > len(parts):
        return ""
    return d.unescape(parts[n - 1].split(d.subcomponent)[0])


def _identifier(cx: str, d: _Delimiters) -> dict[str, Any] | None:
    parts = _components(cx, d)
    value = _part(parts, 1, d)
    if not value:
        return None
    identifier: dict[str, Any] = {"value": value}
    authority = parts[3].split(d.subcomponent) if len(parts) > 3 else []
    namespace = d.unescape(authority[0]) if authority else ""
    universal = d.unescape(authority[1]) if len(authority) > 1 else ""
    universal_type = authority[2].upper() if len(authority) > 2 else ""
    if universal and universal_type == "ISO":
        identifier["system"] = f"urn:oid:{universal}"
    elif universal:
        identifier["system"] = universal
    elif namespace:
        identifier["system"] = f"urn:hl7v2:assigning-authority:{namespace}"
    type_code = _part(parts, 5, d)
    if type_code:
        identifier["type"] = {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0203", "code": type_code}]}
    return identifier


def _identifier_key(patient: dict[str, Any]) -> str:
    first = patient["identifier"][0]
    return f"{first.get('system', '')}|{first['value']}"


def _name(xpn: str, d: _Delimiters) -> dict[str, Any] | None:
    parts = _components(xpn, d)
    name: dict[str, Any] = {}
    family = _part(parts, 1, d)
    if family:
        name["family"] = family
    given = [g for g in (_part(parts, 2, d), _part(parts, 3, d)) if g]
    if given:
        name["given"] = given
    for key, n in (("suffix", 4), ("prefix", 5)):
        value = _part(parts, n, d)
        if value:
            name[key] = [value]
    if name and _part(parts, 7, d) == "L":
        name["use"] = "official"
    return name or None


def _date(dtm: str) -> str | None:
    digits = dtm.split("+")[0].split("-")[0][:8]
    if not digits.isdigit() or len(digits) not in (4, 6, 8):
        return None
    return "-".join(p for p in (digits[:4], digits[4:6], digits[6:8]) if p)


def _address(xad: str, d: _Delimiters) -> dict[str, Any] | None:
    parts = _components(xad, d)
    address: dict[str, Any] = {}
    lines = [line for line in (_part(parts, 1, d), _part(parts, 2, d)) if line]
    if lines:
        address["line"] = lines
    for key, n in (("city", 3), ("state", 4), ("postalCode", 5), ("country", 6)):
        value = _part(parts, n, d)
        if value:
            address[key] = value
    use = _ADDRESS_USE.get(_part(parts, 7, d).upper())
    if address and use:
        address["use"] = use
    return address or None


def _telecom(xtn: str, d: _Delimiters) -> dict[str, Any] | None:
    parts = _components(xtn, d)
    use_code, equipment = _part(parts, 2, d).upper(), _part(parts, 3, d).upper()
    email = _part(parts, 4, d)
    if use_code == "NET" or equipment in ("INTERNET", "X.400") or (email and not _part(parts, 1, d)):
        return {"system": "email", "value": email or _part(parts, 1, d)} if (email or _part(parts, 1, d)) else None
    number = _part(parts, 1, d) or "".join(_part(parts, n, d) for n in (5, 6, 7))
    if not number:
        return None
    telecom: dict[str, Any] = {"system": "fax" if equipment == "FX" else "phone", "value": number}
    use = "mobile" if equipment == "CP" else _PHONE_USE.get(use_code)
    if use:
        telecom["use"] = use
    return telecom
