"""TLS for every listener and for outbound MLLP: one parameter family, certificates that reload.

Theory of operation
-------------------
Every scheme takes the same query parameters (docs/tls.md says why parameters and not
``mllps://``-style schemes: the DICOM kind already named them, a config diff then shows one
parameter, not a new scheme, and every kind gets TLS from one place)::

    tlsCert=/path/cert.pem   server certificate chain (PEM); its presence turns TLS on
    tlsKey=/path/key.pem     its private key (omit when the key is inside tlsCert)
    tlsCa=/path/ca.pem       CA bundle that client certificates must chain to (mutual TLS)
    tlsClientAllow=a,b       optional allow-list of client certificates: ``CN=<common name>``
                             or a SHA-256 fingerprint (hex, colons optional); needs tlsCa

Outbound MLLP remotes take ``tls=true`` (verify the server against the system trust store and
its host name), ``tlsCa`` (trust a private CA instead; implies ``tls=true``) and an optional
client certificate ``tlsCert``/``tlsKey``.

:class:`ServerTls` owns a listener's TLS. The listener hands ``ServerTls.context`` to
``loop.create_server(ssl=...)`` once; that context's SNI callback (OpenSSL calls it for every
ClientHello, with or without SNI) swaps in the *current* context. Before swapping it compares
the files' (mtime_ns, size, inode) with what was loaded: a change reloads them, so a rotated
certificate serves the very next handshake without a restart. A new set that does not load
keeps the old context and logs one line per bad version of the files, not per handshake.
After the handshake the listener calls :meth:`ServerTls.refusal` with the transport: a client
certificate outside ``tlsClientAllow`` is refused (the caller closes the connection).

Invariants
----------
* TLS 1.2 is the minimum everywhere (RFC 8996 deprecates 1.0/1.1); OpenSSL's default ciphers.
* With ``tlsCa`` a client must present a certificate that chains to it (CERT_REQUIRED).
* A failed reload never replaces a working context; the old one keeps serving.
* No key material or certificate contents in logs (paths and fingerprints only).
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import ssl
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final, TypeVar

from medagent.channels.endpoint import Endpoint, EndpointError, bool_param

__all__ = [
    "TLS_LISTENER_PARAMETERS",
    "TLS_REMOTE_PARAMETERS",
    "ClientTls",
    "ServerTls",
    "TlsListenerSettings",
    "TlsRemoteSettings",
    "checking_tls",
    "client_tls",
    "listener_tls",
    "remote_tls",
    "server_tls",
]

logger = logging.getLogger(__name__)

#: Query parameters every listener kind accepts (add them to the kind's ``parameters``).
TLS_LISTENER_PARAMETERS: Final = ("tlsCert", "tlsKey", "tlsCa", "tlsClientAllow")
#: Query parameters of an outbound MLLP remote.
TLS_REMOTE_PARAMETERS: Final = ("tls", "tlsCa", "tlsCert", "tlsKey")

#: A TLS handshake that takes longer than this is dropped (a slot is only taken after it).
HANDSHAKE_TIMEOUT_S: Final = 10.0

_T = TypeVar("_T")

_FINGERPRINT = re.compile(r"(?:sha256:)?((?:[0-9a-fA-F]{2}:?){31}[0-9a-fA-F]{2})")


@dataclass(frozen=True, slots=True)
class TlsListenerSettings:
    """A listener's TLS parameters, checked for shape (the files are read at start)."""

    cert: str
    key: str | None
    ca: str | None
    allow_fingerprints: frozenset[str]
    allow_common_names: frozenset[str]


@dataclass(frozen=True, slots=True)
class TlsRemoteSettings:
    """An outbound remote's TLS parameters."""

    ca: str | None
    cert: str | None
    key: str | None


def _path(endpoint: Endpoint, name: str) -> str | None:
    value = endpoint.params.get(name)
    if value is None:
        return None
    if not value.strip():
        raise EndpointError(endpoint.url, name, "is empty; give the path of a PEM file")
    return value


def listener_tls(endpoint: Endpoint) -> TlsListenerSettings | None:
    """The listener TLS settings of `endpoint`, or None without ``tlsCert`` (EndpointError)."""
    cert, key, ca = _path(endpoint, "tlsCert"), _path(endpoint, "tlsKey"), _path(endpoint, "tlsCa")
    allow = endpoint.params.get("tlsClientAllow")
    if cert is None:
        for name in ("tlsKey", "tlsCa", "tlsClientAllow"):
            if name in endpoint.params:
                raise EndpointError(endpoint.url, name, "needs tlsCert (the server certificate) as well")
        return None
    if allow is not None and ca is None:
        raise EndpointError(endpoint.url, "tlsClientAllow",
                            "needs tlsCa (client certificates are only checked with mutual TLS)")
    fingerprints: set[str] = set()
    names: set[str] = set()
    for entry in (allow or "").split(","):
        entry = entry.strip()
        if not entry:
            continue
        match = _FINGERPRINT.fullmatch(entry)
        if match:
            fingerprints.add(match.group(1).replace(":", "").lower())
        elif entry[:3].upper() == "CN=" and entry[3:].strip():
            names.add(entry[3:].strip())
        else:
            raise EndpointError(endpoint.url, "tlsClientAllow",
                                f"{entry!r} is neither CN=<common name> nor a SHA-256 fingerprint")
    if allow is not None and not (fingerprints or names):
        raise EndpointError(endpoint.url, "tlsClientAllow", "is empty")
    return TlsListenerSettings(cert, key, ca, frozenset(fingerprints), frozenset(names))


def remote_tls(endpoint_url: str, params: Any) -> TlsRemoteSettings | None:
    """The TLS settings of an outbound remote's parameters, or None for plain TCP."""
    endpoint = Endpoint(scheme="mllp", host="", port=0, params=params, url=endpoint_url)
    ca, cert, key = _path(endpoint, "tlsCa"), _path(endpoint, "tlsCert"), _path(endpoint, "tlsKey")
    wanted = bool_param(endpoint, "tls", ca is not None or cert is not None)
    if not wanted:
        if ca is not None or cert is not None or key is not None:
            raise EndpointError(endpoint_url, "tls", "is false but TLS files are given")
        return None
    if key is not None and cert is None:
        raise EndpointError(endpoint_url, "tlsKey", "needs tlsCert (the client certificate) as well")
    return TlsRemoteSettings(ca, cert, key)


def _signature(paths: tuple[str | None, ...]) -> tuple[Any, ...]:
    """What changes when a file is replaced or rewritten (rename-into-place or in place)."""
    result: list[Any] = []
    for path in paths:
        if path is None:
            result.append(None)
            continue
        try:
            st = os.stat(path)
        except OSError as exc:
            result.append(("missing", exc.errno))
        else:
            result.append((st.st_mtime_ns, st.st_size, st.st_ino))
    return tuple(result)


class _Reloading:
    """A context built from files, rebuilt when their signature changes; bad files keep the old."""

    def __init__(self, what: str, paths: tuple[str | None, ...]) -> None:
        self.what = what
        self._paths = paths
        self._lock = threading.Lock()  # handshakes run on the loop thread; the lock is for safety only
        self._signature = _signature(paths)
        self._failed: tuple[Any, ...] | None = None
        self.reloads = 0
        self.context = self._build()  # at start a bad file is an error (raised), not a log line

    def _build(self) -> ssl.SSLContext:
        raise NotImplementedError

    def current(self) -> ssl.SSLContext:
        signature = _signature(self._paths)
        if signature == self._signature or signature == self._failed:
            return self.context
        with self._lock:
            try:
                context = self._build()
            except (OSError, ssl.SSLError, ValueError) as exc:
                self._failed = signature
                logger.error("%s: new TLS files do not load (%s); keeping the previous certificate",
                             self.what, exc)
                return self.context
            self.context, self._signature, self._failed = context, signature, None
            self.reloads += 1
            logger.info("%s: TLS certificate reloaded", self.what)
        return self.context


class ServerTls(_Reloading):
    """A listener's TLS: the context for create_server, reload on handshake, the allow-list."""

    def __init__(self, what: str, settings: TlsListenerSettings) -> None:
        self.settings = settings
        self.refused = 0
        super().__init__(what, (settings.cert, settings.key, settings.ca))
        self._front = self.context
        self._front.sni_callback = self._on_client_hello

    def _build(self) -> ssl.SSLContext:
        settings = self.settings
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.load_cert_chain(settings.cert, settings.key)
        if settings.ca is not None:
            context.load_verify_locations(cafile=settings.ca)
            context.verify_mode = ssl.CERT_REQUIRED
        return context

    @property
    def server_context(self) -> ssl.SSLContext:
        """Give this to ``create_server(ssl=...)``; it serves the current certificate."""
        return self._front

    def _on_client_hello(self, ssl_object: Any, server_name: str | None, context: ssl.SSLContext) -> None:
        current = self.current()
        if current is not ssl_object.context:
            ssl_object.context = current

    def refusal(self, transport: Any) -> str | None:
        """Why this handshaken connection's client certificate is not allowed, or None."""
        return self.refusal_of(transport.get_extra_info("ssl_object"))

    def refusal_of(self, ssl_object: Any) -> str | None:
        """:meth:`refusal` for an ``ssl.SSLObject`` or a handshaken ``ssl.SSLSocket`` (threaded servers)."""
        settings = self.settings
        if not (settings.allow_fingerprints or settings.allow_common_names):
            return None
        der = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
        if not der:
            return "no client certificate"
        fingerprint = hashlib.sha256(der).hexdigest()
        if fingerprint in settings.allow_fingerprints:
            return None
        peer = ssl_object.getpeercert() or {}
        names = {value for rdn in peer.get("subject", ()) for key, value in rdn if key == "commonName"}
        if names & settings.allow_common_names:
            return None
        self.refused += 1
        shown = ",".join(sorted(names)) or "(no CN)"
        return f"client certificate CN={shown} sha256:{fingerprint} is not in tlsClientAllow"


class ClientTls(_Reloading):
    """An outbound remote's TLS context (server verified; optional client certificate)."""

    def __init__(self, what: str, settings: TlsRemoteSettings) -> None:
        self.settings = settings
        super().__init__(what, (settings.ca, settings.cert, settings.key))

    def _build(self) -> ssl.SSLContext:
        settings = self.settings
        context = ssl.create_default_context(cafile=settings.ca)  # CERT_REQUIRED + host name check
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        if settings.cert is not None:
            context.load_cert_chain(settings.cert, settings.key)
        return context


def server_tls(what: str, endpoint: Endpoint) -> ServerTls | None:
    """The listener's ServerTls (files loaded now: a bad file raises OSError/SSLError), or None."""
    settings = listener_tls(endpoint)
    if settings is None:
        return None
    try:
        return ServerTls(what, settings)
    except (ssl.SSLError, ValueError) as exc:
        raise OSError(0, f"{what}: cannot load TLS files {settings.cert}: {exc}") from exc


def client_tls(what: str, settings: TlsRemoteSettings | None) -> ClientTls | None:
    return None if settings is None else ClientTls(what, settings)


def checking_tls(parse_options: Callable[[Endpoint], _T]) -> Callable[[Endpoint], _T]:
    """A kind's ``parse_options`` that also checks the tls* parameters (config-time errors)."""

    def parse(endpoint: Endpoint) -> _T:
        listener_tls(endpoint)
        return parse_options(endpoint)

    parse.__doc__ = parse_options.__doc__
    return parse
