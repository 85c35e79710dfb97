"""systemd's notify protocol (sd_notify(3)), without a dependency: one datagram to $NOTIFY_SOCKET.

The unit `medagent service install` writes is ``Type=notify`` with ``NotifyAccess=all``: the
agent says ``READY=1`` once it serves, and after an upgrade's switch the new process says
``MAINPID=<its pid>`` first, so systemd follows the process that now serves (the old one exits
0 right after, and systemd does not treat that as the service ending). Outside systemd
($NOTIFY_SOCKET unset) :func:`notify` does nothing.
"""

from __future__ import annotations

import logging
import os
import socket

__all__ = ["notify"]

log = logging.getLogger("medagent.ops")


def notify(*assignments: str) -> bool:
    """Send ``KEY=VALUE`` lines to systemd; True when sent. Never raises."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address or not hasattr(socket, "AF_UNIX"):
        return False
    if address.startswith("@"):  # abstract namespace
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.sendto("\n".join(assignments).encode(), address)
    except OSError as exc:
        log.warning("cannot notify systemd at %s: %s", os.environ.get("NOTIFY_SOCKET"), exc)
        return False
    return True
