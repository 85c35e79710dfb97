"""C-FIND, C-GET and C-MOVE SCP answered from the hub's DICOMweb (PS3.4 Annex C).

The channel's pynetdicom threads call :class:`HubQueryRetrieve`'s handlers (generators, as
pynetdicom's ``EVT_C_FIND`` / ``EVT_C_GET`` / ``EVT_C_MOVE`` expect). Each handler runs the
hub request as a coroutine on the agent's loop (``run_coroutine_threadsafe``) and waits in its
own thread for the result, so the loop never blocks and pynetdicom never touches asyncio.

* C-FIND: the identifier becomes one QIDO-RS search (:func:`medagent.dicom.query.qido_from_identifier`);
  each match becomes a response identifier with exactly the requested keys. PATIENT level is
  answered from study results, one response per distinct Patient ID.
* C-GET / C-MOVE: the identifier's UIDs (study, series, SOP instance) select instances with a
  QIDO-RS instance search; each instance is downloaded over WADO-RS to a private temporary file,
  read, deleted, and yielded to pynetdicom, which sends it as a C-STORE sub-operation (on the
  same association for C-GET, on a new one to the destination for C-MOVE). Memory: one
  instance at a time.
* C-MOVE destinations come from the channel's ``moveDestinations`` table (AE title -> host,
  port); an unknown destination is answered 0xA801 (PS3.4 §C.4.2.1.4).

Statuses (PS3.4 Tables C.4-1..3): 0xA900 identifier does not match the information model
(bad level or key), 0xC000-class "unable to process" when the hub cannot be reached (with the
reason in ErrorComment), 0xFE00 on cancel.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import shutil
import tempfile
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import TimeoutError as FutureTimeout
from pathlib import Path
from typing import Any

import aiohttp
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import build_context

from medagent.dicom.hubweb import HubDicomWeb, HubDicomWebError
from medagent.dicom.query import QueryError, qido_from_identifier, response_identifier

__all__ = ["STATUS_BAD_IDENTIFIER", "STATUS_UNABLE", "STATUS_UNKNOWN_DESTINATION", "HubQueryRetrieve"]

log = logging.getLogger("medagent.channels.dicom")

STATUS_PENDING = 0xFF00
STATUS_CANCEL = 0xFE00
STATUS_BAD_IDENTIFIER = 0xA900
STATUS_UNABLE = 0xC001
STATUS_UNKNOWN_DESTINATION = 0xA801


#: what a hub request can fail with (network, HTTP status, timeout, an answer of the wrong shape)
_HUB_TROUBLE = (HubDicomWebError, aiohttp.ClientError, RuntimeError, OSError, ValueError, KeyError, IndexError)


def _failure(status: int, reason: str) -> Dataset:
    ds = Dataset()
    ds.Status = status
    ds.ErrorComment = reason[:64]
    return ds


class HubQueryRetrieve:
    """The Q/R handlers of one channel. ``web`` is None when the agent has no hub client."""

    def __init__(self, loop: asyncio.AbstractEventLoop, web: HubDicomWeb | None, work_dir: Path,
                 move_destinations: Mapping[str, tuple[str, int]], timeout_s: float = 60.0) -> None:
        self.loop = loop
        self.web = web
        self.work_dir = work_dir
        self.move_destinations = move_destinations
        self.timeout_s = timeout_s

    def _run(self, make: Callable[[HubDicomWeb], Any]) -> Any:
        if self.web is None:
            raise RuntimeError("no hub to query")
        future = asyncio.run_coroutine_threadsafe(make(self.web), self.loop)
        try:
            return future.result(self.timeout_s)
        except FutureTimeout:
            future.cancel()
            raise RuntimeError("the hub did not answer in time") from None

    # -- C-FIND -------------------------------------------------------------------------------

    def find(self, identifier: Dataset, is_cancelled: Callable[[], bool]) -> Iterator[tuple[Any, Any]]:
        try:
            level, params = qido_from_identifier(identifier)
        except QueryError as exc:
            yield _failure(STATUS_BAD_IDENTIFIER, str(exc)), None
            return
        try:
            results: list[dict[str, Any]] = self._run(lambda web: web.search(level, params))
        except _HUB_TROUBLE as exc:  # the hub is down, refused, or answered nonsense
            log.warning("C-FIND could not query the hub: %s", exc)
            yield _failure(STATUS_UNABLE, f"hub query failed: {exc}"), None
            return
        patients_seen: set[str] = set()
        patient_level = str(identifier.get("QueryRetrieveLevel", "")).upper() == "PATIENT"
        for result in results:
            if patient_level:
                patient = str(result.get("00100020", {}).get("Value", [""])[0])
                if patient in patients_seen:
                    continue
                patients_seen.add(patient)
            if is_cancelled():
                yield STATUS_CANCEL, None
                return
            yield STATUS_PENDING, response_identifier(identifier, result)

    # -- C-GET / C-MOVE ---------------------------------------------------------------------

    def _locate(self, identifier: Dataset) -> list[dict[str, Any]]:
        params = [(keyword, str(identifier.get(keyword)).replace("\\", ","))
                  for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID")
                  if identifier.get(keyword)]
        if not params:
            raise QueryError("StudyInstanceUID", "a retrieve needs at least one UID key")
        return self._run(lambda web: web.search("instance", params + [("limit", "10000")]))

    def _instances(self, matches: list[dict[str, Any]], is_cancelled: Callable[[], bool]) -> Iterator[tuple[Any, Any]]:
        work = Path(tempfile.mkdtemp(prefix="retrieve-", dir=self.work_dir))
        try:
            for match in matches:
                if is_cancelled():
                    yield STATUS_CANCEL, None
                    return
                url = match["00081190"]["Value"][0]
                try:
                    files = self._run(functools.partial(HubDicomWeb.download, url=url, directory=work))
                    dataset = dcmread(str(files[0]))
                    for path in files:
                        path.unlink(missing_ok=True)
                except _HUB_TROUBLE as exc:
                    log.warning("retrieve: could not fetch an instance from the hub: %s", exc)
                    yield STATUS_UNABLE, None  # counted as a failed sub-operation
                    continue
                yield STATUS_PENDING, dataset
        finally:
            shutil.rmtree(work, ignore_errors=True)

    def get(self, identifier: Dataset, is_cancelled: Callable[[], bool]) -> Iterator[Any]:
        try:
            matches = self._locate(identifier)
        except QueryError as exc:
            yield 0
            yield _failure(STATUS_BAD_IDENTIFIER, str(exc)), None
            return
        except _HUB_TROUBLE as exc:
            log.warning("C-GET could not query the hub: %s", exc)
            yield 0
            return
        yield len(matches)
        yield from self._instances(matches, is_cancelled)

    def move(self, identifier: Dataset, destination: str, is_cancelled: Callable[[], bool]) -> Iterator[Any]:
        address = self.move_destinations.get(destination.strip())
        if address is None:
            log.warning("C-MOVE to unknown destination AE %r refused (not in moveDestinations)", destination)
            yield None, None
            return
        try:
            matches = self._locate(identifier)
        except _HUB_TROUBLE as exc:
            log.warning("C-MOVE could not query the hub: %s", exc)
            yield address[0], address[1]
            yield 0
            return
        # the sub-association proposes each stored (SOP class, transfer syntax) pair as its own
        # context: the acceptor picks one syntax per context (PS3.8 §9.3.2.2)
        pairs = sorted({(match.get("00080016", {}).get("Value", [""])[0],
                         match.get("00083002", {}).get("Value", [ExplicitVRLittleEndian])[0]) for match in matches})
        requested = [build_context(cls, syntax) for cls, syntax in pairs if cls][:128]
        yield address[0], address[1], {"contexts": requested}
        yield len(matches)
        yield from self._instances(matches, is_cancelled)
