"""The TRANSACTION commands: STAT, LIST, UIDL, RETR, TOP, DELE, NOOP, RSET and QUIT into UPDATE.

The session renders every answer from the listing the backend gave at login; only RETR, TOP
(a StreamMessage) and QUIT (a Commit) go back to the backend. A multi-line LIST or UIDL of more
than LISTING_INLINE messages is a SendListing: chunks of LISTING_CHUNK lines made as the I/O
layer pulls them.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterator
from typing import Any

from pop3shield.core import actions as A
from pop3shield.core import grammar, responses
from pop3shield.core._base import MessageEntry, State
from pop3shield.core.framing import Line

#: messages per chunk of a streamed LIST/UIDL
LISTING_CHUNK = 500
#: a maildrop of at most this many messages is listed in one Send (a few KB: a turn of pipelined
#: listings stays small); a larger one is a SendListing
LISTING_INLINE = 100


#: what :meth:`Transaction._replay` did with a line: nothing (the whole way is still to go), answered
#: it from a remembered reply, or took the line the whole way from the fast tier's verdicts on
NOT_REPLAYED, REPLAYED, SCREENED = 0, 1, 2

#: distinct lines whose replies one session remembers (a few bytes each; the pipelining clients
#: repeat a handful of them)
REPLIES_KEPT = 32


class Transaction:
    """Mixin of :class:`~pop3shield.core.session.Session`: the maildrop is open."""

    _messages: list[MessageEntry]
    #: 0-based indexes of the messages marked by DELE (a set from login on)
    _deleted: set[int]
    #: the replies of STAT, NOOP, LIST n and UIDL n by line (None: nothing remembered), each with
    #: the arguments the detector's fast tier judges; see :meth:`_replay`
    _replies: dict[bytes, tuple[tuple[tuple[bytes, str], ...], A.Send]] | None = None
    #: False: every line takes the whole way (the reference the tests compare the replay with)
    replay_replies = True
    #: (line limit, strict_crlf, the fast tier or None), set with the first remembered reply
    _replay_terms: tuple[int, bool, Any]

    def _remember(self, reply: bytes) -> None:
        """Keep the reply of the line being run if running that line again must give it again.

        Only a line that ran with nothing found (no event, no repeat, no limit reached) in
        TRANSACTION is kept: its screening is then a function of its bytes (line ending and
        length aside, which :meth:`_replay` checks again), and its reply a function of the
        maildrop and the deletion marks, which change only by DELE and RSET (they forget).
        """
        screened = self._current
        if (not self.replay_replies or self.state is not State.TRANSACTION or screened is None
                or screened.findings or type(screened.line) is not Line):
            return
        replies = self._replies
        if replies is None:
            replies = self._replies = {}
            # what the replay checks of each line, fixed for the connection: the line limit in
            # TRANSACTION, whether a bare LF is a violation, the fast tier if the protection is on
            limits = self.limits
            check = self._quick_check if self.engine.active("malicious_code") else None
            self._replay_terms = (limits.line_length_limit, limits.strict_crlf, check)
        elif len(replies) >= REPLIES_KEPT:
            return
        content = screened.line.content
        replies[content] = (tuple(self._arguments(content)), A.Send(reply))  # a Send is immutable: shared

    def _forget_replies(self) -> None:
        self._replies = None

    def _replay(self, line: Line) -> int:
        """Run a line whose reply is remembered, if it runs as it did (NOT_REPLAYED: take the whole way).

        What is not a function of the line's bytes is checked here as the whole way checks it:
        the command count and its limit, the length against the line limit, a bare LF under
        strict_crlf; the detector's fast tier is asked about each argument as before (an
        undecided or malicious verdict goes on the whole way from there, with these verdicts).
        """
        content = line.content
        entry = self._replies.get(content) if self._replies is not None else None
        if entry is None or self.state is not State.TRANSACTION or self._commands >= self._command_limit:
            return NOT_REPLAYED
        line_limit, strict_crlf, check = self._replay_terms
        if line.bare_lf:
            if strict_crlf or len(content) + 1 > line_limit:
                return NOT_REPLAYED
        elif len(content) + 2 > line_limit:
            return NOT_REPLAYED
        self._commands += 1
        self.commands += 1
        args, reply = entry
        if args and check is not None:
            if len(args) == 1:  # LIST n, UIDL n
                value, field = args[0]
                verdicts = [check(value, field)]
            else:
                verdicts = [check(value, field) for value, field in args]
            for verdict in verdicts:
                if verdict is None or verdict.malicious:
                    self._screen(line, args, [], 0, verdicts)
                    return SCREENED
        self._out.append(reply)
        return REPLAYED

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
        reply = responses.ok(f"{len(live)} {sum(m.size for _, m in live)}")
        self._send(reply)
        self._remember(reply)

    def _cmd_list(self, args: tuple[bytes, ...]) -> None:
        self._listing(args, uid=False)

    def _cmd_uidl(self, args: tuple[bytes, ...]) -> None:
        self._listing(args, uid=True)

    def _listing(self, args: tuple[bytes, ...], *, uid: bool) -> None:
        if args:
            found = self._message(args[0])
            if found is not None:
                number, entry = found
                reply = responses.ok(f"{number} {entry.uid if uid else entry.size}")
                self._send(reply)
                self._remember(reply)
            return
        live = len(self._messages) - len(self._deleted)
        status = responses.ok(f"{live} messages")
        if len(self._messages) <= LISTING_INLINE:
            self._send(status + self._listing_lines(0, len(self._messages), uid) + b".\r\n")
            return
        # a large maildrop: the listing goes out chunk by chunk as the client takes it
        self._ask(A.SendListing(self._listing_chunks(status, uid)))

    def _listing_chunks(self, status: bytes, uid: bool) -> Iterator[bytes]:
        """The listing in chunks of LISTING_CHUNK messages; the session is busy while they are
        pulled, so the deletion marks cannot change under them."""
        total = len(self._messages)
        for start in range(0, total, LISTING_CHUNK):
            chunk = self._listing_lines(start, min(start + LISTING_CHUNK, total), uid)
            if start == 0:
                chunk = status + chunk
            if start + LISTING_CHUNK >= total:
                chunk += b".\r\n"
            if chunk:
                yield chunk

    def _listing_lines(self, start: int, stop: int, uid: bool) -> bytes:
        """``n value`` CRLF for the live messages start..stop-1 (0-based). No line starts with
        a ``.`` (each starts with its number), so none needs dot-stuffing."""
        part = self._messages[start:stop]
        deleted = self._deleted
        if uid:
            lines = [f"{n} {m.uid}\r\n" for n, m in enumerate(part, start + 1) if n - 1 not in deleted]
        else:
            lines = [f"{n} {m.size}\r\n" for n, m in enumerate(part, start + 1) if n - 1 not in deleted]
        return "".join(lines).encode("ascii")

    def _cmd_retr(self, args: tuple[bytes, ...]) -> None:
        found = self._message(args[0])
        if found is not None:
            status = responses.ok(f"{found[1].size} octets")
            self._ask(A.StreamMessage(found[1].key, status, None, self._next_key(found[0])))

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
        self._ask(A.StreamMessage(found[1].key, responses.ok(), count, self._next_key(found[0])))

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
            self._forget_replies()
            self._send(responses.ok("Marked to be deleted."))

    def _cmd_noop(self, args: tuple[bytes, ...]) -> None:
        reply = responses.ok()
        self._send(reply)
        self._remember(reply)

    def _cmd_rset(self, args: tuple[bytes, ...]) -> None:
        self._deleted.clear()
        self._forget_replies()
        live = self._live()
        self._send(responses.ok(f"{len(live)} messages ({sum(m.size for _, m in live)} octets)."))

    def _cmd_quit(self, args: tuple[bytes, ...]) -> None:
        """Enter UPDATE: only now are the marked messages removed (RFC 1939 section 6)."""
        self.state = State.UPDATE
        keys = tuple(self._messages[i].key for i in sorted(self._deleted))
        self._ask(A.Commit(keys))
