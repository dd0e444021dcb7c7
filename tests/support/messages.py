"""Deterministic test messages and a Maildir writer.

Every message carries a unique ``X-Test-Id:`` header so a retrieved copy can be
matched to its original regardless of the order in which a server presents the
mailbox.  The bytes are exactly what is written to disk; :func:`expected_wire`
says what a POP3 client must end up with after the server has dot-stuffed and
the client has un-stuffed the message.

Wire semantics (RFC 1939 section 3 + common server practice):

* line endings are CRLF on the wire: a bare LF in the file becomes CRLF;
* a message that lacks a final line ending gets a CRLF appended, because the
  terminating ``CRLF.CRLF`` must start on a line of its own and the client
  cannot tell the added CRLF from message content;
* dot-stuffing is transparent: the client sees ``.hidden``, ``.`` and ``..``
  lines exactly as stored.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "TestMessage",
    "MESSAGES",
    "messages_by_id",
    "expected_wire",
    "test_id_of",
    "write_maildir",
    "make_maildir_dirs",
]

#: Base timestamp for Maildir file names (2023-11-14T22:13:20Z).
BASE_TIME = 1700000000


@dataclass(frozen=True)
class TestMessage:
    """One stored message.  ``raw`` is written to the Maildir verbatim."""

    __test__ = False  # not a pytest test class, despite the name

    test_id: str
    raw: bytes
    description: str

    @property
    def wire(self) -> bytes:
        return expected_wire(self.raw)


def _headers(test_id: str, subject: str, *, nl: bytes = b"\r\n",
             extra: tuple[bytes, ...] = ()) -> bytes:
    lines = [
        b"From: Alice Example <alice@example.test>",
        b"To: Bob Example <bob@example.test>",
        b"Subject: " + subject.encode("ascii"),
        b"Date: Tue, 14 Nov 2023 22:13:20 +0000",
        b"Message-ID: <" + test_id.encode("ascii") + b"@pop3shield.test>",
        b"X-Test-Id: " + test_id.encode("ascii"),
        *extra,
    ]
    return nl.join(lines) + nl + nl  # header block + the empty separator line


def _body(nl: bytes, *lines: bytes) -> bytes:
    return b"".join(line + nl for line in lines)


def _big_body() -> bytes:
    """~1 MiB of deterministic, varied, printable lines (CRLF)."""
    out = []
    size = 0
    n = 0
    while size < 1024 * 1024:
        # vary line length 1..76 and content deterministically
        width = 1 + (n * 37) % 76
        line = (f"{n:06d} " + "".join(chr(33 + (n * 7 + i) % 94) for i in range(width)))
        b = line.encode("ascii")
        if b.startswith(b"."):
            b = b"x" + b
        out.append(b + b"\r\n")
        size += len(b) + 2
        n += 1
    # sprinkle a few dot lines into the big one too, to stress stuffing across buffers
    out.insert(len(out) // 3, b".\r\n")
    out.insert(len(out) // 2, b"..\r\n")
    out.insert(2 * len(out) // 3, b".leading dot deep inside a large message\r\n")
    return b"".join(out)


def _build() -> tuple[TestMessage, ...]:
    crlf, lf = b"\r\n", b"\n"
    msgs = [
        TestMessage(
            "plain-ascii",
            _headers("plain-ascii", "Plain ASCII message")
            + _body(crlf, b"Hello Bob,", b"", b"this is a plain 7-bit ASCII message.",
                    b"", b"-- ", b"Alice"),
            "plain ASCII, CRLF line endings",
        ),
        TestMessage(
            "dot-lines",
            _headers("dot-lines", "Lines starting with dots")
            + _body(crlf, b"The next line starts with a dot:", b".hidden",
                    b"The next line is a single dot:", b".",
                    b"The next line is two dots:", b"..",
                    b"And three:", b"...", b". dot space", b"end"),
            "dot-stuffing cases: '.hidden', '.', '..', '...' (CRLF)",
        ),
        TestMessage(
            "dot-lines-lf",
            _headers("dot-lines-lf", "Dot lines with bare LF", nl=lf)
            + _body(lf, b".", b"..", b".hidden", b"last line"),
            "dot-stuffing cases in a bare-LF file",
        ),
        TestMessage(
            "bare-lf",
            _headers("bare-lf", "Unix line endings", nl=lf)
            + _body(lf, b"This file uses bare LF line endings,", b"as Maildir files",
                    b"written by Unix MTAs usually do.", b"", b"bye"),
            "bare-LF file (server must send CRLF)",
        ),
        TestMessage(
            "no-final-newline",
            _headers("no-final-newline", "No final newline")
            + b"first line\r\nthe last line has no line ending",
            "message whose last line lacks CRLF (server appends CRLF)",
        ),
        TestMessage(
            "utf8-8bit",
            _headers("utf8-8bit", "8-bit body",
                     extra=(b"MIME-Version: 1.0",
                            b"Content-Type: text/plain; charset=utf-8",
                            b"Content-Transfer-Encoding: 8bit"))
            + _body(crlf, "Grüße aus Köln — naïve façade, ½ € ✓".encode("utf-8"),
                    "日本語のテキスト".encode("utf-8"),
                    "Ελληνικά / Русский / עברית".encode("utf-8"),
                    b"raw high bytes: \xc3\xa9\xe2\x82\xac"),
            "8-bit UTF-8 body",
        ),
        TestMessage(
            "empty-body",
            _headers("empty-body", "Empty body"),
            "header block and separator line, no body at all",
        ),
        TestMessage(
            "long-line",
            _headers("long-line", "A very long line")
            + _body(crlf, b"before",
                    # exactly 2000 octets: over RFC 5322's 998 limit, but under
                    # poplib's _MAXLINE (2048 incl. CRLF), which would otherwise
                    # abort with "line too long"
                    b"".join(b"%04dabcdefghijklmnopqrstuvwxyz0123456789" % i
                             for i in range(50)),
                    b"after"),
            "one body line of exactly 2000 octets",
        ),
        TestMessage(
            "large-1mb",
            _headers("large-1mb", "Large message") + _big_body(),
            "~1 MiB message",
        ),
    ]
    ids = [m.test_id for m in msgs]
    assert len(ids) == len(set(ids))
    return tuple(msgs)


#: The standard mailbox content, in the order it is written to the Maildir.
MESSAGES: tuple[TestMessage, ...] = _build()


def messages_by_id(messages=MESSAGES) -> dict[str, TestMessage]:
    return {m.test_id: m for m in messages}


_LINE_END = re.compile(rb"\r\n|\n")


def expected_wire(msg: bytes | TestMessage) -> bytes:
    """What a POP3 client receives for stored *msg*, after un-stuffing.

    Bare LF and CRLF become CRLF (a lone CR is left alone, it is not a line
    end); a missing final line ending is added.  The empty file maps to b"".
    """
    raw = msg.raw if isinstance(msg, TestMessage) else msg
    out = _LINE_END.sub(b"\r\n", raw)
    if out and not out.endswith(b"\r\n"):
        out += b"\r\n"
    return out


_TEST_ID = re.compile(rb"^X-Test-Id:[ \t]*([A-Za-z0-9._-]+)[ \t]*\r?$", re.M | re.I)


def test_id_of(data: bytes) -> str | None:
    """Return the X-Test-Id of a retrieved message (searches the header only)."""
    m = re.search(rb"\r?\n\r?\n", data)
    head = data[: m.start() + 1] if m else data
    found = _TEST_ID.search(head)
    return found.group(1).decode("ascii") if found else None


test_id_of.__test__ = False  # type: ignore[attr-defined]


def make_maildir_dirs(maildir: os.PathLike | str) -> Path:
    path = Path(maildir)
    for sub in ("cur", "new", "tmp"):
        (path / sub).mkdir(parents=True, exist_ok=True)
    return path


def write_maildir(maildir: os.PathLike | str, messages=MESSAGES, *,
                  new_every: int = 3, base_time: int = BASE_TIME) -> list[Path]:
    """Write *messages* into Maildir *maildir* (created if needed).

    Message ``n`` (0-based) gets the unique name ``{base_time+n}.M{n}P1.test``;
    every *new_every*-th message (n % new_every == 0) goes to ``new/`` without
    an info suffix, the others to ``cur/`` with ``:2,`` (no flags), so servers
    must cope with both.  ``new_every=0`` puts everything in ``cur/``.  Time
    stamps increase with n, so servers that order by delivery time (Dovecot)
    or by name present the messages in list order.  File mtimes are set to the
    name's timestamp for the same reason.  Returns the paths written.
    """
    root = make_maildir_dirs(maildir)
    paths = []
    for n, msg in enumerate(messages):
        raw = msg.raw if isinstance(msg, TestMessage) else msg
        ts = base_time + n
        base = f"{ts}.M{n}P1.test"
        if new_every and n % new_every == 0:
            final = root / "new" / base
        else:
            final = root / "cur" / (base + ":2,")
        tmp = root / "tmp" / base
        with open(tmp, "wb") as fh:
            fh.write(raw)
        os.utime(tmp, (ts, ts))
        os.rename(tmp, final)
        paths.append(final)
    return paths
