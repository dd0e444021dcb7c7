"""Where a relayed user's mail lives: upstream endpoints and the routing map.

An endpoint is a Twisted client endpoint string: ``tcp:host=mail.internal:port=110`` (also
``tcp6:``, ``unix:path=...``), or ``tls:host=mail.internal:port=995`` for implicit TLS (RFC 8314),
which pop3shield opens as TCP and then starts TLS itself, so that the certificate checks
(``backend.ca_file``, ``backend.verify``) and the PROXY protocol header apply to it too.

The routing map (``backend.routes``) is a text file of ``KEY ENDPOINT`` lines, like perdition's
popmap::

    # user (exactly as logged in) or @domain (case-insensitive): where the mailbox is
    alice@example.com    tcp:host=10.0.0.5:port=110
    @example.org         tls:host=pop.example.org:port=995

A user's own line wins over the domain's, and with neither the default ``backend.endpoint``
serves (without one, the login is refused like a wrong password). Blank lines and lines starting
with ``#`` are ignored. The file is checked at start-up (an error names ``FILE:LINE``); while
running, it is stat'ed in a worker thread at each lookup and re-read when it changed. A broken new
version is logged once and the previous map kept.
"""

from __future__ import annotations

import os
import threading
import unicodedata
from dataclasses import dataclass
from typing import Any

__all__ = ["Endpoint", "EndpointError", "RouteMap", "RouteMapError", "parse_endpoint", "parse_routes"]

PLAIN_KINDS = ("tcp", "tcp6", "unix")
TLS_KIND = "tls"
#: the arguments Twisted's tcp: endpoint takes besides host and port
_TCP_KEYS = frozenset({"host", "port", "timeout", "bindAddress"})


class EndpointError(ValueError):
    """An endpoint string pop3shield cannot use (the text names the problem)."""


class RouteMapError(ValueError):
    """A routing map that cannot be used; ``str()`` is ``FILE:LINE: problem``."""


@dataclass(frozen=True)
class Endpoint:
    """One upstream: the plain endpoint to connect and whether TLS starts at once."""

    #: what is shown in logs and configured (the text as written)
    text: str
    #: the description handed to clientFromString (``tls:`` rewritten as ``tcp:``)
    description: str
    implicit_tls: bool
    #: the host name the certificate must show (None for unix sockets)
    host: str | None


def split_endpoint(description: str) -> list[str]:
    """A Twisted endpoint string's fields: ``:`` separates, ``\\`` escapes the next character."""
    parts, current, escaped = [], [], False
    for ch in description:
        if escaped:
            current.append(ch)
            escaped = False
        elif ch == "\\":
            escaped = True
        elif ch == ":":
            parts.append("".join(current))
            current = []
        else:
            current.append(ch)
    parts.append("".join(current))
    return parts


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace(":", "\\:").replace("=", "\\=")


def parse_endpoint(text: str) -> Endpoint:
    """Check an endpoint string; raise :class:`EndpointError` with the problem."""
    if not isinstance(text, str) or not text.strip():
        raise EndpointError("must be a Twisted client endpoint string such as 'tcp:host=mail:port=110'")
    if any(unicodedata.category(ch).startswith("C") for ch in text):
        raise EndpointError("must not contain control characters")
    parts = split_endpoint(text)
    kind = parts[0].strip().lower()
    if kind not in (*PLAIN_KINDS, TLS_KIND):
        raise EndpointError(f"unknown endpoint type {parts[0]!r} (expected tcp, tcp6, unix or tls)")
    args = [p for p in parts[1:] if "=" not in p]
    pairs = [p.split("=", 1) for p in parts[1:] if "=" in p]
    kwargs = dict(pairs)
    if len(kwargs) != len(pairs):
        raise EndpointError("an argument is given twice")
    if kind == "unix":
        if "path" not in kwargs and not args:
            raise EndpointError("a unix endpoint needs path=...")
        return Endpoint(text, text, False, None)
    positional = dict(zip(("host", "port"), args))
    if len(args) > 2 or set(positional) & set(kwargs):
        raise EndpointError("give host and port once each")
    kwargs.update(positional)
    unknown = set(kwargs) - _TCP_KEYS
    if unknown:
        raise EndpointError(f"unsupported argument {sorted(unknown)[0]!r} (host, port, timeout, bindAddress)")
    host, port = kwargs.get("host", ""), kwargs.get("port", "")
    if not host:
        raise EndpointError("needs host=...")
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise EndpointError(f"needs port=1..65535, got {port!r}")
    plain_kind = "tcp6" if kind == "tcp6" else "tcp"
    description = f"{plain_kind}:" + ":".join(f"{k}={_escape(v)}" for k, v in sorted(kwargs.items()))
    return Endpoint(text, description if kind == TLS_KIND else text, kind == TLS_KIND, host)


def parse_routes(path: str, data: bytes) -> dict[str, Endpoint]:
    """The map's lines as ``{key: Endpoint}``; raise :class:`RouteMapError` naming the line."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise RouteMapError(f"{path}: not valid UTF-8") from None
    routes: dict[str, Endpoint] = {}
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        fields = line.split()
        if len(fields) != 2:
            raise RouteMapError(f"{path}:{number}: expected 'USER ENDPOINT' or '@DOMAIN ENDPOINT'")
        key, endpoint = fields
        key = unicodedata.normalize("NFC", key)
        if key.startswith("@"):
            if len(key) == 1 or "@" in key[1:]:
                raise RouteMapError(f"{path}:{number}: {key!r} is not an @domain")
            key = key.lower()
        if key in routes:
            raise RouteMapError(f"{path}:{number}: {key!r} is listed twice")
        try:
            routes[key] = parse_endpoint(endpoint)
        except EndpointError as exc:
            raise RouteMapError(f"{path}:{number}: {exc}") from None
    return routes


def _stamp(path: str) -> tuple[int, int, int, int]:
    st = os.stat(path)
    return (st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size)


class RouteMap:
    """The default endpoint plus the optional map file, re-read when the file changes.

    :meth:`lookup` is BLOCKING (a stat, and a read when the file changed): call it in a thread.
    """

    def __init__(self, default: Endpoint | None, path: str | None = None, *, log: Any = None) -> None:
        self.default = default
        self.path = path
        self._log = log
        self._lock = threading.Lock()
        self._routes: dict[str, Endpoint] = {}
        self._stamp: tuple[int, int, int, int] | None = None
        self._bad_stamp: Any = None
        if path is not None:
            try:
                stamp = _stamp(path)
                with open(path, "rb") as handle:
                    data = handle.read()
            except OSError as exc:
                raise RouteMapError(f"{path}: cannot read: {exc.strerror or exc}") from None
            self._routes = parse_routes(path, data)
            self._stamp = stamp

    def lookup(self, user: str) -> Endpoint | None:
        """The endpoint for ``user``: its own line, its domain's, or the default (or None)."""
        self._reload_if_changed()
        routes = self._routes
        user = unicodedata.normalize("NFC", user)
        if user in routes:
            return routes[user]
        _, at, domain = user.rpartition("@")
        if at and domain and f"@{domain.lower()}" in routes:
            return routes[f"@{domain.lower()}"]
        return self.default

    def reload(self) -> int:
        """BLOCKING (call it in a thread): re-read the map now, changed or not (SIGHUP); the route count.

        A broken map raises RouteMapError and the previous routes stay.
        """
        if self.path is None:
            return 0
        with self._lock:
            try:
                stamp = _stamp(self.path)
                with open(self.path, "rb") as handle:
                    routes = parse_routes(self.path, handle.read())
            except OSError as exc:
                raise RouteMapError(f"{self.path}: cannot read: {exc.strerror or exc}") from None
            self._routes, self._stamp, self._bad_stamp = routes, stamp, None
        return len(routes)

    def _reload_if_changed(self) -> None:
        if self.path is None:
            return
        try:
            stamp = _stamp(self.path)
        except OSError as exc:
            self._bad(("gone",), f"cannot stat: {exc.strerror or exc}")
            return
        if stamp == self._stamp:
            return
        with self._lock:
            if stamp in (self._stamp, self._bad_stamp):
                return
            try:
                with open(self.path, "rb") as handle:
                    routes = parse_routes(self.path, handle.read())
            except OSError as exc:
                self._bad(stamp, f"cannot read: {exc.strerror or exc}")
                return
            except RouteMapError as exc:
                self._bad(stamp, str(exc))
                return
            self._routes, self._stamp, self._bad_stamp = routes, stamp, None
            if self._log is not None:
                self._log.info("reloaded routing map {path}: {count} routes", path=self.path,
                               count=len(routes))

    def _bad(self, stamp: Any, problem: str) -> None:
        if stamp == self._bad_stamp:
            return
        self._bad_stamp = stamp
        if self._log is not None:
            self._log.error("routing map {path} not reloaded, keeping the previous routes: {problem}",
                            path=self.path, problem=problem)
