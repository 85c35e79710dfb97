"""DICOM UID syntax (PS3.5 §9.1) and names for transfer syntaxes in endpoint parameters.

A UID is 1..64 characters of digits and dots, components without leading zeros (except "0").
UIDs are used as file names by the hub's store, so :func:`is_uid` is also the guard that keeps
a request path from naming anything outside the store.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from types import MappingProxyType

__all__ = ["TRANSFER_SYNTAX_NAMES", "is_uid", "transfer_syntax_uid"]

_UID = re.compile(r"(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*")


def is_uid(value: str) -> bool:
    """True for a syntactically valid DICOM UID (PS3.5 §9.1)."""
    return 0 < len(value) <= 64 and _UID.fullmatch(value) is not None


#: Short names accepted in ``transferSyntaxes=`` besides the UIDs themselves (PS3.6 Annex A).
TRANSFER_SYNTAX_NAMES: Mapping[str, str] = MappingProxyType({
    "implicit-le": "1.2.840.10008.1.2",
    "explicit-le": "1.2.840.10008.1.2.1",
    "deflated-le": "1.2.840.10008.1.2.1.99",
    "explicit-be": "1.2.840.10008.1.2.2",
    "jpeg-baseline": "1.2.840.10008.1.2.4.50",
    "jpeg-extended": "1.2.840.10008.1.2.4.51",
    "jpeg-lossless": "1.2.840.10008.1.2.4.57",
    "jpeg-lossless-sv1": "1.2.840.10008.1.2.4.70",
    "jpeg-ls-lossless": "1.2.840.10008.1.2.4.80",
    "jpeg-ls": "1.2.840.10008.1.2.4.81",
    "jpeg2000-lossless": "1.2.840.10008.1.2.4.90",
    "jpeg2000": "1.2.840.10008.1.2.4.91",
    "rle": "1.2.840.10008.1.2.5",
})


def transfer_syntax_uid(name: str) -> str | None:
    """The UID for a configured transfer syntax (a name above or a UID), None if neither."""
    uid = TRANSFER_SYNTAX_NAMES.get(name.strip().lower(), name.strip())
    return uid if is_uid(uid) else None
