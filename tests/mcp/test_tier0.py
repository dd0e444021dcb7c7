"""Tier 0: field grammar and byte classes decide ordinary arguments at once."""

from __future__ import annotations

import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pop3shield.mcp import Verdict, quick_check
from pop3shield.mcp.tier0 import SHORT_TEXT, byte_class


@pytest.mark.parametrize(
    ("argument", "field"),
    [
        (b"alice", "username"),
        (b"alice@example.com", "username"),
        (b"correct horse battery", "password"),
        (b"P@ss w0rd!", "password"),
        ("J\u00f6rg M\u00fcller".encode(), "username"),
        ("\u5c71\u7530\u592a\u90ce".encode(), "username"),
        (b"1", "number"),
        (b"123456", "number"),
        (b"0123456789abcdef0123456789ABCDEF", "digest"),
        (b"CRAM-MD5", "mechanism"),
        (b"SCRAM-SHA-256", "mechanism"),
        (b"", "text"),
        (b"RETR", "text"),
    ],
)
def test_ordinary_arguments_are_clean_in_tier0(argument: bytes, field: str) -> None:
    verdict = quick_check(argument, field)
    assert verdict is not None and not verdict.malicious


@pytest.mark.parametrize(
    ("argument", "field", "reason"),
    [
        (b"\x90\x90\x90\x31\xc0\x50\x68", "username", "binary-in-text-field"),
        (b"abc\x00def", "password", "binary-in-text-field"),
        (b"\xeb\x10\x5e\x31\xc9", "text", "binary-in-text-field"),
        (b"12\x90", "number", "binary-in-number-field"),
        (b"9" * 40, "number", "number-grammar"),
        (b"A" * 100, "digest", "digest-grammar"),
        (b"\xff" * 32, "digest", "binary-in-digest-field"),
        (b"PLAIN\x00\x01", "mechanism", "binary-in-mechanism-field"),
        (b"A-" * 30, "mechanism", "mechanism-grammar"),
        (b"QUJD\x90", "base64", "binary-in-base64-field"),
    ],
)
def test_binary_or_overlong_grammar_violations_are_malicious(argument: bytes, field: str, reason: str) -> None:
    verdict = quick_check(argument, field)
    assert verdict == Verdict(True, (reason,))


@pytest.mark.parametrize(("argument", "field"), [(b"abc", "number"), (b"-1", "number"), (b"xyz", "digest")])
def test_short_printable_grammar_mismatch_is_a_syntax_error_not_code(argument: bytes, field: str) -> None:
    assert quick_check(argument, field) == Verdict(False, ("grammar-mismatch",))


def test_long_printable_and_binary_sasl_go_to_tier1() -> None:
    assert quick_check(b"A" * SHORT_TEXT, "password") is None
    assert quick_check(b"x" * 200, "username") is None
    assert quick_check(b"NTLMSSP\x00\x01\x00\x00\x00\x07\x82\x08\xa2", "sasl") is None
    assert quick_check("\u00e9".encode() * 30, "username") is None  # 60 octets of UTF-8


def test_legacy_latin1_text_is_not_decided_as_binary() -> None:
    """An old client's ISO-8859-1 password is handed to tier 1, never flagged in tier 0."""
    assert byte_class("gr\u00f6\u00dfe".encode("latin-1")) == "legacy"
    assert quick_check("schl\u00fcssel2024".encode("latin-1"), "password") is None


def test_byte_classes() -> None:
    assert byte_class(b"plain text") == "ascii"
    assert byte_class("na\u00efve".encode()) == "utf8"
    assert byte_class(b"\x90\x90\xcd\x80") == "binary"
    assert byte_class("tab\tok".encode()) == "ascii"
    assert byte_class(b"bell\x07") == "binary"


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=SHORT_TEXT - 1))
def test_every_short_printable_argument_is_clean(text: str) -> None:
    verdict = quick_check(text.encode(), "password")
    assert verdict is not None and not verdict.malicious


@settings(max_examples=300, deadline=None)
@given(st.binary(min_size=1, max_size=300))
def test_non_utf8_binary_in_text_fields_is_never_clean_in_tier0(data: bytes) -> None:
    """Whatever tier 0 says about arbitrary bytes, it never calls binary harmless."""
    verdict = quick_check(data, "username")
    if byte_class(data) == "binary":
        assert verdict is not None and verdict.malicious
    elif verdict is not None:
        assert not verdict.malicious


def test_tier0_takes_microseconds() -> None:
    """A generous bound (the benchmark measures the real figure, ~1 us)."""
    arguments = [(b"alice@example.com", "username"), (b"s3cret-Pass", "password"), (b"17", "number")] * 2000
    timings = []
    for argument, field in arguments:
        start = time.perf_counter()
        quick_check(argument, field)
        timings.append(time.perf_counter() - start)
    timings.sort()
    assert timings[len(timings) // 2] < 50e-6


def test_overlong_auth_line_ends_are_not_a_mechanism_grammar_violation() -> None:
    """The protocol layer types both ends of an over-long AUTH line as its first field, the
    mechanism: ``PLAIN <initial response>`` and ``AUTH PLAIN <base64>`` are base64 text, which
    only tier 1 can judge; the evaluation saw a harmless 400-octet PLAIN response refused."""
    import base64
    import random

    import generators

    line = b"AUTH PLAIN " + base64.b64encode(generators.dotted_plain_response(random.Random(3), 400))
    assert len(line) > 255
    arguments = generators.overlong_arguments(line)
    assert [field for _, field in arguments] == ["mechanism", "mechanism"]
    assert arguments[0][0].startswith(b"PLAIN ") and arguments[1][0].startswith(b"AUTH PLAIN ")
    for argument, field in arguments:
        assert quick_check(argument, field) is None
    assert quick_check(b"PLAIN dGVzdA==", "mechanism") == Verdict(False, ("short-printable",))
    assert quick_check(b"PLAIN dGVzdA== and more words after it, not base64", "mechanism") == Verdict(True, ("mechanism-grammar",))
