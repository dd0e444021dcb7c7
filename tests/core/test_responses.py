"""Byte-exact responses: the 512-octet first line, CRLF, no injection, dot-stuffing."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pop3shield.core import responses
from pop3shield.core.responses import MAX_STATUS, continuation, err, multiline, ok, status


def test_plain_status_lines() -> None:
    assert ok() == b"+OK\r\n"
    assert ok("Logged in.") == b"+OK Logged in.\r\n"
    assert err() == b"-ERR\r\n"
    assert err("Unknown command.") == b"-ERR Unknown command.\r\n"
    assert err("Authentication failed.", "AUTH") == b"-ERR [AUTH] Authentication failed.\r\n"
    assert err("Try later.", "SYS/TEMP") == b"-ERR [SYS/TEMP] Try later.\r\n"
    assert ok("x", "IN-USE") == b"+OK [IN-USE] x\r\n"
    assert status(True, "a") == b"+OK a\r\n"
    assert status(False, "", "AUTH") == b"-ERR [AUTH]\r\n"


def test_max_status_is_512() -> None:
    assert MAX_STATUS == 512


@pytest.mark.parametrize("size", [0, 1, 500, 505, 506, 507, 508, 509, 510, 511, 512, 513, 1000, 100000])
def test_status_is_at_most_512_octets(size: int) -> None:
    for line in (ok("x" * size), err("y" * size), err("z" * size, "SYS/TEMP"), err("a", "C" * size)):
        assert len(line) <= 512
        assert line.endswith(b"\r\n")
        assert line.count(b"\r\n") == 1
        assert b"\r" not in line[:-2] and b"\n" not in line[:-2]


def test_exactly_512() -> None:
    line = ok("x" * 600)
    assert len(line) == 512
    assert line == b"+OK " + b"x" * 506 + b"\r\n"


@pytest.mark.parametrize("text", [
    "bad\r\n+OK forged", "bad\n.\r\n", "bad\rx", "nul\x00", "tab\tx", "del\x7f", "caf\u00e9", "\u2028x",
    "\r\n" * 300,
])
def test_no_cr_lf_or_non_ascii_from_text(text: str) -> None:
    for line in (ok(text), err(text), err("x", text)):
        body = line[:-2]
        assert line.endswith(b"\r\n")
        assert b"\r" not in body and b"\n" not in body
        assert all(0x20 <= b < 0x7F for b in body)


@given(st.booleans(), st.text(max_size=700), st.one_of(st.none(), st.text(max_size=30)))
@settings(max_examples=300, deadline=None)
def test_status_property(is_ok: bool, text: str, code: str | None) -> None:
    line = status(is_ok, text, code)
    assert line.startswith(b"+OK" if is_ok else b"-ERR")
    assert line.endswith(b"\r\n")
    assert len(line) <= 512
    assert line.count(b"\n") == 1 and line.count(b"\r") == 1
    assert all(0x20 <= b < 0x7F for b in line[:-2])


def test_multiline_dot_stuffing() -> None:
    assert multiline(ok("Follows."), [b"CAPA", b".hidden", b"..two", b"", b"a.b"]) == (
        b"+OK Follows.\r\nCAPA\r\n..hidden\r\n...two\r\n\r\na.b\r\n.\r\n")


def test_multiline_empty() -> None:
    assert multiline(ok("0 messages."), []) == b"+OK 0 messages.\r\n.\r\n"


def test_multiline_single_dot_line_is_not_a_terminator() -> None:
    data = multiline(ok(), [b"."])
    assert data == b"+OK\r\n..\r\n.\r\n"
    assert data.count(b"\r\n.\r\n") == 1 and data.endswith(b"\r\n.\r\n")


@given(st.lists(st.binary(max_size=30).filter(lambda b: b"\r" not in b and b"\n" not in b), max_size=20))
@settings(max_examples=200, deadline=None)
def test_multiline_round_trip(lines: list[bytes]) -> None:
    data = multiline(ok(), lines)
    assert data.startswith(b"+OK\r\n") and data.endswith(b".\r\n")
    body = data[len(b"+OK\r\n"):].split(b"\r\n")
    assert body[-1] == b"" and body[-2] == b"."
    decoded = [line[1:] if line.startswith(b".") else line for line in body[:-2]]
    assert decoded == lines
    assert all(line != b"." for line in body[:-2])


def test_continuation() -> None:
    assert continuation() == b"+ \r\n"
    assert continuation(b"VXNlcm5hbWU6") == b"+ VXNlcm5hbWU6\r\n"


def test_crlf_constant() -> None:
    assert responses.CRLF == b"\r\n"


@given(st.text(max_size=40))
def test_status_text_is_printable_ascii_whatever_the_input(text: str) -> None:
    """The fast path for printable ASCII gives what the per-character filter gives."""
    expected = "".join(c if 0x20 <= ord(c) < 0x7F else "?" for c in text).encode("ascii")
    assert responses._clean(text) == expected
