"""Byte-exact POP3 responses.

Every status line goes through :func:`status` so that no response can exceed RFC 2449's
512-octet limit or carry a CR/LF that would let input forge a second response line.
"""

from __future__ import annotations

from collections.abc import Iterable

MAX_STATUS = 512
CRLF = b"\r\n"


def _clean(text: str) -> bytes:
    """Printable ASCII only: response text never echoes raw client bytes."""
    if text.isascii() and text.isprintable():  # the usual case, without a look at each character
        return text.encode("ascii")
    return "".join(c if 0x20 <= ord(c) < 0x7F else "?" for c in text).encode("ascii")


def status(ok: bool, text: str = "", code: str | None = None) -> bytes:
    """``+OK text`` or ``-ERR [CODE] text``, CRLF-terminated, at most 512 octets."""
    line = b"+OK" if ok else b"-ERR"
    if code:
        line += b" [" + _clean(code) + b"]"
    if text:
        line += b" " + _clean(text)
    return line[: MAX_STATUS - 2] + CRLF


def ok(text: str = "", code: str | None = None) -> bytes:
    return status(True, text, code)


def err(text: str = "", code: str | None = None) -> bytes:
    return status(False, text, code)


def multiline(first: bytes, lines: Iterable[bytes]) -> bytes:
    """A status line followed by dot-stuffed lines and the terminating ``.``.

    The status line of a multi-line response carries no ``.`` at all: nmap's POP3 library reads
    a CAPA answer up to the first ``.`` it sees, so a period in ``+OK ...`` hides the whole list.
    """
    body = []
    for line in lines:
        body.append(b"." + line if line.startswith(b".") else line)
        body.append(CRLF)
    return first + b"".join(body) + b"." + CRLF


def continuation(data: bytes = b"") -> bytes:
    """An RFC 5034 server challenge line ``+ base64``."""
    return b"+ " + data + CRLF
