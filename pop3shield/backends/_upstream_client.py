"""The Twisted side of one upstream POP3 connection: commands out, checked responses in.

:class:`UpstreamProtocol` writes command lines and hands each response, as
:class:`pop3shield.core.upstream.UpstreamReader` checks it, to the Deferred of its request, in
order (pipelining is just several requests before the first answer). A multi-line body goes to
the request's ``on_body`` as it arrives, unbuffered, or is collected (CAPA, LIST, UIDL: bounded by
their :class:`~pop3shield.core.upstream.Expect`). Anything the reader refuses, a stalled response
(``response_timeout``), TLS failures and a lost connection fail every outstanding request with an
:class:`UpstreamFailure` whose text names the reason, and the connection is aborted.
"""

from __future__ import annotations

import ipaddress
import struct
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from twisted.internet import defer
from twisted.internet.interfaces import IPushProducer
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.protocols.policies import TimeoutMixin
from twisted.python.failure import Failure
from zope.interface import implementer

from pop3shield import eagerwrite
from pop3shield.core.upstream import (
    Body,
    Continuation,
    Discarded,
    End,
    Expect,
    Kind,
    Refused,
    Status,
    UpstreamReader,
)

__all__ = ["Response", "UpstreamFailure", "UpstreamProtocol", "proxy_v2_header"]

log = Logger(namespace="pop3shield.upstream")


class UpstreamFailure(Exception):
    """The upstream connection cannot go on; the text is for the operator's log.

    ``violation``: the upstream broke the protocol (a response the reader refused), rather than
    stalling or going away.
    """

    def __init__(self, message: str, *, violation: bool = False) -> None:
        super().__init__(message)
        self.violation = violation


@dataclass
class Response:
    status: Status
    #: the collected body (when no on_body was given), still dot-stuffed
    body: bytes | None = field(default=None, repr=False)
    end: End | None = None


class _Request:
    """One response that is due: what to do with its parts as they arrive."""

    __slots__ = ("expect", "deferred", "on_body", "on_status", "start_tls", "responses", "status", "pieces")

    def __init__(self, expect: Expect, deferred: defer.Deferred[Response],
                 on_body: Callable[[bytes], None] | None = None,
                 on_status: Callable[[Status], None] | None = None, start_tls: Any = None) -> None:
        self.expect = expect
        self.deferred = deferred
        self.on_body = on_body
        self.on_status = on_status
        self.start_tls = start_tls
        #: lines to answer the upstream's SASL challenges with, in order (then: cancel)
        self.responses: list[bytes] = []
        self.status: Status | None = None
        #: a collected body's pieces (when there is no on_body)
        self.pieces: list[bytes] = []

    def __repr__(self) -> str:  # no secrets (responses) and no mail (pieces)
        return f"<_Request {self.expect.kind.value} status={self.status!r}>"


class UpstreamProtocol(Protocol, TimeoutMixin):
    """One connection to the upstream; ``greeting`` fires with its first status line."""

    def __init__(self, *, reactor: Any, response_timeout: float, max_line: int,
                 tls_options: Any = None, proxy_header: bytes | None = None,
                 name: str = "upstream") -> None:
        self.reactor = reactor
        self.callLater = reactor.callLater  # TimeoutMixin's clock
        self.response_timeout = response_timeout
        self.reader = UpstreamReader(max_line=max_line)
        self.tls_options = tls_options  # implicit TLS: start it at once
        self.proxy_header = proxy_header
        self.name = name
        self.connected_d: defer.Deferred[UpstreamProtocol] = defer.Deferred()
        self._requests: deque[_Request] = deque()
        self._failure: UpstreamFailure | None = None
        self._closed = False
        self._paused = False
        self.tls = False
        #: command lines held by cork() until uncork(), or None
        self._corked: list[bytes] | None = None
        #: called once the events of one read are handled (a relayed body writes them in one go)
        self.after_read: Callable[[], None] | None = None
        self.greeting = self._queue(Expect(Kind.SINGLE))

    # -- connection ------------------------------------------------------------------------

    def connectionMade(self) -> None:
        set_nodelay = getattr(self.transport, "setTcpNoDelay", None)
        if set_nodelay is not None:
            try:
                set_nodelay(True)
            except OSError:  # not a TCP socket (unix:)
                pass
        if self.proxy_header:
            self.transport.write(self.proxy_header)
        if self.tls_options is not None:
            self.transport.startTLS(self.tls_options)
            self.tls = True
        self._arm()
        self.connected_d.callback(self)

    def dataReceived(self, data: bytes) -> None:
        if self._closed:
            return
        for event in self.reader.feed(data):
            self._event(event)
            if self._closed:
                return
        if self.after_read is not None:
            self.after_read()
        self._arm()

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self.setTimeout(None)
        self._closed = True
        if self._requests:
            self._fail_all(UpstreamFailure(_describe(reason)))

    def abort(self, why: str | None = None, *, violation: bool = False) -> None:
        """Close without QUIT (nothing outstanding is completed); idempotent."""
        if why is not None and self._failure is None:
            self._fail_all(UpstreamFailure(why, violation=violation))
        self._closed = True
        self.setTimeout(None)
        if self.transport is not None:
            self.transport.abortConnection()

    def close(self) -> None:
        """After QUIT: let the upstream's last bytes out, then close."""
        self._closed = True
        self.setTimeout(None)
        if self.transport is not None:
            self.transport.loseConnection()

    def timeoutConnection(self) -> None:
        if not self._requests or self._paused:
            return  # nothing was due: the next request starts the timer again
        self.abort(f"no answer within {self.response_timeout:g} s")

    # -- requests --------------------------------------------------------------------------

    def request(self, line: bytes, expect: Expect | Kind = Kind.SINGLE, *,
                on_body: Callable[[bytes], None] | None = None,
                on_status: Callable[[Status], None] | None = None,
                start_tls: Any = None, responses: list[bytes] | None = None) -> defer.Deferred[Response]:
        """Send ``line`` (CRLF added) and wait for its response; SASL challenges get
        ``responses`` one by one, then a cancel."""
        if self._failure is not None:
            return defer.fail(self._failure)
        if self._closed:
            return defer.fail(UpstreamFailure("connection closed"))
        d = self._queue(expect if isinstance(expect, Expect) else Expect(expect), on_body, on_status,
                        start_tls)
        if responses:
            self._requests[-1].responses.extend(responses)
        self._write(line + b"\r\n")
        self._arm()
        return d

    def pipeline(self, requests: list[tuple[bytes, Expect | Kind]]) -> list[defer.Deferred[Response]]:
        """Several requests at once (the upstream offers PIPELINING): one write for all their
        lines; a Deferred of each response, in order."""
        if self._failure is not None or self._closed:
            failure = self._failure or UpstreamFailure("connection closed")
            return [defer.fail(failure) for _ in requests]
        deferreds = [self._queue(expect if isinstance(expect, Expect) else Expect(expect))
                     for _, expect in requests]
        self._write(b"".join(line + b"\r\n" for line, _ in requests))
        self._arm()
        return deferreds

    def send_line(self, line: bytes) -> None:
        """A line that gets no response of its own (a SASL continuation answer)."""
        if not self._closed:
            self._write(line + b"\r\n")

    def cork(self) -> None:
        """Hold the command lines written from now on until :meth:`uncork` (pipelined requests
        made by several calls, e.g. the login and the listing behind it, go out in one write)."""
        if self._corked is None:
            self._corked = []

    def uncork(self) -> None:
        """Write what :meth:`cork` held, in one write."""
        held, self._corked = self._corked, None
        if held and not self._closed:
            eagerwrite.write(self.transport, held[0] if len(held) == 1 else b"".join(held))

    def _write(self, data: bytes) -> None:
        if self._corked is not None:
            self._corked.append(data)
        else:
            eagerwrite.write(self.transport, data)

    def _queue(self, expect: Expect, on_body: Any = None, on_status: Any = None,
               start_tls: Any = None) -> defer.Deferred[Response]:
        d: defer.Deferred[Response] = defer.Deferred(lambda _: self.abort("cancelled"))
        self.reader.expect(expect)
        self._requests.append(_Request(expect, d, on_body, on_status, start_tls))
        return d

    # -- events ----------------------------------------------------------------------------

    def _event(self, event: Any) -> None:
        kind = type(event)  # the reader's events are final classes: by type, the common ones first
        if kind is Body:
            request = self._requests[0]
            if request.on_body is not None:
                request.on_body(event.data)
            else:
                request.pieces.append(event.data)
            return
        if kind is Refused:
            self.abort(f"refused the upstream's response: {event.problem.value} ({event.detail})", violation=True)
            return
        if kind is Discarded:
            log.info("{name}: discarded {octets} octets sent in plaintext after STLS",
                     name=self.name, octets=event.octets)
            return
        request = self._requests[0]
        if kind is Continuation:
            if request.responses:
                self.send_line(request.responses.pop(0))
            else:
                self.send_line(b"*")  # we have nothing more to say: cancel, the -ERR follows
            return
        if kind is Status:
            if request.expect.kind is Kind.MULTI and event.ok:
                request.status = event
                if request.on_status is not None:
                    request.on_status(event)
                return
            self._requests.popleft()
            if request.start_tls is not None and event.ok:
                self.transport.startTLS(request.start_tls)
                self.tls = True
            request.deferred.callback(Response(event))
            return
        if kind is End:
            self._requests.popleft()
            assert request.status is not None
            body = None if request.on_body is not None else b"".join(request.pieces)
            request.deferred.callback(Response(request.status, body, event))

    def _fail_all(self, failure: UpstreamFailure) -> None:
        if self._failure is None:
            self._failure = failure
        requests, self._requests = self._requests, deque()
        for request in requests:
            if not request.deferred.called:
                request.deferred.errback(failure)

    # -- the response timer, which a paused (backpressured) read does not run --------------

    def _arm(self) -> None:
        if self._closed:
            return
        if self._paused:
            self.setTimeout(None)
        elif self._requests:
            self.setTimeout(self.response_timeout)  # (re)started: moved, not made anew
        # with nothing due the timer is left to run out: cancelling it after each response and
        # making a new one for the next command cost a DelayedCall per command; when it fires
        # with nothing due, timeoutConnection lets it go

    def pause(self) -> None:
        self._paused = True
        self.setTimeout(None)
        if self.transport is not None:
            self.transport.pauseProducing()

    def resume(self) -> None:
        if not self._paused:
            return
        self._paused = False
        if self.transport is not None and not self._closed:
            self.transport.resumeProducing()
        self._arm()


@implementer(IPushProducer)
class PausingProducer:
    """Registered with the client's transport while a body streams: a slow client pauses the
    upstream read (and its response timer)."""

    def __init__(self, protocol: UpstreamProtocol) -> None:
        self.protocol = protocol

    def pauseProducing(self) -> None:
        self.protocol.pause()

    def resumeProducing(self) -> None:
        self.protocol.resume()

    def stopProducing(self) -> None:
        self.protocol.abort("the client connection went away")


def _describe(reason: Failure | None) -> str:
    """One line for the log: why the connection ended."""
    if reason is None:
        return "connection closed"
    value = reason.value
    name = type(value).__name__
    text = reason.getErrorMessage()
    try:
        from OpenSSL import SSL

        if isinstance(value, SSL.Error):
            return f"TLS failure: {text}"
    except ImportError:  # pragma: no cover
        pass
    if name == "ConnectionDone":
        return "the upstream closed the connection"
    if name == "ConnectionLost":
        return "connection lost: " + text
    return f"{name}: {text}"


def proxy_v2_header(client: str | None, client_port: int | None, server: str | None,
                    server_port: int | None) -> bytes:
    """A PROXY protocol v2 header for a TCP client (LOCAL when the address is unknown)."""
    signature = b"\r\n\r\n\x00\r\nQUIT\n"
    try:
        src = ipaddress.ip_address(client) if client else None
    except ValueError:
        src = None
    if src is None:
        return signature + bytes([0x20, 0x00]) + struct.pack("!H", 0)
    if src.version == 6 and src.ipv4_mapped is not None:
        src = src.ipv4_mapped
    try:
        dst = ipaddress.ip_address(server) if server else None
    except ValueError:
        dst = None
    if dst is not None and dst.version == 6 and dst.ipv4_mapped is not None:
        dst = dst.ipv4_mapped
    if dst is None or dst.version != src.version:
        dst = ipaddress.ip_address("0.0.0.0" if src.version == 4 else "::")
        server_port = 0
    if src.version == 4:
        payload = src.packed + dst.packed + struct.pack("!HH", client_port or 0, server_port or 0)
        return signature + bytes([0x21, 0x11]) + struct.pack("!H", len(payload)) + payload
    payload = src.packed + dst.packed + struct.pack("!HH", client_port or 0, server_port or 0)
    return signature + bytes([0x21, 0x21]) + struct.pack("!H", len(payload)) + payload
