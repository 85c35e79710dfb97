"""``make_bus(url)``: the bus a hub process uses, from the ``--bus`` flag / ``[hub] bus`` key.

* empty, ``None`` or ``local`` -> :class:`~medagent.hub.bus.local.LocalBus` (one process;
  ``medagent serve`` and a lone ``medagent hub``);
* ``redis://[:password@]host[:port][/db]``, ``rediss://...`` (TLS) or ``unix:///path.sock`` ->
  :class:`~medagent.hub.bus.redisbus.RedisBus`. Two query parameters are medagent's and are
  removed before the URL reaches redis-py: ``cluster`` (default ``default``: hub processes with
  the same Redis and cluster name act as one hub) and ``presence_ttl`` (seconds, default 15:
  how soon the agents of a dead hub process read as disconnected). Other query parameters are
  redis-py's own (``socket_timeout``, ``ssl_cert_reqs``, ...).

Anything else is a :class:`~medagent.hub.bus.errors.BusConfigError` that names the value and
the fix, raised before the hub starts; so is a Redis URL when the optional ``redis`` package is
missing (``pip install 'medagent[scale]'``).
"""

from __future__ import annotations

import re
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from medagent.hub.bus.base import AgentBus
from medagent.hub.bus.errors import BusConfigError
from medagent.hub.bus.local import LocalBus

__all__ = ["REDIS_SCHEMES", "make_bus"]

REDIS_SCHEMES = frozenset({"redis", "rediss", "unix"})
_OURS = frozenset({"cluster", "presence_ttl"})
#: redis-py URL parameters passed through as strings (its typed ones come from redis-py itself)
_REDIS_SSL_ARGUMENTS = frozenset({"ssl_cert_reqs", "ssl_ca_certs", "ssl_ca_path", "ssl_certfile", "ssl_keyfile",
                                  "client_name"})
_DB_PATH = re.compile(r"/?|/[0-9]+")


def make_bus(url: str | None, *, process_id: str | None = None) -> AgentBus:
    if url is None or url.strip() in ("", "local"):
        return LocalBus(process_id)
    parts = urlsplit(url.strip())
    if parts.scheme not in REDIS_SCHEMES:
        raise BusConfigError(f"hub bus {_shown(url)!r}: expected 'local' or a Redis URL "
                             f"(redis://host:port/db, rediss://..., unix:///path.sock)")
    try:
        from redis.asyncio.connection import URL_QUERY_ARGUMENT_PARSERS

        from medagent.hub.bus.redisbus import DEFAULT_LEASE_TTL_S, RedisBus
    except ImportError:
        raise BusConfigError("the Redis hub bus needs the redis package: pip install 'medagent[scale]'") from None
    if parts.scheme != "unix" and not _DB_PATH.fullmatch(parts.path):
        raise BusConfigError(f"hub bus {_shown(url)!r}: the path must be a database number (redis://host:port/0)")
    query = parse_qsl(parts.query, keep_blank_values=True)
    known = _OURS | _REDIS_SSL_ARGUMENTS | URL_QUERY_ARGUMENT_PARSERS.keys()
    unknown = sorted({k for k, _ in query} - known)
    if unknown:
        raise BusConfigError(f"hub bus {_shown(url)!r}: unknown parameter(s) {', '.join(unknown)}; "
                             f"known: {', '.join(sorted(known))}")
    ours = {k: v for k, v in query if k in _OURS}
    theirs = [(k, v) for k, v in query if k not in _OURS]
    ttl_text = ours.get("presence_ttl")
    try:
        ttl = float(ttl_text) if ttl_text is not None else DEFAULT_LEASE_TTL_S
    except ValueError:
        raise BusConfigError(f"hub bus {_shown(url)!r}: presence_ttl must be a number of seconds") from None
    try:
        return RedisBus(urlunsplit(parts._replace(query=urlencode(theirs))), cluster=ours.get("cluster", "default"),
                        process_id=process_id, lease_ttl_s=ttl)
    except ValueError as exc:
        raise BusConfigError(f"hub bus {_shown(url)!r}: {exc}") from None


def _shown(url: str) -> str:
    """The URL as it may appear in an error message: never its password."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    return urlunsplit(parts._replace(netloc=parts.netloc.replace(f":{parts.password}@", ":***@", 1)))
