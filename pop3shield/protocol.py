"""The Twisted side of a POP3 session: sockets and the clock around the sans-I/O core.

The protocol feeds bytes to :class:`~pop3shield.core.session.Session` and carries out the actions
it returns: a login goes to the factory's backend (:class:`~pop3shield.backends.IBackend`), a
message to the open mailbox (:class:`~pop3shield.backends.IMailbox`), QUIT's UPDATE to its commit.
Reading from the socket is paused whenever the session waits for something (a login, a message
being streamed, a commit, a slow analysis), so pipelined input stays bounded. Nothing here knows
what the backend is.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Sequence
from typing import Any, Callable

from twisted.internet import defer
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IConsumer
from twisted.internet.protocol import Protocol, ServerFactory
from twisted.logger import Logger, LogLevel
from twisted.protocols.policies import TimeoutMixin
from twisted.python.failure import Failure
from zope.interface import implementer

from pop3shield.backends import (
    ClientInfo,
    Credentials,
    IBackend,
    LoginRefused,
    MailboxInUse,
    MessageUnavailable,
    Unavailable,
)
from pop3shield.core import actions as A
from pop3shield.core.session import Session, State
from pop3shield.core.settings import SessionSettings
from pop3shield.events import EventLog, RateLimiter, SessionContext
from pop3shield.limits import ConnectionLimits, FailureDelays
from pop3shield.metrics import CommandScanner, Metrics

log = Logger(namespace="pop3shield.server")


@implementer(IConsumer)
class _ClientStream:
    """The client's transport as a backend's consumer: each write also counts as activity."""

    def __init__(self, transport: Any, on_write: Callable[[], None], metrics: Metrics) -> None:
        self.transport = transport
        self.on_write = on_write
        self.metrics = metrics

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        self.transport.registerProducer(producer, streaming)

    def unregisterProducer(self) -> None:
        self.transport.unregisterProducer()

    def write(self, data: bytes) -> None:
        self.transport.write(data)
        self.metrics.sent_bytes(len(data))
        self.on_write()


class POP3ServerProtocol(Protocol, TimeoutMixin):
    """One client connection."""

    factory: POP3ServerFactory
    session: Session | None = None
    mailbox: Any = None
    _mechanism = "other"

    def connectionMade(self) -> None:
        f = self.factory
        self.callLater = f.reactor.callLater  # TimeoutMixin's clock: the factory's reactor
        peer, host = self.transport.getPeer(), self.transport.getHost()
        self.client_address = getattr(peer, "host", None)
        self.session_id = secrets.token_hex(6)
        self.ctx = SessionContext(self.session_id, self.client_address, getattr(peer, "port", None),
                                  getattr(host, "host", None), getattr(host, "port", None))
        self._streaming = False  # a message is going out: mid-message nothing more can be said
        self._committing = False
        self._reading_paused = False
        self._timeout_state: State | None = None
        # what the one closing log line reports
        self._started = f.reactor.seconds()
        self._ended: str | None = None
        self._user: str | None = None
        self._octets_in = 0
        self._logins_failed = 0
        self._deleted: int | None = None
        refusal = f.admit(self.client_address)
        f.metrics.connection_opened(refusal is None)
        if refusal is not None:
            self.transport.write(refusal)
            f.metrics.sent_bytes(len(refusal))
            self.transport.loseConnection()
            return
        self._admitted = True
        self._commands_seen = CommandScanner()  # command keywords, for the metrics
        if hasattr(self.transport, "setTcpNoDelay"):
            self.transport.setTcpNoDelay(True)
        self.session = Session(f.settings, self.client_address, challenge=f.challenge(),
                               quick_check=f.quick_check)
        log.debug("session {session} connect from {address}:{port}", session=self.session_id,
                  address=self.ctx.client_address, port=self.ctx.client_port)
        if f.greeting_delay > 0:
            self._greeting = f.reactor.callLater(f.greeting_delay, self._greet)
            self.setTimeout(f.login_timeout)
        else:
            self._greet()

    _greeting: Any = None

    def _greet(self) -> None:
        """Send the greeting; input that arrived before it makes the session refuse the client."""
        self._greeting = None
        if self.session is not None and not self.session.closed:
            self._run(self.session.start())

    _admitted = False

    # ------------------------------------------------------------------ input

    def dataReceived(self, data: bytes) -> None:
        if self.session is None or self.session.closed:
            return
        self.resetTimeout()
        self._octets_in += len(data)
        self.factory.metrics.received_bytes(len(data))
        self._commands_seen.feed(data, self.session.state is State.SASL, self.factory.metrics.command)
        self._run(self.session.receive_data(data))

    def timeoutConnection(self) -> None:
        """Idle too long. Mid-message nothing more can be said: the connection is just dropped."""
        if self.session is None or self.session.closed:
            return
        self._ended = f"timeout in {self.session.state.value}"
        log.debug("session {session} timed out in {state}", session=self.session_id, state=self.session.state.value)
        if self._streaming:
            self.session.connection_lost()
            self.transport.abortConnection()
            return
        self._run(self.session.timed_out())

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self.setTimeout(None)
        if self._greeting is not None and self._greeting.active():
            self._greeting.cancel()
        if self._admitted:
            self.factory.release(self.client_address)
            self.factory.metrics.connection_closed()
        if self.session is None:
            return
        self.session.connection_lost()
        if self.mailbox is not None and not self._committing:
            mailbox, self.mailbox = self.mailbox, None
            mailbox.release()  # a dropped connection deletes nothing
        self.factory.events.session_summary(self._context(), dict(self.session.engine.repeats))
        self._log_closed(reason)

    def _log_closed(self, reason: Failure | None) -> None:
        """The one info line of a session, rate-limited per source address and overall."""
        f = self.factory
        now = f.reactor.seconds()
        if self._ended is not None:
            ended = self._ended
        elif reason is not None and reason.check(ConnectionDone):
            ended = "client disconnected"
        else:
            ended = "connection lost"
        admitted, notices = f.session_lines.check(self.client_address or "-", now)
        for notice in notices:
            who = "overall" if notice.source is None else "of {source}"
            what = ("rate-limited at {limit} a minute" if notice.state == "started"
                    else "rate limit ended: {suppressed} suppressed")
            log.info(f"session lines {who} {what}", source=notice.source, state=notice.state,
                     limit=notice.limit, suppressed=notice.suppressed)
        log.emit(LogLevel.info if admitted else LogLevel.debug,
                 "session {session} closed ({ended}) client={address}:{port} user={user} "
                 "duration={duration:.3f}s commands={commands} octets_in={octets_in} "
                 "logins_failed={logins_failed} deleted={deleted}",
                 session=self.session_id, ended=ended, address=self.ctx.client_address, port=self.ctx.client_port,
                 user=self._user or "-", duration=max(0.0, now - self._started),
                 commands=self.session.commands if self.session is not None else 0, octets_in=self._octets_in,
                 logins_failed=self._logins_failed, deleted="-" if self._deleted is None else self._deleted)

    # ------------------------------------------------------------------ actions

    def _run(self, actions: Sequence[A.Action]) -> None:
        for action in actions:
            handler = getattr(self, "_do_" + type(action).__name__)
            handler(action)
        self._update_reading()
        self._update_timeout()

    def _update_reading(self) -> None:
        """Stop reading while the session waits with input pending; this bounds pipelined input.

        A client that waits for each answer never has input pending, so its socket is never
        paused: two epoll changes per command saved. One that pipelines is paused as soon as
        its commands queue up, with at most one read buffered (and the framer's cap on top).
        """
        session = self.session
        if session is None or session.closed:
            return
        want_pause = session.busy and session.buffered > 0
        if want_pause and not self._reading_paused:
            self.transport.pauseProducing()
            self._reading_paused = True
        elif not want_pause and self._reading_paused:
            self._reading_paused = False
            self.transport.resumeProducing()

    def _update_timeout(self) -> None:
        """RFC 1939: at least 10 minutes once logged in; a shorter limit before."""
        session = self.session
        if session is None or session.closed or session.state is self._timeout_state:
            return
        self._timeout_state = session.state
        logged_in = session.state in (State.TRANSACTION, State.UPDATE)
        self.setTimeout(self.factory.idle_timeout if logged_in else self.factory.login_timeout)

    def _context(self) -> SessionContext:
        user = self.session.user if self.session is not None else None
        ctx = self.ctx
        return SessionContext(ctx.session, ctx.client_address, ctx.client_port, ctx.server_address,
                              ctx.server_port, user)

    def _do_Send(self, action: A.Send) -> None:
        self.transport.write(action.data)
        self.factory.metrics.sent_bytes(len(action.data))

    def _do_Close(self, action: A.Close) -> None:
        if self._ended is None:  # a timeout already said more
            self._ended = action.reason
        log.debug("session {session} closing: {reason}", session=self.session_id, reason=action.reason)
        self.transport.loseConnection()

    def _do_Report(self, action: A.Report) -> None:
        self.factory.events.emit(action.event, self._context())

    def _do_LoggedIn(self, action: A.LoggedIn) -> None:
        self._user = action.username
        log.debug("session {session} login user={user} mechanism={mechanism} messages={messages} octets={octets}",
                  session=self.session_id, user=action.username, mechanism=action.mechanism,
                  messages=action.messages, octets=action.octets)

    def _do_Analyze(self, action: A.Analyze) -> None:
        d = self.factory.analyzer.analyze(action.arguments)
        d.addErrback(self._analysis_error, len(action.arguments))
        d.addCallback(self._count_verdicts)
        d.addCallback(self._guard(lambda verdicts: self.session.analysis_finished(verdicts)))

    def _count_verdicts(self, verdicts: Any) -> Any:
        self.factory.metrics.deep_verdicts(verdicts)
        return verdicts

    def _analysis_error(self, failure: Failure, count: int) -> list[None]:
        log.failure("malicious code analysis failed", failure)
        return [None] * count

    def _guard(self, step: Callable[[Any], Sequence[A.Action]]) -> Callable[[Any], None]:
        """Run a session step for an async result, unless the connection is gone by then."""
        def call(result: Any) -> None:
            if self.session is not None and not self.session.closed:
                self._run(step(result))
        return call

    # login

    def _do_Authenticate(self, action: A.Authenticate) -> None:
        credentials = Credentials(action.username, action.secret, action.mechanism, action.challenge)
        self._mechanism = action.mechanism
        ctx = self.ctx
        client = ClientInfo(ctx.session, ctx.client_address, ctx.client_port, ctx.server_address, ctx.server_port)
        d = defer.maybeDeferred(self.factory.backend.login, credentials, client)
        d.addCallbacks(self._login_ok, self._login_error)
        d.addErrback(self._log_failure, "login")

    def _login_ok(self, mailbox: Any) -> None:
        if self.session is None or self.session.closed:
            mailbox.release()
            return
        self.mailbox = mailbox
        self.factory.metrics.login(self._mechanism, "ok")
        self.factory.delays.succeeded(self.client_address or "-")
        self._run(self.session.login_succeeded(mailbox.listing))

    def _login_error(self, failure: Failure) -> None:
        if self.session is None or self.session.closed:
            return
        self.factory.metrics.login(self._mechanism, "in-use" if failure.check(MailboxInUse)
                                   else "auth" if failure.check(LoginRefused) else "unavailable")
        if failure.check(MailboxInUse):
            self._run(self.session.login_failed("IN-USE", "Mailbox is locked by another session."))
            return
        if failure.check(LoginRefused):
            refused = failure.value
            delay = self.factory.delays.failed(self.client_address or "-")
            self._logins_failed += 1
            log.debug("session {session} login failed for user={user}", session=self.session_id,
                      user=self.session.user)
            if refused.nodelay:
                delay = 0.0  # e.g. nologin + nodelay (after a verified password): answered at once
            args = ("AUTH", refused.reason) if refused.reason else ()
            self.factory.reactor.callLater(delay, self._guard(lambda _: self.session.login_failed(*args)), None)
            return
        if failure.check(Unavailable):
            log.error("session {session} {error}", session=self.session_id, error=str(failure.value))
            self._run(self.session.login_failed(failure.value.code, failure.value.text))
            return
        log.failure("session {session} login error", failure, session=self.session_id)
        self._run(self.session.login_failed("SYS/TEMP", "Temporary server problem, try again later."))

    # messages

    def _do_StreamMessage(self, action: A.StreamMessage) -> None:
        self._streaming = True
        consumer = _ClientStream(self.transport, self.resetTimeout, self.factory.metrics)
        d = defer.maybeDeferred(self.mailbox.send_message, action.key, action.body_lines, action.status,
                                consumer, prefetch=action.prefetch)
        d.addCallbacks(self._stream_done, self._stream_error)

    def _stream_done(self, sent: int) -> None:
        self._streaming = False
        self._guard(lambda _: self.session.stream_finished())(None)

    def _stream_error(self, failure: Failure) -> None:
        self._streaming = False
        if self.session is None or self.session.closed:
            return
        if failure.check(MessageUnavailable):
            # nothing was written for it: the client gets an -ERR and the session goes on
            log.warn("session {session} message unavailable: {error}", session=self.session_id,
                     error=failure.getErrorMessage())
            self._run(self.session.stream_failed())
            return
        # part of the response is out: it cannot be completed, so the connection is cut
        log.warn("session {session} message cut off mid-response, connection cut: {error}", session=self.session_id,
                 error=failure.getErrorMessage())
        self.session.connection_lost()
        self.transport.abortConnection()

    # update

    def _do_Commit(self, action: A.Commit) -> None:
        self._committing = True
        mailbox, self.mailbox = self.mailbox, None
        d = defer.maybeDeferred(mailbox.commit, action.delete)
        d.addErrback(self._commit_error, action.delete)
        d.addCallback(self._committed, action.delete)

    def _commit_error(self, failure: Failure, keys: tuple[Any, ...]) -> list[Any]:
        log.failure("session {session} commit failed", failure, session=self.session_id)
        return list(keys)

    def _committed(self, failed: Sequence[Any], keys: tuple[Any, ...]) -> None:
        failed = list(failed)
        self._deleted = len(keys) - len(failed)
        log.debug("session {session} update: deleted={deleted} failed={failed}", session=self.session_id,
                  deleted=len(keys) - len(failed), failed=len(failed))
        self._guard(lambda _: self.session.commit_finished(failed))(None)

    def _log_failure(self, failure: Failure, what: str) -> None:
        log.failure("session {session}: {what} failed", failure, session=self.session_id, what=what)


def _detector_quick_check() -> Any:
    """The malicious-code detector's fast tier (pure Python, runs on the reactor)."""
    from pop3shield.mcp import quick_check

    return quick_check


class POP3ServerFactory(ServerFactory):
    """Shared state of all connections: settings, the backend, limits, the analysis pool, event log."""

    protocol = POP3ServerProtocol
    noisy = False

    def __init__(
        self,
        settings: SessionSettings,
        backend: IBackend,
        events: EventLog,
        *,
        reactor: Any,
        analyzer: Any,
        login_timeout: float = 60.0,
        idle_timeout: float = 600.0,
        greeting_delay: float = 0.0,
        max_connections: int = 1000,
        max_connections_per_ip: int = 20,
        auth_failure_delay: float = 2.0,
        auth_failure_delay_max: float = 15.0,
        quick_check: Any = None,
        log_rate_limit: int = 60,
        log_global_rate_limit: int | None = 600,
        metrics: Metrics | None = None,
    ) -> None:
        self.settings = settings
        self.backend = backend
        self.events = events
        self.reactor = reactor
        self.analyzer = analyzer
        self.login_timeout = login_timeout
        self.idle_timeout = idle_timeout
        self.greeting_delay = greeting_delay
        self.limits = ConnectionLimits(max_connections, max_connections_per_ip)
        self.delays = FailureDelays(auth_failure_delay, auth_failure_delay_max)
        #: what the connections count (a registry of its own; served only if [metrics] is enabled)
        self.metrics = metrics if metrics is not None else Metrics()
        self.metrics.watch(events=events, analyzer=analyzer)
        #: the detector's fast tier handed to each session (by default the malicious-code detector's), counted
        self.quick_check = self.metrics.counting_quick_check(
            quick_check if quick_check is not None else _detector_quick_check())
        #: the closing info line of each session, per source address and overall
        self.session_lines = RateLimiter(log_rate_limit, log_global_rate_limit)

    def challenge(self) -> bytes | None:
        """The APOP timestamp for the greeting, only when APOP is enabled."""
        if not self.settings.apop:
            return None
        return f"<{secrets.token_hex(8)}.{int(time.time())}@{self.settings.hostname}>".encode("ascii")

    def admit(self, address: str | None) -> bytes | None:
        """Count a new connection; the refusal line if a limit is reached."""
        return self.limits.admit(address)

    def release(self, address: str | None) -> None:
        self.limits.release(address)
