"""QIDO-RS and C-FIND matching as pure values (PS3.18 §8.3.4, PS3.4 §C.2.2.2).

:func:`parse_qido` turns a QIDO-RS query string (keys by keyword or by 8-hex tag) into a
:class:`Query`; the hub's store turns that into SQL. :func:`qido_from_identifier` turns a
C-FIND/C-GET/C-MOVE identifier into the QIDO request that answers it (level, parameters), and
:func:`response_identifier` shapes a QIDO result back into a C-FIND response identifier holding
exactly the requested keys (PS3.4 §C.4.1.1.3.2: every requested key is returned, empty if
unknown).

Matching implemented (PS3.4 §C.2.2.2): single value (UIDs, PatientID, AccessionNumber, Modality),
UID list matching (``\\`` or ``,`` separated), wild card matching with ``*`` and ``?`` (PatientID,
PatientName, AccessionNumber), range matching of dates (``A-B``, ``-B``, ``A-``). Universal
matching (an empty value) means "return the attribute", never "filter".
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from pydicom.datadict import keyword_for_tag, tag_for_keyword
from pydicom.dataset import Dataset

from medagent.dicom.uids import is_uid

__all__ = [
    "Level",
    "Query",
    "QueryError",
    "date_range",
    "glob_pattern",
    "parse_qido",
    "qido_from_identifier",
    "response_identifier",
    "tag_hex",
]

Level = str  # "study" | "series" | "instance"
LEVELS = ("study", "series", "instance")
#: C-FIND QueryRetrieveLevel (PS3.4 §C.6) -> QIDO level; PATIENT is answered from studies
CFIND_LEVELS: Mapping[str, Level] = {"PATIENT": "study", "STUDY": "study", "SERIES": "series", "IMAGE": "instance"}

_DATE = re.compile(r"[0-9]{8}")
_MAX_LIMIT = 10_000


class QueryError(ValueError):
    """A query the server cannot run; ``parameter`` names the offending key (for a 400)."""

    def __init__(self, parameter: str, problem: str) -> None:
        super().__init__(f"{parameter}: {problem}")
        self.parameter = parameter


@dataclass(frozen=True, slots=True)
class Query:
    level: Level
    study_uids: tuple[str, ...] = ()
    series_uids: tuple[str, ...] = ()
    sop_uids: tuple[str, ...] = ()
    modalities: tuple[str, ...] = ()
    patient_id: str | None = None  # GLOB pattern
    patient_name: str | None = None  # GLOB pattern
    accession_number: str | None = None  # GLOB pattern
    study_date: tuple[str, str] | None = None  # inclusive, "" = open end
    sop_class_uids: tuple[str, ...] = ()
    include: frozenset[str] = field(default_factory=frozenset)  # 8-hex tags; "all" alone = all
    limit: int = 1000
    offset: int = 0


def tag_hex(key: str) -> str | None:
    """``PatientID`` or ``00100020`` -> ``"00100020"``; None for an unknown keyword."""
    if re.fullmatch(r"[0-9A-Fa-f]{8}", key):
        return key.upper()
    tag = tag_for_keyword(key)
    return None if tag is None else f"{tag:08X}"


def glob_pattern(value: str) -> str:
    """A DICOM wild card value (``*``, ``?``; PS3.4 §C.2.2.2.4) as an SQLite GLOB pattern."""
    return value.replace("[", "[[]")


def date_range(value: str) -> tuple[str, str]:
    """``YYYYMMDD``, ``A-B``, ``-B`` or ``A-`` -> inclusive (low, high); "" is an open end."""
    low, dash, high = value.partition("-")
    if not dash:
        high = low
    for part in (low, high):
        if part and not _DATE.fullmatch(part):
            raise QueryError("StudyDate", f"not a date or date range: {value!r}")
    if not low and not high:
        raise QueryError("StudyDate", "a range needs at least one end")
    return low, high


def _uid_list(name: str, value: str) -> tuple[str, ...]:
    uids = tuple(u.strip() for u in re.split(r"[\\,]", value) if u.strip())
    for uid in uids:
        if not is_uid(uid):
            raise QueryError(name, f"not a UID: {uid!r}")
    return uids


def _number(name: str, value: str, maximum: int) -> int:
    if not value.isdigit():
        raise QueryError(name, f"not a non-negative integer: {value!r}")
    return min(int(value), maximum)


_UID_KEYS = {"0020000D": "study_uids", "0020000E": "series_uids", "00080018": "sop_uids",
             "00080016": "sop_class_uids"}
_PATTERN_KEYS = {"00100020": "patient_id", "00100010": "patient_name", "00080050": "accession_number"}
_MODALITY_KEYS = ("00080060", "00080061")


def parse_qido(level: Level, params: Iterable[tuple[str, str]]) -> Query:
    """A QIDO-RS query (PS3.18 §8.3.4.1) at ``level``; unknown keys raise QueryError."""
    values: dict[str, Any] = {"level": level}
    include: set[str] = set()
    for key, value in params:
        if key == "includefield":
            for item in value.split(","):
                item = item.strip()
                if item == "all":
                    include.add("all")
                elif item:
                    tag = tag_hex(item)
                    if tag is None:
                        raise QueryError("includefield", f"unknown attribute {item!r}")
                    include.add(tag)
            continue
        if key == "limit":
            values["limit"] = _number(key, value, _MAX_LIMIT)
            continue
        if key == "offset":
            values["offset"] = _number(key, value, 1 << 31)
            continue
        if key in ("fuzzymatching",):
            continue  # optional in PS3.18; exact matching is a conforming answer
        tag = tag_hex(key)
        if tag is None:
            raise QueryError(key, "unknown attribute")
        if not value:
            include.add(tag)  # universal matching: return it
        elif tag in _UID_KEYS:
            values[_UID_KEYS[tag]] = _uid_list(key, value)
        elif tag in _PATTERN_KEYS:
            values[_PATTERN_KEYS[tag]] = glob_pattern(value)
        elif tag in _MODALITY_KEYS:
            values["modalities"] = tuple(m.strip() for m in re.split(r"[\\,]", value) if m.strip())
        elif tag == "00080020":
            values["study_date"] = date_range(value)
        else:
            include.add(tag)  # matching on it is not supported: return it, do not filter
    values["include"] = frozenset(include)
    return Query(**values)


def _element_text(element: Any) -> str:
    value = element.value
    if isinstance(value, list | tuple) or type(value).__name__ == "MultiValue":
        return "\\".join(str(v) for v in value)
    return "" if value is None else str(value)


def qido_from_identifier(identifier: Dataset) -> tuple[Level, list[tuple[str, str]]]:
    """The QIDO level and parameters answering a C-FIND identifier (PS3.4 §C.4.1).

    Keys with a value become matching parameters; every key becomes an ``includefield`` so the
    answer carries it. Raises QueryError for a missing or unknown QueryRetrieveLevel.
    """
    level_name = str(identifier.get("QueryRetrieveLevel", "")).upper()
    if level_name not in CFIND_LEVELS:
        raise QueryError("QueryRetrieveLevel", f"unsupported level {level_name or '(none)'}")
    params: list[tuple[str, str]] = []
    include: list[str] = []
    for element in identifier:
        keyword = element.keyword
        if not keyword or keyword in ("QueryRetrieveLevel", "SpecificCharacterSet") or element.VR == "SQ":
            continue
        text = _element_text(element)
        tag = f"{int(element.tag):08X}"
        if text:
            params.append((keyword, text))
        else:
            include.append(tag)
    if include:
        params.append(("includefield", ",".join(include)))
    return CFIND_LEVELS[level_name], params


def response_identifier(requested: Dataset, result: Mapping[str, Any]) -> Dataset:
    """A C-FIND response identifier: each requested key, valued from a QIDO result if present."""
    found = Dataset.from_json(dict(result))
    out = Dataset()
    for element in requested:
        if element.keyword == "QueryRetrieveLevel":
            out.QueryRetrieveLevel = element.value
            continue
        if element.tag in found:
            out.add(found[element.tag])
        else:
            out.add_new(element.tag, element.VR, None)
    if "SpecificCharacterSet" in found:
        out.SpecificCharacterSet = found.SpecificCharacterSet
    return out


def keyword(tag: str) -> str:
    """``"00100020"`` -> ``"PatientID"`` (for messages)."""
    return keyword_for_tag(int(tag, 16)) or tag
