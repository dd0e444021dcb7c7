"""The POP3 session state machine, sans I/O.

Bytes go in through :meth:`Session.receive_data`; a list of :mod:`actions <pop3shield.core.actions>`
comes out. Every line passes the protections before any command runs. While the session waits for
the I/O layer (a login, a message being streamed, a commit, a slow analysis) it is ``busy``: input
stays in the bounded framer and the I/O layer stops reading from the socket.
"""

from __future__ import annotations

import enum
import functools
from collections.abc import Callable, Sequence
from typing import Any, Hashable, Protocol

from pop3shield.core import actions as A
from pop3shield.core import grammar, responses, sasl
from pop3shield.core.framing import Line, LineFramer, Overflow, Overlong
from pop3shield.core.protections import ProtectionEngine, Trigger
from pop3shield.core.settings import Action, SessionSettings

#: a line in ``detect`` mode may grow to this before it is discarded anyway (memory is bounded)
HARD_LINE_LIMIT = 8192


class State(enum.Enum):
    AUTHORIZATION = "authorization"
    SASL = "sasl"
    TRANSACTION = "transaction"
    UPDATE = "update"
    CLOSED = "closed"


class MessageEntry(Protocol):
    """What the session needs of a message in the maildrop."""

    key: Hashable
    uid: str
    size: int


QuickCheck = Callable[[bytes, str], Any]


def _default_quick_check() -> QuickCheck | None:
    """The malicious-code detector's fast tier, when the package is importable."""
    try:
        from pop3shield.mcp import quick_check
    except ImportError:  # pragma: no cover - the detector ships with the package
        return None
    return quick_check


class Session:
    """One POP3 conversation, from greeting to close."""

    def __init__(
        self,
        settings: SessionSettings,
        client_address: str | None = None,
        *,
        challenge: bytes | None = None,
        quick_check: QuickCheck | None = None,
    ) -> None:
        self.settings = settings
        self.limits = settings.protections
        self.engine = ProtectionEngine(settings.protections, client_address)
        self.state = State.AUTHORIZATION
        self.user: str | None = None
        self.busy = False
        self.challenge = challenge if settings.apop else None
        self._quick_check = quick_check if quick_check is not None else _default_quick_check()
        self._framer = LineFramer(self._line_limit(), max(settings.input_buffer_limit, HARD_LINE_LIMIT),
                                  self._partial_cap())
        self._out: list[A.Action] = []
        self._started = False
        self._early_data = False
        self._seen_input = False
        self._commands = 0  # toward max_commands: restarts at login
        self.commands = 0  # every command of the connection, for the shell's session log line
        self._command_limit = settings.protections.commands_limit
        self._errors = 0
        self._messages: list[MessageEntry] = []
        self._deleted: set[int] = set()
        self._sasl_mechanism: str | None = None
        self._sasl_user: bytes | None = None
        self._pending: Line | Overlong | None = None
        self._pending_triggers: list[tuple[Trigger, str, str | None]] = []
        self._current_sample: Callable[[], str] | str = ""
        self._lead = 0

    # ------------------------------------------------------------------ inputs

    def start(self) -> list[A.Action]:
        """The greeting (RFC 1939 section 4), or a refusal when the client spoke first."""
        if self._started or self.state is State.CLOSED:
            return []
        self._started = True
        if self._early_data:
            trigger = self.engine.trigger("non_compliant", "<before greeting>", reason="data sent before the greeting")
            if self._apply([(trigger, "Protocol violation.", None)]):
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
        if self._first_bytes(data):
            return self._flush()
        self._framer.feed(data)
        if self._started:
            self._process()
        return self._flush()

    def _first_bytes(self, data: bytes) -> bool:
        """A TLS ClientHello has no line end: judge it on arrival, not at a newline that never comes."""
        if self._seen_input or not data:
            return False
        self._seen_input = True
        if not grammar.looks_like_tls(data):
            return False
        trigger = self.engine.trigger("non_compliant", grammar.escape_sample(data, 16),
                                      reason="TLS handshake on a POP3 port")
        return self._apply([(trigger, "Protocol violation.", None)])

    def login_succeeded(self, messages: Sequence[MessageEntry]) -> list[A.Action]:
        """The I/O layer authenticated the user and locked the maildrop."""
        if self.state is State.CLOSED:
            return []
        self.busy = False
        self._messages = list(messages)
        self._deleted.clear()
        self.state = State.TRANSACTION
        # from here on the commands an honest session needs grow with the maildrop
        self._commands = 0
        self._command_limit = self.limits.commands_after_login_limit(len(self._messages))
        octets = sum(m.size for m in self._messages)
        self._out.append(A.LoggedIn(self.user or "", self._sasl_mechanism or "USER", len(self._messages), octets))
        self._sasl_mechanism = None
        self._send(responses.ok(f"Logged in, {len(self._messages)} messages ({octets} octets)."))
        self._process()
        return self._flush()

    def login_failed(self, code: str | None = "AUTH", text: str = "Authentication failed.") -> list[A.Action]:
        """Wrong credentials (``AUTH``), a locked maildrop (``IN-USE``) or a system problem."""
        if self.state is State.CLOSED:
            return []
        self.busy = False
        self.state = State.AUTHORIZATION
        self.user = None
        self._sasl_mechanism = None
        self._error(text, code)
        self._process()
        return self._flush()

    def stream_finished(self) -> list[A.Action]:
        """The message and its terminating dot were written."""
        if self.state is State.CLOSED:
            return []
        self.busy = False
        self._process()
        return self._flush()

    def stream_failed(self) -> list[A.Action]:
        """The message could not be opened (it vanished): nothing was sent for it yet."""
        if self.state is State.CLOSED:
            return []
        self.busy = False
        # the maildrop changed under the session (another program removed the file): the
        # client did nothing wrong, so this is not a bad command
        self._send(responses.err("Message is no longer available.", "SYS/TEMP"))
        self._process()
        return self._flush()

    def commit_finished(self, failed: Sequence[Hashable] = ()) -> list[A.Action]:
        """The UPDATE step is over; the maildrop is released."""
        if self.state is State.CLOSED:
            return []
        self.busy = False
        if failed:
            self._send(responses.err(f"{len(failed)} messages could not be deleted.", "SYS/TEMP"))
        else:
            self._send(responses.ok("Logging out."))
        self._close("quit")
        return self._flush()

    def analysis_finished(self, verdicts: Sequence[Any]) -> list[A.Action]:
        """Results of :class:`~pop3shield.core.actions.Analyze`; ``None`` means no capacity was left."""
        if self.state is State.CLOSED:
            return []
        self.busy = False
        pending, self._pending = self._pending, None
        triggers = self._pending_triggers
        self._pending_triggers = []
        if pending is None:  # pragma: no cover - the I/O layer only answers what was asked
            return self._flush()
        refuse = any(v is None for v in verdicts)
        if refuse:
            triggers.insert(self._lead, self._mcp_unavailable(pending))
        elif any(v.malicious for v in verdicts):
            reasons = sorted({r for v in verdicts if v.malicious for r in v.reasons})
            triggers.insert(self._lead, self._mcp_trigger(pending, reasons))
        self._resume(pending, triggers, refuse)
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
    def closed(self) -> bool:
        return self.state is State.CLOSED

    @property
    def buffered(self) -> int:
        return self._framer.buffered

    # ------------------------------------------------------------------ plumbing

    def _flush(self) -> list[A.Action]:
        out, self._out = self._out, []
        return out

    def _send(self, data: bytes) -> None:
        self._out.append(A.Send(data))

    def _close(self, reason: str) -> None:
        self._out.append(A.Close(reason))
        self.state = State.CLOSED
        self.busy = False

    def _line_limit(self) -> int:
        """The framer's limit: the protection's limit when it prevents, the hard cap otherwise."""
        soft = self.limits.sasl_line_limit if self.state is State.SASL else self.limits.line_length_limit
        if self.engine.action("max_line_length") is Action.PREVENT:
            return soft
        return max(soft, HARD_LINE_LIMIT)

    def _partial_cap(self) -> int:
        """The longest unterminated line the framer holds: the largest limit of any state."""
        soft = max(self.limits.line_length_limit, self.limits.sasl_line_limit)
        if self.engine.action("max_line_length") is Action.PREVENT:
            return soft
        return max(soft, HARD_LINE_LIMIT)

    def _soft_limit(self) -> int:
        return self.limits.sasl_line_limit if self.state is State.SASL else self.limits.line_length_limit

    def _error(self, text: str, code: str | None = None) -> None:
        """Send an ``-ERR`` that counts toward the bad-command limit."""
        self._errors += 1
        if self._errors > self.limits.bad_commands_limit:
            trigger = self.engine.trigger(
                "max_bad_commands", "<error reply>", count=self._errors, limit=self.limits.bad_commands_limit
            )
            if self._apply([(trigger, "Too many bad commands.", None)]):
                return
        self._send(responses.err(text, code))

    def _fail_line(self, text: str, code: str | None = None) -> None:
        """An -ERR for a line that cannot run; inside AUTH it also ends the exchange (RFC 5034)."""
        if self.state is State.SASL:
            self._sasl_fail(text, code)
        else:
            self._error(text, code)

    def _apply(self, triggers: list[tuple[Trigger, str, str | None]]) -> bool:
        """Report every event; the first preventing trigger answers and closes. True if closed."""
        for trigger, _, _ in triggers:
            if trigger.event is not None:
                self._out.append(A.Report(trigger.event))
        for trigger, text, code in triggers:
            if trigger.prevents:
                self._send(responses.err(text, code))
                self._close(f"prevented:{trigger.event.protection if trigger.event else 'repeat'}")
                return True
        return False

    def _process(self) -> None:
        """Run pending lines until the session has to wait or is closed."""
        while not self.busy and self.state is not State.CLOSED:
            self._framer.line_limit = self._line_limit()
            event = self._framer.next_event()
            if event is None:
                return
            if isinstance(event, Overflow):
                self._send(responses.err("Too much pipelined input.", "SYS/TEMP"))
                self._close("input buffer full")
            elif isinstance(event, Overlong):
                self._handle_overlong(event)
            else:
                self._handle_line(event)

    # ------------------------------------------------------------------ checks before a command runs

    def _sample(self, content: bytes) -> Callable[[], str]:
        """The event sample of a line, built only if an event needs it (SASL-ness fixed now)."""
        return functools.partial(grammar.command_sample, content, in_sasl=self.state is State.SASL)

    def _handle_overlong(self, line: Overlong) -> None:
        """A line over the limit: the line-length protection, plus an exploit check of its ends."""
        if self.state is not State.SASL:
            self._commands += 1
            self.commands += 1
        sample = self._sample(line.head)
        trigger = self.engine.trigger(
            "max_line_length", sample, length=line.length, limit=self._soft_limit(), complete=line.terminated
        )
        triggers = [(trigger, "Command line too long.", None)]
        args = self._overlong_arguments(line)
        self._screen(line, args, triggers)

    def _overlong_arguments(self, line: Overlong) -> list[tuple[bytes, str]]:
        """The ends of an over-long line, typed by its keyword where one is recognisable."""
        if self.state is State.SASL:
            return [(line.head, "text"), (line.tail, "text")]
        keyword, _, rest = line.head.partition(b" ")
        field = _FIELD_OF.get(keyword.upper(), ("text",))[0]
        return [(rest or line.head, field), (line.tail, field)]

    def _handle_line(self, line: Line) -> None:
        triggers: list[tuple[Trigger, str, str | None]] = []
        sample = self._sample(line.content)
        if self.state is not State.SASL:
            self._commands += 1
            self.commands += 1
            if self._commands > self._command_limit:
                trigger = self.engine.trigger(
                    "max_commands", sample, count=self._commands, limit=self._command_limit
                )
                if self._apply([(trigger, "Too many commands.", None)]):
                    return
        if line.length > self._soft_limit():
            trigger = self.engine.trigger("max_line_length", sample, length=line.length, limit=self._soft_limit())
            triggers.append((trigger, "Command line too long.", None))
        if self.limits.strict_crlf and line.bare_lf:
            trigger = self.engine.trigger("non_compliant", sample, reason="bare LF line ending")
            triggers.append((trigger, "Lines must end with CRLF.", None))
        if grammar.looks_like_tls(line.content) or grammar.looks_like_http(line.content):
            kind = "TLS handshake" if grammar.looks_like_tls(line.content) else "HTTP request"
            trigger = self.engine.trigger("non_compliant", sample, reason=f"{kind} on a POP3 port")
            triggers.append((trigger, "Protocol violation.", None))
            if not self._apply(triggers):
                self._fail_line("Unknown command.")
            return
        problems = grammar.byte_problems(line.content)
        if problems:
            trigger = self.engine.trigger("non_compliant", sample, reason=", ".join(problems))
            triggers.insert(0, (trigger, "Protocol violation.", None))
        self._screen(line, self._arguments(line.content), triggers, lead=1 if problems else 0)

    def _screen(self, line: Line | Overlong, args: list[tuple[bytes, str]], triggers: list, lead: int = 0) -> None:
        """The malicious-code check, fast tier here, slow tier through the I/O layer.

        Its finding goes first (an exploit is the more useful verdict than "too long"), except
        behind ``lead`` byte-level violations: a NUL or a Latin-1 byte is first of all not POP3.
        """
        self._lead = lead
        if not self.engine.active("malicious_code") or self._quick_check is None:
            self._resume(line, triggers)
            return
        slow: list[bytes] = []
        reasons: list[str] = []
        for value, field in args:
            verdict = self._quick_check(value, field)
            if verdict is None:
                slow.append(value)
            elif verdict.malicious:
                reasons.extend(verdict.reasons)
        if reasons:
            triggers.insert(lead, self._mcp_trigger(line, sorted(set(reasons))))
        elif slow:
            self._pending = line
            self._pending_triggers = triggers
            self.busy = True
            self._out.append(A.Analyze(tuple(slow)))
            return
        self._resume(line, triggers)

    def _mcp_trigger(self, line: Line | Overlong, reasons: list[str]) -> tuple[Trigger, str, str | None]:
        trigger = self.engine.trigger("malicious_code", self._sample_of(line), reasons=reasons)
        return (trigger, "Command refused.", None)

    def _mcp_unavailable(self, line: Line | Overlong) -> tuple[Trigger, str, str | None]:
        """Fail closed: no capacity for the analysis means the command does not run."""
        trigger = self.engine.trigger("malicious_code", self._sample_of(line), reasons=["analysis capacity exhausted"])
        return (trigger, "Server busy, try again later.", "SYS/TEMP")

    def _sample_of(self, line: Line | Overlong) -> Callable[[], str]:
        return self._sample(line.content if isinstance(line, Line) else line.head)

    def _resume(self, line: Line | Overlong, triggers: list, refuse: bool = False) -> None:
        """After the screening: act on the triggers, then run the command if it may run.

        ``refuse`` is set when the analysis could not run: the command is refused (fail closed)
        even where the protection only detects.
        """
        if isinstance(line, Overlong):
            if not self._apply(triggers):
                self._fail_line("Command line too long.")
                if not line.terminated and self.state is not State.CLOSED:
                    self._close("line without end")
            return
        if self._apply(triggers):
            return
        if refuse:
            self._fail_line("Server busy, try again later.", "SYS/TEMP")
            return
        self._current_sample = self._sample(line.content)
        if self.state is State.SASL:
            self._sasl_response(line)
        else:
            self._command(line)

    def _arguments(self, content: bytes) -> list[tuple[bytes, str]]:
        """Each argument of a line with the field type the detector should judge it as."""
        if self.state is State.SASL:
            return _sasl_fields(content)
        keyword, sep, rest = content.partition(b" ")
        if not sep:
            return []
        upper = keyword.upper()
        if upper.decode("ascii", "replace") in grammar.REST_OF_LINE:
            return [(rest, _FIELD_OF[upper][0])]
        parts = rest.split(b" ")
        if upper == b"AUTH":
            fields = [(parts[0], "mechanism")]
            for extra in parts[1:]:
                fields.extend(_sasl_fields(extra))
            return fields
        kinds = _FIELD_OF.get(upper, ())
        return [(part, kinds[i] if i < len(kinds) else "text") for i, part in enumerate(parts)]

    # ------------------------------------------------------------------ commands

    def _violation(self, key: str, text: str, code: str | None = None, **detail: Any) -> bool:
        """Fire one protection for the line being run; True if the session was closed."""
        trigger = self.engine.trigger(key, self._current_sample, **detail)
        return self._apply([(trigger, text, code)])

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
        handler(parsed.args)

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

    def _handler(self, keyword: str) -> Callable[[tuple[bytes, ...]], None] | None:
        table = _AUTHORIZATION if self.state is State.AUTHORIZATION else _TRANSACTION
        name = table.get(keyword)
        return getattr(self, name) if name else None

    # AUTHORIZATION

    def _cmd_capa(self, args: tuple[bytes, ...]) -> None:
        caps = [b"CAPA", b"TOP", b"UIDL", b"RESP-CODES", b"PIPELINING", b"AUTH-RESP-CODE"]
        if self.state is State.AUTHORIZATION:
            caps.append(b"USER")
            if self.settings.sasl_mechanisms:
                caps.append(b"SASL " + " ".join(self.settings.sasl_mechanisms).encode("ascii"))
        if self.settings.implementation:
            caps.append(b"IMPLEMENTATION " + self.settings.implementation.encode("ascii", "replace"))
        self._send(responses.multiline(responses.ok("Capability list follows"), caps))

    def _cmd_quit_auth(self, args: tuple[bytes, ...]) -> None:
        self._send(responses.ok("Logging out."))
        self._close("quit")

    def _cmd_stls(self, args: tuple[bytes, ...]) -> None:
        """STLS is not offered; the session stays open whatever the protection's action."""
        trigger = self.engine.trigger("stls", "STLS")
        if trigger.event is not None:
            self._out.append(A.Report(trigger.event))
        self._error("STLS is not available.")

    def _check_username(self, raw: bytes) -> str | None:
        """The NFC form of a user name that is valid UTF-8 and made of allowed characters, else
        a violation. The NFC form is what authentication, the maildrop and the logs see."""
        try:
            name: str | None = grammar.normalise_username(raw.decode("utf-8"))
        except UnicodeDecodeError:
            name = None
        problem = "user name is not UTF-8" if name is None else grammar.username_problem(
            name, self.limits.username_extra_chars)
        if problem is None:
            return name
        if not self._violation("non_compliant", "Invalid user name.", "AUTH", reason=problem):
            self._error("Invalid user name.", "AUTH")
        return None

    def _cmd_user(self, args: tuple[bytes, ...]) -> None:
        name = self._check_username(args[0])
        if name is None:
            return
        self.user = name
        self._send(responses.ok())

    def _cmd_pass(self, args: tuple[bytes, ...]) -> None:
        if self.user is None:
            self._error("No username given.")
            return
        self._authenticate(self.user, args[0], "USER")

    def _cmd_apop(self, args: tuple[bytes, ...]) -> None:
        if self.challenge is None:
            self._error("APOP is not enabled.")
            return
        name = self._check_username(args[0])
        if name is None:
            return
        digest = args[1].lower()
        if len(digest) != 32 or any(c not in b"0123456789abcdef" for c in digest):
            if not self._violation("non_compliant", "Invalid APOP digest.", reason="malformed digest"):
                self._error("Invalid APOP digest.", "AUTH")
            return
        self.user = name
        self._authenticate(name, digest, "APOP", self.challenge)

    def _cmd_auth(self, args: tuple[bytes, ...]) -> None:
        if not args:
            mechs = [m.encode("ascii") for m in self.settings.sasl_mechanisms]
            self._send(responses.multiline(responses.ok("Supported mechanisms follow"), mechs))
            return
        mechanism = args[0].upper().decode("ascii", "replace")
        if mechanism not in self.settings.sasl_mechanisms:
            self._error("Unsupported authentication mechanism.")
            return
        self._sasl_mechanism = mechanism
        self._sasl_user = None
        if len(args) == 1:
            self._enter_sasl(sasl.LOGIN_USER_PROMPT if mechanism == "LOGIN" else b"")
            return
        self.state = State.SASL
        self._sasl_response(Line(args[1], bare_lf=False))

    def _enter_sasl(self, prompt: bytes) -> None:
        self.state = State.SASL
        self._send(responses.continuation(prompt))

    def _sasl_fail(self, text: str, code: str | None = None) -> None:
        self.state = State.AUTHORIZATION
        self._sasl_mechanism = None
        self._error(text, code)

    def _sasl_response(self, line: Line) -> None:
        """One client line of an AUTH exchange (initial response or continuation)."""
        data = line.content
        if data == b"*":
            self._sasl_fail("Authentication cancelled.")
            return
        try:
            decoded = sasl.decode_base64(data)
        except sasl.SaslError as exc:
            if not self._violation("non_compliant", "Invalid base64 data.", reason=str(exc)):
                self._sasl_fail("Invalid base64 data.")
            return
        if self._sasl_mechanism == "PLAIN":
            self._sasl_plain(decoded, data)
        else:
            self._sasl_login(decoded, data)

    def _sasl_plain(self, decoded: bytes, data: bytes) -> None:
        try:
            creds = sasl.parse_plain(decoded)
        except sasl.SaslError as exc:
            if not self._violation("non_compliant", "Invalid PLAIN data.", reason=str(exc)):
                self._sasl_fail("Invalid PLAIN data.", "AUTH")
            return
        self._sasl_credentials(creds.authcid, creds.password, data, "PLAIN")

    def _sasl_login(self, decoded: bytes, data: bytes) -> None:
        """LOGIN: the user name first (refused at once if empty), then the password."""
        if self._sasl_user is None:
            if not decoded.strip(b" "):
                self._sasl_empty("empty_username", "No username given.")
                return
            self._sasl_user = decoded
            self._send(responses.continuation(sasl.LOGIN_PASSWORD_PROMPT))
            return
        user, self._sasl_user = self._sasl_user, None
        self._sasl_credentials(user, decoded, data, "LOGIN")

    def _sasl_credentials(self, user: bytes, password: bytes, data: bytes, mechanism: str) -> None:
        self.state = State.AUTHORIZATION
        if not user.strip(b" "):
            self._sasl_empty("empty_username", "No username given.")
        elif not password.strip(b" "):
            self._sasl_empty("empty_password", "No password given.")
        else:
            name = self._check_username(user)
            if name is not None:
                self.user = name
                self._sasl_mechanism = mechanism
                self._authenticate(name, password, mechanism)

    def _sasl_empty(self, key: str, text: str) -> None:
        """An empty SASL identity or password: the protection, else an [AUTH] failure."""
        self.state = State.AUTHORIZATION
        if not self._violation(key, text, "AUTH"):
            self._sasl_fail(text, "AUTH")

    def _authenticate(self, user: str, secret: bytes, mechanism: str, challenge: bytes | None = None) -> None:
        self.busy = True
        self._sasl_mechanism = mechanism
        self._out.append(A.Authenticate(user, secret, mechanism, challenge))

    # TRANSACTION

    def _message(self, raw: bytes) -> tuple[int, MessageEntry] | None:
        """A live message by its 1-based number, or None after answering the error."""
        number = grammar.parse_number(raw)
        if number is None:
            if not self._violation("non_compliant", "Invalid message number.",
                                   reason="malformed message number"):
                self._error("Invalid message number.")
            return None
        if number > len(self._messages):
            self._error("There is no such message.")
            return None
        if number - 1 in self._deleted:
            # a client that lost track of its own DELEs is no attacker: not a bad command
            self._send(responses.err("Message is deleted."))
            return None
        return number, self._messages[number - 1]

    def _live(self) -> list[tuple[int, MessageEntry]]:
        return [(i + 1, m) for i, m in enumerate(self._messages) if i not in self._deleted]

    def _cmd_stat(self, args: tuple[bytes, ...]) -> None:
        live = self._live()
        self._send(responses.ok(f"{len(live)} {sum(m.size for _, m in live)}"))

    def _cmd_list(self, args: tuple[bytes, ...]) -> None:
        self._listing(args, lambda m: str(m.size))

    def _cmd_uidl(self, args: tuple[bytes, ...]) -> None:
        self._listing(args, lambda m: m.uid)

    def _listing(self, args: tuple[bytes, ...], value: Callable[[MessageEntry], str]) -> None:
        if args:
            found = self._message(args[0])
            if found is not None:
                self._send(responses.ok(f"{found[0]} {value(found[1])}"))
            return
        live = self._live()
        lines = [f"{n} {value(m)}".encode("ascii") for n, m in live]
        self._send(responses.multiline(responses.ok(f"{len(live)} messages"), lines))

    def _cmd_retr(self, args: tuple[bytes, ...]) -> None:
        found = self._message(args[0])
        if found is not None:
            self.busy = True
            status = responses.ok(f"{found[1].size} octets")
            self._out.append(A.StreamMessage(found[1].key, status, None, self._next_key(found[0])))

    def _cmd_top(self, args: tuple[bytes, ...]) -> None:
        found = self._message(args[0])
        if found is None:
            return
        count = grammar.parse_number(args[1], allow_zero=True)
        if count is None:
            if not self._violation("non_compliant", "Invalid line count.",
                                   reason="malformed line count"):
                self._error("Invalid line count.")
            return
        self.busy = True
        self._out.append(A.StreamMessage(found[1].key, responses.ok(), count, self._next_key(found[0])))

    def _next_key(self, number: int) -> Hashable | None:
        """The key of the first live message after ``number`` (1-based), if any."""
        for index in range(number, len(self._messages)):
            if index not in self._deleted:
                return self._messages[index].key
        return None

    def _cmd_dele(self, args: tuple[bytes, ...]) -> None:
        found = self._message(args[0])
        if found is not None:
            self._deleted.add(found[0] - 1)
            self._send(responses.ok("Marked to be deleted."))

    def _cmd_noop(self, args: tuple[bytes, ...]) -> None:
        self._send(responses.ok())

    def _cmd_rset(self, args: tuple[bytes, ...]) -> None:
        self._deleted.clear()
        live = self._live()
        self._send(responses.ok(f"{len(live)} messages ({sum(m.size for _, m in live)} octets)."))

    def _cmd_quit(self, args: tuple[bytes, ...]) -> None:
        """Enter UPDATE: only now are the marked messages removed (RFC 1939 section 6)."""
        self.state = State.UPDATE
        self.busy = True
        keys = tuple(self._messages[i].key for i in sorted(self._deleted))
        self._out.append(A.Commit(keys))


_AUTHORIZATION = {
    "CAPA": "_cmd_capa",
    "QUIT": "_cmd_quit_auth",
    "STLS": "_cmd_stls",
    "USER": "_cmd_user",
    "PASS": "_cmd_pass",
    "APOP": "_cmd_apop",
    "AUTH": "_cmd_auth",
}

_TRANSACTION = {
    "CAPA": "_cmd_capa",
    "QUIT": "_cmd_quit",
    "STLS": "_cmd_stls",
    "STAT": "_cmd_stat",
    "LIST": "_cmd_list",
    "UIDL": "_cmd_uidl",
    "RETR": "_cmd_retr",
    "TOP": "_cmd_top",
    "DELE": "_cmd_dele",
    "NOOP": "_cmd_noop",
    "RSET": "_cmd_rset",
}

#: the detector's field type for each argument position of a command
_FIELD_OF: dict[bytes, tuple[str, ...]] = {
    b"USER": ("username",),
    b"PASS": ("password",),
    b"APOP": ("username", "digest"),
    b"LIST": ("number",),
    b"UIDL": ("number",),
    b"RETR": ("number",),
    b"DELE": ("number",),
    b"TOP": ("number", "number"),
    b"AUTH": ("mechanism", "sasl"),
}


def _sasl_fields(data: bytes) -> list[tuple[bytes, str]]:
    """A SASL response as the detector should see it: decoded, PLAIN split on NUL."""
    try:
        decoded = sasl.decode_base64(data)
    except sasl.SaslError:
        return [(data, "text")]
    return [(part, "sasl") for part in decoded.split(b"\x00") if part]
