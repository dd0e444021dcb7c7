"""systemd's readiness protocol (``Type=notify``) without a dependency: one datagram.

:func:`notify` sends ``READY=1`` (or any ``KEY=value`` lines) to the AF_UNIX datagram socket
named by ``$NOTIFY_SOCKET``; a name starting with ``@`` is in the abstract namespace (a leading
NUL). Without the variable it does nothing: the server started by hand, or ``Type=simple``.
:class:`ReadyNotifier` is the service that says READY=1 once every listener has its port, and
STOPPING=1 when the server stops.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterable, Mapping
from typing import Any

from twisted.application import service
from twisted.internet import defer
from twisted.logger import Logger

log = Logger(namespace="pop3shield.server")


def notify_address(environ: Mapping[str, str] | None = None) -> str | bytes | None:
    """Where to send: a path, an abstract name as bytes (leading NUL), or None."""
    name = (os.environ if environ is None else environ).get("NOTIFY_SOCKET", "")
    if not name:
        return None
    if name.startswith("@"):
        return b"\0" + name[1:].encode("utf-8", "surrogateescape")
    if name.startswith("/"):
        return name
    return None  # vsock and relative names: not for us


def notify(state: str, environ: Mapping[str, str] | None = None) -> bool:
    """Send ``state`` (``"READY=1"``); True if a datagram went out. Never raises."""
    address = notify_address(environ)
    if address is None:
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.sendto(state.encode("utf-8"), address)
    except OSError as exc:
        log.warn("cannot notify systemd ({state}): {error}", state=state.split("=", 1)[0], error=str(exc))
        return False
    return True


class ReadyNotifier(service.Service):
    """Started after the listeners: READY=1 when every one of them is listening.

    A listener that fails stops the server (``ListenService._failed``), so READY=1 is not sent
    then. ``listeners`` are the ``ListenService`` objects: their ``listening`` Deferreds exist
    once they have started, which the MultiService does in order, before this one.
    """

    def __init__(self, listeners: Iterable[Any], environ: Mapping[str, str] | None = None) -> None:
        self.listeners = list(listeners)
        self.environ = environ
        self.ready: defer.Deferred[bool] | None = None

    def startService(self) -> None:
        super().startService()
        waits = [listener.listening for listener in self.listeners if listener.listening is not None]
        self.ready = defer.gatherResults(waits, consumeErrors=True)
        self.ready.addCallback(self._listening)
        self.ready.addErrback(lambda failure: False)

    def _listening(self, _: Any) -> bool:
        if not self.running or not all(listener.port is not None for listener in self.listeners):
            return False
        return notify("READY=1", self.environ)

    def stopService(self) -> None:
        super().stopService()
        notify("STOPPING=1", self.environ)
