"""The POP3 session state machine, sans I/O: the public face of the core.

Bytes go in through :meth:`Session.receive_data`; a list of :mod:`actions <pop3shield.core.actions>`
comes out. Every line passes the protections before any command runs. The I/O layer may bound
the lines run per turn of its loop (``turn_budget``); the rest waits for :meth:`Session.proceed`. While the session waits for
the I/O layer (a login, a message being streamed, a commit, a slow analysis) it is ``busy``: input
stays in the bounded framer and the I/O layer stops reading from the socket. A result method
called when its action is not outstanding raises :class:`~pop3shield.core.errors.SessionMisuse`.

The work is split along its jobs, h11 style, into private modules: the screening pipeline
(:mod:`._screening`), the commands before login (:mod:`._authorization`), the AUTH exchange
(:mod:`._sasl_exchange`) and the TRANSACTION commands (:mod:`._transaction`); the table
:data:`COMMANDS` says which handler runs a keyword in which state.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import replace
from typing import Any, Hashable

from pop3shield.core import actions as A
from pop3shield.core import grammar, responses
from pop3shield.core._authorization import Authorization
from pop3shield.core._base import HARD_LINE_LIMIT, MessageEntry, QuickCheck, State
from pop3shield.core._sasl_exchange import SaslExchange
from pop3shield.core._screening import Finding, Screened, Screening
from pop3shield.core._transaction import Transaction
from pop3shield.core.errors import SessionMisuse
from pop3shield.core.framing import Line, LineFramer
from pop3shield.core.protections import ProtectionEngine
from pop3shield.core.settings import SessionSettings, _normalise_address

__all__ = ["COMMANDS", "HARD_LINE_LIMIT", "MessageEntry", "QuickCheck", "Session", "SessionMisuse", "State"]


class Session(Screening, Authorization, SaslExchange, Transaction):
    """One POP3 conversation, from greeting to close."""

    # State that starts at these values, declared here and set on the instance only once it
    # changes: an idle session's attributes then stay few enough for CPython's compact
    # shared-key form (about 1.2 KB less for every connection held).
    user: str | None = None
    #: the busy action whose result the session waits for, if any
    _awaiting: A.Action | None = None
    _started = False
    _early_data = False
    _seen_input = False
    _errors = 0
    _sasl_exchange: str | None = None
    _sasl_user: bytes | None = None
    _login_mechanism: str | None = None
    #: the maildrop and the deletion marks, made at login (none before it)
    _messages: Sequence[MessageEntry] = ()
    _deleted: AbstractSet[int] = frozenset()

    def __init__(
        self,
        settings: SessionSettings,
        client_address: str | None = None,
        *,
        challenge: bytes | None = None,
        quick_check: QuickCheck | None = None,
        tls: bool = False,
        can_starttls: bool = True,
    ) -> None:
        self.settings = settings
        #: the connection is encrypted: an implicit-TLS listener, or after STLS
        self.tls = tls
        #: the transport can start TLS (STLS is offered only then, and only before TLS)
        self._can_starttls = can_starttls
        #: with disable_plaintext_auth: this peer may log in without TLS (loopback, no IP address)
        self._secure_peer = settings.plaintext_auth_loopback and _is_local(client_address)
        self.limits = settings.protections
        self.engine = ProtectionEngine(settings.protections, client_address)
        self.state = State.AUTHORIZATION
        self.challenge = challenge if settings.apop else None
        #: the detector's fast tier, handed in by the shell (None: every argument is clean here)
        self._quick_check = quick_check
        self._framer = LineFramer(self._line_limit(), max(settings.input_buffer_limit, HARD_LINE_LIMIT),
                                  self._partial_cap())
        self._out: list[A.Action] = []
        self._commands = 0  # toward max_commands: restarts at login
        self.commands = 0  # every command of the connection, for the shell's session log line
        self._command_limit = settings.protections.commands_limit
        #: the line waiting for the slow analysis, with what its screening found
        self._pending: Screened | None = None
        #: the line whose command runs now (its sample is the one its events carry)
        self._current: Screened | None = None

    def start(self) -> list[A.Action]:
        """The greeting (RFC 1939 section 4), or a refusal when the client spoke first."""
        if self._started or self.state is State.CLOSED:
            return []
        self._started = True
        if self._early_data:
            trigger = self.engine.trigger("non_compliant", "<before greeting>", reason="data sent before the greeting")
            if self._apply([Finding(trigger, "Protocol violation.")]):
                return self._flush()
        self._send(self._greeting())
        self._process()
        return self._flush()

    def _greeting(self) -> bytes:
        """``+OK host POP3 ready.`` plus the APOP challenge, within RFC 2449's 512 octets."""
        if self.challenge is None:
            return responses.ok(f"{self.settings.hostname} POP3 ready.")
        room = responses.MAX_STATUS - len(b"+OK  POP3 ready. \r\n") - len(self.challenge)
        host = self.settings.hostname[: max(room, 0)]
        return b"+OK " + f"{host} POP3 ready. ".encode("ascii", "replace") + self.challenge + b"\r\n"

    def receive_data(self, data: bytes) -> list[A.Action]:
        """Feed network bytes; returns what to do now."""
        if self.state is State.CLOSED:
            return []
        if not self._started:
            self._early_data = True
        if not self._seen_input and self._first_bytes(data):
            return self._flush()
        self._framer.feed(data)
        if self._started:
            self._process()
        return self._flush()

    def login_succeeded(self, messages: Sequence[MessageEntry]) -> list[A.Action]:
        """The I/O layer authenticated the user and locked the maildrop."""
        if not self._answer("login_succeeded", A.Authenticate):
            return []
        self._messages = list(messages)
        self._deleted = set()
        self._forget_replies()
        self.state = State.TRANSACTION
        # from here on the commands an honest session needs grow with the maildrop
        self._commands = 0
        self._command_limit = self.limits.commands_after_login_limit(len(self._messages))
        octets = sum(m.size for m in self._messages)
        self._out.append(A.LoggedIn(self.user or "", self._login_mechanism or "USER", len(self._messages), octets))
        self._login_mechanism = None
        self._send(responses.ok(f"Logged in, {len(self._messages)} messages ({octets} octets)."))
        self._process()
        return self._flush()

    def login_failed(self, code: str | None = "AUTH", text: str = "Authentication failed.") -> list[A.Action]:
        """Wrong credentials (``AUTH``), a locked maildrop (``IN-USE``) or a system problem."""
        if not self._answer("login_failed", A.Authenticate):
            return []
        self.state = State.AUTHORIZATION
        self.user = None
        self._login_mechanism = None
        self._error(text, code)
        self._process()
        return self._flush()

    def stream_finished(self) -> list[A.Action]:
        """The message and its terminating dot were written."""
        if not self._answer("stream_finished", A.StreamMessage):
            return []
        self._process()
        return self._flush()

    def stream_failed(self, *, fatal: bool = False) -> list[A.Action]:
        """The message could not be opened (it vanished): nothing was sent for it yet.

        ``fatal``: the backend itself broke (a relay's upstream went away or broke the protocol),
        so the session cannot go on: the client is told so and the connection closed.
        """
        if not self._answer("stream_failed", A.StreamMessage):
            return []
        if fatal:
            self._send(responses.err("Temporary server problem, try again later.", "SYS/TEMP"))
            self._close("backend failed")
            return self._flush()
        # the maildrop changed under the session (another program removed the file): the
        # client did nothing wrong, so this is not a bad command
        self._send(responses.err("Message is no longer available.", "SYS/TEMP"))
        self._process()
        return self._flush()

    def commit_finished(self, failed: Sequence[Hashable] = ()) -> list[A.Action]:
        """The UPDATE step is over; the maildrop is released."""
        if not self._answer("commit_finished", A.Commit):
            return []
        if failed:
            self._send(responses.err(f"{len(failed)} messages could not be deleted.", "SYS/TEMP"))
        else:
            self._send(responses.ok("Logging out."))
        self._close("quit")
        return self._flush()

    def analysis_finished(self, verdicts: Sequence[Any]) -> list[A.Action]:
        """Results of :class:`~pop3shield.core.actions.Analyze`; ``None`` means no capacity was left."""
        if not self._answer("analysis_finished", A.Analyze):
            return []
        pending, self._pending = self._pending, None
        assert pending is not None  # Screening asks for Analyze only with a pending line
        findings = list(pending.findings)
        # no capacity (a flood elsewhere): the command is refused with [SYS/TEMP], and that is no
        # security event against whoever sent it; the I/O layer counts and logs the refusal
        refuse = any(v is None for v in verdicts)
        if not refuse and any(v.malicious for v in verdicts):
            reasons = sorted({r for v in verdicts if v.malicious for r in v.reasons})
            findings.insert(pending.lead, self._mcp_trigger(pending.line, reasons))
        self._resume(replace(pending, findings=tuple(findings)), refuse)
        self._process()
        return self._flush()

    def tls_started(self) -> list[A.Action]:
        """The STLS handshake completed: from here on the session is encrypted (RFC 2595 section 4)."""
        if not self._answer("tls_started", A.StartTLS):
            return []
        self.tls = True
        self.user = None  # RFC 2595: forget what the client said before TLS
        self._process()
        return self._flush()

    def shutting_down(self) -> list[A.Action]:
        """The server stops and the grace period is over: say so and close (no UPDATE, nothing deleted)."""
        if self.state is State.CLOSED:
            return []
        self._send(responses.err("Server shutting down.", "SYS/TEMP"))
        self._close("shutdown")
        return self._flush()

    def listing_sent(self) -> list[A.Action]:
        """Every chunk of a :class:`~pop3shield.core.actions.SendListing` was written."""
        if not self._answer("listing_sent", A.SendListing):
            return []
        self._process()
        return self._flush()

    def proceed(self) -> list[A.Action]:
        """Run the lines left when the last turn's ``turn_budget`` ran out (see ``yielded``)."""
        if self.state is State.CLOSED or not self._started:
            return []
        self._process()
        return self._flush()

    def timed_out(self) -> list[A.Action]:
        """The inactivity timer fired (RFC 1939: an autologout deletes nothing)."""
        if self.state is State.CLOSED:
            return []
        self._send(responses.err("Disconnected for inactivity."))
        self._close("timeout")
        return self._flush()

    def connection_lost(self) -> None:
        """The peer is gone; nothing more will happen (and nothing is deleted)."""
        self.state = State.CLOSED

    @property
    def busy(self) -> bool:
        """The session waits for the I/O layer (a login, a message, a commit, an analysis)."""
        return self._awaiting is not None

    @property
    def yielded(self) -> bool:
        """Lines are waiting only because this turn's ``turn_budget`` ran out: call :meth:`proceed`."""
        return self._yielded and not self.busy and self.state is not State.CLOSED

    @property
    def closed(self) -> bool:
        return self.state is State.CLOSED

    @property
    def buffered(self) -> int:
        return self._framer.buffered

    def _flush(self) -> list[A.Action]:
        out, self._out = self._out, []
        return out

    def _send(self, data: bytes) -> None:
        self._out.append(A.Send(data))

    def _close(self, reason: str) -> None:
        self._out.append(A.Close(reason))
        self.state = State.CLOSED
        self._awaiting = None

    def _ask(self, action: A.Action) -> None:
        """Emit a busy action: no more input runs until its result comes back."""
        self._awaiting = action
        self._out.append(action)

    @property
    def awaiting(self) -> A.Action | None:
        """The busy action whose result the session waits for (None: it waits for the client)."""
        return self._awaiting

    def _answer(self, method: str, kind: type) -> bool:
        """Accept the result of a busy action of type ``kind``; False if the session is closed.

        A result nobody asked for is a bug in the I/O layer: :class:`SessionMisuse`.
        """
        if self.state is State.CLOSED:
            return False
        if not isinstance(self._awaiting, kind):
            raise SessionMisuse(method, type(self._awaiting).__name__ if self._awaiting is not None else None)
        self._awaiting = None
        return True

    def _error(self, text: str, code: str | None = None) -> None:
        """Send an ``-ERR`` that counts toward the bad-command limit."""
        self._errors += 1
        if self._errors > self.limits.bad_commands_limit:
            trigger = self.engine.trigger(
                "max_bad_commands", "<error reply>", count=self._errors, limit=self.limits.bad_commands_limit
            )
            if self._apply([Finding(trigger, "Too many bad commands.")]):
                return
        self._send(responses.err(text, code))

    def _fail_line(self, text: str, code: str | None = None) -> None:
        """An -ERR for a line that cannot run; inside AUTH it also ends the exchange (RFC 5034)."""
        if self.state is State.SASL:
            self._sasl_fail(text, code)
        else:
            self._error(text, code)

    def _violation(self, key: str, text: str, code: str | None = None, **detail: Any) -> bool:
        """Fire one protection for the line being run; True if the session was closed."""
        sample = self._current.sample if self._current is not None else ""
        trigger = self.engine.trigger(key, sample, **detail)
        return self._apply([Finding(trigger, text, code)])

    def _command(self, line: Line) -> None:
        content = line.content
        problems = grammar.byte_problems(content)  # already reported before the screening
        keyword = content.partition(b" ")[0].upper()
        if self._empty_credentials(keyword, content):
            return
        parsed = grammar.parse_command(content)
        if isinstance(parsed, grammar.GrammarError):
            self._grammar_error(content, parsed)
            return
        if problems:
            self._error("Invalid characters in command.")
            return
        handler = self._handler(parsed.keyword)
        if handler is None:
            self._error("Unknown command.")
            return
        handler(self, parsed.args)

    def _empty_credentials(self, keyword: bytes, content: bytes) -> bool:
        """USER/PASS/APOP with nothing (or only blanks) where the name or password belongs."""
        rest = content.partition(b" ")[2]
        if keyword == b"USER" and not rest.strip(b" "):
            key, text = "empty_username", "No username given."
        elif keyword == b"PASS" and not rest.strip(b" "):
            key, text = "empty_password", "No password given."
        elif keyword == b"APOP" and (not rest or rest.startswith(b" ")):
            key, text = "empty_username", "No username given."
        else:
            return False
        if not self._violation(key, text, "AUTH"):
            self._error(text)
        return True

    def _grammar_error(self, content: bytes, error: grammar.GrammarError) -> None:
        unknown = error.reason == "unknown command"
        if not unknown or self.limits.unknown_commands == "violation":
            if self._violation("non_compliant", "Protocol violation.", reason=error.reason):
                return
        self._error("Unknown command." if unknown or error.keyword is None else "Invalid arguments.")

    def _handler(self, keyword: str) -> Callable[[Session, tuple[bytes, ...]], None] | None:
        return COMMANDS.get((self.state, keyword))


def _is_local(address: str | None) -> bool:
    """Loopback, or no IP address at all (a unix socket): Dovecot's "secured" connections."""
    if not address:
        return True
    ip = _normalise_address(address)
    return ip is not None and ip.is_loopback


Handler = Callable[[Session, tuple[bytes, ...]], None]

#: (state, keyword) -> the handler that runs it; a keyword missing for a state is "Unknown command."
COMMANDS: dict[tuple[State, str], Handler] = {
    (State.AUTHORIZATION, "CAPA"): Authorization._cmd_capa,
    (State.AUTHORIZATION, "QUIT"): Authorization._cmd_quit_auth,
    (State.AUTHORIZATION, "STLS"): Authorization._cmd_stls,
    (State.AUTHORIZATION, "USER"): Authorization._cmd_user,
    (State.AUTHORIZATION, "PASS"): Authorization._cmd_pass,
    (State.AUTHORIZATION, "APOP"): Authorization._cmd_apop,
    (State.AUTHORIZATION, "AUTH"): SaslExchange._cmd_auth,
    (State.TRANSACTION, "CAPA"): Authorization._cmd_capa,
    (State.TRANSACTION, "QUIT"): Transaction._cmd_quit,
    (State.TRANSACTION, "STLS"): Authorization._cmd_stls,
    (State.TRANSACTION, "STAT"): Transaction._cmd_stat,
    (State.TRANSACTION, "LIST"): Transaction._cmd_list,
    (State.TRANSACTION, "UIDL"): Transaction._cmd_uidl,
    (State.TRANSACTION, "RETR"): Transaction._cmd_retr,
    (State.TRANSACTION, "TOP"): Transaction._cmd_top,
    (State.TRANSACTION, "DELE"): Transaction._cmd_dele,
    (State.TRANSACTION, "NOOP"): Transaction._cmd_noop,
    (State.TRANSACTION, "RSET"): Transaction._cmd_rset,
}
