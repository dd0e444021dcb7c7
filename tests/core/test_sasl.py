"""RFC 5034 / RFC 4616 pieces: strict base64 and PLAIN."""

from __future__ import annotations

import base64

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pop3shield.core.sasl import (
    LOGIN_PASSWORD_PROMPT,
    LOGIN_USER_PROMPT,
    PlainCredentials,
    SaslError,
    decode_base64,
    parse_plain,
)


@pytest.mark.parametrize("data, decoded", [
    (b"=", b""),
    (b"", b""),
    (b"AA==", b"\x00"),
    (b"AAA=", b"\x00\x00"),
    (b"AAAA", b"\x00\x00\x00"),
    (b"AGJvYgBzZWNyZXQ=", b"\x00bob\x00secret"),
    (b"+/+/", b"\xfb\xff\xbf"),
])
def test_decode_base64(data: bytes, decoded: bytes) -> None:
    assert decode_base64(data) == decoded


@pytest.mark.parametrize("data", [
    b"AB==",  # non-canonical: the low bits of B are not zero
    b"AAB=",  # non-canonical
    b"AA",  # missing padding
    b"AAA",  # missing padding
    b"AA=",  # short padding
    b"A===",
    b"====",
    b"==",
    b"AA==AA==",  # padding in the middle
    b"AA ==",
    b" AAAA",
    b"AAAA ",
    b"AA\r\nAA",
    b"AA\tAA",
    b"AAAA\n",
    b"AA-_",  # the URL-safe alphabet
    b"AAA\x00",
    b"*",
    b"==AA",
    b"A",
    "AAA\u00e9".encode(),
])
def test_decode_base64_rejects(data: bytes) -> None:
    with pytest.raises(SaslError):
        decode_base64(data)


def test_sasl_error_is_a_value_error() -> None:
    assert issubclass(SaslError, ValueError)


@given(st.binary(max_size=200))
@settings(max_examples=200, deadline=None)
def test_round_trip(data: bytes) -> None:
    assert decode_base64(base64.b64encode(data)) == data


@given(st.binary(max_size=60))
@settings(max_examples=300, deadline=None)
def test_strict_decoder_never_raises_anything_else(data: bytes) -> None:
    try:
        decoded = decode_base64(data)
    except SaslError:
        return
    assert data == b"=" or base64.b64encode(decoded) == data


def test_login_prompts() -> None:
    assert base64.b64decode(LOGIN_USER_PROMPT) == b"Username:"
    assert base64.b64decode(LOGIN_PASSWORD_PROMPT) == b"Password:"


@pytest.mark.parametrize("message, creds", [
    (b"\x00bob\x00secret", PlainCredentials(b"", b"bob", b"secret")),
    (b"bob\x00bob\x00secret", PlainCredentials(b"bob", b"bob", b"secret")),
    (b"\x00bob\x00pass with spaces", PlainCredentials(b"", b"bob", b"pass with spaces")),
    (b"\x00\x00", PlainCredentials(b"", b"", b"")),  # empty parts are the session's business
    (b"\x00bob\x00", PlainCredentials(b"", b"bob", b"")),
    (b"\x00\x00secret", PlainCredentials(b"", b"", b"secret")),
    # an authzid with an empty or blank authcid is an empty user name, not proxy authorization
    (b"admin\x00\x00secret", PlainCredentials(b"admin", b"", b"secret")),
    (b"admin\x00  \x00secret", PlainCredentials(b"admin", b"  ", b"secret")),
    (b"admin\x00\x00", PlainCredentials(b"admin", b"", b"")),
])
def test_parse_plain(message: bytes, creds: PlainCredentials) -> None:
    assert parse_plain(message) == creds


@pytest.mark.parametrize("message", [
    b"", b"bob", b"bob\x00secret", b"\x00bob\x00secret\x00", b"\x00bob\x00sec\x00ret", b"\x00\x00\x00",
    b"admin\x00bob\x00secret",  # proxy authorization
    b"BOB\x00bob\x00secret",
])
def test_parse_plain_rejects(message: bytes) -> None:
    with pytest.raises(SaslError):
        parse_plain(message)
