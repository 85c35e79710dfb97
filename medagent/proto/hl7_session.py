"""The per-connection HL7 ACK sequencer: which ACK, when, and in what order (selector).

``medagent.proto._hl7session_py`` is the pure-Python specification (its docstring has the theory
of operation and the invariants); ``medagent._fast._hl7session`` is its Cython twin. This module
exports the active one under the public names (``Hl7Session``, ``Slot``, ``Hl7Counters``,
``SequenceCounter``), chosen once through :func:`medagent._compat.load_fast`, so every importer
(the MLLP adapter, the hub, tests, fuzzing) gets the same classes and ``type(x) is Slot`` checks
hold. ``<Name>Py`` and ``<Name>C`` name each twin (``C`` is None in pure mode) for the
differential tests and benchmarks. A session, its slots, its counters and its sequence counter
must come from the same twin (the Cython session only accepts its own counter types).

The result types and helpers below are shared by both twins (defined once, in the pure module).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from medagent._compat import load_fast
from medagent.proto import _hl7session_py as _py
from medagent.proto._hl7session_py import (
    MAX_AWAITED_REPLIES,
    MAX_CONSECUTIVE_FRAMING_ERRORS,
    FramingError,
    Rejected,
    ReplyResult,
    SlotState,
    rewrite_msh_field,
)

__all__ = [
    "MAX_AWAITED_REPLIES",
    "MAX_CONSECUTIVE_FRAMING_ERRORS",
    "FramingError",
    "Hl7Counters",
    "Hl7CountersC",
    "Hl7CountersPy",
    "Hl7Session",
    "Hl7SessionC",
    "Hl7SessionPy",
    "Rejected",
    "ReplyResult",
    "SequenceCounter",
    "SequenceCounterC",
    "SequenceCounterPy",
    "Slot",
    "SlotC",
    "SlotPy",
    "SlotState",
    "rewrite_msh_field",
]

Hl7SessionPy = _py.Hl7Session
SlotPy = _py.Slot
Hl7CountersPy = _py.Hl7Counters
SequenceCounterPy = _py.SequenceCounter

_fast = load_fast("_hl7session")

Hl7SessionC: Any = _fast.Hl7SessionC if _fast is not None else None
SlotC: Any = _fast.SlotC if _fast is not None else None
Hl7CountersC: Any = _fast.Hl7CountersC if _fast is not None else None
SequenceCounterC: Any = _fast.SequenceCounterC if _fast is not None else None

if TYPE_CHECKING:  # type checkers see the specification's classes
    Hl7Session = _py.Hl7Session
    Slot = _py.Slot
    Hl7Counters = _py.Hl7Counters
    SequenceCounter = _py.SequenceCounter
elif _fast is not None:
    Hl7Session, Slot, Hl7Counters, SequenceCounter = Hl7SessionC, SlotC, Hl7CountersC, SequenceCounterC
else:
    Hl7Session, Slot, Hl7Counters, SequenceCounter = Hl7SessionPy, SlotPy, Hl7CountersPy, SequenceCounterPy
