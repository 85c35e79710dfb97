"""The ACK decision table of medagent.proto.ackpolicy, exhaustively over its enums."""

from __future__ import annotations

import itertools

import pytest

from medagent.proto import ackpolicy as p
from medagent.proto.ackpolicy import (
    AckCode,
    AckDecision,
    AckMode,
    AppLevelAck,
    CommitOutcome,
    DuplicateBehavior,
    ReplyAction,
)
from medagent.records import CommitResult

CONDITIONS = ["", "AL", "NE", "ER", "SU", "al", " ne ", "XX"]
MODES = list(AckMode)


# ------------------------------------------------------------------ MSH-15 / MSH-16


@pytest.mark.parametrize(
    "condition,success,expected",
    [
        ("", True, True), ("", False, True), (None, True, True), (None, False, True),
        ("AL", True, True), ("AL", False, True),
        ("NE", True, False), ("NE", False, False),
        ("ER", True, False), ("ER", False, True),
        ("SU", True, True), ("SU", False, False),
        ("su", True, True), (" er ", False, True), ("XX", True, True), ("XX", False, True),
    ],
)
def test_condition_allows(condition: str | None, success: bool, expected: bool) -> None:
    assert p.condition_allows(condition, success) is expected


@pytest.mark.parametrize("code", list(AckCode))
@pytest.mark.parametrize("msh15,msh16", list(itertools.product(CONDITIONS, CONDITIONS)))
def test_ack_allowed_uses_msh15_for_commit_codes_and_msh16_for_application_codes(
    code: AckCode, msh15: str, msh16: str
) -> None:
    success = code in (AckCode.AA, AckCode.CA)
    governing = msh15 if code in p.COMMIT_CODES else msh16
    assert p.ack_allowed(code, msh15, msh16) is p.condition_allows(governing, success)
    # the accept acknowledgment (FAST's and IMMEDIATE's own answers) follows MSH-15 whatever its code
    assert p.ack_allowed(code, msh15, msh16, accept_level=True) is p.condition_allows(msh15, success)


def test_accept_level_modes() -> None:
    assert {m for m in AckMode if p.is_accept_level(m)} == {AckMode.FAST, AckMode.IMMEDIATE, AckMode.TWO_PHASE}


@pytest.mark.parametrize("mode", [AckMode.FAST, AckMode.IMMEDIATE])
def test_defect2_accept_al_application_ne_gets_its_aa(mode: AckMode) -> None:
    """Issue 13 defect 2: MSH-15=AL, MSH-16=NE asks for the accept ACK; FAST/IMMEDIATE's AA is it."""
    if mode is AckMode.FAST:
        assert p.commit_ack(mode, CommitOutcome.STORED, None, "AL", "NE") == AckDecision(AckCode.AA)
        assert p.commit_ack(mode, CommitOutcome.STORED, None, "NE", "AL") is None
    else:
        assert p.receipt_ack(mode, "AL", "NE") == AckDecision(AckCode.AA)
        assert p.receipt_ack(mode, "NE", "AL") is None


# ------------------------------------------------------------------ commit classification


@pytest.mark.parametrize("behavior", list(DuplicateBehavior))
def test_classify_commit(behavior: DuplicateBehavior) -> None:
    assert p.classify_commit(CommitResult(1), behavior) is CommitOutcome.STORED
    assert p.classify_commit(CommitResult(None, None, "storage error: disk full"), behavior) is CommitOutcome.FAILED
    assert p.classify_commit(CommitResult(None, 7), behavior) is CommitOutcome.DUPLICATE_DROPPED
    flagged = p.classify_commit(CommitResult(9, 7), behavior)
    expected = CommitOutcome.DUPLICATE_FLAGGED if behavior is DuplicateBehavior.REJECT else CommitOutcome.STORED
    assert flagged is expected


# ------------------------------------------------------------------ receipt / commit table

# (mode, outcome) -> the decision before MSH-15/16 gating (None: nothing at this point)
COMMIT_TABLE: dict[tuple[AckMode, CommitOutcome], AckDecision | None] = {
    (AckMode.FAST, CommitOutcome.STORED): AckDecision(AckCode.AA),
    (AckMode.FAST, CommitOutcome.FAILED): AckDecision(AckCode.CE, "storage error: x", "storage error: x"),
    (AckMode.FAST, CommitOutcome.DUPLICATE_DROPPED): AckDecision(AckCode.AA, p.DUPLICATE_DROPPED_TEXT),
    (AckMode.FAST, CommitOutcome.DUPLICATE_FLAGGED):
        AckDecision(AckCode.AR, p.DUPLICATE_REJECTED_TEXT, p.DUPLICATE_REJECTED_TEXT),
    (AckMode.TWO_PHASE, CommitOutcome.STORED): AckDecision(AckCode.CA),
    (AckMode.TWO_PHASE, CommitOutcome.FAILED): AckDecision(AckCode.CE, "storage error: x", "storage error: x"),
    (AckMode.TWO_PHASE, CommitOutcome.DUPLICATE_DROPPED): AckDecision(AckCode.CA, p.DUPLICATE_DROPPED_TEXT),
    (AckMode.TWO_PHASE, CommitOutcome.DUPLICATE_FLAGGED):
        AckDecision(AckCode.CR, p.DUPLICATE_REJECTED_TEXT, p.DUPLICATE_REJECTED_TEXT),
    (AckMode.ORIGINAL, CommitOutcome.STORED): None,
    (AckMode.ORIGINAL, CommitOutcome.FAILED): AckDecision(AckCode.AE, "storage error: x", "storage error: x"),
    (AckMode.ORIGINAL, CommitOutcome.DUPLICATE_DROPPED): AckDecision(AckCode.AA, p.DUPLICATE_DROPPED_TEXT),
    (AckMode.ORIGINAL, CommitOutcome.DUPLICATE_FLAGGED):
        AckDecision(AckCode.AR, p.DUPLICATE_REJECTED_TEXT, p.DUPLICATE_REJECTED_TEXT),
    **{(AckMode.IMMEDIATE, outcome): None for outcome in CommitOutcome},
}


def test_commit_table_is_complete() -> None:
    assert set(COMMIT_TABLE) == set(itertools.product(AckMode, CommitOutcome))


@pytest.mark.parametrize("mode,outcome", list(COMMIT_TABLE))
@pytest.mark.parametrize("msh15,msh16", list(itertools.product(CONDITIONS[:5], CONDITIONS[:5])))
def test_commit_ack(mode: AckMode, outcome: CommitOutcome, msh15: str, msh16: str) -> None:
    reason = "storage error: x" if outcome is CommitOutcome.FAILED else None
    expected = COMMIT_TABLE[(mode, outcome)]
    accept_level = mode is not AckMode.ORIGINAL
    if expected is not None and not p.ack_allowed(expected.code, msh15, msh16, accept_level=accept_level):
        expected = None
    assert p.commit_ack(mode, outcome, reason, msh15, msh16) == expected


@pytest.mark.parametrize("mode", MODES)
def test_storage_error_is_never_positive(mode: AckMode) -> None:
    for msh15, msh16 in itertools.product(CONDITIONS, CONDITIONS):
        decision = p.commit_ack(mode, CommitOutcome.FAILED, "storage error: disk full", msh15, msh16)
        assert decision is None or decision.code not in (AckCode.AA, AckCode.CA)
        if decision is not None:
            assert decision.text == "storage error: disk full"


def test_storage_error_without_reason_still_says_so() -> None:
    decision = p.commit_ack(AckMode.FAST, CommitOutcome.FAILED, None, "", "")
    assert decision == AckDecision(AckCode.CE, "storage error", "storage error")


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("msh15,msh16", list(itertools.product(CONDITIONS[:5], CONDITIONS[:5])))
def test_receipt_ack(mode: AckMode, msh15: str, msh16: str) -> None:
    decision = p.receipt_ack(mode, msh15, msh16)
    if mode is AckMode.IMMEDIATE and p.condition_allows(msh15, True):  # the accept ACK: MSH-15
        assert decision == AckDecision(AckCode.AA)
    else:
        assert decision is None


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("msh15,msh16", list(itertools.product(CONDITIONS[:5], CONDITIONS[:5])))
def test_reject_ack(mode: AckMode, msh15: str, msh16: str) -> None:
    decision = p.reject_ack(mode, "unknown character set", msh15, msh16)
    code = AckCode.CR if mode is AckMode.TWO_PHASE else AckCode.AR
    governing = msh16 if mode is AckMode.ORIGINAL else msh15  # ORIGINAL has no accept level
    if p.condition_allows(governing, False):
        assert decision == AckDecision(code, "unknown character set", "unknown character set")
    else:
        assert decision is None


@pytest.mark.parametrize("msh16", CONDITIONS)
def test_timeout_ack(msh16: str) -> None:
    decision = p.timeout_ack(2.5, "NE", msh16)
    if p.condition_allows(msh16, False):
        assert decision == AckDecision(AckCode.AR, "no response from hub within 2.5 s", "no response from hub within 2.5 s")
    else:
        assert decision is None


def test_awaits_hub_reply() -> None:
    assert {m for m in AckMode if p.awaits_hub_reply(m)} == {AckMode.ORIGINAL, AckMode.TWO_PHASE}


# ------------------------------------------------------------------ replies


@pytest.mark.parametrize(
    "text,expected",
    [
        ("MSH|^~\\&|A|B\rMSA|AA|123|OK\r", (True, "AA", "123")),
        ("\ufeff\r\nMSH|^~\\&|A\nMSA|ce|9\n", (True, "ce", "9")),
        ("MSH#^~\\&#A\rMSA#AR#77#bad#x\r", (True, "AR", "77")),
        ("MSH|^~\\&|A\rPID|1\r", (True, None, None)),
        ("MSH|^~\\&|A\rMSA|\r", (True, "", "")),
        ("MSH|^~\\&|A\rMSA\r", (True, None, None)),
        ("MSH1abc", (False, None, None)),
        ("error: bot crashed", (False, None, None)),
        ("", (False, None, None)),
    ],
)
def test_classify_reply_reads_the_msa_with_parse_ack(text: str, expected: tuple[bool, str | None, str | None]) -> None:
    """The MSA reading itself is proto.hl7.parse_ack's (tests/proto/test_hl7_ack.py)."""
    is_hl7, code, _ = expected
    assert p.classify_reply(text) == (is_hl7, p.parse_ack_code(code))


def test_classify_reply_and_parse_ack_code() -> None:
    assert p.classify_reply("MSH|^~\\&\rMSA|AE|1\r") == (True, AckCode.AE)
    assert p.classify_reply("MSH|^~\\&\rMSA|ZZ|1\r") == (True, None)
    assert p.classify_reply("plain text") == (False, None)
    assert p.parse_ack_code(" ca ") is AckCode.CA
    assert p.parse_ack_code(None) is None


def _app_level_allows(setting: AppLevelAck, code: AckCode) -> bool:
    return {
        AppLevelAck.AL: True,
        AppLevelAck.NE: False,
        AppLevelAck.ER: code is not AckCode.AA,
        AppLevelAck.SU: code is AckCode.AA,
    }[setting]


REPLY_KINDS = [
    # (is_hl7, code)
    (True, AckCode.AA), (True, AckCode.AE), (True, AckCode.AR),
    (True, AckCode.CA), (True, AckCode.CE), (True, AckCode.CR),
    (True, None), (False, None),
]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("app_level", list(AppLevelAck))
@pytest.mark.parametrize("status", [200, 400, 500])
@pytest.mark.parametrize("is_hl7,code", REPLY_KINDS)
@pytest.mark.parametrize("msh16", ["", "AL", "NE", "ER", "SU"])
def test_reply_decision_table(
    mode: AckMode, app_level: AppLevelAck, status: int, is_hl7: bool, code: AckCode | None, msh16: str
) -> None:
    decision = p.reply_decision(mode, app_level, status, is_hl7, code, msh16, None if is_hl7 else "bot failed")
    if mode in (AckMode.FAST, AckMode.IMMEDIATE):
        assert decision.action is ReplyAction.SUPPRESS_MODE
        assert not decision.writes
        return
    if is_hl7 and code not in p.APPLICATION_CODES:
        assert decision.action is ReplyAction.FORWARD  # non-AA/AE/AR bodies are always forwarded
        return
    effective = code if is_hl7 else AckCode.AE
    assert effective is not None
    allowed = p.condition_allows(msh16, effective is AckCode.AA)
    if mode is AckMode.TWO_PHASE:
        allowed = allowed and _app_level_allows(app_level, effective)
    if not allowed:
        assert decision.action is ReplyAction.SUPPRESS_FILTERED
    elif is_hl7:
        assert decision.action is ReplyAction.FORWARD
    else:
        assert decision.action is ReplyAction.BUILD_AE
        assert decision.text == ("bot failed" if status >= 400 else "the hub's reply is not an HL7 v2 message")
        assert decision.writes


def test_reply_error_without_text_names_the_status() -> None:
    decision = p.reply_decision(AckMode.ORIGINAL, AppLevelAck.AL, 502, False, None, "", "  ")
    assert decision == p.ReplyDecision(ReplyAction.BUILD_AE, "hub error (status 502)")
