"""The Twisted side of a POP3 session: sockets and the clock around the sans-I/O core.

The protocol feeds bytes to :class:`~pop3shield.core.session.Session` and carries out the actions
it returns: a login goes to the factory's backend (:class:`~pop3shield.backends.IBackend`), a
message to the open mailbox (:class:`~pop3shield.backends.IMailbox`), QUIT's UPDATE to its commit.
Reading from the socket is paused whenever the session waits for something (a login, a message
being streamed, a commit, a slow analysis) with input pending; while the client has not taken
the output it was sent (more than ``output_buffer_limit`` waiting) no command runs, so pipelined
input and output stay bounded. One connection runs at most COMMANDS_PER_TURN commands (a replayed
reply counting 1/REPLAYS_PER_LINE of one) or writes LISTING_OCTETS_PER_TURN of a listing per turn of
the reactor, then lets the others have theirs.
A client that takes no output for ``write_stall_timeout`` seconds, or a connection that does not
finish closing within it, is aborted. Nothing here knows what the backend is.
"""

from __future__ import annotations

import dataclasses

import secrets
import time
from collections import Counter
from collections.abc import Sequence
from typing import Any, Callable

from twisted.internet import defer
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IConsumer, IHandshakeListener, IPushProducer, ISSLTransport, ITLSTransport
from twisted.internet.protocol import Protocol, ServerFactory
from twisted.logger import LogLevel
from twisted.protocols.policies import TimeoutMixin
from twisted.python.failure import Failure
from zope.interface import implementer

from pop3shield import eagerwrite
from pop3shield.backends import (
    BackendBroken,
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
from pop3shield.lifecycle import Connections
from pop3shield.limits import (
    EVICTED,
    EVICTION_GRACE,
    STATE_UNAVAILABLE,
    TOO_FAST_FROM_ADDRESS,
    TOO_MANY_FROM_ADDRESS,
    AddressLimits,
    ConnectionLimits,
    ConnectionPolicy,
    FailureDelays,
)
from pop3shield.hashpool import CLEAN, SUSPECT, TRUSTED
from pop3shield.logsetup import QuietDebugLogger
from pop3shield.metrics import CommandScanner, Metrics
from pop3shield.proxyproto import BadHeader, HeaderReader, TrustedProxies, looks_like_header
from pop3shield.state import IState, LocalState, LoginHistory, StateUnavailable, address_key, user_key

log = QuietDebugLogger(namespace="pop3shield.server")


#: actions that may wait in the output batch: anything else first flushes what was said before it
_BATCHED = (A.Send, A.Report, A.LoggedIn)
#: lines one connection runs per turn of the reactor before the others get theirs
COMMANDS_PER_TURN = 32
#: lines answered from a remembered reply (STAT, NOOP, LIST n, UIDL n again) that count as one
#: of those: a turn is at most COMMANDS_PER_TURN lines the whole way or 4 times as many replays
#: (about the same CPU), so 100 pipelined small commands are one turn and one write, not four
REPLAYS_PER_LINE = 4
#: octets of a streamed listing one connection writes per turn of the reactor
LISTING_OCTETS_PER_TURN = 64 * 1024


def _buffering_transport(transport: Any) -> Any:
    """The file descriptor under ``transport`` (TLS, PROXY wrappers) whose buffer pauses producers."""
    for _ in range(4):
        if transport is None or isinstance(getattr(type(transport), "bufferSize", None), int):
            return transport
        transport = getattr(transport, "transport", None)
    return None


@implementer(IConsumer, IPushProducer)
class _ClientStream:
    """The client's transport for the session and the backends: one batched, bounded output.

    Registered once, for the whole connection, as the transport's streaming producer, with the
    transport's buffer limit set to ``cap``: when more than ``cap`` octets wait to be sent, the
    transport pauses it, and with it the connection (``on_pause``: no reading, no command, no
    chunk), until everything is sent (``on_resume``). A backend streaming a message (the Maildir's
    :class:`~pop3shield.streaming.MessageSender`, the relay's reader) registers its producer here,
    not with the transport, and is paused and resumed with the connection, so a message of any
    size, a pipelined reply or a listing all stop at the same cap.

    Replies are batched: :meth:`queue` collects them, :meth:`flush` (or the next :meth:`write`)
    sends them in one ``transport.write``.
    """

    def __init__(self, transport: Any, cap: int, metrics: Metrics, on_write: Callable[[], None],
                 on_pause: Callable[[], None], on_resume: Callable[[], None]) -> None:
        self.transport = transport
        self.metrics = metrics
        self.on_write = on_write
        self.on_pause = on_pause
        self.on_resume = on_resume
        #: the transport holds more than the cap: nothing more is produced until it drains
        self.paused = False
        #: octets written through :meth:`write` (a backend's), to tell "nothing sent yet" apart
        self.written = 0
        self._pending: list[bytes] = []
        self._producer: Any = None
        self._registered = False
        buffering = _buffering_transport(transport)
        if buffering is not None:
            buffering.bufferSize = cap
        transport.registerProducer(self, True)
        self._registered = True

    # -- the session's replies

    def queue(self, data: bytes) -> None:
        self._pending.append(data)

    def flush(self) -> None:
        pending = self._pending
        if pending:
            data = pending[0] if len(pending) == 1 else b"".join(pending)
            pending.clear()  # the same list for the whole connection: see POP3ServerProtocol._run
            eagerwrite.write(self.transport, data)
            self.metrics.sent_bytes(len(data))

    def close(self) -> None:
        """Flush and stop being the transport's producer (a TLS close waits for that)."""
        self.flush()
        self._producer = None
        if self._registered:
            self._registered = False
            self.transport.unregisterProducer()

    # -- IConsumer, for a backend sending a message

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        self._producer = producer
        if self.paused:
            producer.pauseProducing()

    def unregisterProducer(self) -> None:
        self._producer = None

    def write(self, data: bytes) -> None:
        self.written += len(data)
        if self._pending:
            self._pending.append(data)
            self.flush()
        else:
            eagerwrite.write(self.transport, data)
            self.metrics.sent_bytes(len(data))
        self.on_write()

    # -- IPushProducer, driven by the transport's buffer

    def pauseProducing(self) -> None:
        if self.paused:
            return
        self.paused = True
        if self._producer is not None:
            self._producer.pauseProducing()
        self.on_pause()

    def resumeProducing(self) -> None:
        if not self.paused:
            return
        self.paused = False
        # the connection first (its stall timer stops), then the backend's producer: one that
        # writes at once (a cached chunk) may fill the buffer and pause us again right here, and
        # the stall timer that pause starts must not be cancelled by a resumption already over
        self.on_resume()
        if self._producer is not None and not self.paused:
            self._producer.resumeProducing()

    def stopProducing(self) -> None:
        self._registered = False
        producer, self._producer = self._producer, None
        if producer is not None:
            producer.stopProducing()


@implementer(IHandshakeListener)
class POP3ServerProtocol(Protocol, TimeoutMixin):
    """One client connection."""

    factory: POP3ServerFactory
    session: Session | None = None
    mailbox: Any = None
    _mechanism = "other"
    # The state of a connection, with the value it starts with: declared here, set on the instance
    # only once it changes, so an idle connection's attributes stay few enough for CPython to keep
    # them in its compact shared-key form (a connection held idle costs about 1.2 KB less).
    _streaming = False  # a message is going out: mid-message nothing more can be said
    _out: _ClientStream | None = None  # the client's output, once the session starts
    _listing: Any = None  # the chunks of a listing still to send
    _turn: Any = None  # the call that runs the next turn of this connection
    _stall: Any = None  # the timer of a client that takes no output
    _closing: Any = None  # the grace timer of a closing connection
    _committing = False
    _reading_paused = False
    _timeout_state: State | None = None
    # what the one closing log line reports
    _ended: str | None = None
    _user: str | None = None
    _octets_in = 0
    _logins_failed = 0
    _deleted: int | None = None

    def connectionMade(self) -> None:
        f = self.factory
        self.callLater = f.reactor.callLater  # TimeoutMixin's clock: the factory's reactor
        peer, host = self.transport.getPeer(), self.transport.getHost()
        self.session_id = secrets.token_hex(6)
        self._set_addresses((getattr(peer, "host", None), getattr(peer, "port", None)),
                            (getattr(host, "host", None), getattr(host, "port", None)))
        # what the one closing log line reports
        self._started = f.reactor.seconds()
        f.connections.add(self)  # SIGTERM's drain waits for it (lifecycle.Connections)
        if self.client_address in f.trusted_proxies:
            # the client's address comes in the PROXY header: until then no byte goes out, nothing is decided
            self._proxy_reader = HeaderReader()
            self._proxy_deadline = f.reactor.callLater(f.proxy_timeout, self._proxy_refused, "no header in time")
            return
        self._admit()

    def _set_addresses(self, client: tuple[Any, Any], server: tuple[Any, Any]) -> None:
        self.client_address = client[0]
        self.ctx = SessionContext(self.session_id, client[0], client[1], server[0], server[1])

    # ------------------------------------------------------------------ PROXY header (trusted proxies only)

    _proxy_reader: HeaderReader | None = None
    _proxy_deadline: Any = None

    def _proxy_received(self, data: bytes) -> None:
        assert self._proxy_reader is not None
        try:
            header = self._proxy_reader.feed(data)
        except BadHeader as exc:
            self._proxy_refused(str(exc))
            return
        if header is None:
            return
        self._proxy_reader = None
        if self._proxy_deadline is not None and self._proxy_deadline.active():
            self._proxy_deadline.cancel()
        self._proxy_deadline = None
        proxy = self.ctx.client_address
        if header.source is not None:  # else LOCAL / UNKNOWN: the proxy's own connection, it is the client
            host = self.transport.getHost()
            destination = header.destination or (getattr(host, "host", None), getattr(host, "port", None))
            self._set_addresses(header.source, destination)
        log.debug("session {session} PROXY v{version} header from {proxy}: client {address}:{port}",
                  session=self.session_id, version=header.version, proxy=proxy,
                  address=self.ctx.client_address, port=self.ctx.client_port)
        self._admit(header.remaining)

    def _proxy_refused(self, reason: str) -> None:
        self._proxy_deadline = None
        if self._proxy_reader is None:
            return
        self._proxy_reader = None
        log.warn("session {session} refused: PROXY header from {proxy}:{port}: {reason}", session=self.session_id,
                 proxy=self.ctx.client_address, port=self.ctx.client_port, reason=reason)
        self.transport.abortConnection()  # nothing was said: a POP3 byte would go to the proxy, not a client

    # ------------------------------------------------------------------ admission, then the session

    _admitting = False
    _early = b""

    def _admit(self, early: bytes = b"") -> None:
        """Ask the limits (maybe shared, so maybe later); input waits, with reading paused."""
        self._admitting = True
        self._early = early
        d = self.factory.admit(self.client_address, self.session_id)
        d.addCallback(self._admission)
        d.addErrback(self._log_failure, "admission")
        if self._admitting and not self._gone:
            self.transport.pauseProducing()
            self._reading_paused = True

    def _admission(self, refusal: bytes | None) -> None:
        self._admitting = False
        if self._gone:
            if refusal is None:
                self.factory.release(self.client_address, self.session_id, counted=True)
            return
        if self._reading_paused:
            self._reading_paused = False
            self.transport.resumeProducing()
        self.factory.metrics.connection_opened(refusal is None)
        if refusal is not None:
            self.transport.write(refusal)
            self.factory.metrics.sent_bytes(len(refusal))
            self.transport.loseConnection()
            return
        self._admitted = True
        self._commands_seen = CommandScanner()  # command keywords, for the metrics
        self._start_session(self._early)
        self._early = b""

    def _start_session(self, early: bytes) -> None:
        f = self.factory
        if hasattr(self.transport, "setTcpNoDelay"):
            self.transport.setTcpNoDelay(True)
        tls = ISSLTransport.providedBy(self.transport)  # an implicit-TLS (ssl:) listener
        self.session = Session(f.settings, self.client_address, challenge=f.challenge(),
                               quick_check=f.quick_check, tls=tls,
                               can_starttls=f.tls is not None and not tls and ITLSTransport.providedBy(self.transport))
        self.session.turn_budget = COMMANDS_PER_TURN
        self.session.replays_per_line = REPLAYS_PER_LINE
        self._out = _ClientStream(self.transport, f.output_buffer_limit, f.metrics, self.resetTimeout,
                                  self._output_paused, self._output_resumed)
        log.debug("session {session} connect from {address}:{port}", session=self.session_id,
                  address=self.ctx.client_address, port=self.ctx.client_port)
        if f.login_deadline:
            # absolute, unlike the idle timeout that each byte restarts: one byte a second buys nothing
            self._prelogin_timer = f.reactor.callLater(f.login_deadline, self._login_deadline_reached)
        if f.greeting_delay > 0:
            self._greeting = f.reactor.callLater(f.greeting_delay, self._greet)
            self.setTimeout(f.login_timeout)
        else:
            self._greet()
        if early:
            self.dataReceived(early)

    _greeting: Any = None
    _prelogin_timer: Any = None

    _evicted = False

    @property
    def connected_at(self) -> float:
        return self._started

    def waiting_for_login(self) -> bool:
        """Admitted, its session started, not logged in and not in the middle of a login: evictable."""
        return (self._admitted and not self._logged_in and not self._gone and not self._evicted
                and self.session is not None and not self.session.closed and not self._tls_pending
                and not isinstance(self.session.awaiting, A.Authenticate))  # a login under way is left alone

    def evict(self) -> None:
        """The server is full and this is the oldest connection waiting to log in: told, then closed."""
        self._evicted = True
        self._ended = "evicted: server full"
        log.debug("session {session} from {address}:{port} evicted: max_connections reached",
                  session=self.session_id, address=self.ctx.client_address, port=self.ctx.client_port)
        session = self.session
        assert session is not None and self._out is not None
        session.connection_lost()  # nothing more from the core: not logged in, nothing to keep
        self._out.write(EVICTED)
        self.lose_connection()
        self.factory.reactor.callLater(EVICTION_GRACE, self._abort_evicted)

    def _abort_evicted(self) -> None:
        if not self._gone:
            self.transport.abortConnection()  # its place is already another's: no write_stall_timeout

    def _login_deadline_reached(self) -> None:
        """``server.login_deadline`` after the connection, still not logged in: dropped (Dovecot's 180 s)."""
        self._prelogin_timer = None
        if self.session is None or self.session.closed or self._logged_in:
            return
        self._ended = "login deadline"
        log.info("session {session} from {address}:{port} not logged in within {deadline:g} s: disconnected",
                 session=self.session_id, address=self.ctx.client_address, port=self.ctx.client_port,
                 deadline=self.factory.login_deadline)
        self._run(self.session.timed_out())

    def _greet(self) -> None:
        """Send the greeting; input that arrived before it makes the session refuse the client."""
        self._greeting = None
        if self.session is not None and not self.session.closed:
            self._run(self.session.start())

    _admitted = False

    # ------------------------------------------------------------------ input

    def dataReceived(self, data: bytes) -> None:
        if self._proxy_reader is not None:
            self._proxy_received(data)
            return
        if self._admitting:
            self._early += data  # at most a read or two: reading is paused until admission is decided
            return
        if self.session is None or self.session.closed:
            return
        if self._octets_in == 0 and looks_like_header(data):
            # a PROXY header from a peer outside server.proxy_protocol_networks: it may not choose its address
            log.warn("session {session} refused: PROXY header from untrusted {address}:{port}",
                     session=self.session_id, address=self.ctx.client_address, port=self.ctx.client_port)
            self._ended = "PROXY header from an untrusted peer"
            self.session.connection_lost()
            self.lose_connection()
            return
        self.resetTimeout()
        if self._turn is None and self._out is not None and not self._out.paused:
            self.session.turn_budget = COMMANDS_PER_TURN  # a read is a turn of its own
        self._octets_in += len(data)
        self.factory.metrics.received_bytes(len(data))
        keywords = self._commands_seen.keywords(data, self.session.state is State.SASL)
        if keywords:
            self.factory.metrics.commands_seen(keywords)
        self._run(self.session.receive_data(data))

    def timeoutConnection(self) -> None:
        """Idle too long. Mid-message nothing more can be said: the connection is just dropped."""
        if self.session is None or self.session.closed:
            return
        self._ended = f"timeout in {self.session.state.value}"
        log.debug("session {session} timed out in {state}", session=self.session_id, state=self.session.state.value)
        if self._streaming or self._listing is not None:
            self.session.connection_lost()
            self.transport.abortConnection()
            return
        self._run(self.session.timed_out())

    _gone = False

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        try:
            self._connection_lost(reason)
        finally:
            self.factory.connections.discard(self)  # last: it may let the shutdown go on

    def _connection_lost(self, reason: Failure | None) -> None:
        self._gone = True
        self.setTimeout(None)
        # work queued for this client is dropped: its next turn, the rest of a listing, the timers
        self._listing = None
        for timer in (self._turn, self._stall, self._closing):
            if timer is not None and timer.active():
                timer.cancel()
        self._turn = self._stall = self._closing = None
        self._proxy_reader = None
        if self._proxy_deadline is not None and self._proxy_deadline.active():
            self._proxy_deadline.cancel()
        if self._greeting is not None and self._greeting.active():
            self._greeting.cancel()
        if self._prelogin_timer is not None and self._prelogin_timer.active():
            self._prelogin_timer.cancel()
        if self._analysis is not None:
            self._analysis.cancel()  # a queued analysis of a client that left is dropped
        if self._admitted:
            self.factory.release(self.client_address, self.session_id, counted=not self._logged_in)
            self.factory.metrics.connection_closed()
        if self._user_slot is not None:
            self.factory.state.release(self._user_slot, self.session_id)
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
        out = self._out
        pending = out._pending if out is not None else None
        for action in actions:
            kind = type(action)
            if kind is A.Send and pending is not None:
                pending.append(action.data)  # what _do_Send (out.queue) does, without a call per reply
                continue
            if out is not None and not isinstance(action, _BATCHED):
                out.flush()  # what was said goes first, before anything else happens (e.g. STARTTLS)
            getattr(self, "_do_" + kind.__name__)(action)
        if out is not None:
            out.flush()  # the replies of one batch of input: one write
        self._update_reading()
        self._update_timeout()
        self._schedule_turn()

    def _update_reading(self) -> None:
        """Stop reading while the session waits, or has used up its turn, with input pending;
        this bounds pipelined input. While the client has not taken its output the turn is used
        up at once (``turn_budget`` 0), so the first read that arrives then stops reading too.

        A client that waits for each answer never has input pending, so its socket is never
        paused: two epoll changes per command saved. One that pipelines is paused as soon as
        its commands queue up, with at most one read buffered (and the framer's cap on top).
        Reading is not stopped for the output alone: a TLS layer pauses its producer during
        the handshake, which needs the reading to go on.
        """
        session = self.session
        if session is None or session.closed or self._out is None:
            return
        want_pause = (session.busy or session.yielded) and session.buffered > 0
        if want_pause and not self._reading_paused:
            self.transport.pauseProducing()
            self._reading_paused = True
        elif not want_pause and self._reading_paused:
            self._reading_paused = False
            self.transport.resumeProducing()

    # ------------------------------------------------------------------ turns, output, stalls

    def _schedule_turn(self) -> None:
        """Another turn for this connection, after the others had theirs, when work is left."""
        session = self.session
        if self._turn is not None or self._gone or session is None or session.closed:
            return
        if self._out is None or self._out.paused:
            return  # the output's resumption schedules it
        if session.yielded or (self._listing is not None and not session.closed):
            self._turn = self.factory.reactor.callLater(0, self._next_turn)

    def _next_turn(self) -> None:
        self._turn = None
        session = self.session
        if self._gone or session is None or session.closed or self._out is None or self._out.paused:
            return
        if self._listing is not None:
            self._pump_listing()
            return
        session.turn_budget = COMMANDS_PER_TURN
        self._run(session.proceed())

    def _output_paused(self) -> None:
        """More than the cap waits for the client: no command or chunk until it drains."""
        if self.session is not None:
            self.session.turn_budget = 0
        if self._stall is None and not self._gone:
            self._stall = self.factory.reactor.callLater(self.factory.write_stall_timeout, self._stalled)
        self._update_reading()

    def _output_resumed(self) -> None:
        if self._stall is not None:
            if self._stall.active():
                self._stall.cancel()
            self._stall = None
        self._update_reading()
        self._schedule_turn()

    def _stalled(self) -> None:
        """The client took nothing for write_stall_timeout: a message in flight keeps it no longer."""
        self._stall = None
        if self._gone:
            return
        log.info("session {session} aborted: client {address}:{port} took no output for {timeout:g} s",
                 session=self.session_id, address=self.ctx.client_address, port=self.ctx.client_port,
                 timeout=self.factory.write_stall_timeout)
        self._abort("write stall")

    def _close_overdue(self) -> None:
        self._closing = None
        if self._gone:
            return
        log.info("session {session} aborted: output to {address}:{port} not flushed {timeout:g} s after closing",
                 session=self.session_id, address=self.ctx.client_address, port=self.ctx.client_port,
                 timeout=self.factory.write_stall_timeout)
        self._abort(None)

    def _abort(self, ended: str | None) -> None:
        if ended is not None and self._ended is None:
            self._ended = ended
        self._listing = None
        if self.session is not None:
            self.session.connection_lost()
        self.transport.abortConnection()

    def _pump_listing(self) -> None:
        """Write a listing's chunks while the client takes them, a bounded amount per turn."""
        budget = LISTING_OCTETS_PER_TURN
        out = self._out
        assert out is not None
        while self._listing is not None and not out.paused:
            if budget <= 0:
                self._schedule_turn()
                return
            chunk = next(self._listing, None)
            if chunk is None:
                self._listing = None
                self._run(self.session.listing_sent())
                return
            out.write(chunk)
            budget -= len(chunk)

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
        assert self._out is not None
        self._out.queue(action.data)

    def _do_SendListing(self, action: A.SendListing) -> None:
        self._listing = iter(action.chunks)
        self._pump_listing()

    def _do_Close(self, action: A.Close) -> None:
        if self._ended is None:  # a timeout already said more
            self._ended = action.reason
        log.debug("session {session} closing: {reason}", session=self.session_id, reason=action.reason)
        self.lose_connection()

    def lose_connection(self) -> None:
        """Close once what was written is sent, within write_stall_timeout; use this, not the
        transport's loseConnection, once the session started: a TLS transport does not close
        while the connection's output producer is registered."""
        if self._stall is not None:
            if self._stall.active():
                self._stall.cancel()
            self._stall = None  # closing has its own grace from now on
        if self._out is not None:
            self._out.close()
        self.transport.loseConnection()
        if self._closing is None and not self._gone:
            # a client that does not take the last bytes does not hold the connection open
            self._closing = self.factory.reactor.callLater(self.factory.write_stall_timeout, self._close_overdue)

    # ------------------------------------------------------------------ STLS and shutdown

    _tls_pending = False

    def _do_StartTLS(self, action: A.StartTLS) -> None:
        """The +OK is written (in plaintext, first); from here every byte read goes through TLS."""
        self._tls_pending = True
        self.transport.startTLS(self.factory.tls)  # the certificate current now (SIGHUP may replace it)

    def handshakeCompleted(self) -> None:
        """IHandshakeListener: the STLS handshake is done (also called for an ssl: listener's own)."""
        if not self._tls_pending:
            return
        self._tls_pending = False
        log.debug("session {session} STLS: TLS started", session=self.session_id)
        self._guard(lambda _: self.session.tls_started())(None)

    def shut_down(self) -> None:
        """The shutdown grace is over: say so if the session can still speak, and close, without UPDATE.

        A session in UPDATE (QUIT's deletions under way) is left alone here (the drain's final abort
        ends its connection; the deletions themselves finish in their thread); one sending a message or
        a listing is cut (a status line in the middle of either would corrupt it).
        """
        if self._committing:
            return
        self._ended = "server shutdown"
        if (self.session is None or self.session.closed or self._streaming or self._listing is not None
                or self._tls_pending):
            if self.session is not None:
                self.session.connection_lost()
            self.transport.abortConnection()
            return
        self._run(self.session.shutting_down())

    def _do_Report(self, action: A.Report) -> None:
        self.factory.events.emit(action.event, self._context())

    def _do_LoggedIn(self, action: A.LoggedIn) -> None:
        self._user = action.username
        log.debug("session {session} login user={user} mechanism={mechanism} messages={messages} octets={octets}",
                  session=self.session_id, user=action.username, mechanism=action.mechanism,
                  messages=action.messages, octets=action.octets)

    _analysis: Any = None

    def _do_Analyze(self, action: A.Analyze) -> None:
        # shared fairly by source network: a flood from one network cannot starve the others
        d = self._analysis = self.factory.analyzer.analyze(action.arguments, self.client_address)
        d.addBoth(self._analysis_over)
        d.addErrback(self._analysis_error, len(action.arguments))
        d.addCallback(self._count_verdicts)
        d.addCallback(self._guard(lambda verdicts: [] if verdicts is None  # cancelled: the client left
                                  else self.session.analysis_finished(verdicts)))

    def _count_verdicts(self, verdicts: Any) -> Any:
        if verdicts is None:
            return None
        self.factory.metrics.deep_verdicts(verdicts)
        return verdicts

    def _analysis_over(self, result: Any) -> Any:
        self._analysis = None
        return result

    def _analysis_error(self, failure: Failure, count: int) -> list[None]:
        if failure.check(defer.CancelledError):
            return None  # cancelled: the client left, nobody waits for it
        log.failure("malicious code analysis failed", failure)
        return [None] * count

    def _guard(self, step: Callable[[Any], Sequence[A.Action]]) -> Callable[[Any], None]:
        """Run a session step for an async result, unless the connection is gone by then."""
        def call(result: Any) -> None:
            if self.session is not None and not self.session.closed:
                self._run(step(result))
        return call

    # login

    _user_slot: str | None = None
    _login_user: str | None = None
    _logged_in = False

    def _do_Authenticate(self, action: A.Authenticate) -> None:
        credentials = Credentials(action.username, action.secret, action.mechanism, action.challenge)
        self._mechanism = action.mechanism
        ctx = self.ctx
        client = ClientInfo(ctx.session, ctx.client_address, ctx.client_port, ctx.server_address, ctx.server_port)
        self._login_user = action.username
        # a failed login is answered at a deadline fixed now, from the command's arrival, whatever
        # the hash costs (so its time says nothing about the account); until the penalty is read,
        # the longest delay
        self._login_arrived = self.factory.reactor.seconds()
        self._login_deadline = self._login_arrived + self.factory.delays.ceiling
        # the shared penalty is read first: with the state unreachable and fail-closed, no login is checked
        d = self.factory.state.counts(self.client_address or "-", action.username)
        d.addCallback(self._check_login, credentials, client)
        d.addCallbacks(self._login_ok, self._login_error)
        d.addErrback(self._log_failure, "login")

    _login_arrived = 0.0
    _login_deadline = 0.0

    def _check_login(self, history: LoginHistory, credentials: Credentials, client: ClientInfo) -> Any:
        if self.session is None or self.session.closed:
            return None  # the client left while the state answered: no hashing for nobody
        f = self.factory
        self._login_deadline = self._login_arrived + f.delays.delay(history.level + 1)
        over_address, over_user, over_pair = (bool(limit and count >= limit) for count, limit in
                                              zip((history.address, history.user, history.pair),
                                                  f.penalty_thresholds))
        # the attempt's own history: its address's failures and the pair's (a user name being guessed
        # from elsewhere says nothing about this client)
        if over_address or over_pair or (over_user and history.own_failures):
            # an active penalty: refused at the deadline unchecked, so no thread hashes for a guesser
            # (a right password is refused too, until it is forgotten); a user name guessed from many
            # addresses is checked only for a client whose address and pair have no failures, once
            # per such address, so its owner still logs in from a clean address
            log.debug("session {session} login not checked: failures address={address} user={user} pair={pair}",
                      session=self.session_id, address=history.address, user=history.user, pair=history.pair)
            raise LoginRefused("penalty")
        # its place in the hashing queue: a guesser's attempts wait behind everyone's; a pair that
        # logged in lately (on any worker: the state remembers) goes first (hashpool)
        standing = SUSPECT if history.own_failures else TRUSTED if history.known else CLEAN
        if standing != CLEAN:
            client = dataclasses.replace(client, standing=standing)
        return f.backend.login(credentials, client)

    def _login_ok(self, mailbox: Any) -> None:
        if mailbox is None:
            return
        if self.session is None or self.session.closed:
            mailbox.release()
            return
        f = self.factory
        address, user = self.client_address or "-", self._login_user or ""
        d = f.state.succeeded(address, user)  # forgives this pair's failures only, and marks it known
        d.addErrback(self._state_error, "clearing the failures of a valid login")
        slot = user_key(user, self.client_address)
        d = f.state.acquire(slot, self.session_id, f.max_connections_per_user_ip)
        d.addCallbacks(self._user_admitted, self._user_admission_error, callbackArgs=(mailbox, slot),
                       errbackArgs=(mailbox,))
        d.addErrback(self._log_failure, "login")

    def _user_admitted(self, admitted: bool, mailbox: Any, slot: str) -> None:
        if admitted:
            if self._gone:  # connectionLost has run: nobody else will give the slot back
                self.factory.state.release(slot, self.session_id)
            else:
                self._user_slot = slot
        if self.session is None or self.session.closed:
            mailbox.release()
            return
        if not admitted:
            mailbox.release()
            self._run(self.session.login_failed("IN-USE", "Too many sessions for this user from your address."))
            return
        self.mailbox = mailbox
        self.factory.metrics.login(self._mechanism, "ok")
        # logged in: from now on it counts per (user, address), no longer against its address's limit
        self._logged_in = True
        if self._prelogin_timer is not None and self._prelogin_timer.active():
            self._prelogin_timer.cancel()
        self._prelogin_timer = None
        d = self.factory.state.release(address_key(self.client_address), self.session_id)
        d.addErrback(self._state_error, "releasing the address's count")
        self._run(self.session.login_succeeded(mailbox.listing))

    def _user_admission_error(self, failure: Failure, mailbox: Any) -> None:
        mailbox.release()
        self._login_error(failure)

    def _state_error(self, failure: Failure, what: str) -> None:
        failure.trap(StateUnavailable)
        log.error("session {session} shared state unavailable {what}: {error}", session=self.session_id,
                  what=what, error=failure.getErrorMessage())

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
            self._logins_failed += 1
            log.debug("session {session} login failed for user={user}", session=self.session_id,
                      user=self.session.user)
            args = ("AUTH", refused.reason) if refused.reason else ()
            d = self.factory.state.failed(self.client_address or "-", self._login_user)
            d.addCallback(lambda _level: self._login_deadline)

            def unknown(failure: Failure) -> float:  # the count is lost: the longest delay, to be safe
                self._state_error(failure, "recording a failed login")
                return self._login_arrived + self.factory.delays.ceiling
            d.addErrback(unknown)
            if refused.nodelay:
                d.addCallback(lambda _: 0.0)  # e.g. nologin + nodelay (after a verified password): answered at once
            # at the deadline fixed on arrival (or at once, when the hash took even longer); a
            # timer on the reactor: no thread waits
            d.addCallback(lambda deadline: self.factory.reactor.callLater(
                max(0.0, deadline - self.factory.reactor.seconds()),
                self._guard(lambda _: self.session.login_failed(*args)), None))
            d.addErrback(self._log_failure, "login")
            return
        if failure.check(StateUnavailable):
            self._state_error(failure, "at login")
            self._run(self.session.login_failed("SYS/TEMP", "Temporary server problem, try again later."))
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
        consumer = self._out
        assert consumer is not None
        d = defer.maybeDeferred(self.mailbox.send_message, action.key, action.body_lines, action.status,
                                consumer, prefetch=action.prefetch)
        d.addCallbacks(self._stream_done, self._stream_error, errbackArgs=(consumer.written,))

    def _stream_done(self, sent: int) -> None:
        self._streaming = False
        self._guard(lambda _: self.session.stream_finished())(None)

    def _stream_error(self, failure: Failure, written_before: int) -> None:
        self._streaming = False
        if self.session is None or self.session.closed:
            return
        broken = failure.check(BackendBroken) is not None
        if broken:
            self.factory.events.backend_failure(self._context(), failure.getErrorMessage())
        if failure.check(MessageUnavailable) and self._out is not None and self._out.written == written_before:
            # nothing was written for it: the client gets an -ERR; the session goes on unless
            # the backend itself broke
            log.warn("session {session} message unavailable: {error}", session=self.session_id,
                     error=failure.getErrorMessage())
            self._run(self.session.stream_failed(fatal=broken))
            return
        # part of the response is out: it cannot be completed, so the connection is cut
        log.warn("session {session} message cut off mid-response, connection cut: {error}", session=self.session_id,
                 error=failure.getErrorMessage())
        self._abort(None)

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
        login_deadline: float = 180.0,
        idle_timeout: float = 600.0,
        greeting_delay: float = 0.0,
        max_connections: int = 1000,
        max_connections_per_ip: int = 300,
        new_connections_per_ip: float = 0.0,
        new_connections_burst: int = 300,
        connection_limits: Any = (),
        max_connections_per_user_ip: int = 10,
        auth_failure_delay: float = 2.0,
        auth_failure_delay_max: float = 15.0,
        auth_penalty_thresholds: tuple[int, int, int] = (100, 30, 10),
        quick_check: Any = None,
        log_rate_limit: int = 60,
        log_global_rate_limit: int | None = 600,
        proxy_protocol_networks: Any = (),
        proxy_protocol_timeout: float = 5.0,
        state: IState | None = None,
        metrics: Metrics | None = None,
        tls: Any = None,
        output_buffer_limit: int = 256 * 1024,
        write_stall_timeout: float = 60.0,
    ) -> None:
        self.settings = settings
        self.backend = backend
        self.events = events
        self.reactor = reactor
        self.analyzer = analyzer
        self.login_timeout = login_timeout
        #: seconds from admission to a login, whatever the client sends meanwhile (0: none)
        self.login_deadline = login_deadline
        self.idle_timeout = idle_timeout
        self.greeting_delay = greeting_delay
        #: this process's total; per address and per (user, address) are in the (maybe shared) state
        self.limits = ConnectionLimits(max_connections)
        self.max_connections_per_ip = max_connections_per_ip
        #: per address before login: connections at once and new ones a second, overridable per network
        default = AddressLimits(max_connections_per_ip, new_connections_per_ip, new_connections_burst)
        self.policy = ConnectionPolicy(default, [
            (o.networks, AddressLimits(
                o.max_connections_per_ip if o.max_connections_per_ip is not None else default.max_connections,
                o.new_connections_per_ip if o.new_connections_per_ip is not None else default.rate,
                o.new_connections_burst if o.new_connections_burst is not None else default.burst))
            for o in connection_limits])
        self.max_connections_per_user_ip = max_connections_per_user_ip
        self.state: IState = state if state is not None else LocalState(reactor.seconds)
        self.delays = FailureDelays(auth_failure_delay, auth_failure_delay_max)
        #: failures of the address, the user, the pair from which passwords are not checked (0: always
        #: checked); part of the brute-force brake, so without a failure delay there is none
        self.penalty_thresholds = auth_penalty_thresholds if auth_failure_delay > 0 else (0, 0, 0)
        #: what the connections count (a registry of its own; served only if [metrics] is enabled)
        self.metrics = metrics if metrics is not None else Metrics()
        self.metrics.watch(events=events, analyzer=analyzer)
        #: the detector's fast tier handed to each session (by default the malicious-code detector's), counted
        self.quick_check = self.metrics.counting_quick_check(
            quick_check if quick_check is not None else _detector_quick_check())
        #: the closing info line of each session, per source address and overall
        self.session_lines = RateLimiter(log_rate_limit, log_global_rate_limit)
        #: peers whose connections start with a PROXY header naming the client, and how long it may take
        self.trusted_proxies = TrustedProxies(proxy_protocol_networks)
        self.proxy_timeout = proxy_protocol_timeout
        #: the STLS certificate (pop3shield.tls.ServerTLS, re-read on SIGHUP); None: no STLS
        self.tls = tls
        #: the open connections, which SIGTERM's grace period waits for
        self.connections = Connections(reactor)
        #: octets waiting for a client beyond which its connection stops (reading, commands, chunks)
        self.output_buffer_limit = output_buffer_limit
        #: seconds a client may take no output (or a closing connection may not flush) before the abort
        self.write_stall_timeout = write_stall_timeout

    def challenge(self) -> bytes | None:
        """The APOP timestamp for the greeting, only when APOP is enabled."""
        if not self.settings.apop:
            return None
        return f"<{secrets.token_hex(8)}.{int(time.time())}@{self.settings.hostname}>".encode("ascii")

    def admit(self, address: str | None, member: str) -> defer.Deferred[bytes | None]:
        """Count a new connection (this process's total, then its address in the state); a refusal line or None.

        The address's count holds connections not logged in (issue 10: a NAT of many users logs in
        and then counts per user and address); :meth:`release` or a login gives the place back.
        """
        refusal = self.limits.admit()
        if refusal is not None:
            if not self._evict_oldest_waiting():
                self.metrics.connection_refused("total")
                return defer.succeed(refusal)
            self.limits.take_over()
        limits = self.policy.for_address(address)
        if limits.rate > 0:  # new connections a second from the address, shared like the counts
            d = self.state.take(address_key(address), limits.rate, limits.burst)
        else:
            d = defer.succeed(True)

        def rate_decided(fast_enough: bool) -> Any:
            if not fast_enough:
                return "rate"
            return self.state.acquire(address_key(address), member, limits.max_connections)

        def decided(admitted: Any) -> bytes | None:
            if admitted is True:
                return None
            self.limits.release()
            if admitted == "rate":
                self.metrics.connection_refused("rate")
                return TOO_FAST_FROM_ADDRESS
            self.metrics.connection_refused("address")
            return TOO_MANY_FROM_ADDRESS
        d.addCallback(rate_decided)

        def unavailable(failure: Failure) -> bytes:
            self.limits.release()
            failure.trap(StateUnavailable)
            log.error("connection from {address} refused: shared state unavailable: {error}", address=address,
                      error=failure.getErrorMessage())
            self.metrics.connection_refused("state")
            return STATE_UNAVAILABLE
        d.addCallbacks(decided, unavailable)
        return d

    def _evict_oldest_waiting(self) -> bool:
        """At ``max_connections``: close the oldest connection not logged in, of the address holding the
        most such connections, so that a slowloris of half-open connections cannot lock everyone out
        (new clients push its connections out, not the other way round). False: none to evict."""
        waiting = [connection for connection in self.connections if connection.waiting_for_login()]
        if not waiting:
            return False
        per_address = Counter(connection.client_address for connection in waiting)
        victim = min(waiting, key=lambda c: (-per_address[c.client_address], c.connected_at))
        victim.evict()
        self.metrics.connection_evicted()
        return True

    def release(self, address: str | None, member: str, *, counted: bool) -> None:
        """An admitted connection ended; ``counted``: it still counts against its address (not logged in)."""
        self.limits.release()
        if counted:
            d = self.state.release(address_key(address), member)
            d.addErrback(lambda failure: log.failure("releasing a connection", failure))
