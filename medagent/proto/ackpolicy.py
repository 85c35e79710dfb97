"""Which acknowledgment an inbound HL7 channel sends, and when: pure decision rules, no I/O.

Theory of operation
-------------------
The per-connection ACK sequencer (:mod:`medagent.proto.hl7_session`, driven by the MLLP
listener :mod:`medagent.channels.hl7`) meets five events per message and asks this module what
to answer each time; the answer is an :class:`AckDecision` (MSA-1 code, MSA-3
text, ERR text) or ``None`` for "send nothing now". Building and writing the bytes is the
adapter's job (``proto.hl7.build_ack``), deciding is done here so that the whole table can be
tested exhaustively without sockets.

=============  ===================================================================
event          function
=============  ===================================================================
receipt        :func:`receipt_ack`      only ``IMMEDIATE`` answers here (AA before storage)
commit         :func:`commit_ack`       the queue's :class:`~medagent.records.CommitResult`
reject         :func:`reject_ack`       undecodable text, unknown charset, oversize frame
timeout        :func:`timeout_ack`      ``ORIGINAL`` only: no hub reply in time
hub reply      :func:`reply_decision`   the bot's ``agent:transmit:response``
=============  ===================================================================

Modes (DESIGN.md "ACK modes and durability", medplum-protocol.md §4.3):

* ``FAST``: stored, then **AA**. A storage error gives **CE** with the reason, never AA. The
  bot's later reply is suppressed.
* ``TWO_PHASE``: stored, then **CA** (storage error: **CE**); the bot's AA/AE/AR is forwarded
  when ``appLevelAck`` lets it through (AL all, NE none, ER only AE/AR, SU only AA). A reply
  body that is not an AA/AE/AR acknowledgment is always forwarded (Medplum §4.3).
* ``ORIGINAL``: stored, then nothing until the bot's reply, which *is* the ACK. A storage
  error gives **AE** with the reason. A hub error (statusCode >= 400) whose body is HL7 is
  forwarded; a non-HL7 body (an error text, or anything that is not HL7 v2) is replaced by an
  **AE** built from the original message with that text. No reply in ``response_timeout_s``
  gives **AR** "no response from hub within N s"; the message stays queued and is still
  delivered, and the late reply is discarded (the adapter counts it).
* ``IMMEDIATE``: **AA** on receipt, before anything is stored (opt-in; promises nothing).
  The bot's later reply is suppressed.

Duplicates (the queue detects by (channel, sender, MSH-10, body digest) inside its window; a
reused MSH-10 with other content is a new message, stored and delivered, and only counted:
``CommitResult.control_id_reused``; see ``DuplicateBehavior``):

* ``DROP``: the earlier copy is durable, so the message *is* stored: the sender gets the
  positive answer of its mode with MSA-3 ``"duplicate: already received"`` (FAST and ORIGINAL:
  AA, since no bot reply will come for a dropped copy; TWO_PHASE: CA, and no app ACK follows).
* ``REJECT``: a flagged duplicate gets **CR** (TWO_PHASE) or **AR** (other modes) with MSA-3
  ``"duplicate of an earlier message (same MSH-10 and content)"``. The row is kept, flagged.
* ``FLAG`` / ``OFF``: a flagged duplicate is acknowledged like any stored message (the hub sees
  ``duplicate_of`` and decides).

Rejections: undecodable text, an unknown MSH-18 charset or an oversize frame with a readable
MSH get **CR** in TWO_PHASE and **AR** otherwise, the reason in MSA-3 and ERR; nothing is stored.

MSH-15 / MSH-16 (HL7 v2.5 ch. 2, 2.9.3 "Enhanced acknowledgment mode", table 0155): an
*accept* acknowledgment answers "I have taken responsibility for the message" and obeys MSH-15
*accept acknowledgment type*; an *application* acknowledgment answers "the receiving
application processed it" and obeys MSH-16 *application acknowledgment type*
(DESIGN.md "ACK modes and durability"; defect 2 of issue 13):

* every commit code (CA/CE/CR) is an accept acknowledgment;
* in FAST and IMMEDIATE modes the channel's own answer (Medplum's ``enhanced=aa`` AA after
  commit, the immediate AA, and the AR/CE for duplicates, rejections and storage errors) is
  the accept acknowledgment: it stands for the commit, so it obeys MSH-15. A sender with
  MSH-15 = AL and MSH-16 = NE gets its AA;
* in ORIGINAL mode there is no accept level: the channel's AE/AR (storage error, rejection,
  duplicate, timeout) and the bot's reply are application acknowledgments (MSH-16);
* the bot's AA/AE/AR in TWO_PHASE and ORIGINAL obeys MSH-16.

====== ==============================================
value  send the ACK when
====== ==============================================
AL     always; also when the field is empty or absent
NE     never
ER     only for an error (CE/CR, AE/AR)
SU     only for success (CA, AA)
====== ==============================================

An unrecognised value is treated as AL (answering is safer than a sender waiting for ever).
In TWO_PHASE both the channel's ``appLevelAck`` and MSH-16 must allow a bot AA/AE/AR.

Invariants
----------
* No storage error ever yields AA or CA; no rejection ever yields a positive code.
* FAST and IMMEDIATE never forward a bot reply; ORIGINAL never sends a commit ACK (CA/CE/CR).
* Every function is total over its enums and deterministic; nothing here does I/O or logs.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Final

from medagent.proto.hl7 import Hl7Error, parse_ack
from medagent.records import CommitResult

__all__ = [
    "APPLICATION_CODES",
    "COMMIT_CODES",
    "DUPLICATE_DROPPED_TEXT",
    "DUPLICATE_REJECTED_TEXT",
    "AckCode",
    "AckDecision",
    "AckMode",
    "AppLevelAck",
    "CommitOutcome",
    "DuplicateBehavior",
    "ReplyAction",
    "ReplyDecision",
    "ack_allowed",
    "awaits_hub_reply",
    "classify_commit",
    "classify_reply",
    "commit_ack",
    "condition_allows",
    "parse_ack_code",
    "receipt_ack",
    "reject_ack",
    "reply_decision",
    "timeout_ack",
]


class AckMode(enum.Enum):
    """What the channel sends the device, and when (DESIGN.md ACK mode table)."""

    ORIGINAL = "original"
    TWO_PHASE = "two-phase"
    FAST = "fast"
    IMMEDIATE = "immediate"


class AppLevelAck(enum.Enum):
    """Which bot application ACKs reach the device in two-phase mode (MSH-16 semantics).

    AL: all; NE: none; ER: only AE/AR; SU: only AA. Ignored in the other modes.
    """

    AL = "AL"
    NE = "NE"
    ER = "ER"
    SU = "SU"


class DuplicateBehavior(enum.Enum):
    """What a channel does with a message whose dedup key (channel, sender, MSH-10, body
    digest) was seen recently.

    FLAG: store it flagged and acknowledge it like any message (the hub decides); Medplum calls
    this ``idempotent``, accepted as an alias. REJECT: a flagged duplicate gets CR/AR. DROP: a
    duplicate is acknowledged again but neither stored nor forwarded. OFF: no detection.
    """

    FLAG = "flag"
    DROP = "drop"
    REJECT = "reject"
    OFF = "off"

    @classmethod
    def _missing_(cls, value: object) -> DuplicateBehavior | None:
        if isinstance(value, str) and value.lower() == "idempotent":
            return cls.FLAG
        return None


class AckCode(enum.Enum):
    """MSA-1 acknowledgment codes (HL7 table 0008)."""

    AA = "AA"
    AE = "AE"
    AR = "AR"
    CA = "CA"
    CE = "CE"
    CR = "CR"


#: Codes of the accept (commit) level, governed by MSH-15.
COMMIT_CODES: Final = frozenset({AckCode.CA, AckCode.CE, AckCode.CR})
#: Codes of the application level, governed by MSH-16.
APPLICATION_CODES: Final = frozenset({AckCode.AA, AckCode.AE, AckCode.AR})
_SUCCESS_CODES: Final = frozenset({AckCode.AA, AckCode.CA})
_CODE_BY_TEXT: Final = {code.value: code for code in AckCode}

DUPLICATE_DROPPED_TEXT: Final = "duplicate: already received"
DUPLICATE_REJECTED_TEXT: Final = "duplicate of an earlier message (same MSH-10 and content)"


@dataclass(frozen=True, slots=True)
class AckDecision:
    """An ACK to send: MSA-1 `code`, MSA-3 `text` (None: the standard text), ERR `error`."""

    code: AckCode
    text: str | None = None
    error: str | None = None


_AA: Final = AckDecision(AckCode.AA)  # shared: decisions are frozen
_CA: Final = AckDecision(AckCode.CA)


class CommitOutcome(enum.Enum):
    """What the queue did with a message, as far as the ACK is concerned."""

    STORED = "stored"
    DUPLICATE_DROPPED = "duplicate-dropped"
    DUPLICATE_FLAGGED = "duplicate-flagged"
    FAILED = "failed"

    # Identity hash (members are singletons and compare by identity): Enum's own __hash__ is a
    # Python call, and the HL7 session hashes an outcome per committed message (its ACK memo).
    __hash__ = object.__hash__


class ReplyAction(enum.Enum):
    """What to do with the bot's reply to an inbound message."""

    FORWARD = "forward"  # write the reply body to the device as is
    BUILD_AE = "build-ae"  # write an AE built from the original message, reason in `text`
    SUPPRESS_MODE = "suppress-mode"  # the mode never forwards bot replies (FAST, IMMEDIATE)
    SUPPRESS_FILTERED = "suppress-filtered"  # appLevelAck or MSH-16 filtered it out


@dataclass(frozen=True, slots=True)
class ReplyDecision:
    """The answer of :func:`reply_decision`; `text` is the AE reason for BUILD_AE."""

    action: ReplyAction
    text: str | None = None

    @property
    def writes(self) -> bool:
        """True when something goes to the device."""
        return self.action is ReplyAction.FORWARD or self.action is ReplyAction.BUILD_AE


# --------------------------------------------------------------------------- conditions


def condition_allows(condition: str | None, success: bool) -> bool:
    """Whether an MSH-15/MSH-16 value (AL/NE/ER/SU; empty = AL) lets an ACK of that outcome out."""
    if not condition:
        return True
    value = condition.strip().upper()
    if value == "NE":
        return False
    if value == "ER":
        return not success
    if value == "SU":
        return success
    return True  # AL, empty after strip, or unrecognised


def ack_allowed(code: AckCode, accept_ack_type: str | None, app_ack_type: str | None, *,
                accept_level: bool = False) -> bool:
    """Whether the sender's MSH-15 or MSH-16 allows `code`.

    MSH-15 governs commit codes and any ACK that is the accept acknowledgment
    (``accept_level``: the channel's own answer in FAST/IMMEDIATE mode); MSH-16 the others.
    """
    condition = accept_ack_type if accept_level or code in COMMIT_CODES else app_ack_type
    return condition_allows(condition, code in _SUCCESS_CODES)


def is_accept_level(mode: AckMode) -> bool:
    """True when the channel's own answers in `mode` are accept acknowledgments (MSH-15).

    FAST's AA and IMMEDIATE's AA stand for the commit (HL7 v2.5 2.9.3); TWO_PHASE answers with
    commit codes anyway; ORIGINAL has only application acknowledgments.
    """
    return mode is not AckMode.ORIGINAL


def _gated(decision: AckDecision, mode: AckMode, accept_ack_type: str | None,
           app_ack_type: str | None) -> AckDecision | None:
    """`decision` when MSH-15/16 let it out: ``ack_allowed(..., accept_level=is_accept_level(mode))``,
    inlined because it runs once per message (an empty condition is AL: no table lookup)."""
    code = decision.code
    condition = accept_ack_type if mode is not AckMode.ORIGINAL or code in COMMIT_CODES else app_ack_type
    if not condition:
        return decision
    return decision if condition_allows(condition, code in _SUCCESS_CODES) else None


def _app_level_allows(setting: AppLevelAck, code: AckCode) -> bool:
    if setting is AppLevelAck.NE:
        return False
    if setting is AppLevelAck.ER:
        return code is not AckCode.AA
    if setting is AppLevelAck.SU:
        return code is AckCode.AA
    return True


# --------------------------------------------------------------------------- events


def classify_commit(result: CommitResult, duplicate_behavior: DuplicateBehavior) -> CommitOutcome:
    """Map a queue CommitResult to what matters for the ACK.

    A flagged duplicate only counts as such when the channel rejects duplicates (REJECT);
    under FLAG/OFF it is an ordinary stored message.
    """
    if result.error is not None:
        return CommitOutcome.FAILED
    if result.row_id is None:
        return CommitOutcome.DUPLICATE_DROPPED
    if result.duplicate_of is not None and duplicate_behavior is DuplicateBehavior.REJECT:
        return CommitOutcome.DUPLICATE_FLAGGED
    return CommitOutcome.STORED


def awaits_hub_reply(mode: AckMode) -> bool:
    """True when the bot's reply decides the device's (final) ACK: ORIGINAL and TWO_PHASE."""
    return mode is AckMode.ORIGINAL or mode is AckMode.TWO_PHASE


def receipt_ack(mode: AckMode, accept_ack_type: str | None, app_ack_type: str | None) -> AckDecision | None:
    """ACK written as soon as a valid message is parsed: AA in IMMEDIATE mode, else nothing."""
    if mode is not AckMode.IMMEDIATE:
        return None
    return _gated(_AA, mode, accept_ack_type, app_ack_type)


def _reject_code(mode: AckMode) -> AckCode:
    return AckCode.CR if mode is AckMode.TWO_PHASE else AckCode.AR


def commit_ack(
    mode: AckMode,
    outcome: CommitOutcome,
    reason: str | None,
    accept_ack_type: str | None,
    app_ack_type: str | None,
) -> AckDecision | None:
    """ACK written when the queue reports the commit of a message (not called in IMMEDIATE).

    `reason` is the CommitResult's error text (FAILED only); it goes into MSA-3 and ERR.
    """
    if mode is AckMode.IMMEDIATE:
        return None
    if outcome is CommitOutcome.FAILED:
        text = reason or "storage error"
        code = AckCode.AE if mode is AckMode.ORIGINAL else AckCode.CE
        decision = AckDecision(code, text, text)
    elif outcome is CommitOutcome.DUPLICATE_FLAGGED:
        decision = AckDecision(_reject_code(mode), DUPLICATE_REJECTED_TEXT, DUPLICATE_REJECTED_TEXT)
    elif outcome is CommitOutcome.DUPLICATE_DROPPED:
        code = AckCode.CA if mode is AckMode.TWO_PHASE else AckCode.AA
        decision = AckDecision(code, DUPLICATE_DROPPED_TEXT)
    elif mode is AckMode.FAST:
        decision = _AA
    elif mode is AckMode.TWO_PHASE:
        decision = _CA
    else:  # ORIGINAL, stored: the bot's reply is the ACK
        return None
    return _gated(decision, mode, accept_ack_type, app_ack_type)


def reject_ack(
    mode: AckMode, reason: str, accept_ack_type: str | None, app_ack_type: str | None
) -> AckDecision | None:
    """ACK for a message refused before storage (undecodable, unknown charset, oversize)."""
    return _gated(AckDecision(_reject_code(mode), reason, reason), mode, accept_ack_type, app_ack_type)


def timeout_ack(timeout_s: float, accept_ack_type: str | None, app_ack_type: str | None) -> AckDecision | None:
    """ORIGINAL mode: the AR sent when the hub did not answer within `timeout_s` seconds."""
    text = f"no response from hub within {timeout_s:g} s"
    return _gated(AckDecision(AckCode.AR, text, text), AckMode.ORIGINAL, accept_ack_type, app_ack_type)


def parse_ack_code(text: str | None) -> AckCode | None:
    """The AckCode for an MSA-1 value, or None when absent or not one of the six codes."""
    if text is None:
        return None
    return _CODE_BY_TEXT.get(text.strip().upper())


def classify_reply(text: str) -> tuple[bool, AckCode | None]:
    """(is the bot's reply an HL7 v2 message, its MSA-1 as an AckCode or None).

    HL7 means a readable MSH (``proto.hl7.parse_ack``: after an optional BOM and whitespace,
    ``MSH`` and a punctuation field separator); the code is that of its first MSA segment.
    """
    try:
        info = parse_ack(text)
    except Hl7Error:
        return False, None
    return True, (None if info is None else parse_ack_code(info.code))


# The decisions without a text, built once: reply_decision runs once per routed reply, and a
# frozen dataclass costs ~1 us to build (immutable, so sharing them is safe).
_FORWARD: Final = ReplyDecision(ReplyAction.FORWARD)
_SUPPRESS_MODE: Final = ReplyDecision(ReplyAction.SUPPRESS_MODE)
_SUPPRESS_FILTERED: Final = ReplyDecision(ReplyAction.SUPPRESS_FILTERED)


def reply_decision(
    mode: AckMode,
    app_level_ack: AppLevelAck,
    status_code: int,
    is_hl7: bool,
    reply_code: AckCode | None,
    app_ack_type: str | None,
    error_text: str | None = None,
) -> ReplyDecision:
    """What to do with the bot's reply (``agent:transmit:response``) to an inbound message.

    `is_hl7`: the body starts with an MSH segment. `reply_code`: its MSA-1 when it is an
    acknowledgment (None otherwise). `error_text`: the body when it is not HL7 (for the AE).
    Lateness (ORIGINAL reply after the timeout AR) is the adapter's state, not decided here.
    """
    if mode is AckMode.FAST or mode is AckMode.IMMEDIATE:
        return _SUPPRESS_MODE
    if not is_hl7:
        if status_code >= 400:
            text = (error_text or "").strip() or f"hub error (status {status_code})"
        else:
            text = "the hub's reply is not an HL7 v2 message"
        code = AckCode.AE
        action = ReplyDecision(ReplyAction.BUILD_AE, text)
    elif reply_code in APPLICATION_CODES:
        assert reply_code is not None
        code = reply_code
        action = _FORWARD
    else:
        return _FORWARD  # not an AA/AE/AR: always forwarded
    if mode is AckMode.TWO_PHASE and not _app_level_allows(app_level_ack, code):
        return _SUPPRESS_FILTERED
    if not condition_allows(app_ack_type, code is AckCode.AA):
        return _SUPPRESS_FILTERED
    return action
