"""The ``dicom://`` channel kind: a DICOM SCP (pynetdicom) that queues instances by file reference.

Theory of operation
-------------------
One pynetdicom ``AE`` per channel listens on the endpoint (or a handed-over socket) in its own
threads. Those threads never touch asyncio except through ``loop.call_soon_threadsafe`` and
``asyncio.run_coroutine_threadsafe``; they block *themselves* while the loop does the work, so
the loop never waits for them.

* C-ECHO (PS3.4 Annex A): Success.
* C-STORE (PS3.4 Annex B): pynetdicom's file-backed receive (``_config.STORE_RECV_CHUNKED_DATASET``)
  writes the dataset to a Part 10 temporary file as the P-DATA PDUs arrive, so an instance never
  sits in memory. The handler moves that file into ``<data_dir>/spool/<channel>/`` (a rename, or
  a streamed copy across file systems; fsynced with ``fsync=true``), reads its header (no pixel data), builds the
  transmit body (Medplum's ``{association, dataset}`` plus our ``instance``), and submits an
  :class:`~medagent.records.InboundRecord` with a :class:`~medagent.records.FilePayload` to the
  sink (durable). It answers **Success only after the queue's commit callback reports ok**.
  A failed move (disk full) or commit answers 0xA700 "Out of resources" with an ErrorComment; an
  unreadable dataset 0xC000 "Cannot understand"; the spool file is removed in both cases (nothing
  was accepted). A duplicate (same calling AE, SOP Instance UID and content) is answered Success
  and its new file removed: the earlier copy is durable.
* C-FIND / C-GET / C-MOVE (PS3.4 Annex C): answered from the hub's DICOMweb
  (:mod:`medagent.dicom.retrieve`), when the runtime gives the channel a hub client.
* Delivery: the runtime's dispatcher calls the file uploader registered for
  ``application/dicom`` (:mod:`medagent.dicom.upload`) before it sends the transmit.

Association policy: ``aet`` set -> the called AE title must equal it (else rejected, PS3.8
§9.3.4 reason 7); unset -> any called AE is accepted, as Medplum does. ``callingAets`` set ->
only those calling AE titles (reason 3). Every storage SOP class pynetdicom knows is accepted in
every transfer syntax it knows (compressed ones included) unless ``transferSyntaxes`` narrows it.

Invariants: Success is never sent for an instance that is not committed; a spool file exists
only while the queue owns it or the handler is still deciding; no dataset values in logs unless
``log_phi`` (UIDs and AE titles are logged: they are not PHI).
"""

from __future__ import annotations

import asyncio
import enum
import errno
import logging
import os
import re
import socket
import socketserver
import threading
import time
import uuid
from collections.abc import Mapping
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Final, cast

import aiohttp
import orjson
from pydicom.dataset import Dataset
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts, _config, evt
from pynetdicom.sop_class import (  # type: ignore[attr-defined]  # generated at import
    PatientRootQueryRetrieveInformationModelFind,
    PatientRootQueryRetrieveInformationModelGet,
    PatientRootQueryRetrieveInformationModelMove,
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
    Verification,
)
from pynetdicom.transport import ThreadedAssociationServer

from medagent.channels.base import (
    ChannelContext,
    ChannelKind,
    ChannelStats,
    base_stats,
    observe_latency,
    register_file_uploader,
    register_kind,
    register_outbound_sender,
)
from medagent.channels.endpoint import Endpoint, EndpointError, bool_param, choice_param, int_param
from medagent.channels.tls import ServerTls, checking_tls, server_tls
from medagent.dicom.dicomjson import dataset_json
from medagent.dicom.files import InvalidInstance, durable_move, instance_info, read_header
from medagent.dicom.hubweb import HubDicomWeb
from medagent.dicom.retrieve import HubQueryRetrieve
from medagent.dicom.scu import DicomStoreSender
from medagent.dicom.uids import transfer_syntax_uid
from medagent.dicom.upload import STORAGE_KEY, upload_instance
from medagent.records import (
    DICOM_CONTENT_TYPE,
    CommitResult,
    DuplicatePolicy,
    FilePayload,
    InboundRecord,
)

__all__ = ["DICOM_KIND", "DICOM_PARAMETERS", "DicomChannel", "DicomOptions", "Storage", "dicom_options"]

logger = logging.getLogger("medagent.channels.dicom")

DICOM_PARAMETERS: Final = (
    "aet", "callingAets", "maxPdu", "maxAssociations", "transferSyntaxes", "storage",
    "moveDestinations", "commitTimeoutMs", "fsync", "tlsCert", "tlsKey", "tlsCa", "tlsClientAllow",
)

STATUS_SUCCESS = 0x0000
STATUS_OUT_OF_RESOURCES = 0xA700
STATUS_CANNOT_UNDERSTAND = 0xC000
_AE_TITLE = re.compile(r"[\x20-\x5b\x5d-\x7e]{1,16}")  # PS3.5 §6.2 AE VR: no backslash, no controls
_HOST_PORT = re.compile(r"(?P<ae>[^@]{1,16})@(?P<host>\[[0-9A-Fa-f:.]+\]|[^:@]+):(?P<port>[0-9]{1,5})")


class Storage(enum.Enum):
    """Where instances go when the hub is a Medplum server (medplum-next-waves.md §1)."""

    BINARY = "binary"  # a FHIR Binary (application/dicom), ``binary: {reference}`` in the transmit
    DICOMWEB = "dicomweb"  # STOW-RS to <hub>/dicomweb/studies (medagent's hub, Medplum >= 5.1.27)


@dataclass(frozen=True, slots=True)
class DicomOptions:
    """Typed settings of a ``dicom://`` listener."""

    aet: str | None = None  # None: accept any called AE title (Medplum's behaviour)
    calling_aets: frozenset[str] = frozenset()  # empty: any calling AE
    max_pdu: int = 65536  # Medplum's value; 0 = unlimited
    max_associations: int = 10
    transfer_syntaxes: tuple[str, ...] = tuple(ALL_TRANSFER_SYNTAXES)
    storage: Storage = Storage.DICOMWEB
    move_destinations: Mapping[str, tuple[str, int]] = field(default_factory=lambda: MappingProxyType({}))
    commit_timeout_s: float = 30.0
    #: fsync each spooled file (and its directory) before the commit: power-loss durability,
    #: which only means something with the agent's ``durability = "fsync"`` queue
    fsync: bool = False
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_ca: Path | None = None

    @property
    def own_ae_title(self) -> str:
        """Our AE title in associations we start (C-MOVE sub-operations)."""
        return self.aet or "MEDAGENT"


def _ae_title(endpoint: Endpoint, name: str, value: str) -> str:
    value = value.strip()
    if not _AE_TITLE.fullmatch(value):
        raise EndpointError(endpoint.url, name, f"{value!r} is not an AE title (1-16 characters, no backslash)")
    return value


def _move_destinations(endpoint: Endpoint) -> Mapping[str, tuple[str, int]]:
    table: dict[str, tuple[str, int]] = {}
    for item in filter(None, (i.strip() for i in endpoint.params.get("moveDestinations", "").split(","))):
        match = _HOST_PORT.fullmatch(item)
        if match is None or not 0 < int(match["port"]) < 65536:
            raise EndpointError(endpoint.url, "moveDestinations", f"{item!r} is not AE@host:port")
        table[_ae_title(endpoint, "moveDestinations", match["ae"])] = (match["host"].strip("[]"), int(match["port"]))
    return MappingProxyType(table)


def _file(endpoint: Endpoint, name: str) -> Path | None:
    value = endpoint.params.get(name)
    if value is None:
        return None
    path = Path(value)
    if not path.is_file():
        raise EndpointError(endpoint.url, name, f"no such file: {value}")
    return path


def dicom_options(endpoint: Endpoint) -> DicomOptions:
    """Typed options of a ``dicom://`` endpoint; every value checked (EndpointError)."""
    params = endpoint.params
    aet = _ae_title(endpoint, "aet", params["aet"]) if params.get("aet") else None
    calling = frozenset(_ae_title(endpoint, "callingAets", a) for a in params.get("callingAets", "").split(",") if a.strip())
    syntaxes: tuple[str, ...] = tuple(ALL_TRANSFER_SYNTAXES)
    if params.get("transferSyntaxes"):
        chosen = []
        for name in params["transferSyntaxes"].split(","):
            uid = transfer_syntax_uid(name)
            if uid is None:
                raise EndpointError(endpoint.url, "transferSyntaxes", f"unknown transfer syntax {name.strip()!r}")
            chosen.append(uid)
        syntaxes = tuple(dict.fromkeys(chosen))
    tls = (_file(endpoint, "tlsCert"), _file(endpoint, "tlsKey"), _file(endpoint, "tlsCa"))
    if (tls[0] is None) != (tls[1] is None):
        raise EndpointError(endpoint.url, "tlsCert", "tlsCert and tlsKey go together")
    if tls[2] is not None and tls[0] is None:
        raise EndpointError(endpoint.url, "tlsCa", "client certificates (tlsCa) need tlsCert and tlsKey")
    max_pdu = int_param(endpoint, "maxPdu", 65536, minimum=0)
    if 0 < max_pdu < 4096:
        raise EndpointError(endpoint.url, "maxPdu", "must be 0 (unlimited) or at least 4096")
    return DicomOptions(
        aet=aet, calling_aets=calling, max_pdu=max_pdu,
        max_associations=int_param(endpoint, "maxAssociations", 10, minimum=1),
        transfer_syntaxes=syntaxes, storage=choice_param(endpoint, "storage", Storage, Storage.DICOMWEB),
        move_destinations=_move_destinations(endpoint),
        commit_timeout_s=int_param(endpoint, "commitTimeoutMs", 30_000, minimum=100) / 1000.0,
        fsync=bool_param(endpoint, "fsync", False),
        tls_cert=tls[0], tls_key=tls[1], tls_ca=tls[2],
    )


class _Server(ThreadedAssociationServer):
    """pynetdicom's server, optionally on a listening socket handed over by the runtime."""

    def __init__(self, *args: Any, handed_socket: socket.socket | None = None, tls: ServerTls | None = None,
                 what: str = "dicom channel", **kwargs: Any) -> None:
        self._handed = handed_socket
        self._tls = tls
        self._what = what
        super().__init__(*args, **kwargs)

    def verify_request(self, request: Any, client_address: Any) -> bool:
        """socketserver's hook after the TLS handshake: apply ``tlsClientAllow`` (False closes it)."""
        refusal = self._tls.refusal_of(request) if self._tls is not None else None
        if refusal is not None:
            logger.warning("%s: refused association from %s: %s", self._what, client_address[0], refusal)
            return False
        return True

    def server_bind(self) -> None:
        if self._handed is None:
            super().server_bind()
            return
        if self.socket is not None:
            self.socket.close()
        self.socket = self._handed
        self.server_address = self._handed.getsockname()

    def server_activate(self) -> None:
        if self._handed is None:
            super().server_activate()

    def shutdown(self) -> None:
        # pynetdicom's shutdown also unregisters from AE._servers, where only start_server adds
        socketserver.BaseServer.shutdown(self)
        self.server_close()


@dataclass(slots=True)
class _DicomCounters:
    shared: ChannelStats = field(default_factory=ChannelStats)
    associations_rejected: int = 0
    finds: int = 0
    gets: int = 0
    moves: int = 0
    in_flight: int = 0


def _failure(status: int, reason: str) -> Dataset:
    ds = Dataset()
    ds.Status = status
    ds.ErrorComment = reason[:64]  # LO: 64 characters
    return ds


def _storage_status(reason: str) -> int:
    """0xA700 for anything that says the disk or database is full, else 0xC000-class."""
    text = reason.lower()
    return STATUS_OUT_OF_RESOURCES if ("full" in text or "space" in text or "quota" in text) else 0xC001


class DicomChannel:
    """A DICOM SCP for one channel: the ``dicom`` kind's Channel (channels/base.py)."""

    def __init__(self, name: str, endpoint: Endpoint, options: DicomOptions, context: ChannelContext) -> None:
        self.name = name
        self.endpoint = endpoint
        self.options = options
        self.context = context
        self.sink = context.sink
        self.spool = context.spool_dir(name)
        # fsync=true on the endpoint, or the agent's durability = "fsync" (power-loss safe queue)
        self._fsync = options.fsync or context.durability == "fsync"
        self._lock = threading.Lock()
        self._counters = _DicomCounters()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._ae: AE | None = None
        self._server: _Server | None = None
        self._tls: ServerTls | None = None
        self._thread: threading.Thread | None = None
        self._session: aiohttp.ClientSession | None = None
        self._qr: HubQueryRetrieve | None = None
        self._idle = threading.Condition(self._lock)

    # ------------------------------------------------------------------ Channel protocol

    @property
    def kind(self) -> str:
        return "dicom"

    @property
    def wants_replies(self) -> bool:
        return False  # a bot's answer never goes back to a modality (Medplum neither)

    @property
    def encoding(self) -> str:
        return "utf-8"

    def deliver_reply(self, remote: str, control_id: str, body: str, status_code: int = 200) -> bool:
        return False

    def pause_reading(self) -> None:
        """Nothing to pause: every C-STORE already waits for its own commit."""

    def resume_reading(self) -> None:
        """See :meth:`pause_reading`."""

    @property
    def port(self) -> int:
        if self._server is None:
            return self.endpoint.port
        return int(self._server.server_address[1])

    def listening_sockets(self) -> list[socket.socket]:
        server = self._server
        return [server.socket] if server is not None and server.socket is not None else []

    # ------------------------------------------------------------------ lifecycle


    def _build_ae(self) -> AE:
        options = self.options
        ae = AE(ae_title=options.own_ae_title)
        ae.maximum_pdu_size = options.max_pdu
        ae.maximum_associations = options.max_associations
        ae.require_called_aet = options.aet is not None
        ae.require_calling_aet = sorted(options.calling_aets)
        ae.network_timeout = 60
        ae.dimse_timeout = max(60.0, options.commit_timeout_s + 5)
        syntaxes = list(options.transfer_syntaxes)
        ae.add_supported_context(Verification, ALL_TRANSFER_SYNTAXES)
        # scu_role/scp_role True: accept the roles a C-GET requestor proposes (PS3.7 §D.3.3.4)
        for context in AllStoragePresentationContexts:
            if context.abstract_syntax is not None:
                ae.add_supported_context(context.abstract_syntax, syntaxes, scu_role=True, scp_role=True)
        for model in (PatientRootQueryRetrieveInformationModelFind, StudyRootQueryRetrieveInformationModelFind,
                      PatientRootQueryRetrieveInformationModelGet, StudyRootQueryRetrieveInformationModelGet,
                      PatientRootQueryRetrieveInformationModelMove, StudyRootQueryRetrieveInformationModelMove):
            ae.add_supported_context(model, ALL_TRANSFER_SYNTAXES[:4])
        return ae

    async def start(self, sock: socket.socket | None = None) -> None:
        """Listen on ``sock`` when given (handed over), else on the endpoint's host:port (0: any)."""
        if self._server is not None:
            raise RuntimeError(f"dicom channel {self.name} is already started")
        self._loop = asyncio.get_running_loop()
        # pynetdicom's file-backed C-STORE receive (process-wide switch; every SCP handler here
        # reads event.dataset_path, and event.dataset still works for other AEs in the process)
        _config.STORE_RECV_CHUNKED_DATASET = True
        self.spool.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(self.spool, 0o700)
        ae = self._build_ae()
        handlers: list[Any] = [
            (evt.EVT_C_ECHO, self._on_echo), (evt.EVT_C_STORE, self._on_store),
            (evt.EVT_C_FIND, self._on_find), (evt.EVT_C_GET, self._on_get), (evt.EVT_C_MOVE, self._on_move),
            (evt.EVT_ESTABLISHED, self._on_established), (evt.EVT_RELEASED, self._on_closed),
            (evt.EVT_ABORTED, self._on_closed), (evt.EVT_REJECTED, self._on_rejected),
        ]
        address = (self.endpoint.host, self.endpoint.port)
        try:
            # TLS 1.2+ from channels/tls.py (shared by every listener): rotated files load at the next handshake
            self._tls = server_tls(f"dicom channel {self.name}", self.endpoint)
            server = ae.make_server(address, ssl_context=None if self._tls is None else self._tls.server_context,
                                    evt_handlers=handlers, server_class=_Server, handed_socket=sock, tls=self._tls,
                                    what=f"dicom channel {self.name}")
        except OSError as exc:
            where = "the handed-over socket" if sock is not None else f"{self.endpoint.host}:{self.endpoint.port}"
            raise OSError(exc.errno, f"dicom channel {self.name}: cannot listen on {where}: {exc.strerror or exc}") from exc
        self._ae, self._server = ae, cast(_Server, server)
        if self.context.hub is not None:
            self._session = aiohttp.ClientSession()
            web = HubDicomWeb(self.context.hub, self._session)
        else:
            web = None
        self._qr = HubQueryRetrieve(self._loop, web, self.spool, self.options.move_destinations)
        self._thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.2},
                                        name=f"dicom-{self.name}", daemon=True)
        self._thread.start()
        logger.debug("dicom channel %s listening on %s:%d (AE %s, storage=%s)", self.name, self.endpoint.host,
                    self.port, self.options.aet or "any", self.options.storage.value)

    async def stop(self, drain_timeout: float = 5.0) -> None:
        """Stop accepting, wait up to ``drain_timeout`` for stores in flight, then close."""
        server, thread = self._server, self._thread
        if server is None:
            return
        self._server = self._thread = None

        def drain_and_close() -> None:
            server.shutdown()  # stops accepting; the listening socket is closed
            deadline = time.monotonic() + drain_timeout
            with self._idle:
                while self._counters.in_flight and (left := deadline - time.monotonic()) > 0:
                    self._idle.wait(left)
            for assoc in list(server.active_associations):
                assoc.abort()
            if thread is not None:
                thread.join(5.0)

        # the commits the store handlers wait for run on this loop, so drain from a thread
        await asyncio.to_thread(drain_and_close)
        if self._session is not None:
            await self._session.close()
            self._session = None
        logger.info("dicom channel %s stopped", self.name)

    # ------------------------------------------------------------------ association events

    def _on_established(self, event: evt.Event) -> None:
        with self._lock:
            self._counters.shared.connections_open += 1
            self._counters.shared.connections_total += 1

    def _on_closed(self, event: evt.Event) -> None:
        with self._lock:
            self._counters.shared.connections_open = max(0, self._counters.shared.connections_open - 1)

    def _on_rejected(self, event: evt.Event) -> None:
        with self._lock:
            self._counters.associations_rejected += 1
        requestor = event.assoc.requestor
        logger.warning("dicom channel %s rejected an association from %s (calling AE %r, called AE %r)",
                       self.name, requestor.address, requestor.ae_title, event.assoc.acceptor.ae_title)

    def _count_answer(self, status: int, started: float, size: int = 0) -> None:
        with self._lock:
            shared = self._counters.shared
            key = f"0x{status:04X}"
            shared.answers[key] = shared.answers.get(key, 0) + 1
            if status == STATUS_SUCCESS:
                shared.units_in += 1
                shared.bytes_in += size
            else:
                shared.errors += 1
            observe_latency(shared, (time.perf_counter() - started) * 1000.0)

    # ------------------------------------------------------------------ services (pynetdicom threads)

    def _on_echo(self, event: evt.Event) -> int:
        return STATUS_SUCCESS

    def _on_store(self, event: evt.Event) -> int | Dataset:
        started = time.perf_counter()
        with self._lock:
            self._counters.in_flight += 1
        try:
            status, answer, size = self._store(event)
        finally:
            with self._idle:
                self._counters.in_flight -= 1
                self._idle.notify_all()
        self._count_answer(status, started, size)
        return answer

    def _store(self, event: evt.Event) -> tuple[int, int | Dataset, int]:
        assoc = event.assoc
        calling = assoc.requestor.ae_title.strip()
        called = assoc.acceptor.ae_title.strip()
        target = self.spool / f"{uuid.uuid4().hex}.dcm"
        try:
            size, sha256 = durable_move(self._received_file(event), target, fsync=self._fsync)
        except OSError as exc:
            reason = f"cannot spool the instance: {exc.strerror or exc}"
            logger.error("dicom channel %s: %s (answered 0xA700)", self.name, reason)
            status = STATUS_OUT_OF_RESOURCES if exc.errno in (errno.ENOSPC, errno.EDQUOT) else 0xC001
            return status, _failure(status, reason), 0
        try:
            header = read_header(target)
            info = instance_info(header)
            dataset = dataset_json(header)
        except InvalidInstance as exc:
            target.unlink(missing_ok=True)
            logger.warning("dicom channel %s: instance from %s refused: %s", self.name, calling, exc)
            return STATUS_CANNOT_UNDERSTAND, _failure(STATUS_CANNOT_UNDERSTAND, str(exc)), 0
        body = {
            "association": {"callingAeTitle": calling, "calledAeTitle": called},
            "dataset": dataset,
            "instance": {"studyInstanceUid": info.study_uid, "seriesInstanceUid": info.series_uid,
                         "sopInstanceUid": info.sop_uid, "sopClassUid": info.sop_class_uid,
                         "transferSyntaxUid": info.transfer_syntax},
            STORAGE_KEY: self.options.storage.value,
        }
        record = InboundRecord(
            channel=self.name, remote=f"{assoc.requestor.address}:{assoc.requestor.port}", sender=calling,
            control_id=info.sop_uid, message_type=info.modality or info.sop_class_uid,
            body=orjson.dumps(body), received_at=time.time(), content_type=DICOM_CONTENT_TYPE,
            file=FilePayload(str(target.relative_to(self.context.data_dir)), size, sha256),
        )
        result = self._commit(record, target)
        if result is None:
            reason = "the queue did not commit in time"
            logger.error("dicom channel %s: instance %s: %s (answered 0xA700)", self.name, info.sop_uid, reason)
            return STATUS_OUT_OF_RESOURCES, _failure(STATUS_OUT_OF_RESOURCES, reason), 0
        if not result.ok:
            target.unlink(missing_ok=True)
            status = _storage_status(result.error or "")
            logger.error("dicom channel %s: instance %s not stored: %s (answered 0x%04X)", self.name,
                         info.sop_uid, result.error, status)
            return status, _failure(status, result.error or "storage error"), 0
        if result.dropped:  # the same instance, already queued: its earlier copy stands
            target.unlink(missing_ok=True)
        logger.debug("dicom channel %s stored %s (%d bytes) from %s", self.name, info.sop_uid, size, calling)
        return STATUS_SUCCESS, STATUS_SUCCESS, size

    def _received_file(self, event: evt.Event) -> Path:
        """pynetdicom's file of the received dataset; written here if file-backed receive is off."""
        try:
            return Path(event.dataset_path)
        except AttributeError:  # another component switched STORE_RECV_CHUNKED_DATASET off
            path = self.spool / f"{uuid.uuid4().hex}.part"
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(event.encoded_dataset(include_meta=True))
            return path

    def _commit(self, record: InboundRecord, target: Path) -> CommitResult | None:
        """Submit on the loop and wait here (pynetdicom's thread) for the commit; None on timeout."""
        future: Future[CommitResult] = Future()

        def settle(result: CommitResult) -> None:
            if not future.done():
                future.set_result(result)

        def submit() -> None:
            try:
                self.sink.accept(record, durable=True, dedup=DuplicatePolicy.DROP, on_commit=settle)
            except Exception as exc:  # noqa: BLE001 - any refusal by the sink is a failed commit
                settle(CommitResult(None, None, f"storage error: {exc}"))

        assert self._loop is not None
        self._loop.call_soon_threadsafe(submit)
        try:
            return future.result(self.options.commit_timeout_s)
        except FutureTimeout:
            # answered 0xA700; if the commit fails later its file is ours to remove, if it
            # succeeds the instance is delivered (the modality's resend is then a duplicate)
            def late(done: Future[CommitResult]) -> None:
                result = done.result()
                if not result.ok or result.dropped:  # the queue does not own this file
                    target.unlink(missing_ok=True)

            future.add_done_callback(late)
            return None

    def _on_find(self, event: evt.Event) -> Any:
        with self._lock:
            self._counters.finds += 1
        assert self._qr is not None
        yield from self._qr.find(event.identifier, lambda: event.is_cancelled)

    def _on_get(self, event: evt.Event) -> Any:
        with self._lock:
            self._counters.gets += 1
        assert self._qr is not None
        yield from self._qr.get(event.identifier, lambda: event.is_cancelled)

    def _on_move(self, event: evt.Event) -> Any:
        with self._lock:
            self._counters.moves += 1
        assert self._qr is not None
        destination: str | bytes | None = event.move_destination
        if isinstance(destination, bytes):
            destination = destination.decode("ascii", "replace")
        yield from self._qr.move(event.identifier, destination or "", lambda: event.is_cancelled)

    # ------------------------------------------------------------------ stats

    def stats(self) -> dict[str, Any]:
        """base_stats shape; connections are associations, units are instances stored."""
        with self._lock:
            counters = self._counters
            shared = ChannelStats(**{name: getattr(counters.shared, name) for name in ChannelStats.__slots__})
            shared.answers = dict(shared.answers)
            shared.latency_ms = dict(shared.latency_ms)
            extra = {
                "associationsOpen": shared.connections_open, "associationsTotal": shared.connections_total,
                "associationsRejected": counters.associations_rejected, "instances": shared.units_in,
                "bytes": shared.bytes_in, "failures": shared.errors, "storeLatencyMs": dict(shared.latency_ms),
                "finds": counters.finds, "gets": counters.gets, "moves": counters.moves,
                "storesInFlight": counters.in_flight,
            }
        if self._tls is not None:
            extra["tls_clients_refused"] = self._tls.refused
        return base_stats("dicom", shared, extra)


def _create(name: str, endpoint: Endpoint, options: DicomOptions, context: ChannelContext) -> DicomChannel:
    return DicomChannel(name, endpoint, options, context)


#: The ``dicom://`` kind, registered when this module is imported.
DICOM_KIND: Final = register_kind(ChannelKind(
    scheme="dicom",
    parameters=DICOM_PARAMETERS,
    parse_options=checking_tls(dicom_options),
    create=_create,
    description="DICOM SCP: C-ECHO, C-STORE streamed to disk and queued; C-FIND/C-GET/C-MOVE from the hub",
))
register_file_uploader(DICOM_CONTENT_TYPE, upload_instance)
register_outbound_sender("dicom", DicomStoreSender)
