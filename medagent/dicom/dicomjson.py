"""PS3.18 §F.2 DICOM JSON of a dataset, without bulk data.

The agent's transmit body (Medplum's ``dataset`` field) and the hub's QIDO-RS / ``/metadata``
answers carry a dataset as tag-keyed DICOM JSON (``{"0020000D": {"vr": "UI", "Value": [...]}}``)
*without bulk data*: Pixel Data and its float/double twins, and any other binary-VR element
(OB/OD/OF/OL/OV/OW/UN) longer than :data:`INLINE_BINARY_LIMIT`, are left out entirely (Medplum
deletes ``7FE00010``; PS3.18 would allow BulkDataURIs, which a bot cannot fetch anyway). Short
binary values stay as ``InlineBinary``.

Invariant: a bulk element's value is never read. Headers come from
:func:`medagent.dicom.files.read_header`, which defers large values; this module decides on the
*raw* element's length (``get_item(keep_deferred=True)``, so nothing deferred is loaded).
"""

from __future__ import annotations

from typing import Any

from pydicom.datadict import dictionary_VR
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

__all__ = ["BULK_TAGS", "INLINE_BINARY_LIMIT", "dataset_json", "without_bulk_data"]

#: Binary values up to this size stay inline (file meta version, small LUTs); longer are bulk.
INLINE_BINARY_LIMIT = 1024
#: Pixel Data, Float Pixel Data, Double Float Pixel Data: always bulk (PS3.18 §8.7.4.1).
BULK_TAGS = frozenset({0x7FE00010, 0x7FE00008, 0x7FE00009})
_BINARY_VRS = frozenset({"OB", "OD", "OF", "OL", "OV", "OW", "UN", "OB or OW", "US or OW", "US or SS or OW"})


def _vr(tag: int, raw_vr: str | None) -> str:
    if raw_vr:
        return raw_vr
    try:
        return dictionary_VR(tag)
    except KeyError:  # private or unknown tag read with implicit VR: treat as UN
        return "UN"


def _is_bulk(tag: int, vr: str, length: int | None) -> bool:
    if tag in BULK_TAGS:
        return True
    # undefined length (0xFFFFFFFF) on a binary VR is encapsulated data: bulk
    return vr in _BINARY_VRS and (length is None or length > INLINE_BINARY_LIMIT)


def without_bulk_data(dataset: Dataset) -> Dataset:
    """A copy of ``dataset`` (recursing into sequences) with every bulk element removed."""
    out = Dataset()
    for key in sorted(dataset.keys()):
        # keep_deferred: a deferred (large) value is not read just to learn it is bulk
        element = dataset.get_item(key, keep_deferred=True)
        tag = int(element.tag)
        if isinstance(element, RawDataElement):
            vr = _vr(tag, element.VR)
            if _is_bulk(tag, vr, element.length):
                continue
            converted = dataset[element.tag]
        else:
            vr = element.VR
            length = len(element.value) if isinstance(element.value, bytes | bytearray) else 0
            if _is_bulk(tag, vr, length):
                continue
            converted = element
        if converted.VR == "SQ":
            items = [without_bulk_data(item) for item in converted.value]
            out.add_new(converted.tag, "SQ", Sequence(items))
        else:
            out.add(converted)
    return out


def dataset_json(dataset: Dataset) -> dict[str, Any]:
    """Tag-keyed PS3.18 DICOM JSON of ``dataset`` without bulk data (file meta not included)."""
    return without_bulk_data(dataset).to_json_dict(bulk_data_threshold=INLINE_BINARY_LIMIT)
