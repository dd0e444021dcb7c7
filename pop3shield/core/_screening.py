"""The screening pipeline: framer events, the protections, the asynchronous analysis step.

Every line passes here before any command runs. A line whose arguments the fast tier of the
malicious-code detector cannot judge waits for the slow tier (an :class:`~pop3shield.core.actions.Analyze`
action); what the screening found so far waits with it in one frozen :class:`Screened` record.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from pop3shield.core import actions as A
from pop3shield.core import grammar, responses, sasl
from pop3shield.core._base import HARD_LINE_LIMIT, State
from pop3shield.core._transaction import REPLAYED
from pop3shield.core.framing import Line, Overflow, Overlong
from pop3shield.core.protections import Trigger
from pop3shield.core.settings import Action


@dataclass(frozen=True)
class Finding:
    """A protection's trigger with the answer the client gets if it prevents."""

    trigger: Trigger
    text: str
    code: str | None = None


@dataclass(frozen=True)
class Screened:
    """A line between its screening and its command, carried across the analysis step."""

    line: Line | Overlong
    #: in the order they are reported; the first preventing one answers
    findings: tuple[Finding, ...]
    #: how many byte-level findings stay ahead of a malicious-code finding
    lead: int
    #: the line's event sample, built only if an event needs it
    sample: Callable[[], str] | str


class Screening:
    """Mixin of :class:`~pop3shield.core.session.Session`: from framer events to commands."""

    _pending: Screened | None
    _current: Screened | None
    _awaiting: Any
    _framer: Any
    _replies: Any
    _quick_check: Any
    #: lines that may still run in this turn of the I/O layer's loop (None: no limit)
    turn_budget: int | None = None
    #: replayed lines (see ``_replay``) that cost one line of ``turn_budget``: a replay is a
    #: dict lookup and an append, a few times cheaper than a line that takes the whole way
    replays_per_line = 1
    #: replays since one last cost a line
    _replays = 0
    _yielded = False
    #: the framer's line limit (see :meth:`_line_limit`) and the state it was worked out for
    _limit_state: State | None = None
    _limit = 0

    def _first_bytes(self, data: bytes) -> bool:
        """A TLS ClientHello has no line end: judge it on arrival, not at a newline that never comes."""
        if self._seen_input or not data:
            return False
        self._seen_input = True
        if not grammar.looks_like_tls(data):
            return False
        trigger = self.engine.trigger("non_compliant", grammar.escape_sample(data, 16),
                                      reason="TLS handshake on a POP3 port")
        return self._apply([Finding(trigger, "Protocol violation.")])

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

    def _apply(self, findings: Sequence[Finding]) -> bool:
        """Report every event; the first preventing finding answers and closes. True if closed."""
        for finding in findings:
            if finding.trigger.event is not None:
                self._out.append(A.Report(finding.trigger.event))
        for finding in findings:
            trigger = finding.trigger
            if trigger.prevents:
                self._send(responses.err(finding.text, finding.code))
                self._close(f"prevented:{trigger.event.protection if trigger.event else 'repeat'}")
                return True
        return False

    def _process(self) -> None:
        """Run pending lines until the session has to wait, is closed, or its turn is used up.

        ``turn_budget`` (None: no limit) is how many more lines may run before the session
        yields: then ``yielded`` is set, the lines stay in the framer, and the I/O layer calls
        :meth:`~pop3shield.core.session.Session.proceed` in a later turn of its loop. A line
        answered by a replayed reply costs 1/``replays_per_line`` of a line (1 by default).
        """
        self._yielded = False
        framer = self._framer
        while self._awaiting is None and self.state is not State.CLOSED:  # not busy, not closed
            budget = self.turn_budget
            if budget is not None and budget <= 0:
                self._yielded = framer.buffered > 0
                return
            if self.state is not self._limit_state:  # the limit is a function of the state alone
                self._limit_state = self.state
                self._limit = self._line_limit()
            framer.line_limit = self._limit
            event = framer.next_event()
            if event is None:
                return
            if budget is not None:
                self.turn_budget = budget - 1
            if type(event) is Line and self._replies is not None:
                done = self._replay(event)
                if done == REPLAYED and budget is not None and self.replays_per_line > 1:
                    self._replays += 1
                    if self._replays < self.replays_per_line:
                        self.turn_budget = budget  # only every replays_per_line-th replay costs a line
                    else:
                        self._replays = 0
                if done:
                    continue
            if isinstance(event, Overflow):
                self._send(responses.err("Too much pipelined input.", "SYS/TEMP"))
                self._close("input buffer full")
            elif isinstance(event, Overlong):
                self._handle_overlong(event)
            else:
                self._handle_line(event)

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
        triggers = [Finding(trigger, "Command line too long.")]
        args = self._overlong_arguments(line)
        self._screen(line, args, triggers)

    def _overlong_arguments(self, line: Overlong) -> list[tuple[bytes, str]]:
        """The ends of an over-long line, typed by its keyword where one is recognisable."""
        if self.state is State.SASL:
            return [(line.head, "text"), (line.tail, "text")]
        keyword, _, rest = line.head.partition(b" ")
        if keyword.upper() == b"AUTH":
            # AUTH mechanism initial-response: past the mechanism the ends are cut-off SASL data
            mechanism, sep, response = rest.partition(b" ")
            fields = [(mechanism or line.head, "mechanism")]
            return fields + ([(response, "text")] if sep and response else []) + [(line.tail, "text")]
        field = _FIELD_OF.get(keyword.upper(), ("text",))[0]
        return [(rest or line.head, field), (line.tail, field)]

    def _handle_line(self, line: Line) -> None:
        triggers: list[Finding] = []
        sample = self._sample(line.content)
        if self.state is not State.SASL:
            self._commands += 1
            self.commands += 1
            if self._commands > self._command_limit:
                trigger = self.engine.trigger(
                    "max_commands", sample, count=self._commands, limit=self._command_limit
                )
                if self._apply([Finding(trigger, "Too many commands.")]):
                    return
        if line.length > self._soft_limit():
            trigger = self.engine.trigger("max_line_length", sample, length=line.length, limit=self._soft_limit())
            triggers.append(Finding(trigger, "Command line too long."))
        if self.limits.strict_crlf and line.bare_lf:
            trigger = self.engine.trigger("non_compliant", sample, reason="bare LF line ending")
            triggers.append(Finding(trigger, "Lines must end with CRLF."))
        if grammar.looks_like_tls(line.content) or grammar.looks_like_http(line.content):
            kind = "TLS handshake" if grammar.looks_like_tls(line.content) else "HTTP request"
            trigger = self.engine.trigger("non_compliant", sample, reason=f"{kind} on a POP3 port")
            triggers.append(Finding(trigger, "Protocol violation."))
            if not self._apply(triggers):
                self._fail_line("Unknown command.")
            return
        problems = grammar.byte_problems(line.content)
        if problems:
            trigger = self.engine.trigger("non_compliant", sample, reason=", ".join(problems))
            triggers.insert(0, Finding(trigger, "Protocol violation."))
        self._screen(line, self._arguments(line.content), triggers, lead=1 if problems else 0, sample=sample)

    def _screen(self, line: Line | Overlong, args: Sequence[tuple[bytes, str]], triggers: list[Finding],
                lead: int = 0, verdicts: Sequence[Any] | None = None,
                sample: Callable[[], str] | None = None) -> None:
        """The malicious-code check, fast tier here, slow tier through the I/O layer.

        Its finding goes first (an exploit is the more useful verdict than "too long"), except
        behind ``lead`` byte-level violations: a NUL or a Latin-1 byte is first of all not POP3.
        ``verdicts``: the fast tier's, one per argument, when the caller already asked it;
        ``sample``: the line's event sample, when the caller already made it.
        """
        if sample is None:
            sample = self._sample_of(line)
        if not self.engine.active("malicious_code") or self._quick_check is None:
            self._resume(Screened(line, tuple(triggers), lead, sample))
            return
        slow: list[bytes] = []
        reasons: list[str] = []
        if verdicts is None:
            verdicts = [self._quick_check(value, field) for value, field in args]
        for (value, _), verdict in zip(args, verdicts):
            if verdict is None:
                slow.append(value)
            elif verdict.malicious:
                reasons.extend(verdict.reasons)
        if reasons:
            triggers.insert(lead, self._mcp_trigger(line, sorted(set(reasons))))
        elif slow:
            self._pending = Screened(line, tuple(triggers), lead, sample)
            self._ask(A.Analyze(tuple(slow)))
            return
        self._resume(Screened(line, tuple(triggers), lead, sample))

    def _mcp_trigger(self, line: Line | Overlong, reasons: list[str]) -> Finding:
        trigger = self.engine.trigger("malicious_code", self._sample_of(line), reasons=reasons)
        return Finding(trigger, "Command refused.")

    def _sample_of(self, line: Line | Overlong) -> Callable[[], str]:
        return self._sample(line.content if isinstance(line, Line) else line.head)

    def _resume(self, screened: Screened, refuse: bool = False) -> None:
        """After the screening: act on the findings, then run the command if it may run.

        ``refuse`` is set when the analysis could not run: the command is refused (fail closed)
        even where the protection only detects.
        """
        line, triggers = screened.line, screened.findings
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
        self._current = screened
        if self.state is State.SASL:
            self._sasl_response(line)
        else:
            self._command(line)

    def _arguments(self, content: bytes) -> list[tuple[bytes, str]]:
        """Each argument of a line with the field type the detector should judge it as."""
        if self.state is State.SASL:
            return _sasl_fields(content, self._sasl_exchange)
        keyword, sep, rest = content.partition(b" ")
        if not sep:
            return []
        upper = keyword.upper()
        if upper.decode("ascii", "replace") in grammar.REST_OF_LINE:
            return [(rest, _FIELD_OF[upper][0])]
        parts = rest.split(b" ")
        if upper == b"AUTH":
            fields = [(parts[0], "mechanism")]
            mechanism = parts[0].upper().decode("ascii", "replace")
            for extra in parts[1:]:
                fields.extend(_sasl_fields(extra, mechanism))
            return fields
        kinds = _FIELD_OF.get(upper, ())
        return [(part, kinds[i] if i < len(kinds) else "text") for i, part in enumerate(parts)]


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


def _sasl_fields(data: bytes, mechanism: str | None = None) -> list[tuple[bytes, str]]:
    """A SASL response as the detector should see it: decoded, PLAIN split on NUL, the OAuth
    mechanisms on their ^A separators (each key=value pair, the token included, is text)."""
    try:
        decoded = sasl.decode_base64(data)
    except sasl.SaslError:
        return [(data, "text")]
    if mechanism in ("XOAUTH2", "OAUTHBEARER"):
        return [(part, "sasl") for part in decoded.split(b"\x01") if part]
    return [(part, "sasl") for part in decoded.split(b"\x00") if part]
